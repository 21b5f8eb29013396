"""AsyncLLM: the engine client of an API server whose engine cores run in their own processes.

The API server keeps the front-end work (tokenizing and checking prompts, detokenizing, stop
strings, streaming) and sends tokenized requests to the engine core processes (EngineCoreProc,
herd/engine/core.py) over ZeroMQ; their token outputs come back on one PULL socket per API server,
read by an output thread that runs the OutputProcessor and hands each request its newest output
(the same coalescing slots as the in-process AsyncLLMEngine, whose interface this mirrors:
generate, abort, is_running, errored, get_stats, num_unfinished, shutdown, engine, tokenizer).

Why ZeroMQ + msgpack: ZeroMQ gives message framing, queueing while a peer starts, many-to-many
PUSH/PULL over ipc:// sockets in a private 0700 folder and sends/receives without holding the GIL;
msgpack is compact, fast, and decoding it runs no code (unlike pickle). vLLM V1 uses the same pair.

A dead engine core is noticed at once: the front end holds a pidfd of each core process (Linux),
readable the moment it exits, whatever killed it; a core that stops on an error also says so
before it exits. Then /health answers 503, every request in flight gets an EngineDeadError, and the
server exits non-zero (herd/server/cli.py watch_engine).

Data parallel: several engine cores (each with its own tensor-parallel group) behind one front end;
each request goes to one core, picked by herd/engine/dp.py (queue lengths, prefix-cache affinity).
The processes themselves are started and stopped by herd/engine/core_procs.py.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing

import zmq

from herd.config import EngineConfig
from herd.engine.async_engine import OutputSlot, deliver, wake_slots
from herd.engine.core_procs import CoreGroup, CoreInfo, EngineCoreProcs
from herd.engine.dp import DPLoadBalancer
from herd.engine.exceptions import EngineDeadError
from herd.engine.input_processor import InputProcessor
from herd.engine.llm_engine import EngineStats
from herd.engine.output_processor import OutputProcessor
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.serial_utils import decode_error, decode_output, merge_stats, pack_request, packb, unpackb
from herd.engine.tokenizer import get_eos_token_ids
from herd.parallel.mp_executor import exit_reason
from herd.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

# Outputs detokenized per turn of the output thread before it lets the event loop run.
OUTPUT_CHUNK = 64


class FrontendProcessor(InputProcessor):
    """The API server's side of the engine: prompt checks, structured-output compile checks (their
    grammar cache lives here too), and the engine cores' figures for /metrics."""

    def __init__(self, config: EngineConfig, cores: list[CoreInfo] | None = None):
        super().__init__(config)
        mc = config.model
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size,
                                                         get_eos_token_ids(mc.model, self.tokenizer),
                                                         mc.structured_outputs_config)
        self.iteration_tokens: dict[int, int] = {}   # tokens per step -> steps, over all cores
        if cores is not None:
            self.set_cores(cores)

    def set_cores(self, cores: list[CoreInfo]) -> None:
        """The cores' KV blocks, known once they have sized their caches (this processor is built
        while they load)."""
        self.num_blocks = {g: sum(c.num_blocks.get(g, 0) for c in cores) for g in cores[0].num_blocks}


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, or the process is already gone
        return None


