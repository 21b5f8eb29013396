"""AsyncLLMEngine: one engine thread owns the model and steps; asyncio callers stream from it.

Callers validate and tokenize on their side (fast 400s), then hand the request to the engine
thread through a command queue. Outputs come back through per-request asyncio queues. A caller
that stops listening (client disconnect) aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from herd.config import EngineConfig
from herd.engine.llm_engine import LLMEngine
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
        params.verify(self.engine.vocab_size)
        return ids

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.errored is not None:
            raise EngineDeadError(f"the engine has stopped: {self.errored}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        if isinstance(prompt, list) and prompt_text is not None:
            prompt = {"prompt": prompt_text, "prompt_token_ids": prompt}
        self._send(("add", request_id, prompt, params, time.time()))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # cancelled or the consumer went away: free the request's blocks
                self._send(("abort", request_id))

    def abort(self, request_id: str):
        self._send(("abort", request_id))

    def _send(self, command):
        self._commands.append(command)
        self._wake.set()

    def shutdown(self, timeout: float = 10.0):
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- engine thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item):
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue = stream
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
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
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.last_stats = self.engine.stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is dead: fail everything in flight
            logger.exception("engine step failed")
            self.errored = e
            dead = EngineDeadError(f"the engine has stopped: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, dead)

    def get_stats(self):
        """Engine counters for /metrics; read from the engine thread's last step."""
        return self.engine.stats()
