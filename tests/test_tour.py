"""The README's quick start and five-minute tour, run as written: the ```sh blocks of its "Five-minute
tour" section, in order, in one bash session (on a free port instead of 8000), against the tiny
models the README names; and `make run`, whose recipe is run with the embedded model and piped input."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from herd.hub.smollm2 import find_smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tour_blocks(readme: Path = ROOT / "README.md") -> list[str]:
    section = readme.read_text().split("\n## Five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completions(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"id":"cmpl-')]


def test_readme_tour_runs_as_written(tmp_path):
    blocks = tour_blocks()
    assert len(blocks) == 6
    port = str(free_port())
    script = ["set -euo pipefail"]
    for i, block in enumerate(blocks, 1):
        script += [f"echo '=== step {i}'", block.replace("8000", port)]
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")  # the tour runs from the repository root
    env = {k: v for k, v in os.environ.items() if k not in ("HERD_API_KEY", "QUANT_CONFIG")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # as after `source .venv/bin/activate`
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        try:  # a failed step can leave its server running
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logs = {p.name: p.read_text() for p in (tmp_path / "out").glob("*.log")}
    assert proc.returncode == 0, out[-6000:] + "".join(f"\n--- {k}\n{v[-2000:]}" for k, v in logs.items())
    steps = dict(re.findall(r"^=== step (\d)\n(.*?)(?=^=== step |\Z)", out, flags=re.S | re.M))
    assert sorted(steps) == [str(i) for i in range(1, 7)]
    (done,) = completions(steps["2"])
    assert done["model"] == "tiny-llama4" and done["choices"][0]["text"].strip()
    assert steps["3"].strip()  # the openai client's chat reply
    counts = dict((what, int(n)) for n, what in re.findall(r"^(\d+) prompt tokens (with the image|without it)$",
                                                           steps["4"], re.M))
    # the image became its span: image start/end, a tile's <|patch|> tokens, ... (7 tokens at the least)
    assert counts["with the image"] >= counts["without it"] + 7
    assert "Recommended: TP=2" in steps["5"] and "Gaudi 3" in steps["5"]
    inc, fp8 = completions(steps["6"])
    assert inc["model"] == "tiny-llama4" and fp8["model"] == "out/tiny-llama4-fp8"
    assert "INC static FP8" in logs["serve-inc.log"]
    config = json.loads((tmp_path / "out" / "tiny-llama4-fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "accuracy report" in steps["6"]


def make_run(*variables, **kw):
    """`make run` without the install step (-o: the install stamp counts as up to date)."""
    venv = Path(sys.prefix)
    return subprocess.run(["make", "-s", "-o", f"{venv}/.installed", "run", f"VENV={venv}", *variables],
                          cwd=ROOT, capture_output=True, text=True, **kw)


def test_make_run_chats_with_smollm2_by_default():
    dry = make_run("-n", timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [f"{sys.prefix}/bin/herd", "chat", "smollm2"]


def test_make_run_recipe_starts_a_chat():
    proc = make_run("RUN_MODEL=tiny-llama4", "RUN_ARGS=--max-tokens 6 --max-model-len 128 --temperature 0",
                    input="Who made the heaven and the earth?\n", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "herd chat: tiny-llama4: the embedded tiny Llama 4 MoE" in proc.stderr
    assert "5.6M parameters" in proc.stderr and "/exit or Ctrl-D quits" in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.skipif(find_smollm2_gguf() is None, reason="SmolLM2 is not installed (make install adds it)")
def test_chat_with_smollm2_answers_questions():
    """What `make run` starts: herd chat smollm2, asked what the issue asked."""
    questions = ["What is the capital of France?", "What is the capital of Germany?",
                 "How many legs does a spider have?"]
    proc = subprocess.run([sys.executable, "-m", "herd.cli", "chat", "smollm2", "--temperature", "0",
                           "--max-tokens", "24", "--max-model-len", "1024"],
                          input="".join(q + "\n" for q in questions), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SmolLM2-135M-Instruct" in proc.stderr and "134.5M parameters" in proc.stderr
    replies = proc.stdout.lower()
    assert "paris" in replies and "berlin" in replies and ("8" in replies or "eight" in replies)