class AsyncLLM:
    """Front end over engine core processes. `group` names the cores; `client` is this API server's
    index among those the cores were started for. With `owned`, shutdown() also stops the cores;
    `frontend` is a FrontendProcessor built while the cores loaded."""

    def __init__(self, config: EngineConfig, group: CoreGroup, client: int = 0,
                 owned: EngineCoreProcs | None = None, frontend: FrontendProcessor | None = None):
        self.config = config
        # tokenizer, defaults, prompt checks, images
        self.engine = frontend if frontend is not None else FrontendProcessor(config)
        self.engine.set_cores(group.cores)
        self.tokenizer = self.engine.tokenizer
        self.group, self.client, self._owned = group, client, owned
        self.output_processor = OutputProcessor(self.tokenizer)
        self.balancer = DPLoadBalancer(len(group.cores), group.block_size)
        self._stats: list[dict | None] = [None] * len(group.cores)
        self._streams: dict[str, OutputSlot] = {}
        self._core_of: dict[str, int] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()     # output processor, routing tables and the PUSH sockets
        self._stop = threading.Event()
        self.errored: BaseException | None = None
        self._ctx = zmq.Context()
        # no high-water marks: a send never blocks or drops (a request or a token lost would
        # corrupt a stream); queues are bounded by the requests in flight
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(group.client_addrs[client])
        self._push = []
        for c in group.cores:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(c.input_addr)
            self._push.append(sock)
        self._wake_r, self._wake_w = os.pipe()
        # at interpreter exit this runs before the cores are stopped: their exit is no news then
        weakref.finalize(self, self._stop.set)
        self._threads = [threading.Thread(target=self._read_outputs, name="herd-output", daemon=True),
                         threading.Thread(target=self._watch_cores, name="herd-core-watch", daemon=True)]
        for t in self._threads:
            t.start()

    @classmethod
    def launch(cls, config: EngineConfig, data_parallel_size: int = 1) -> "AsyncLLM":
        """Start the engine core processes and a front end for them in this process; the front
        end's tokenizer and structured-output setup run while the cores load."""
        procs = EngineCoreProcs(data_parallel_size, num_clients=1)
        try:
            procs.start(config)
            frontend = FrontendProcessor(config)
            return cls(config, procs.wait_ready(), 0, owned=procs, frontend=frontend)
        except BaseException:
            procs.shutdown()
            raise

    # -- caller side ------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.errored is None and not self._stop.is_set()

    def num_unfinished(self) -> int:
        return len(self._streams)

    def get_stats(self) -> EngineStats:
        """The engine cores' last reported stats, added up over data-parallel replicas."""
        stats = [s for s in self._stats if s is not None]
        if not stats:
            return EngineStats(0, 0, 0.0, 0, 0, 0, {g: 0 for g in self.engine.num_blocks})
        return merge_stats(EngineStats, stats)

    def core_stats(self) -> list[EngineStats | None]:
        """Each engine core's last reported stats (data parallel: one per replica)."""
        return [None if s is None else merge_stats(EngineStats, [s]) for s in self._stats]

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.errored is not None:
            raise EngineDeadError(f"the engine has stopped: {self.errored}")
        text, ids, mm = self._split_prompt(prompt, params, prompt_text)
        engine_id = f"{request_id}#{self.client}.{next(self._ids)}"  # unique per submission
        arrival = time.time()
        message = pack_request(engine_id, self.client, ids, params, arrival, mm)  # ValueError: not sendable
        slot = OutputSlot(asyncio.get_running_loop())
        with self._lock:
            if self.errored is not None:  # died meanwhile: _die has failed the streams it knew
                raise EngineDeadError(f"the engine has stopped: {self.errored}")
            core = self.balancer.choose(ids, params.n)
            self._streams[engine_id] = slot
            self._core_of[engine_id] = core
            self.output_processor.add_request(engine_id, text, ids, params, arrival)
            self._push[core].send(message, copy=False)
        try:
            async with aclosing(slot.outputs(request_id, params)) as outputs:
                async for item in outputs:
                    yield item
        finally:
            with self._lock:
                self._streams.pop(engine_id, None)
                core = self._core_of.pop(engine_id, None)
                if not slot.finished:  # cancelled or the consumer went away: free the request's blocks
                    self.output_processor.abort_request(engine_id)
                    if core is not None and self.errored is None:
                        self._send(core, ["abort", [engine_id]])

    def _split_prompt(self, prompt, params: SamplingParams, prompt_text: str | None):
        """(text, ids, images) as the engine core will see them (truncation applied, ids checked)."""
        if isinstance(prompt, (list, tuple)):
            prompt = {"prompt_token_ids": list(prompt)}
        text, ids, mm = self.engine.process_prompt(prompt, params)
        return text if text is not None else prompt_text, ids, mm

    def abort(self, request_id: str):
        """Abort every live submission made with this caller id."""
        with self._lock:
            for engine_id in [k for k in self._streams if k.rsplit("#", 1)[0] == request_id]:
                self.output_processor.abort_request(engine_id)
                core = self._core_of.get(engine_id)
                if core is not None and self.errored is None:
                    self._send(core, ["abort", [engine_id]])

    def _send(self, core: int, msg):  # under self._lock: zmq sockets are not thread-safe
        self._push[core].send(packb(msg), copy=False)

    def shutdown(self):
        """Stop this front end's threads and sockets; with `owned`, the engine cores too."""
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(5.0)
        with self._lock:
            for sock in [self._pull, *self._push]:
                sock.close(linger=0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.engine.structured_output.shutdown()
        if self._owned is not None:
            self._owned.shutdown()

    # -- output thread ----------------------------------------------------------------------
    def _deliver(self, engine_id: str, item):
        deliver(self._streams, engine_id, item)

    def _read_outputs(self):
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll()).get(self._pull):
                continue
            woken: dict = {}  # event loop -> slots with news: one wake-up per loop for all of it
            while True:  # everything that arrived (a slot keeps only the newest output)
                try:
                    msg = unpackb(self._pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                try:
                    self._handle(msg, woken)
                except Exception:
                    logger.exception("an engine core message could not be processed")
            for loop, slots in woken.items():
                try:
                    loop.call_soon_threadsafe(wake_slots, slots)
                except RuntimeError:  # the callers' loop is closed
                    pass

    def _handle(self, msg, woken: dict):
        kind, core = msg[0], msg[1]
        if kind == "out":
            self._set_stats(core, msg[3])
            for i in range(0, len(msg[2]), OUTPUT_CHUNK):
                outs = [decode_output(o) for o in msg[2][i:i + OUTPUT_CHUNK]]
                with self._lock:
                    results, stops = self.output_processor.process_outputs(outs)
                    for rid, index, stop_str in stops:  # tell the core, which still runs them
                        owner = self._core_of.get(rid)
                        if owner is not None:
                            self._send(owner, ["finish", rid, index, stop_str])
                    for out in results:
                        slot = self._streams.get(out.request_id)
                        if slot is not None and slot.stage(out):
                            woken.setdefault(slot.loop, []).append(slot)
                time.sleep(0)  # hand the GIL to the event loop between chunks (HTTP, /health)
        elif kind == "err":
            _, _, rid, err_kind, message, param = msg
            with self._lock:
                self.output_processor.abort_request(rid)
                self._deliver(rid, decode_error(err_kind, message, param))
        elif kind == "stats":
            self._set_stats(core, msg[2])
        elif kind == "dead":
            self._die(msg[2])

    def _set_stats(self, core: int, stats: dict):
        self._stats[core] = stats
        steps: dict[int, int] = {}
        for s in self._stats:
            for n, count in (s or {}).get("iteration_tokens", {}).items():
                steps[n] = steps.get(n, 0) + count
        self.engine.iteration_tokens = steps
        with self._lock:
            self.balancer.update(core, stats["num_running"], stats["num_waiting"])

    def _die(self, reason: str):
        if self.errored is not None:
            return
        logger.error("%s", reason)
        self.errored = EngineDeadError(reason)
        with self._lock:
            for rid in list(self._streams):
                self._deliver(rid, self.errored)

    # -- engine core liveness ---------------------------------------------------------------
    def _watch_cores(self):
        """Wait for any engine core process to end (pidfd: at once, however it died)."""
        procs = {p.pid: p for p in self.group.procs}
        fds, opened, unwatchable = {}, [], []
        for c in self.group.cores:
            fd = _pidfd(c.pid)
            if fd is not None:
                opened.append(fd)
            elif c.pid in procs:
                fd = procs[c.pid].sentinel
            else:  # no pidfd and not our child: polled below
                unwatchable.append(c)
                continue
            fds[fd] = c
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([*fds, self._wake_r], [], [], 0.2 if unwatchable else None)
                gone = [fds[fd] for fd in ready if fd in fds] + [c for c in unwatchable if not _alive(c.pid)]
                if gone and not self._stop.is_set():
                    c = gone[0]
                    how = ""
                    proc = procs.get(c.pid)
                    if proc is not None:
                        proc.join(1.0)
                        how = f" ({exit_reason(proc.exitcode)})" if proc.exitcode is not None else ""
                    self._die(f"the engine has stopped: engine core {c.index} (pid {c.pid}) died unexpectedly{how}")
                    return
        finally:
            for fd in opened:
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
