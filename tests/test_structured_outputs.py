"""Structured outputs: JSON schema, JSON object, regex, choice and grammars on the embedded default model,
offline (LLM) and through a real `herd serve` with the official openai client. Replies of the tiny model
must parse / match whenever the constraint completes."""
from __future__ import annotations

import gc
import json
import math
import re
import threading

import jsonschema
import openai
import pytest
import torch

from herd import LLM, SamplingParams
from herd.engine.sampler import unpack_bitmask
from herd.engine.sampling_params import GuidedDecodingParams, SamplingParamsError, StructuredOutputsParams
from herd.hub.default import default_model_path
from tests.server_utils import RemoteServer

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}, "maxItems": 3},
                         "alive": {"type": "boolean"}},
          "required": ["name", "age", "pets", "alive"]}
PROMPTS = ["Tell me about a person:", "And God said", "A list of animals", "In the beginning"]


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_path(), dtype="float32", max_model_len=512, num_kv_blocks=96, block_size=16,
               device="cpu")


def _gen(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def test_json_schema_greedy_sampled_and_n(llm):
    so = StructuredOutputsParams(json=PERSON)
    outs = _gen(llm, PROMPTS, temperature=0, max_tokens=80, structured_outputs=so)
    outs += _gen(llm, PROMPTS[:2], temperature=0.9, n=3, seed=5, max_tokens=80, structured_outputs=so)
    texts = []
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON)
            texts.append(c.text)
    assert len(texts) == 10 and len(set(texts[4:7])) > 1  # the n samples differ
    # seeds: the same request again gives the same samples
    again = _gen(llm, PROMPTS[:1], temperature=0.9, n=3, seed=5, max_tokens=80, structured_outputs=so)
    assert [c.text for c in again[0].outputs] == texts[4:7]


def test_regex_choice_and_grammars(llm):
    cases = [(StructuredOutputsParams(regex=r"[a-z]{3}-\d{2,4}"), r"[a-z]{3}-\d{2,4}"),
             (StructuredOutputsParams(grammar='root ::= "x" [0-9] [0-9]? "y"'), r"x[0-9][0-9]?y"),  # GBNF
             (StructuredOutputsParams(grammar='start: "id=" /[A-F]{2}/ ";"'), r"id=[A-F]{2};"),   # Lark
             (GuidedDecodingParams(choice=["yes", "no", "maybe so"]), r"yes|no|maybe so")]
    for so, pattern in cases:
        for out in _gen(llm, PROMPTS, temperature=0.7, seed=1, max_tokens=30, structured_outputs=so, ignore_eos=True):
            c = out.outputs[0]
            # ignore_eos too: a complete constraint ends the sequence, it never runs to max_tokens
            assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), (so, c.text)
    # the older SamplingParams(guided_decoding=...) spelling
    out = _gen(llm, PROMPTS[:1], temperature=0, max_tokens=8, guided_decoding=GuidedDecodingParams(choice=["left"]))
    assert out[0].outputs[0].text == "left"


def test_json_object(llm):
    outs = _gen(llm, PROMPTS, temperature=0, max_tokens=40,
                structured_outputs=StructuredOutputsParams(json_object=True))
    done = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done  # the tiny model closes some objects within the budget ...
    for c in done:
        assert isinstance(json.loads(c.text), dict)
    for o in outs:  # ... and the others were cut by max_tokens, as vLLM reports it
        assert o.outputs[0].finish_reason in ("stop", "length") and o.outputs[0].text.startswith("{")


