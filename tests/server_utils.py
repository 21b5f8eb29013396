"""A real `herd serve` process on loopback for tests, and helpers to read its /metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_children(pid: int) -> list[int]:
    """Live processes that `pid` started with multiprocessing's spawn: its engine cores,
    tensor-parallel workers or API servers (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(entry))
    return out


def server_env() -> dict[str, str]:
    """The environment of a test server: one thread per op, no API key or layout from the caller's
    environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for name in ("HERD_API_KEY", "VLLM_API_KEY", "HERD_ENABLE_MULTIPROCESSING", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        env.pop(name, None)
    return env


class RemoteServer:
    """`python -m herd.cli serve MODEL ARGS` on a free port; waits for /health. It runs the default
    layout, the engine core in its own process. Flags in $HERD_TEST_SERVER_ARGS are added to every
    server (unless `suite_args=False`), e.g. `--disable-frontend-multiprocessing` to run a server
    suite against the in-process server. `env`: variables to set for the server; `launcher`: the
    command that takes herd's arguments (default `python -m herd.cli`)."""

    def __init__(self, model: str, args: list[str], api_key: str | None = None, timeout: float = 120.0,
                 env: dict[str, str] | None = None, suite_args: bool = True, launcher: list[str] | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*(launcher or [sys.executable, "-m", "herd.cli"]), "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        if suite_args:
            cmd += os.environ.get("HERD_TEST_SERVER_ARGS", "").split()
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(server_env(), **(env or {}))
        # A file, not a pipe: a full pipe would block the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="herd-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(timeout)

    def _wait(self, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log = self.read_log()  # before stop(), which removes the log file
        self.stop()
        raise TimeoutError(f"server did not become healthy in {timeout}s:\n{log}")

    def read_log(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted label items without model_name/engine): value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))
                out[(s.name, labels)] = s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)
        return self.proc.returncode
