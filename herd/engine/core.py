"""The engine core: the loop that schedules, runs and applies steps, in a thread or a process.

EngineCore holds what every driver of LLMEngine's steps shares: a step that raises fails only the
requests it was running (their blocks are freed), then a one-token probe step decides whether the
engine lives on; `max_step_failures` failed steps in a row, or a failed probe, and it is dead.

EngineCoreProc is an engine core in its own process (vLLM V1's EngineCoreProc): API servers send
it tokenized requests over ZeroMQ (herd/engine/serial_utils.py) and get token outputs back; it
never detokenizes. Its busy loop overlaps host work with the device: the forward of step N runs on
a device thread while the loop sends step N-1's outputs, decodes and admits new requests; only what
step N+1 depends on (appending step N's tokens, the token-level stops, scheduling) sits between two
forwards. With async scheduling that too moves off the gap: step N+1 is scheduled and queued on the
device thread before step N's outputs are applied (herd/engine/scheduler.py says when it cannot
be), so two steps are in flight. IO threads do the socket work, as in vLLM.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import zmq

from herd.config import EngineConfig
from herd.engine.exceptions import EngineStepError
from herd.engine.llm_engine import LLMEngine
from herd.engine.output_processor import EngineCoreOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import ScheduledBatch
from herd.engine.sequence import Sequence, SequenceStatus
from herd.engine.serial_utils import (decode_mm, decode_params, encode_error, encode_output, encode_stats,
                                      packb, unpackb)

logger = logging.getLogger(__name__)

# Seconds between the stats an idle or busy core sends every API server (load balancing, /metrics).
STATS_INTERVAL = 0.1


class EngineCore:
    """Failure isolation and stall reports around an LLMEngine; subclasses deliver errors."""

    def __init__(self, engine: LLMEngine, max_step_failures: int = 3):
        self.engine = engine
        self.max_step_failures = max_step_failures
        self.num_step_failures = 0        # failed steps since the engine started (for logs/tests)
        self._failures_in_a_row = 0
        self._stalled_since: float | None = None
        self._stall_reported = False

    def _fail_requests(self, request_ids: list[str], error: BaseException) -> None:
        raise NotImplementedError

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
        self._fail_requests(victims, EngineStepError(
            f"the engine failed while running this request ({type(exc).__name__}); it was aborted, "
            "see the server log"))

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


def _has_news(o: EngineCoreOutput) -> bool:
    return bool(o.seqs or o.new_prompt_logprobs or o.finished)


class EngineCoreProc(EngineCore):
    """An engine core serving API servers over ZeroMQ: PULL `input_addr` (bound here) for requests,
    one PUSH per API server (`output_addrs[client]`) for its requests' outputs."""

    def __init__(self, config: EngineConfig, index: int, input_addr: str, output_addrs: list[str],
                 engine: LLMEngine | None = None, max_step_failures: int = 3):
        super().__init__(engine or LLMEngine(config, process_outputs=False), max_step_failures)
        self.index = index
        self._ctx = zmq.Context()
        # no high-water marks: a slow API server never blocks this loop, nor loses a token
        self._input = self._ctx.socket(zmq.PULL)
        self._input.setsockopt(zmq.RCVHWM, 0)
        self._input.bind(input_addr)
        self._outputs = []
        for addr in output_addrs:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(addr)
            self._outputs.append(sock)
        self._client_of: dict[str, int] = {}          # request id -> the API server that sent it
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: dict[int, list] = {}
        self._stop = threading.Event()
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-device")
        self._last_stats: dict | None = None
        self._stats_sent_at = 0.0
        self._reader = threading.Thread(target=self._read_inputs, name="herd-core-input", daemon=True)
        self._reader.start()

    # -- IO thread: requests are decoded off the busy loop ---------------------------------
    def _read_inputs(self):
        poller = zmq.Poller()
        poller.register(self._input, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                msg = unpackb(self._input.recv(zmq.NOBLOCK))
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # closed at shutdown
            except Exception:
                logger.exception("engine core %d: an undecodable message was dropped", self.index)
                continue
            if msg[0] == "add":
                _, client, rid, ids, params, arrival, mm = msg
                try:
                    prompt = ids if mm is None else {"prompt_token_ids": ids, "multi_modal_inputs": decode_mm(mm)}
                    self._inbox.put(("add", client, rid, prompt, decode_params(params), arrival))
                except Exception as e:  # bad parameters: only this request fails
                    self._inbox.put(("fail", client, rid, e))
            else:
                self._inbox.put(tuple(msg))

    # -- the busy loop ----------------------------------------------------------------------
    def stop(self):
        self._stop.set()
        self._inbox.put(("wake",))

    def run_busy_loop(self) -> int:
        """Until stop(): inputs -> schedule -> execute (device thread) -> apply. Returns the exit
        status: 0 after stop(), 1 when the engine died (every API server has been told)."""
        pending: deque = deque()   # (batch, future) of the steps on the device, oldest first
        depth = 2 if self.engine.async_scheduling else 1
        idle_rounds = 0
        try:
            while not self._stop.is_set():
                busy = bool(pending) or self.engine.has_unfinished_requests()
                if not busy:
                    self._flush()  # the last outputs leave before the loop waits for work
                self._apply_inputs(0.0 if busy else 0.05)
                if not pending and self.engine.has_unfinished_requests():
                    launched = self._launch()
                    if launched is None:  # nothing schedulable: do not spin, report if it lasts
                        self._flush()
                        self._note_stall()
                        self._apply_inputs(0.01)
                        continue
                    pending.append(launched)
                self._flush()  # the previous step's outputs leave while this step runs
                if not pending:
                    self._stalled_since = None
                    idle_rounds += 1
                    if idle_rounds % 10 == 0:  # a tensor-parallel rank that died while idle
                        self.engine.check_health()
                    continue
                self._apply_inputs(0.0)  # admit what arrived meanwhile, still during the step
                if len(pending) < depth:  # async scheduling: the next step, before this one's outputs
                    launched = self._launch(pending)
                    if launched is not None:
                        pending.append(launched)
                    elif not pending:  # scheduling failed: the running step was drained
                        continue
                batch, future = pending.popleft()
                try:
                    out = future.result()
                except Exception as e:
                    self.engine.scheduler.discard(batch)
                    self._drain(pending)
                    self._recover(e)  # raises when the engine cannot go on
                    continue
                self._failures_in_a_row = 0
                self._stalled_since = None
                self._queue_outputs(self.engine.update_from_output(batch, out))
            self._flush()
            return 0
        except BaseException as e:
            logger.exception("engine core %d has stopped", self.index)
            self._announce_death(e)
            return 1

    def _launch(self, pending=()):
        try:
            batch = self.engine.schedule()
        except Exception as e:
            self._drain(pending)
            self._recover(e)
            return None
        if not batch.seqs:
            return None
        return batch, self._device.submit(self.engine.executor.execute, batch)

    def _drain(self, pending):
        """Wait for the steps still on the device and forget them: one before them failed (their
        requests are aborted), and nothing may run there while the probe step does."""
        while pending:
            batch, future = pending.popleft()
            try:
                future.result()
            except Exception:
                pass
            self.engine.scheduler.discard(batch)

    def _apply_inputs(self, wait: float):
        try:
            item = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, item):
        kind = item[0]
        if kind == "add":
            _, client, rid, prompt, params, arrival = item
            self._client_of[rid] = client
            try:
                self.engine.add_request(rid, prompt, params, arrival)
            except Exception as e:  # bad input found late: only this request fails
                self._fail_requests([rid], e)
        elif kind == "fail":
            _, client, rid, exc = item
            self._client_of[rid] = client
            self._fail_requests([rid], exc)
        elif kind == "abort":
            for rid in item[1]:
                self.engine.abort_request(rid)
                self._client_of.pop(rid, None)
        elif kind == "finish":  # a stop string ended one sequence
            _, rid, index, stop_str = item
            self.engine.finish_sequence(rid, index, stop_str)
            if rid not in self.engine.requests:
                self._client_of.pop(rid, None)

    # -- outputs ----------------------------------------------------------------------------
    def _queue_outputs(self, outputs: list[EngineCoreOutput]):
        for o in outputs:
            client = self._client_of.get(o.request_id)
            if client is None:
                continue
            if o.finished:
                del self._client_of[o.request_id]
            if _has_news(o):
                self._outbox.setdefault(client, []).append(["o", encode_output(o)])

    def _fail_requests(self, request_ids: list[str], error: BaseException):
        for rid in request_ids:
            client = self._client_of.pop(rid, None)
            if client is not None:
                self._outbox.setdefault(client, []).append(["e", rid, *encode_error(error)])
        self._flush()

    def _flush(self):
        stats = None
        if self._outbox:
            stats = self._stats()
            for client, items in self._outbox.items():
                outs = [x[1] for x in items if x[0] == "o"]
                for x in items:
                    if x[0] == "e":
                        self._send(client, ["err", self.index, *x[1:]])
                if outs:
                    self._send(client, ["out", self.index, outs, stats])
            self._outbox = {}
        now = time.monotonic()
        if now - self._stats_sent_at >= STATS_INTERVAL:
            stats = stats or self._stats()
            if stats != self._last_stats:
                for client in range(len(self._outputs)):
                    self._send(client, ["stats", self.index, stats])
                self._last_stats = stats
            self._stats_sent_at = now

    def _stats(self) -> dict:
        stats = encode_stats(self.engine.stats())
        stats["iteration_tokens"] = dict(self.engine.iteration_tokens)
        return stats

    def _send(self, client: int, msg):
        self._outputs[client].send(packb(msg), copy=False)

    def _announce_death(self, exc: BaseException):
        self._outbox = {}
        for client in range(len(self._outputs)):
            try:
                self._send(client, ["dead", self.index, f"the engine has stopped: {exc!r}"])
            except zmq.ZMQError:
                pass

    def shutdown(self) -> list:
        """Stop the threads, the executor (INC MEASURE writes its files) and the sockets."""
        self._stop.set()
        self._device.shutdown(wait=True)
        try:
            written = self.engine.shutdown()
        except Exception:
            logger.exception("executor shutdown failed")
            written = []
        self._reader.join(2.0)
        for sock in [self._input, *self._outputs]:
            sock.close(linger=1000)  # let a last "dead" message reach the API servers
        self._ctx.term()
        return written


