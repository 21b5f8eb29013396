"""vLLM drop-in: Hugging Face repo ids from the local cache, the vLLM flags Llama 4 deployments pass,
the Python API names (EngineArgs, beam search, SamplingParams fields), CLI polish, and the
compatibility table of docs/serving.md kept true against `herd serve --help`.

Nothing here touches the network: the hub cache is a folder laid out in tmp_path and
HF_HUB_OFFLINE=1 is set wherever a repo id is resolved."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from herd import LLM, SamplingParams
from tests.server_utils import REPO, free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V2 = "fedcba9876543210fedcba9876543210fedcba98"
REPO_ID = "org/tiny-scout"
SMALL = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128, device="cpu")
PROMPT = "The quick brown fox jumps over"


def make_hub_cache(root: Path, model_dir: str, repo_id: str = REPO_ID) -> Path:
    """`huggingface-cli download`'s layout: models--org--name/{refs/<branch>, snapshots/<commit>/}.
    `main` is the checkpoint as it is; tag `v2` has a generation_config.json asking for greedy."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit in (COMMIT, COMMIT_V2):
        shutil.copytree(model_dir, repo / "snapshots" / commit)
    gen = repo / "snapshots" / COMMIT_V2 / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "temperature": 0.0}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(COMMIT_V2)
    return root


@pytest.fixture
def hub(tmp_path, scout_dir, monkeypatch):
    cache = make_hub_cache(tmp_path / "hub", scout_dir)
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def llm(scout_dir):
    return LLM(scout_dir, **SMALL)


