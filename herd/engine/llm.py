"""LLM: the offline Python API, mirroring vLLM's (`from herd import LLM, SamplingParams`)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from dataclasses import fields

from tqdm import tqdm

from herd.engine.arg_utils import EngineArgs
from herd.engine.llm_engine import LLMEngine
from herd.engine.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from herd.engine.sampling_params import BeamSearchParams, SamplingParams
from herd.engine.tokenizer import apply_chat_template, get_eos_token_ids
from herd.multimodal.chat import extract_chat_images, prepare_tool_messages, resolve_chat_template
from herd.multimodal.media import MediaConnector
from herd.parallel.mp_executor import check_not_spawn_reimport


class LLM:
    """LLM(model, **engine_args): every EngineArgs keyword (herd.engine.arg_utils, the same as the
    CLI's flags: dtype, max_model_len, tensor_parallel_size, quantization, kv_cache_dtype,
    block_size, gpu_memory_utilization, num_kv_blocks / num_gpu_blocks_override, enforce_eager,
    limit_mm_per_prompt, generation_config, swap_space, ...). `model`: a folder, a .gguf file, a
    short name or a Hugging Face repo id (from the local cache).

    Image URLs in chat messages: data: URLs always; file:// under `allowed_local_media_path`;
    http(s) only with `allow_remote_media=True` (public addresses only)."""

    def __init__(self, model: str | None = None, **kwargs):
        check_not_spawn_reimport()  # in a tensor-parallel worker importing the user's script: explain, exit
        self.media = MediaConnector(allowed_local_media_path=kwargs.pop("allowed_local_media_path", None) or None,
                                    allow_remote=bool(kwargs.pop("allow_remote_media", False)))
        known = {f.name for f in fields(EngineArgs)}
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}  # other EngineConfig fields
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.config = self.engine_args.create_engine_config(**extra)
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
        become <|image|> in the template and go to the model as multi_modal_data. `tools` (OpenAI
        function tools) and earlier tool calls / results go through the template; `chat_template`
        may name a shipped one ("llama4_pythonic", "llama4_json"), a file, or be Jinja text."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            conv, images = extract_chat_images(prepare_tool_messages(conv), self.media.load_image)
            prompt = {"prompt_token_ids": apply_chat_template(
                self.llm_engine.tokenizer, conv, add_generation_prompt=add_generation_prompt, tools=tools,
                chat_template=resolve_chat_template(chat_template), continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}))}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search on top of generate(): each step asks every live beam for its
        2 * beam_width most likely next tokens (one-token requests whose prompts the prefix cache
        mostly holds), keeps the beam_width best candidates per prompt by
        cum_logprob / len ** length_penalty (len counts the prompt, not a final EOS), and sets
        aside those ending in EOS (unless ignore_eos) or reaching max_model_len."""
        engine, tok = self.llm_engine, self.llm_engine.tokenizer
        width, limit = params.beam_width, engine.max_model_len
        eos = set() if params.ignore_eos else get_eos_token_ids(self.config.model.model, tok)
        step = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * width,
                              ignore_eos=True, detokenize=False)

        def score(b: BeamSearchSequence) -> float:
            n = len(b.tokens) - (1 if b.tokens[-1] in eos else 0)
            return b.cum_logprob / (n ** params.length_penalty)

        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        starts = []
        for p in prompts:
            if isinstance(p, dict) and p.get("multi_modal_data"):
                raise ValueError("beam_search takes text or token prompts, not images")
            starts.append(engine.tokenize_prompt(p)[1])
        live = [[BeamSearchSequence(tokens=list(ids), logprobs=[])] for ids in starts]
        done: list[list[BeamSearchSequence]] = [[] for _ in starts]
        for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm, leave=False):
            flat = [(i, b) for i, beams in enumerate(live) for b in beams]
            if not flat:
                break
            outs = self.generate([{"prompt_token_ids": b.tokens} for _, b in flat], step, use_tqdm=False)
            grown: list[list[BeamSearchSequence]] = [[] for _ in starts]
            for (i, beam), out in zip(flat, outs):
                top = out.outputs[0].logprobs[0]
                for token, lp in top.items():
                    new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top],
                                             beam.cum_logprob + lp.logprob)
                    if token in eos:
                        new.finish_reason, new.stop_reason = "stop", token
                        done[i].append(new)
                    elif len(new.tokens) >= limit:  # no room for another token
                        new.finish_reason = "length"
                        done[i].append(new)
                    else:
                        grown[i].append(new)
            live = [sorted(g, key=score, reverse=True)[:width] for g in grown]
        results = []
        for finished, beams in zip(done, live):
            for b in beams:
                b.finish_reason = "length"
            best = sorted(finished + beams, key=score, reverse=True)[:width]
            for b in best:
                b.text = tok.decode(b.tokens)
            results.append(BeamSearchOutput(sequences=best))
        return results

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