def run_engine_core(config: EngineConfig, index: int, input_addr: str, output_addrs: list[str], conn,
                    devices: str | None = None):
    """Entry of an engine core process (spawned by EngineCoreProcs). Reports ("ready", info) or
    ("error", kind, message) on `conn`; stops when the launcher says so or goes away."""
    # Ctrl-C reaches the whole process group; the launcher decides when engine cores stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(levelname)s %(asctime)s EngineCore_{index} %(name)s: %(message)s")
    if devices is not None:  # a data-parallel replica sees only its own accelerators
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        core = EngineCoreProc(config, index, input_addr, output_addrs)
    except BaseException as e:
        if isinstance(e, (ValueError, TypeError, FileNotFoundError, NotImplementedError)):
            logger.error("engine core %d failed to start: %s", index, e)  # the launcher prints it
        else:
            logger.exception("engine core %d failed to start", index)
        conn.send(("error", type(e).__name__, str(e)))
        sys.exit(2)
    conn.send(("ready", {"num_blocks": core.engine.num_blocks, "pid": os.getpid()}))

    def watch_launcher():
        try:
            conn.recv()  # "shutdown", or EOF when the launcher is gone
        except (EOFError, OSError):
            pass
        core.stop()

    threading.Thread(target=watch_launcher, name="herd-core-launcher", daemon=True).start()
    code = core.run_busy_loop()
    written = core.shutdown()
    if written:
        logger.info("engine core %d wrote %s", index, ", ".join(map(str, written)))
    sys.exit(code)
