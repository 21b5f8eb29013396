"""LLMEngine: the step loop. add_request -> step() (schedule, run, sample, token stops) -> outputs;
text and stop strings come from the OutputProcessor (herd/engine/output_processor.py).

With async scheduling step() keeps one step queued on a device thread: step N+1 is scheduled and
started before step N's outputs are applied (herd/engine/scheduler.py says when it cannot be)."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from herd.config import EngineConfig
from herd.engine.block_manager import BlockManager
from herd.engine.input_processor import InputProcessor, PromptTooLongError  # noqa: F401 (re-export)
from herd.engine.output_processor import EngineCoreOutput, OutputProcessor, SeqOutput
from herd.engine.outputs import RequestOutput
from herd.engine.sampler import make_generator
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import ScheduledBatch, Scheduler
from herd.engine.sequence import Sequence, SequenceStatus
from herd.engine.tokenizer import get_eos_token_ids
from herd.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

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
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class LLMEngine(InputProcessor):
    def __init__(self, config: EngineConfig, executor=None, process_outputs: bool = True):
        mc = config.model
        torch.manual_seed(mc.seed)
        super().__init__(config)  # tokenizer, generation config, image processor, prompt checks
        # text and stop strings; None in an engine core process (its API server does them)
        self.output_processor = OutputProcessor(self.tokenizer) if process_outputs else None
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size,
                                                         get_eos_token_ids(mc.model, self.tokenizer),
                                                         mc.structured_outputs_config)
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
        self.iteration_tokens: dict[int, int] = {}  # tokens computed in a step -> steps (metrics)
        self.async_scheduling = sc.async_scheduling
        if self.async_scheduling and config.parallel.tensor_parallel_size > 1:
            # the other ranks would need each step's samples before the next one: not done yet
            logger.warning("async scheduling is not supported with tensor_parallel_size > 1; "
                           "scheduling synchronously")
            self.async_scheduling = False
        self._pending: deque = deque()   # (batch, future) of steps on the device thread, oldest first
        self._device: ThreadPoolExecutor | None = None
        logger.info("KV cache: %s blocks of %d tokens", num_blocks, config.cache.block_size)

    def check_health(self):
        """Raise if a part of the engine (a tensor-parallel worker) is gone."""
        self.executor.check_health()

    def shutdown(self):
        """Stop the executor's ranks (idempotent); returns the files their runners wrote on the way
        out (INC MEASURE)."""
        self._drain()
        if self._device is not None:
            self._device.shutdown(wait=True)
            self._device = None
        self.structured_output.shutdown()
        return self.executor.shutdown()

    # -- requests ---------------------------------------------------------------------------
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
        grammar = self.structured_output.compile(params)  # before any sequence is queued: may raise
        arrival = arrival_time or time.time()
        seqs = []
        for i in range(params.n):
            child = params.for_child(i) if params.n > 1 else params
            if grammar is not None:  # each sample walks the grammar on its own
                child.structured_output_request = self.structured_output.new_request(grammar)
            seq = Sequence(next(self._seq_counter), request_id, i, list(prompt_ids), child, arrival,
                           multi_modal=mm)
            if child.seed is not None:
                seq.generator = make_generator(child.seed, self.executor.device)
            if child.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(prompt_ids)
        state = RequestState(request_id, text, list(prompt_ids), params, seqs, arrival)
        self.requests[request_id] = state
        if self.output_processor is not None:
            self.output_processor.add_request(request_id, text, prompt_ids, params, arrival)
        return state

    def abort_request(self, request_id: str) -> bool:
        if self.output_processor is not None:
            self.output_processor.abort_request(request_id)
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._pending)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.async_scheduling:
            return self._step_async()
        batch = self.schedule()
        if not batch.seqs:
            return []
        try:
            out = self.executor.execute(batch)
        except BaseException:
            self.scheduler.discard(batch)
            raise
        return self._process(batch, out)

    def _process(self, batch: ScheduledBatch, out) -> list[RequestOutput]:
        outputs, stops = self.output_processor.process_outputs(self.update_from_output(batch, out))
        for request_id, index, stop_str in stops:  # stop strings the output processor found
            self.finish_sequence(request_id, index, stop_str)
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        """Step N's outputs, with step N+1 scheduled and queued behind it on the device before N's
        samples are known (when it can be: otherwise the next call schedules it synchronously)."""
        if self._device is None:
            self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-device")
        try:
            if not self._pending:
                batch = self.schedule()
                if not batch.seqs:
                    return []
                self._pending.append((batch, self._device.submit(self.executor.execute, batch)))
            if len(self._pending) == 1:
                ahead = self.schedule()
                if ahead.seqs:
                    self._pending.append((ahead, self._device.submit(self.executor.execute, ahead)))
            batch, future = self._pending.popleft()
            try:
                out = future.result()
            except BaseException:
                self.scheduler.discard(batch)
                raise
            outputs = self._process(batch, out)
        except BaseException:
            self._drain()  # nothing may run on the device while the caller recovers (probe step)
            raise
        if not self.requests:
            self._drain(apply=True)  # a step queued for sequences that have all finished since
        return outputs

    def _drain(self, apply: bool = False):
        """Wait for the queued steps; apply their outputs (apply=True: every sequence in them has
        finished, so nothing is reported) or forget them (a step failed before them)."""
        while self._pending:
            batch, future = self._pending.popleft()
            try:
                out = future.result()
            except BaseException as e:
                out = None
                if apply:  # nobody waits for this step's outputs: say it failed
                    logger.warning("a step whose sequences had all finished failed: %r", e)
            if apply and out is not None:
                self.update_from_output(batch, out)
            else:
                self.scheduler.discard(batch)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch (an engine core process runs it on its device thread)."""
        batch = self.scheduler.schedule()
        if batch.seqs and self.structured_output.live:  # bitmasks fill while the forward runs
            self.structured_output.prepare_step(batch.seqs, batch.num_tokens)
        return batch

    def update_from_output(self, batch: ScheduledBatch, out) -> list[EngineCoreOutput]:
        """Apply a step's results (computed tokens, prefix-cache blocks, sampled tokens, token-level
        stops); returns the news of every request the step touched. Sequences that finished while
        the step ran (aborted meanwhile) are skipped."""
        total = batch.total_tokens
        self.iteration_tokens[total] = self.iteration_tokens.get(total, 0) + 1
        self.scheduler.update_from_output(batch)
        self.scheduler.tracker.commit(batch.output)
        now = time.time()
        touched: dict[str, EngineCoreOutput] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            if seq.is_finished:
                continue
            old = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.block_manager.cache_blocks(seq, old, seq.num_computed_tokens)
            news = None
            if seq.request_id in self.requests:
                news = touched.get(seq.request_id)
                if news is None:
                    news = touched[seq.request_id] = EngineCoreOutput(seq.request_id, [])
            if out.prompt_logprobs[i]:
                seq.prompt_logprobs.extend(out.prompt_logprobs[i])
                if news is not None and seq.index == 0:
                    news.new_prompt_logprobs = out.prompt_logprobs[i]
            token = out.sampled[i]
            if token is not None:
                lp = out.logprobs[i]
                stop_token = self._append_token(seq, token, lp, now)
                if news is not None:
                    news.seqs.append(SeqOutput(
                        seq.index, [token], None if lp is None else [lp],
                        seq.cumulative_logprob if seq.logprobs is not None else None,
                        seq.finish_reason, seq.stop_reason if seq.is_finished else None, stop_token))
        for rid, news in touched.items():
            state = self.requests[rid]
            first = state.seqs[0]
            news.metrics = first.metrics.snapshot()
            news.num_cached_tokens = first.num_cached_tokens
            news.finished = state.finished
            if news.finished:
                del self.requests[rid]
        return list(touched.values())

    def finish_sequence(self, request_id: str, index: int, stop_reason) -> None:
        """End one sequence that the output processor stopped (a stop string)."""
        state = self.requests.get(request_id)
        if state is None:
            return
        seq = state.seqs[index]
        if not seq.is_finished:
            seq.stop_reason = stop_reason
            seq.metrics.finished_time = seq.metrics.last_token_time
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if state.finished:
            del self.requests[request_id]

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float):
        p = seq.params
        seq.output_token_ids.append(token)
        self.generation_tokens_total += 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        status, stop_token = None, False
        if len(seq.output_token_ids) >= p.min_tokens:
            if p.eos_token_id is not None and token == p.eos_token_id:
                status, stop_token = SequenceStatus.FINISHED_STOPPED, True
            elif token in p.stop_token_ids:
                status, stop_token, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, True, token
        grammar = p.structured_output_request
        if status is None and grammar is not None and grammar.accept(token):
            status = SequenceStatus.FINISHED_STOPPED  # the constraint is complete: nothing may follow
        length = len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        if status is None and length:
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            m.finished_time = now
            self.scheduler.finish(seq, status)
        return stop_token  # the token ends the sequence as EOS / a stop id: its text is left out

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_cache_usage=self.block_manager.usage(),
                           num_preemptions=self.scheduler.num_preemptions,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           free_blocks=self.block_manager.num_free_blocks(),
                           prefix_cache_queries=self.scheduler.prefix_cache_queries,
                           prefix_cache_hits=self.scheduler.prefix_cache_hits)
