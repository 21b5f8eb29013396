"""LLMEngine: the step loop. add_request -> step() (schedule, run, sample, detokenize, stop) -> outputs."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from herd.config import EngineConfig
from herd.engine.block_manager import BlockManager
from herd.engine.outputs import CompletionOutput, RequestOutput
from herd.engine.sampler import make_generator
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import Scheduler
from herd.engine.sequence import Sequence, SequenceStatus
from herd.engine.tokenizer import (IncrementalDetokenizer, decode_logprob_tokens, get_tokenizer,
                                   load_generation_config)
from herd.multimodal.inputs import MultiModalInputs
from herd.multimodal.processing import MultiModalProcessor

logger = logging.getLogger(__name__)

# Fields of generation_config.json that become default sampling parameters (vLLM "auto" mode).
_GEN_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class PromptTooLongError(ValueError):
    def __init__(self, message: str, prompt_len: int, max_model_len: int):
        super().__init__(message)
        self.prompt_len, self.max_model_len = prompt_len, max_model_len


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    free_blocks: dict


class LLMEngine:
    def __init__(self, config: EngineConfig, executor=None):
        self.config = config
        mc = config.model
        torch.manual_seed(mc.seed)
        self.tokenizer = get_tokenizer(mc.tokenizer)
        self.generation_config = load_generation_config(mc.model)
        self.mm_processor = self._make_mm_processor()
        self.vocab_size = mc.hf_config.vocab_size
        self.max_model_len = mc.max_model_len
        if executor is None:
            from herd.parallel.executor import make_executor
            executor = make_executor(config)
        self.executor = executor
        num_blocks = executor.determine_num_blocks()
        executor.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.block_manager = BlockManager(config.cache.block_size, num_blocks,
                                          mc.hf_config.attention_chunk_size, config.cache.enable_prefix_caching)
        # One max_model_len sequence alone must always progress at the chunk sizes the scheduler
        # uses: it caps a step at what the pools can hold (BlockManager.max_chunk_tokens), so with
        # chunked prefill the local group needs only one chunk window; without it, whole prompts.
        sc = config.scheduler
        need = self.block_manager.min_blocks_to_progress(self.max_model_len, sc.enable_chunked_prefill)
        short = {g: (need[g], n) for g, n in num_blocks.items() if n < need[g]}
        if short:
            executor.shutdown()
            raise ValueError(f"the KV cache is too small for one sequence of max_model_len={self.max_model_len}"
                             f"{'' if sc.enable_chunked_prefill else ' without chunked prefill'}: "
                             f"(needed, available) blocks per group {short}; lower max_model_len or give "
                             "the cache more memory")
        step = min(sc.max_num_batched_tokens, self.max_model_len)
        full_step = self.block_manager.min_blocks_to_progress(step, chunked_prefill=False)
        small = {g: (full_step[g], n) for g, n in num_blocks.items() if n < full_step[g]}
        if small:
            logger.warning("the KV cache cannot hold a full prefill chunk of %d tokens ((needed, available) "
                           "blocks per group %s): long prompts are prefilled in smaller chunks", step, small)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, RequestState] = {}
        self._seq_counter = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info("KV cache: %s blocks of %d tokens", num_blocks, config.cache.block_size)

    def check_health(self):
        """Raise if a part of the engine (a tensor-parallel worker) is gone."""
        self.executor.check_health()

    def shutdown(self):
        """Stop the executor's ranks (idempotent); returns the files their runners wrote on the way
        out (INC MEASURE)."""
        return self.executor.shutdown()

    # -- requests ---------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied."""
        return SamplingParams(**{k: self.generation_config[k] for k in _GEN_DEFAULTS
                                 if self.generation_config.get(k) is not None})

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    # -- image input ------------------------------------------------------------------------
    def _make_mm_processor(self) -> MultiModalProcessor | None:
        """Image input needs a checkpoint with a vision tower and a tokenizer with the image tokens."""
        mc = self.config.model
        raw = mc.hf_config.raw
        if not mc.hf_config.multimodal or raw.get("vision_config") is None:
            return None
        try:
            return MultiModalProcessor.from_pretrained(mc.model, self.tokenizer, raw)
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

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = (params or self.default_sampling_params()).clone()
        text, prompt_ids, mm = self.process_prompt(prompt, params)
        params.verify(self.vocab_size, self.config.model.max_logprobs)
        params.update_from_generation_config(self.generation_config, self.tokenizer.eos_token_id)
        params.update_from_tokenizer(self.tokenizer)
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
        arrival = arrival_time or time.time()
        seqs = []
        for i in range(params.n):
            child = params.for_child(i) if params.n > 1 else params
            seq = Sequence(next(self._seq_counter), request_id, i, list(prompt_ids), child, arrival,
                           multi_modal=mm)
            if child.seed is not None:
                seq.generator = make_generator(child.seed, self.executor.device)
            seq.detokenizer = IncrementalDetokenizer.from_params(self.tokenizer, prompt_ids, child)
            if child.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(prompt_ids)
        state = RequestState(request_id, text, list(prompt_ids), params, seqs, arrival)
        self.requests[request_id] = state
        return state

    def abort_request(self, request_id: str) -> bool:
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        out = self.executor.execute(batch)
        self.scheduler.tracker.commit(batch.output)
        now = time.time()
        touched: dict[str, RequestState] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            old = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.block_manager.cache_blocks(seq, old, seq.num_computed_tokens)
            if out.prompt_logprobs[i]:
                decode_logprob_tokens(self.tokenizer, out.prompt_logprobs[i])
                seq.prompt_logprobs.extend(out.prompt_logprobs[i])
            token = out.sampled[i]
            if token is not None:
                self._append_token(seq, token, out.logprobs[i], now)
            state = self.requests.get(seq.request_id)
            if state is not None:
                touched[seq.request_id] = state
        outputs = []
        for rid, state in touched.items():
            outputs.append(self.make_output(state))
            if state.finished:
                del self.requests[rid]
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float):
        p = seq.params
        seq.output_token_ids.append(token)
        self.generation_tokens_total += 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if logprobs is not None:
            decode_logprob_tokens(self.tokenizer, [logprobs])
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        status, stop_token = None, False
        if len(seq.output_token_ids) >= p.min_tokens:
            if p.eos_token_id is not None and token == p.eos_token_id:
                status, stop_token = SequenceStatus.FINISHED_STOPPED, True
            elif token in p.stop_token_ids:
                status, stop_token, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, True, token
        length = len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        stop_str = seq.detokenizer.update([token], stop_terminated=stop_token,
                                          finished=status is not None or length)
        seq.output_text = seq.detokenizer.output_text
        if stop_str is not None:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
        elif status is None and length:
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            m.finished_time = now
            self.scheduler.finish(seq, status)

    def make_output(self, state: RequestState) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=s.output_text, token_ids=list(s.output_token_ids),
                                 cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                 logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for s in state.seqs]
        first = state.seqs[0]
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, prompt_logprobs=first.prompt_logprobs,
                             outputs=outs, finished=state.finished, metrics=dataclasses.replace(first.metrics),
                             num_cached_tokens=first.num_cached_tokens)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_cache_usage=self.block_manager.usage(),
                           num_preemptions=self.scheduler.num_preemptions,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           free_blocks=self.block_manager.num_free_blocks())
