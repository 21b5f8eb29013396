"""AsyncLLMEngine: one engine thread owns the model and steps; asyncio callers stream from it.

Callers validate and tokenize on their side (fast 400s), then hand the request to the engine
thread through a command queue. Outputs come back through one slot per request: outputs are
cumulative, so a newer one replaces an unread older one (a caller that reads slowly holds at most
one output, never a backlog). A caller that stops listening (client disconnect) aborts its
request, which frees its KV blocks.

The engine knows each submission by an id of its own (the caller's id plus a counter), so two
submissions with the same caller id, e.g. a client that hangs up and resends at once, never see
each other's outputs; the outputs the caller gets carry the caller's id.

A step that raises fails only the requests it was running (each gets an EngineStepError, their
blocks are freed); the engine then checks itself with a one-token probe step. If the probe fails,
or `max_step_failures` steps fail in a row, the engine is dead: every request gets an
EngineDeadError and `is_running` turns False (the server's /health answers 503 and it exits).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from herd.config import EngineConfig
from herd.engine.llm_engine import LLMEngine
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import ScheduledBatch
from herd.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineStepError(RuntimeError):
    """The step running this request raised; the request was aborted, the engine lives on."""


class _OutputSlot:
    """The newest undelivered output (or error) of one request, handed from the engine thread to
    the caller's event loop. At most one wake-up is scheduled on the loop at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self.wake_pending = False
        self.num_coalesced = 0  # outputs replaced before the caller read them (for tests/logs)

    def push(self, item) -> None:  # engine thread
        with self.lock:
            if isinstance(item, BaseException):
                self.error = item
            else:
                if self.latest is not None:
                    self.num_coalesced += 1
                self.latest = item
            if self.wake_pending:
                return
            self.wake_pending = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # caller's loop
        with self.lock:
            self.wake_pending = False
        self.event.set()

    async def get(self):
        while True:
            with self.lock:
                item, self.latest = self.latest, None
                if item is None and self.error is not None:
                    item, self.error = self.error, None
            if item is not None:
                return item
            self.event.clear()
            await self.event.wait()


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 max_step_failures: int = 3):
        self.engine = engine or LLMEngine(config)
        self.max_step_failures = max_step_failures
        self.num_step_failures = 0        # failed steps since the engine started (for logs/tests)
        self._failures_in_a_row = 0
        self._stalled_since: float | None = None
        self._stall_reported = False
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _OutputSlot] = {}   # by engine request id
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.errored: BaseException | None = None
        self.last_stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.errored is None

    def num_unfinished(self) -> int:
        return len(self._streams)

    def prepare_prompt(self, prompt, params: SamplingParams) -> list[int]:
        """Tokenize and validate in the caller's thread; raises ValueError for bad input."""
        _, ids = self.engine.tokenize_prompt(prompt)
        self.engine.check_prompt(ids, params)
        params.verify(self.engine.vocab_size, self.config.model.max_logprobs)
        return ids

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.errored is not None:
            raise EngineDeadError(f"the engine has stopped: {self.errored}")
        engine_id = f"{request_id}#{next(self._ids)}"  # unique per submission
        slot = _OutputSlot(asyncio.get_running_loop())
        self._streams[engine_id] = slot
        if isinstance(prompt, list) and prompt_text is not None:
            prompt = {"prompt": prompt_text, "prompt_token_ids": prompt}
        self._send(("add", engine_id, prompt, params, time.time()))
        finished = False
        try:
            while True:
                item = await slot.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                item.request_id = request_id  # the caller's id, as the caller gave it
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(engine_id, None)
            if not finished:  # cancelled or the consumer went away: free the request's blocks
                self._send(("abort", engine_id))

    def abort(self, request_id: str):
        """Abort every live submission made with this caller id."""
        for engine_id in [k for k in self._streams if k.rsplit("#", 1)[0] == request_id]:
            self._send(("abort", engine_id))

    def _send(self, command):
        self._commands.append(command)
        self._wake.set()

    def shutdown(self, timeout: float = 10.0):
        """Stop the engine thread, then the executor (its workers; INC MEASURE writes its files)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.errored is None:
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("executor shutdown failed")

    # -- engine thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item):
        slot = self._streams.get(request_id)
        if slot is None:
            return
        try:
            slot.push(item)
        except RuntimeError:  # the caller's loop is closed
            self._streams.pop(request_id, None)

    def _apply_commands(self):
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "add":
                _, rid, prompt, params, arrival = cmd
                try:
                    self.engine.add_request(rid, prompt, params, arrival)
                except Exception as e:  # bad input found late: only this request fails
                    self._deliver(rid, e)
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1])

    def _run(self):
        idle_checks = 0
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._stalled_since = None
                    self._wake.wait(0.05)
                    self._wake.clear()
                    idle_checks += 1
                    if idle_checks % 10 == 0:  # a tensor-parallel rank that died while idle
                        self.engine.check_health()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    self._recover(e)  # raises when the engine cannot go on
                    continue
                self._failures_in_a_row = 0
                self.last_stats = self.engine.stats()
                if not outputs:  # nothing could be scheduled: do not spin, and say so if it lasts
                    self._note_stall()
                    self._wake.wait(0.01)
                    self._wake.clear()
                    continue
                self._stalled_since = None
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is dead: fail everything in flight
            logger.exception("the engine has stopped")
            self.errored = e
            dead = EngineDeadError(f"the engine has stopped: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, dead)

    def _note_stall(self, report_after: float = 30.0):
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since, self._stall_reported = now, False
        elif not self._stall_reported and now - self._stalled_since > report_after:
            self._stall_reported = True
            s = self.engine.stats()
            logger.error("the scheduler has scheduled nothing for %.0f s with %d request(s) unfinished "
                         "(%d running, %d waiting, free KV blocks %s)", now - self._stalled_since,
                         len(self.engine.requests), s.num_running, s.num_waiting, s.free_blocks)

    # -- failure isolation ------------------------------------------------------------------
    def _recover(self, exc: Exception):
        """Abort the requests the failed step was running and probe the engine; re-raise `exc`
        (the engine is dead) when the probe fails or too many steps failed in a row. The callers
        hear of it only once the verdict is in, so /health never answers 200 for a dead engine."""
        self.num_step_failures += 1
        self._failures_in_a_row += 1
        victims = self._requests_in_failed_step()
        logger.error("engine step failed (%s: %s); aborting %d request(s): %s", type(exc).__name__, exc,
                     len(victims), ", ".join(victims[:8]) + (" ..." if len(victims) > 8 else ""),
                     exc_info=exc)
        for rid in victims:
            self.engine.abort_request(rid)
        if self._failures_in_a_row >= self.max_step_failures:
            logger.error("%d engine steps failed in a row", self._failures_in_a_row)
            raise exc
        try:
            self._probe()
        except Exception as probe_exc:
            logger.error("the engine's probe step failed too (%r)", probe_exc)
            raise exc from probe_exc
        self.last_stats = self.engine.stats()
        error = EngineStepError(f"the engine failed while running this request ({type(exc).__name__}); "
                                "it was aborted, see the server log")
        for rid in victims:
            self._deliver(rid, error)

    def _requests_in_failed_step(self) -> list[str]:
        """Requests the failed step was running: those with a scheduled (running) sequence, plus
        any the step finished but never reported. (With a token budget smaller than the running
        set this is a superset of the step's batch.)"""
        return [rid for rid, state in self.engine.requests.items()
                if state.finished or any(s.status is SequenceStatus.RUNNING for s in state.seqs)]

    def _probe(self):
        """A one-token forward pass outside the scheduler, on a block of its own."""
        eng = self.engine
        eng.check_health()
        bos = eng.tokenizer.bos_token_id
        seq = Sequence(-1, "herd-probe", 0, [bos if bos is not None else 0],
                       SamplingParams(max_tokens=1, temperature=0.0))
        if not eng.block_manager.allocate_slots(seq, 1):
            logger.warning("no free KV block for the probe step; relying on the health check")
            return
        try:
            tracker = eng.scheduler.tracker
            sched = tracker.build([seq], [1])
            try:
                out = eng.executor.execute(ScheduledBatch([seq], [1], sched))
                tracker.commit(sched)
            finally:
                tracker.remove(seq.seq_id)  # the runners drop it with the next step
            if out.sampled[0] is None or not 0 <= out.sampled[0] < eng.vocab_size:
                raise RuntimeError(f"the probe step sampled {out.sampled[0]!r}")
        finally:
            eng.block_manager.free(seq)

    def get_stats(self):
        """Engine counters for /metrics; read from the engine thread's last step."""
        return self.engine.stats()
