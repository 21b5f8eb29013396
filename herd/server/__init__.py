"""OpenAI-compatible HTTP server (`herd serve`): see docs/serving.md."""
