"""LLM: the offline Python API, mirroring vLLM's (`from herd import LLM, SamplingParams`)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from herd.config import EngineConfig
from herd.engine.llm_engine import LLMEngine
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import apply_chat_template
from herd.multimodal.chat import extract_chat_images
from herd.multimodal.media import MediaConnector


class LLM:
    """LLM(model=path, dtype=..., max_model_len=..., tensor_parallel_size=..., quantization=...,
    kv_cache_dtype=..., block_size=..., gpu_memory_utilization=..., num_kv_blocks=...,
    max_num_seqs=..., max_num_batched_tokens=..., enable_prefix_caching=..., seed=...).

    Image URLs in chat messages: data: URLs always; file:// under `allowed_local_media_path`;
    http(s) only with `allow_remote_media=True` (public addresses only)."""

    def __init__(self, model: str | None = None, **kwargs):
        kwargs.pop("trust_remote_code", None)  # accepted for vLLM compatibility; nothing remote runs
        self.media = MediaConnector(allowed_local_media_path=kwargs.pop("allowed_local_media_path", None) or None,
                                    allow_remote=bool(kwargs.pop("allow_remote_media", False)))
        self.config = EngineConfig.from_kwargs(model or default_model_path(), **kwargs)
        self.llm_engine = LLMEngine(self.config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SequenceABC):
            if len(sampling_params) != len(prompts):
                raise ValueError("the lengths of prompts and sampling_params must be the same")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of dicts) or a list of conversations. Image parts
        ({"type": "image_url", "image_url": {"url": ...}} or {"type": "image_pil", "image_pil": img})
        become <|image|> in the template and go to the model as multi_modal_data."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            conv, images = extract_chat_images(conv, self.media.load_image)
            prompt = {"prompt_token_ids": apply_chat_template(
                self.llm_engine.tokenizer, conv, add_generation_prompt=add_generation_prompt, tools=tools,
                chat_template=chat_template, continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}))}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        for prompt, p in zip(prompts, params):
            rid = str(next(self._counter))
            engine.add_request(rid, prompt, p)
            ids.append(rid)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, leave=False)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:  # on an exception, leave nothing half-done in the engine
                engine.abort_request(rid)
        return [finished[rid] for rid in ids]
