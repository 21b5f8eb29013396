"""`python -m herd.entrypoints.openai.api_server`: vLLM's module path of the OpenAI server."""