def greedy(n=6, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


# -- model ids ---------------------------------------------------------------------------------

def test_repo_ids_resolve_from_the_local_cache(hub, tmp_path, monkeypatch, scout_dir):
    from herd.config import EngineConfig

    snapshots = hub / "models--org--tiny-scout" / "snapshots"
    cfg = EngineConfig.from_kwargs(REPO_ID, device="cpu")
    assert cfg.model.model == str(snapshots / COMMIT) == cfg.model.tokenizer
    assert EngineConfig.from_kwargs(REPO_ID, revision="v2", device="cpu").model.model == str(snapshots / COMMIT_V2)
    assert EngineConfig.from_kwargs(REPO_ID, revision=COMMIT_V2, device="cpu").model.model == str(snapshots / COMMIT_V2)
    # HF_HOME/hub when HF_HUB_CACHE is unset; --download-dir over both
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        EngineConfig.from_kwargs(REPO_ID, device="cpu")
    make_hub_cache(tmp_path / "home" / "hub", scout_dir)
    assert EngineConfig.from_kwargs(REPO_ID, device="cpu").model.model.startswith(str(tmp_path / "home" / "hub"))
    assert EngineConfig.from_kwargs(REPO_ID, download_dir=str(hub), device="cpu").model.model == str(snapshots / COMMIT)


def test_missing_repo_ids_fail_with_what_to_do(hub, monkeypatch):
    from herd.config import EngineConfig

    with pytest.raises(FileNotFoundError) as e:
        EngineConfig.from_kwargs("meta-llama/Llama-4-Scout-17B-16E-Instruct", device="cpu")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface-cli download meta-llama/Llama-4-Scout-17B-16E-Instruct" in msg
    with pytest.raises(FileNotFoundError, match="revision 'nope'"):
        EngineConfig.from_kwargs(REPO_ID, revision="nope", device="cpu")
    # online mode, hub unreachable (a closed local port): no download attempt, a clear error
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(FileNotFoundError, match="unreachable"):
        EngineConfig.from_kwargs("org/not-cached", device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        EngineConfig.from_kwargs("./no/such/folder", device="cpu")


def test_serve_a_repo_id_with_the_flags_deployments_pass(hub, tmp_path, llm):
    """`python -m herd.entrypoints.openai.api_server --model org/name` (vLLM's module path) with the
    vLLM flags that used to stop the server, some of them from a --config YAML file."""
    config = tmp_path / "serve.yaml"
    config.write_text("max-model-len: 128\nnum_kv_blocks: 64\nblock-size: 4\nenforce_eager: true\n"
                      "response-role: helper\nmax_logprobs: 3\ndisable-log-stats: true\n")
    port = free_port()
    cmd = [sys.executable, "-m", "herd.entrypoints.openai.api_server", "--model", REPO_ID, "--config", str(config),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu",
           "--api-key", "k1", "k2", "--limit-mm-per-prompt", "image=2", "--generation-config", "auto",
           "--override-generation-config", '{"top_k": 5}', "--swap-space", "4", "--cpu-offload-gb", "0",
           "-pp", "1", "-O", "0", "--max-seq-len-to-capture", "8192", "--disable-custom-all-reduce",
           "--return-tokens-as-token-ids", "--disable-uvicorn-access-log"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k2"}).json()
        assert models["data"][0]["id"] == REPO_ID and models["data"][0]["max_model_len"] == 128
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        auth = {"Authorization": "Bearer k1"}
        body = {"model": REPO_ID, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2,
                "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).json()
        want = llm.generate(PROMPT, greedy(4), use_tqdm=False)[0].outputs[0]
        assert r["choices"][0]["text"] == want.text
        assert r["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in want.token_ids]
        r = httpx.post(url + "/v1/completions", json={**body, "logprobs": 4}, headers=auth)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Requested sample logprobs of 4, which is greater than max allowed: 3"
        r = httpx.post(url + "/v1/completions", json={**body, "truncate_prompt_tokens": 3}, headers=auth).json()
        assert r["usage"]["prompt_tokens"] == 3
        chat = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
        assert chat["choices"][0]["message"]["role"] == "helper"
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    for name in ("swap-space", "max-seq-len-to-capture", "disable-custom-all-reduce"):
        assert f"--{name} is accepted for vLLM compatibility and not needed" in text


@pytest.mark.parametrize("flags, feature", [
    (["--enable-lora"], "LoRA adapters"), (["--lora-modules", "a=/x"], "LoRA adapters"),
    (["--speculative-config", '{"method": "eagle3"}'], "speculative decoding"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector"}'], "KV cache transfer"),
    (["-pp", "2"], "pipeline parallelism"), (["--cpu-offload-gb", "8", "--device", "cuda"], "offloading weights")])
def test_missing_features_fail_with_one_line(scout_dir, flags, feature):
    from herd.cli import build_parser, parse
    from herd.engine.arg_utils import EngineArgs
    from herd.server.cli import resolve_args

    argv = ["serve", scout_dir, *flags]
    args = parse(build_parser(argv), argv)
    with pytest.raises(NotImplementedError, match=re.escape(feature)) as e:
        resolve_args(args)
        EngineArgs.from_cli_args(args).engine_kwargs()
    assert "\n" not in str(e.value) and "herd does not support" in str(e.value)


def test_missing_feature_exits_2_without_a_traceback(scout_dir):
    proc = subprocess.run([sys.executable, "-m", "herd", "serve", scout_dir, "--speculative-config",
                           '{"method": "ngram"}'], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "herd serve: error: herd does not support speculative decoding" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_max_model_len_limits_and_spellings(scout_dir, monkeypatch):
    from herd.config import EngineConfig
    from herd.engine.arg_utils import EngineArgs

    monkeypatch.delenv("HERD_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ValueError, match=r"max_model_len \(1024\) is greater than the derived max_model_len "
                                         r"\(max_position_embeddings=512") as e:
        EngineArgs(model=scout_dir, max_model_len="1K", device="cpu").create_engine_config()
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in str(e.value)
    for var in ("HERD_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        monkeypatch.setenv(var, "1")
        assert EngineConfig.from_kwargs(scout_dir, max_model_len=1024, device="cpu").model.max_model_len == 1024
        monkeypatch.delenv(var)
    assert EngineArgs(model=scout_dir, max_model_len="auto", device="cpu").create_engine_config().model.max_model_len == 512
    assert EngineArgs(max_model_len="-1").max_model_len == "auto"
    assert [EngineArgs(max_model_len=v).max_model_len for v in ("2k", "2K", "1M", "1.5k", 300)] == \
        [2000, 2048, 1 << 20, 1500, 300]
    with pytest.raises(ValueError, match="invalid length"):
        EngineArgs(max_model_len="lots")


def test_plan_takes_human_lengths(capsys):
    from herd.cli import main

    assert main(["plan", "--model", "scout", "--device", "h100", "--max-model-len", "2k",
                 "--max-num-batched-tokens", "8K", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["max_model_len"] == 2000 and settings["max_num_batched_tokens"] == 8192
    assert main(["plan", "--model", "scout", "--device", "h100", "--max-model-len", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["max_model_len"] == 8192


# -- generation config, multimodal limits ---------------------------------------------------------

def test_generation_config_modes(scout_dir, tmp_path):
    from herd.config import EngineConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(scout_dir, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0, "top_p": 0.9,
                                                             "max_new_tokens": 7}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.4}))

    def defaults(**kw):
        return EngineConfig.from_kwargs(str(ckpt), device="cpu", **kw).model.generation_defaults()

    auto = defaults()
    assert (auto["temperature"], auto["top_p"], auto["max_new_tokens"]) == (0.0, 0.9, 7)
    assert auto["eos_token_id"] == gen["eos_token_id"]
    vllm = defaults(generation_config="vllm")
    assert "temperature" not in vllm and "max_new_tokens" not in vllm and vllm["eos_token_id"] == gen["eos_token_id"]
    assert defaults(generation_config=str(other))["temperature"] == 0.4
    over = defaults(override_generation_config='{"temperature": 0.7, "max_tokens": 3}')
    assert (over["temperature"], over["top_p"], over["max_new_tokens"]) == (0.7, 0.9, 3)
    with pytest.raises(ValueError, match="generation_config must be"):
        defaults(generation_config=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not valid JSON"):
        defaults(override_generation_config="{temperature: 1}")
    cfg = EngineConfig.from_kwargs(str(ckpt), device="cpu", override_generation_config={"attn_temperature_tuning": False})
    assert cfg.model.hf_config.attn_temperature_tuning is False
    # the engine takes them: greedy by default under "auto", not under "vllm"
    from herd.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(str(ckpt), generation_config="vllm", **SMALL))
    try:
        assert engine.default_sampling_params().temperature == 1.0
        assert engine.default_sampling_params().top_p == 1.0
    finally:
        engine.shutdown()


def test_limit_mm_per_prompt_parsing():
    from herd.config import parse_mm_limits

    assert parse_mm_limits("image=2,video=0") == {"image": 2, "video": 0}
    assert parse_mm_limits('{"image": 10}') == {"image": 10}
    assert parse_mm_limits({"image": {"count": 3, "width": 512}}) == {"image": 3}
    assert parse_mm_limits(None) is None
    for bad in ("images=2", "image", "image=-1", "image=two"):
        with pytest.raises(ValueError, match="limit_mm_per_prompt"):
            parse_mm_limits(bad)


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    from tests.tiny_models import make_tiny_multimodal_checkpoint

    return make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("compat_mm"), "scout")


def test_limit_mm_per_prompt_is_enforced(mm_dir):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from herd.engine.arg_utils import AsyncEngineArgs
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app
    from tests.test_multimodal_engine import IMG_A, IMG_B
    from tests.test_server_images import data_url

    kw = dict(dtype="float32", max_model_len=200, block_size=4, num_kv_blocks=256, device="cpu")
    llm = LLM(mm_dir, limit_mm_per_prompt="image=1", **kw)
    one = {"prompt": "<|image|> Describe.", "multi_modal_data": {"image": IMG_A}}
    assert llm.generate(one, greedy(2), use_tqdm=False)[0].outputs[0].token_ids
    two = {"prompt": "<|image|><|image|> Compare.", "multi_modal_data": {"image": [IMG_A, IMG_B]}}
    with pytest.raises(ValueError, match=re.escape("At most 1 image(s) may be provided in one prompt.")):
        llm.generate(two, greedy(2), use_tqdm=False)
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=mm_dir, limit_mm_per_prompt={"image": 1}, **kw))
    try:
        http = TestClient(build_app(engine, SimpleNamespace(served_model_name=["m"])))
        parts = [{"type": "image_url", "image_url": {"url": data_url(IMG_A)}},
                 {"type": "image_url", "image_url": {"url": data_url(IMG_B)}}, {"type": "text", "text": "Compare."}]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"] == \
            "At most 1 image(s) may be provided in one prompt."
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts[1:]}],
                                                    "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        engine.shutdown()


# -- Python API ---------------------------------------------------------------------------------

def test_top_level_names_import_lazily():
    code = ("import sys, herd\n"
            "from herd import TokensPrompt, TextPrompt, EngineArgs, AsyncEngineArgs, BeamSearchParams\n"
            "assert 'torch' not in sys.modules, 'herd loaded torch'\n"
            "from herd import RequestOutput, CompletionOutput, AsyncLLMEngine, LLMEngine, LLM, SamplingParams\n"
            "from herd.engine.outputs import RequestOutput as R\n"
            "assert RequestOutput is R and AsyncLLMEngine.__name__ == 'AsyncLLMEngine'\n"
            "assert TokensPrompt(prompt_token_ids=[1]) == {'prompt_token_ids': [1]}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import herd

    with pytest.raises(AttributeError):
        herd.NoSuchThing  # noqa: B018


def test_llm_takes_every_engine_arg_the_cli_takes(scout_dir, capsys):
    from dataclasses import fields

    from herd.cli import build_parser
    from herd.engine.arg_utils import EngineArgs

    names = {f.name for f in fields(EngineArgs)}
    for command in ("serve", "generate", "chat"):
        parser = next(a for a in build_parser([command])._actions if a.dest == "command").choices[command]
        engine_group = [g for g in parser._action_groups if g.title in (
            "engine", "accepted for vLLM compatibility, not needed", "vLLM features herd does not have (fail with a message)")]
        dests = {a.dest for g in engine_group for a in g._group_actions} - {"config"}
        assert dests <= names, dests - names
    llm = LLM(scout_dir, dtype="float32", block_size=4, num_gpu_blocks_override=80, max_model_len="0.25k",
              enforce_eager=True, swap_space=4, disable_log_stats=True, limit_mm_per_prompt={"image": 2},
              device="cpu", max_seq_len_to_capture=8192, disable_custom_all_reduce=True, trust_remote_code=True,
              cpu_offload_gb=0, pipeline_parallel_size=1, generation_config="vllm")
    cfg = llm.config
    assert (cfg.cache.num_kv_blocks, cfg.model.max_model_len, cfg.model.enforce_eager) == (80, 250, True)
    assert cfg.model.limit_mm_per_prompt == {"image": 2} and cfg.model.generation_config == "vllm"
    assert "--swap-space is accepted for vLLM compatibility and not needed" in capsys.readouterr().err
    with pytest.raises(TypeError, match="no_such_arg"):
        LLM(scout_dir, no_such_arg=1, **SMALL)
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        LLM(scout_dir, speculative_config={"method": "ngram"}, **SMALL)


def test_beam_search(llm):
    from herd import BeamSearchParams, TokensPrompt

    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    one = llm.beam_search([TokensPrompt(prompt_token_ids=prompt_ids)],
                          BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))[0].sequences
    want = llm.generate({"prompt_token_ids": prompt_ids}, greedy(5, logprobs=1), use_tqdm=False)[0].outputs[0]
    assert len(one) == 1 and one[0].tokens == prompt_ids + want.token_ids  # width 1 is greedy
    assert one[0].cum_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)
    assert one[0].text == llm.get_tokenizer().decode(one[0].tokens) and one[0].finish_reason == "length"

    seqs = llm.beam_search([{"prompt": PROMPT}, "Llamas graze"],
                           BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    assert len(seqs) == 2
    beams = seqs[0].sequences
    assert len(beams) == 3 and len({tuple(b.tokens) for b in beams}) == 3
    scores = [b.cum_logprob / len(b.tokens) for b in beams]  # length_penalty 1
    assert scores == sorted(scores, reverse=True)
    # each beam's cumulative logprob is what scoring its tokens from scratch gives
    for b in beams:
        scored = llm.generate({"prompt_token_ids": b.tokens}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0]
        total = sum(scored.prompt_logprobs[i][b.tokens[i]].logprob for i in range(len(prompt_ids), len(b.tokens)))
        assert b.cum_logprob == pytest.approx(total, abs=1e-3)
        assert len(b.logprobs) == 4 and b.tokens[:len(prompt_ids)] == prompt_ids


def test_sampling_params_fields(llm):
    from herd.engine.sampling_params import SamplingParamsError

    tok = llm.get_tokenizer()
    full = tok.encode(PROMPT)
    out = llm.generate(PROMPT, greedy(3, truncate_prompt_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == full[-3:]
    plain = llm.generate(PROMPT, greedy(5), use_tqdm=False)[0].outputs[0]
    raw = llm.generate(PROMPT, greedy(5, detokenize=False, logprobs=1), use_tqdm=False)[0].outputs[0]
    assert raw.token_ids == plain.token_ids and raw.text == "" and plain.text
    assert all(lp.decoded_token is None for d in raw.logprobs for lp in d.values())
    with pytest.raises(SamplingParamsError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["x"])
    with pytest.raises(SamplingParamsError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    with pytest.raises(SamplingParamsError, match="extra_args"):
        SamplingParams(extra_args=[1])
    assert SamplingParams(extra_args={"k": 1}).clone().extra_args == {"k": 1}

    seen = []

    def only_seven(output_ids, logits):
        seen.append(len(output_ids))
        banned = logits.clone().fill_(float("-inf"))
        banned[7] = 0.0
        return banned

    def record_prompt(prompt_ids, output_ids, logits):
        seen.append(tuple(prompt_ids))
        return None  # unchanged

    out = llm.generate(PROMPT, greedy(4, logits_processors=[record_prompt, only_seven]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [7, 7, 7, 7]
    assert seen[0] == tuple(full) and seen[1::2] == [0, 1, 2, 3]
    with pytest.raises(SamplingParamsError, match="logits_processors"):
        SamplingParams(logits_processors=[1])


def test_request_output_cached_tokens_and_metrics(llm):
    long_prompt = " ".join(["llamas graze in the field"] * 6)
    first = llm.generate(long_prompt, greedy(2), use_tqdm=False)[0]
    second = llm.generate(long_prompt, greedy(2), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 16  # whole 4-token blocks
    m = second.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_async_engine_output_kinds(scout_dir):
    from herd import AsyncEngineArgs, AsyncLLMEngine, RequestOutputKind

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=scout_dir, **SMALL))

    async def collect(kind, rid, **kw):
        params = greedy(8, output_kind=kind, **kw)
        return [o async for o in engine.generate(PROMPT, params, rid)]

    try:
        cumulative = asyncio.run(collect(RequestOutputKind.CUMULATIVE, "c"))
        final = cumulative[-1].outputs[0]
        deltas = asyncio.run(collect(RequestOutputKind.DELTA, "d"))
        assert "".join(o.outputs[0].text for o in deltas if o.outputs) == final.text
        assert [t for o in deltas for c in o.outputs for t in c.token_ids] == final.token_ids
        assert deltas[-1].finished and deltas[-1].outputs[-1].finish_reason == "length"
        only = asyncio.run(collect(RequestOutputKind.FINAL_ONLY, "f"))
        assert len(only) == 1 and only[0].finished and only[0].outputs[0].text == final.text
        # a stop string is never half-sent in deltas
        stop = final.text[2:4]
        held = asyncio.run(collect(RequestOutputKind.DELTA, "s", stop=[stop]))
        assert "".join(o.outputs[0].text for o in held if o.outputs) == final.text[:final.text.find(stop)]
    finally:
        engine.shutdown()


def test_top_level_tp_script_without_main_guard_is_explained(scout_dir, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text("from herd import LLM\n"
                      f"llm = LLM({scout_dir!r}, tensor_parallel_size=2, dtype='float32', device='cpu', "
                      "block_size=4, num_kv_blocks=16, max_model_len=64)\n"
                      "print('loaded')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "loaded" not in proc.stdout
    assert 'if __name__ == "__main__":' in proc.stderr and "died unexpectedly" not in proc.stderr


# -- CLI polish ---------------------------------------------------------------------------------

def test_python_m_herd():
    proc = subprocess.run([sys.executable, "-m", "herd", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    from herd import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == __version__


def test_generate_flags_between_model_and_prompt(scout_dir, llm, capsys):
    from herd.cli import main

    want = llm.generate("The fox", greedy(4), use_tqdm=False)[0].outputs[0].text
    assert main(["generate", scout_dir, "--max-tokens", "4", "The fox", "--temperature", "0", "--dtype", "float32",
                 "--max-model-len", "64", "--num-kv-blocks", "16", "--device", "cpu"]) == 0
    assert want in capsys.readouterr().out


def test_generate_and_chat_errors_are_one_line(scout_dir, capsys, monkeypatch):
    from herd.cli import main

    monkeypatch.delenv("QUANT_CONFIG", raising=False)
    cases = [["generate", "/no/such/model", "hi"], ["chat", "/no/such/model"],
             ["generate", scout_dir, "hi", "--quantization", "inc", "--device", "cpu", "--dtype", "float32"]]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Traceback" not in err, err
    assert "QUANT_CONFIG" in lines[0]


def test_config_file(scout_dir, tmp_path):
    from herd.cli import build_parser, parse

    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-model-len: 64\ndtype: float32\nnum_kv_blocks: 8\nenable_prefix_caching: false\n"
                   f"served-model-name: [a, b]\nmodel: {scout_dir}\nenforce-eager: true\n"
                   "override-generation-config: {temperature: 0.5}\n")
    argv = ["serve", "--config", str(cfg), "--dtype", "bfloat16", "-O3"]
    args = parse(build_parser(argv), argv)
    assert (args.max_model_len, args.dtype, args.num_kv_blocks, args.enable_prefix_caching) == (64, "bfloat16", 8, False)
    assert args.served_model_name == ["a", "b"] and args.model == scout_dir and args.enforce_eager is True
    assert json.loads(args.override_generation_config) == {"temperature": 0.5} and args.compilation_config == "3"
    argv = ["serve", "other-model", "--config", str(cfg)]
    assert parse(build_parser(argv), argv).model is None  # MODEL on the command line wins over the file's
    cfg.write_text("no-such-flag: 1\n")
    with pytest.raises(SystemExit):
        parse(build_parser(["serve", "--config", str(cfg)]), ["serve", "--config", str(cfg)])


def test_quantize_and_calibrate_files_are_readable_by_others(scout_dir, tmp_path, monkeypatch):
    from herd.cli import main
    from herd.quant.inc import calibrate
    from herd.quant.inc.measure import Measurements, NodeStats
    from herd.quant.inc.nodes import measurement_stem

    assert main(["quantize", "-m", scout_dir, "-o", str(tmp_path / "q"), "--no-report", "--no-progress"]) == 0
    rows = [{"system_prompt": "Be terse.", "question": q} for q in ("The fox", "Llamas graze", "Hello")]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen = {}

    def fake_measure(model_path, prompts, measure_config, batch_size, tp, *rest, **kw):
        seen.update(kw, tp=tp)
        prefix = json.loads(Path(measure_config).read_text())["dump_stats_path"]
        for rank in range(tp):
            node = NodeStats(inputs=[1.0 + rank], outputs=[2.0], weight=0.5)
            Measurements({"model.layers.0.self_attn.qkv_proj": node}, local_rank=rank).save(
                measurement_stem(prefix, "maxabs", rank, tp))

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    assert main(["calibrate", "-m", scout_dir, "-d", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "cal"),
                 "-t", "4", "-g", "0,1--2,3", "-e"]) == 0
    assert seen == {"enforce_eager": True, "tp": 4}
    unified = list((tmp_path / "cal").rglob("*_hooks_maxabs_*_2.npz"))
    assert len(unified) == 2  # -g 0,1--2,3 unified 4 ranks into 2
    written = [p for d in ("q", "cal") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    unreadable = [p for p in written if not stat.S_IMODE(p.stat().st_mode) & 0o004]
    assert not unreadable, unreadable
    assert main(["calibrate", "-m", scout_dir, "-d", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "cal2"),
                 "-t", "4", "-g", "0,2--1,3"]) == 2


# -- the compatibility table --------------------------------------------------------------------

STATUSES = ("implemented", "accepted, not needed", "not supported")


def compat_rows(title: str) -> list[tuple[list[str], str]]:
    """([names], status) rows of one table under docs/serving.md's `## vLLM compatibility`."""
    text = (Path(REPO) / "docs" / "serving.md").read_text()
    section = text.split("## vLLM compatibility", 1)[1].split("\n## ", 1)[0]
    table = section.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        status = next((s for s in STATUSES if cells[1].startswith(s)), None)
        assert status is not None, f"row {line!r}: status must start with one of {STATUSES}"
        rows.append((re.findall(r"`([^`]+)`", cells[0]), status))
    return rows


def test_compat_table_matches_serve_help():
    from herd.cli import build_parser

    parser = next(a for a in build_parser(["serve"])._actions if a.dest == "command").choices["serve"]
    options = parser._option_string_actions
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    rows = compat_rows("Flags")
    assert len(rows) >= 40
    missing = []
    for names, status in rows:
        flags = [n.split()[0] for n in names if n.startswith("-")]
        assert flags, names
        present = [f for f in flags if f in options]
        if status == "implemented" and len(present) < len(flags):
            missing.append(flags)
            continue
        for f in present:
            group, help_text = groups[options[f].dest], options[f].help or ""
            if status == "accepted, not needed":
                assert group == "accepted for vLLM compatibility, not needed", f
            elif status == "not supported":
                assert "not supported" in help_text or "herd does not have" in group or "(herd has no" in help_text, f
    assert not missing, f"flags the table calls implemented but `herd serve --help` lacks: {missing}"


def test_compat_table_request_fields_exist():
    from herd.server.protocol import ChatCompletionRequest, CompletionRequest

    known = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    rows = compat_rows("Request fields")
    assert len(rows) >= 25
    absent = [names for names, status in rows if status == "implemented" and not set(names) <= known]
    assert not absent, absent