def test_logprobs_come_from_masked_logits(llm):
    so = StructuredOutputsParams(choice=["yes", "no"])
    out = _gen(llm, PROMPTS[:1], temperature=0, max_tokens=5, logprobs=20, structured_outputs=so)[0].outputs[0]
    tok = llm.get_tokenizer()
    first = out.logprobs[0]
    allowed = {t: lp for t, lp in first.items() if lp.logprob > -1e9}
    # all probability sits on tokens that can start "yes" or "no"
    assert math.isclose(sum(math.exp(lp.logprob) for lp in allowed.values()), 1.0, rel_tol=1e-4)
    assert all(("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t]))) for t in allowed)


def test_stop_strings_allowed_ids_and_conflicts(llm):
    # a stop string cuts the constrained reply, as it would any other
    out = _gen(llm, PROMPTS[:1], temperature=0, max_tokens=30, stop=["-"],
               structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3}-\d{2}"))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "-" and re.fullmatch(r"[a-z]{3}", out.text)
    # allowed_token_ids that exclude every token the grammar allows: the grammar wins
    out = _gen(llm, PROMPTS[:1], temperature=0, max_tokens=8, allowed_token_ids=[5, 6],
               structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    # min_tokens cannot hold a finished constraint open: it ends when the constraint completes
    out = _gen(llm, PROMPTS[:1], temperature=0, max_tokens=8, min_tokens=4,
               structured_outputs=StructuredOutputsParams(choice=["no"]))[0].outputs[0]
    assert out.text == "no"


def test_preemption_and_prefix_caching():
    # 12 blocks of 16 tokens for 8 growing sequences: the scheduler must preempt and recompute
    llm = LLM(default_model_path(), dtype="float32", max_model_len=128, num_kv_blocks=12, block_size=16,
              device="cpu", max_num_seqs=8)
    so = StructuredOutputsParams(json=PERSON)
    prompt = "The quick brown fox jumps over the lazy dog, and the llamas graze in the field. " * 2
    outs = _gen(llm, [prompt] * 8, temperature=0.9, seed=3, max_tokens=80, structured_outputs=so)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert any(o.num_cached_tokens > 0 for o in outs)  # the shared prompt came from the prefix cache
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)
    # a preempted sequence resumes where its grammar is: greedy gives the same reply as alone
    alone = _gen(llm, [prompt], temperature=0, max_tokens=80, structured_outputs=so)[0].outputs[0].text
    crowd = _gen(llm, [prompt] * 8, temperature=0, max_tokens=80, structured_outputs=so)
    assert {o.outputs[0].text for o in crowd} == {alone}


def test_invalid_constraints(llm):
    for so, message in ((StructuredOutputsParams(regex="a(b"), "invalid regex"),
                        (StructuredOutputsParams(json={"type": "nonsense"}), "invalid JSON schema"),
                        (StructuredOutputsParams(grammar='root ::= ( "a"'), "invalid grammar")):
        with pytest.raises(ValueError, match=message):
            _gen(llm, PROMPTS[:1], max_tokens=4, structured_outputs=so)
    assert not llm.llm_engine.requests  # nothing half-added
    with pytest.raises(SamplingParamsError, match="exactly one kind"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(SamplingParamsError, match="exactly one kind"):
        StructuredOutputsParams()
    with pytest.raises(SamplingParamsError, match="not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(SamplingParamsError, match="not available in herd"):
        _gen(llm, PROMPTS[:1], max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["a"], backend="xgrammar"))
    assert StructuredOutputsParams.from_optional(json=None, regex=None) is None


def test_grammars_are_cached_and_idle_engines_skip_them(llm):
    manager = llm.llm_engine.structured_output
    _gen(llm, PROMPTS[:1], max_tokens=4)  # unconstrained
    gc.collect()
    assert not manager.live
    so = StructuredOutputsParams(json=PERSON)
    params = SamplingParams(structured_outputs=so)
    assert manager.compile(params) is manager.compile(SamplingParams(structured_outputs=StructuredOutputsParams(json=PERSON)))
    backend, threads = manager.backend, []
    fill = backend.fill_bitmask

    def recording_fill(grammars, bitmask):
        threads.append((threading.current_thread().name, len(grammars)))
        fill(grammars, bitmask)

    backend.fill_bitmask = recording_fill
    try:
        out = _gen(llm, PROMPTS[:2], temperature=0, max_tokens=60, structured_outputs=so)
    finally:
        del backend.fill_bitmask
    assert all(o.outputs[0].finish_reason == "stop" for o in out)
    # one batched fill per step, in the worker thread (overlapping the forward), none in the sampler
    assert threads and all(name.startswith("herd-grammar") for name, _ in threads)
    assert threads[0][1] == 2 and sum(n for _, n in threads) == sum(len(o.outputs[0].token_ids) for o in out)
    gc.collect()
    assert not manager.live  # finished requests leave no grammar state: later steps do no grammar work


def test_unpack_bitmask():
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[0, 0] = 1 | (1 << 5)
    bits[0, 1] = -2 ** 31     # bit 31 of word 1: token 63
    bits[1, 1] = 1 << 1       # token 33
    allowed = unpack_bitmask(bits, 60)
    assert allowed.shape == (2, 60)
    assert allowed[0].nonzero().flatten().tolist() == [0, 5] and allowed[1].nonzero().flatten().tolist() == [33]
    assert unpack_bitmask(bits, 64)[0].nonzero().flatten().tolist() == [0, 5, 63]


# -- a real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    srv = RemoteServer(default_model_path(), [
        "--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "96", "--max-model-len", "512",
        "--served-model-name", "m", "--device", "cpu", "--disable-log-stats", "--disable-uvicorn-access-log"])
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()


CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


def test_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="m", messages=CHAT, response_format=fmt, max_completion_tokens=80,
                                       temperature=0.8, seed=2, n=2)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    stream = client.chat.completions.create(model="m", messages=CHAT, response_format=fmt, max_completion_tokens=80,
                                            temperature=0.8, seed=2, n=2, stream=True)
    texts, finish = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in r.choices] and finish == ["stop", "stop"]

    r = client.chat.completions.create(model="m", messages=CHAT, response_format={"type": "json_object"},
                                       max_completion_tokens=60, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert r.choices[0].message.content in ("alpha", "beta")


def test_completions_structured_outputs(client):
    cases = [({"structured_outputs": {"regex": r"\d{3}-[a-z]{2}"}}, r"\d{3}-[a-z]{2}"),
             ({"guided_regex": r"[A-Z][a-z]{1,5}!"}, r"[A-Z][a-z]{1,5}!"),
             ({"guided_choice": ["red", "green"]}, r"red|green"),
             ({"guided_grammar": 'root ::= "<" [a-c] [a-c]? ">"'}, r"<[a-c]{1,2}>")]
    for extra, pattern in cases:
        r = client.completions.create(model="m", prompt=["Colors:", "Code"], max_tokens=24, temperature=0.5,
                                      seed=4, extra_body=extra)
        for c in r.choices:
            assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), (extra, c.text)
    r = client.completions.create(model="m", prompt="Person:", max_tokens=80, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model="m", prompt="Person:", max_tokens=80, temperature=0, extra_body={
        "guided_json": json.dumps(PERSON)}, logprobs=2, stream=True)
    text = "".join(chunk.choices[0].text for chunk in r if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = client.completions.create(model="m", prompt="Person:", max_tokens=3, temperature=0, extra_body={
        "guided_json": json.dumps(PERSON)})
    assert r.choices[0].finish_reason == "length"  # cut by max_tokens, as vLLM reports it


def test_structured_outputs_errors(client):
    bad = [({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
           ({"guided_json": {"type": "nonsense"}}, "guided_json", "invalid JSON schema"),
           ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one kind"),
           ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "only use one kind"),
           ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
           ({"response_format": {"type": "yaml"}}, "response_format", "not supported"),
           ({"structured_outputs": {"choice": []}}, "structured_outputs", "must not be empty"),
           ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "invalid grammar"),
           ({"guided_choice": ["a"], "guided_decoding_backend": "outlines"}, "guided_choice", "not available")]
    for extra, param, message in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt="x", max_tokens=4, extra_body=extra)
        body = e.value.body
        assert body["param"] == param and message in body["message"] and body["code"] == 400, (extra, body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "object", "properties": 3}}})
    assert e.value.body["param"] == "response_format"
