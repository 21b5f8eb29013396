"""InputProcessor: a prompt -> checked token ids (and preprocessed images), before any engine work.

The in-process engine (LLMEngine) is one; an API server in front of engine core processes has its
own, so tokenizing, chat templates and image preprocessing run there, and the engine core only
re-checks the ids it receives (cheap).
"""
from __future__ import annotations

import logging

from herd.config import EngineConfig
from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import get_tokenizer
from herd.multimodal.inputs import MultiModalInputs
from herd.multimodal.processing import MultiModalProcessor

logger = logging.getLogger(__name__)

# Fields of generation_config.json that become default sampling parameters (vLLM "auto" mode).
_GEN_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class PromptTooLongError(ValueError):
    def __init__(self, message: str, prompt_len: int, max_model_len: int):
        super().__init__(message)
        self.prompt_len, self.max_model_len = prompt_len, max_model_len


class InputProcessor:
    def __init__(self, config: EngineConfig):
        mc = config.model
        self.config = config
        self.tokenizer = get_tokenizer(mc.tokenizer)
        self._warned_double_bos = False  # the duplicate-BOS warning is given once per engine
        self.generation_config = mc.generation_defaults()  # --generation-config, --override-generation-config
        self.mm_processor = self._make_mm_processor()
        self.vocab_size = mc.hf_config.vocab_size
        self.max_model_len = mc.max_model_len
        self.num_blocks: dict[str, int] = {}   # KV blocks per group, once an engine sized its cache

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied."""
        return SamplingParams(**{k: self.generation_config[k] for k in _GEN_DEFAULTS
                                 if self.generation_config.get(k) is not None})

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self._encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    def _encode(self, text: str) -> list[int]:
        """Encode with the tokenizer's special tokens. Text that already starts with the BOS token
        (a chat-templated string) then gets a second one; it is kept, as in vLLM, with a warning."""
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos] and not self._warned_double_bos:
            self._warned_double_bos = True
            logger.warning("the prompt starts with two BOS tokens (%s): its text begins with one, e.g. from a "
                           "chat template, and the tokenizer added another. Pass the messages to LLM.chat, or "
                           "the templated prompt as {'prompt_token_ids': ...}. (Shown once.)",
                           self.tokenizer.bos_token)
        return ids

    # -- image input ------------------------------------------------------------------------
    def _make_mm_processor(self) -> MultiModalProcessor | None:
        """Image input needs a checkpoint with a vision tower and a tokenizer with the image tokens."""
        mc = self.config.model
        raw = mc.hf_config.raw
        if not mc.hf_config.multimodal or raw.get("vision_config") is None:
            return None
        try:
            return MultiModalProcessor.from_pretrained(mc.model, self.tokenizer, raw,
                                                       (mc.limit_mm_per_prompt or {}).get("image"))
        except ValueError as e:
            logger.warning("image input is disabled: %s", e)
            return None

    def process_prompt(self, prompt, params: SamplingParams) -> tuple[str | None, list[int],
                                                                       MultiModalInputs | None]:
        """Tokenize and validate a prompt; with `multi_modal_data` also expand its <|image|>
        placeholders and preprocess the images (CPU work that callers may run off the engine thread).
        The result can be resubmitted as {"prompt": text, "prompt_token_ids": ids,
        "multi_modal_inputs": mm}, which add_request then only validates."""
        text, ids = self.tokenize_prompt(prompt)
        if params.truncate_prompt_tokens is not None:  # the last k tokens; -1: as many as leave room
            k = self.max_model_len - 1 if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
            ids = ids[-k:]
        mm = None
        if isinstance(prompt, dict) and prompt.get("multi_modal_inputs") is not None:
            mm = prompt["multi_modal_inputs"]
            if self.mm_processor is None:
                raise ValueError("this model does not accept image input")
            if not isinstance(mm, MultiModalInputs):
                raise TypeError("multi_modal_inputs must come from LLMEngine.process_prompt")
            mm.validate(ids, self.mm_processor.ids.patch)
        elif isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            ids, mm = self._process_images(ids, prompt["multi_modal_data"], params)
        self.check_prompt(ids, params)
        return text, ids, mm

    def _process_images(self, ids: list[int], data, params: SamplingParams):
        if self.mm_processor is None:
            raise ValueError("this model does not accept image input (no vision tower, or its tokenizer "
                             "lacks the image tokens)")
        if not isinstance(data, dict):
            raise ValueError("multi_modal_data must be a dict like {'image': image or [images]}")
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise ValueError(f"unsupported multi_modal_data keys {unknown}: only 'image' is supported")
        images = data.get("image")
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return ids, None
        return self.mm_processor.process(ids, images, check=lambda expanded: self.check_prompt(expanded, params))

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams):
        if not prompt_ids:
            raise ValueError("The decoder prompt cannot be empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocab size {self.vocab_size})")
        n, L = len(prompt_ids), self.max_model_len
        if n >= L:
            raise PromptTooLongError(
                f"The decoder prompt (length {n}) is longer than the maximum model length of {L}. "
                "Make sure that `max_model_len` is no smaller than the number of text tokens.", n, L)
