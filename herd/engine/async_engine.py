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
blocks are freed); the engine then checks itself with a one-token probe step (EngineCore). If the
probe fails, or `max_step_failures` steps fail in a row, the engine is dead: every request gets an
EngineDeadError and `is_running` turns False (the server's /health answers 503 and it exits).

This is the in-process engine of `herd serve --disable-frontend-multiprocessing` and of tests;
AsyncLLM (herd/engine/core_client.py) has the same interface over engine core processes.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

from herd.config import EngineConfig
from herd.engine.core import EngineCore
from herd.engine.exceptions import EngineDeadError, EngineStepError  # noqa: F401 (re-export)
from herd.engine.llm_engine import LLMEngine
from herd.engine.output_kind import OutputKindFilter
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OutputSlot:
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
        self.finished = False

    def push(self, item) -> None:  # engine (or output) thread
        if self.stage(item):
            self.loop.call_soon_threadsafe(self._wake)

    def stage(self, item) -> bool:
        """Store `item`; True when the consumer must be woken (push does it; wake_slots wakes many
        slots of one loop with one call)."""
        with self.lock:
            if isinstance(item, BaseException):
                self.error = item
            else:
                if self.latest is not None:
                    self.num_coalesced += 1
                self.latest = item
            if self.wake_pending:
                return False
            self.wake_pending = True
            return True

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

    async def outputs(self, request_id: str, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """What the caller sees of one submission: its outputs under the caller's request id, in
        the params' output kind, until the finished one; `self.finished` tells afterwards whether it
        came (if not, the caller aborts the request to free its blocks)."""
        to_kind = OutputKindFilter(params)  # params.output_kind: cumulative, delta or final only
        while not self.finished:
            item = await self.get()
            if isinstance(item, BaseException):
                raise item
            self.finished = item.finished
            item.request_id = request_id  # the caller's id, as the caller gave it
            item = to_kind(item)
            if item is not None:
                yield item


def deliver(streams: dict[str, OutputSlot], engine_id: str, item) -> None:
    """Hand an output (or error) to its request's slot, if the request is still listened to."""
    slot = streams.get(engine_id)
    if slot is None:
        return
    try:
        slot.push(item)
    except RuntimeError:  # the caller's loop is closed
        streams.pop(engine_id, None)


def wake_slots(slots: list[OutputSlot]) -> None:  # on the slots' loop
    for slot in slots:
        slot._wake()


class AsyncLLMEngine(EngineCore):
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 max_step_failures: int = 3):
        super().__init__(engine or LLMEngine(config), max_step_failures)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._streams: dict[str, OutputSlot] = {}   # by engine request id
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.errored: BaseException | None = None
        self.last_stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> "AsyncLLMEngine":
        """vLLM's constructor: AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=...))."""
        return cls(engine_args.create_engine_config(), **kwargs)

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
        slot = OutputSlot(asyncio.get_running_loop())
        self._streams[engine_id] = slot
        if isinstance(prompt, list) and prompt_text is not None:
            prompt = {"prompt": prompt_text, "prompt_token_ids": prompt}
        self._send(("add", engine_id, prompt, params, time.time()))
        try:
            async with aclosing(slot.outputs(request_id, params)) as outputs:
                async for item in outputs:
                    yield item
        finally:
            self._streams.pop(engine_id, None)
            if not slot.finished:  # cancelled or the consumer went away: free the request's blocks
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
        deliver(self._streams, request_id, item)

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

    def _fail_requests(self, request_ids: list[str], error: BaseException):
        self.last_stats = self.engine.stats()
        for rid in request_ids:
            self._deliver(rid, error)

    def get_stats(self):
        """Engine counters for /metrics; read from the engine thread's last step."""
        return self.engine.stats()
