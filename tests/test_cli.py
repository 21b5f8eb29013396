import io
import subprocess
import sys

from herd import LLM, SamplingParams
from herd.cli import main


def test_generate_prints_the_greedy_completion(scout_dir, capsys):
    llm = LLM(scout_dir, dtype="float32", max_model_len=64, num_kv_blocks=8)
    want = llm.generate("The fox", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    assert main(["generate", scout_dir, "The fox", "--max-tokens", "6", "--temperature", "0",
                 "--dtype", "float32", "--max-model-len", "64", "--num-kv-blocks", "8"]) == 0
    assert want in capsys.readouterr().out


def test_chat_reads_turns_from_stdin(scout_dir):
    proc = subprocess.run([sys.executable, "-m", "herd.cli", "chat", scout_dir, "--max-tokens", "4",
                           "--temperature", "0", "--max_model_len", "96", "--dtype", "float32",
                           "--trust_remote_code"],
                          input="hello\n/reset\nagain\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not needed" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2  # one streamed reply per user turn


def test_unknown_flag_is_an_error(scout_dir):
    proc = subprocess.run([sys.executable, "-m", "herd.cli", "generate", scout_dir, "x", "--bogus-flag"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus-flag" in proc.stderr
