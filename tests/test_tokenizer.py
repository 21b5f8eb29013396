"""Tokenizer loading, Llama 4 chat template rendering, incremental detokenizer, stop strings."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import (IncrementalDetokenizer, apply_chat_template, check_stop_strings,
                                   decode_logprob_tokens, get_eos_token_ids, get_tokenizer,
                                   load_generation_config)
from herd.engine.outputs import Logprob

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>",
            "<|fim_suffix|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
            "<|step|>", "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
            "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"]

# Follows llama4.md §5.3 for system / user / assistant / image parts + generation prompt.
TEMPLATE = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_text = messages[0]['content'] | trim %}
    {%- else %}
        {%- set system_text = messages[0]['content'][0]['text'] | trim %}
    {%- endif %}
    {{- '<|header_start|>system<|header_end|>\n\n' + system_text + '<|eot|>' }}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\n\n' }}
{%- endif %}
"""

MULTILINGUAL = "héllo wörld 日本語 🙂 — ça va? naïve café 中文 😀👍 done"


def _write_checkpoint(folder, with_template=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world, the quick brown fox jumps over the lazy dog.",
              "What is the capital of France? Paris is.", "You are a helpful assistant.",
              "héllo wörld 日本語 🙂"]
    tok.train_from_iterator(corpus * 3, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>",
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    if with_template:
        config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9}))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _write_checkpoint(tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return get_tokenizer(ckpt)


def _id(tokenizer, token):
    return tokenizer.convert_tokens_to_ids(token)


# ---- loading / chat template -------------------------------------------------------------------

def test_get_tokenizer_loads_checkpoint(tokenizer):
    assert tokenizer.eos_token_id == _id(tokenizer, "<|eot|>")
    ids = tokenizer.encode("hello world")
    assert ids[0] == _id(tokenizer, "<|begin_of_text|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_get_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer(tmp_path / "nope")


def test_eos_ids_and_generation_config(ckpt, tokenizer):
    expected = {_id(tokenizer, t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")}
    assert get_eos_token_ids(ckpt, tokenizer) == expected
    assert load_generation_config(ckpt)["top_p"] == 0.9
    assert load_generation_config(ckpt.parent) == {}


def test_chat_template_system_user_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    text = apply_chat_template(tokenizer, messages, tokenize=False)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful "
                    "assistant.<|eot|><|header_start|>user<|header_end|>\n\nWhat is the capital of "
                    "France?<|eot|><|header_start|>assistant<|header_end|>\n\n")
    no_prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == text[:-len("<|header_start|>assistant<|header_end|>\n\n")]


def test_chat_template_image_part_and_openai_image_url(tokenizer):
    expected = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>Describe this "
                "image.<|eot|><|header_start|>assistant<|header_end|>\n\n")
    hf_parts = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe this image."}]}]
    openai_parts = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Describe this image."}]}]
    assert apply_chat_template(tokenizer, hf_parts, tokenize=False) == expected
    assert apply_chat_template(tokenizer, openai_parts, tokenize=False) == expected


def test_chat_template_multi_turn_trims_only_system(tokenizer):
    messages = [{"role": "system", "content": "  Be brief. \n"},
                {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    text = apply_chat_template(tokenizer, messages, tokenize=False)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\n Hi <|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\nHello!<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nBye<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")


def test_chat_template_token_ids_have_single_bos(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = apply_chat_template(tokenizer, messages)
    text = apply_chat_template(tokenizer, messages, tokenize=False)
    bos = _id(tokenizer, "<|begin_of_text|>")
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert tokenizer.encode(text).count(bos) == 2  # what add_special_tokens=True would have done
    assert ids[1] == _id(tokenizer, "<|header_start|>")


def test_chat_template_missing_is_a_clear_error(tmp_path):
    tok = get_tokenizer(_write_checkpoint(tmp_path / "plain", with_template=False))
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(tok, [{"role": "user", "content": "hi"}])


def test_chat_template_json_beside_tokenizer(tmp_path):
    folder = _write_checkpoint(tmp_path / "mm", with_template=False)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tok = get_tokenizer(folder)
    text = apply_chat_template(tok, [{"role": "user", "content": "hi"}], tokenize=False)
    assert text == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")


def test_decode_logprob_tokens(tokenizer):
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    eot = _id(tokenizer, "<|eot|>")
    positions = [{hello: Logprob(-0.1, 1), eot: Logprob(-2.0, 2)}, None]
    decode_logprob_tokens(tokenizer, positions)
    assert positions[0][hello].decoded_token == tokenizer.decode([hello])
    assert positions[0][eot].decoded_token == "<|eot|>"


# ---- incremental detokenizer -------------------------------------------------------------------

def test_tokenizer_splits_characters_across_tokens(tokenizer):
    # Precondition for the detokenizer tests: some tokens hold only part of a character.
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    assert sum(tokenizer.decode([i]).endswith("\ufffd") for i in ids) >= 5


@pytest.mark.parametrize("with_prompt", [False, True])
def test_incremental_matches_full_decode_every_prefix(tokenizer, with_prompt):
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}]) if with_prompt else []
    det = IncrementalDetokenizer(tokenizer, prompt)
    pieces = []
    for k, token_id in enumerate(ids):
        pieces.append(det.add(token_id))
        full = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        assert "".join(pieces) == det.output_text
        assert "\ufffd" not in det.output_text
        if full.endswith("\ufffd"):
            assert full.startswith(det.output_text) and len(det.output_text) < len(full)
        else:
            assert det.output_text == full
    assert det.output_text == MULTILINGUAL
    assert det.flush() == ""
    assert det.output_token_ids == ids


def test_incremental_invalid_bytes(tokenizer):
    lone = _id(tokenizer, "æ")    # byte 0xE6: the first byte of a 3-byte character
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    det = IncrementalDetokenizer(tokenizer)
    assert det.add(lone) == ""  # might still become a character
    assert det.add(a) == "\ufffda"  # it did not: now the replacement is real
    assert det.add(lone) == ""
    assert det.flush() == "\ufffd"  # generation ended inside a character
    assert det.output_text == tokenizer.decode([lone, a, lone]) == "\ufffda\ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_special_tokens(tokenizer, skip):
    ids = (tokenizer.encode("hello", add_special_tokens=False) + [_id(tokenizer, "<|eot|>")]
           + tokenizer.encode(" 日本", add_special_tokens=False))
    det = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    for token_id in ids:
        det.add(token_id)
    assert det.output_text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|eot|>" in det.output_text) is (not skip)


@pytest.mark.parametrize("skip", [True, False])
def test_direct_rust_decode_gives_the_same_deltas(tokenizer, skip):
    """The detokenizer calls the tokenizers library directly when that is exactly
    tokenizer.decode: the same deltas, token by token, as through transformers' wrapper (held-back
    partial characters, special tokens and a prompt context included)."""
    from herd.engine.tokenizer import rust_decoder

    assert rust_decoder(tokenizer) is not None
    ids = (tokenizer.encode(MULTILINGUAL, add_special_tokens=False) + [_id(tokenizer, "<|eot|>"), _id(tokenizer, "æ")]
           + tokenizer.encode(" ok", add_special_tokens=False))
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])
    fast = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    slow = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    slow._rust = None
    assert [fast.add(i) for i in ids] + [fast.flush()] == [slow.add(i) for i in ids] + [slow.flush()]
    assert fast.output_text == slow.output_text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_direct_rust_decode_only_where_it_is_exact(tokenizer, monkeypatch):
    from herd.engine.tokenizer import rust_decoder

    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)   # decode would post-process
    assert rust_decoder(tokenizer) is None
    assert rust_decoder(object()) is None


# ---- stop strings ------------------------------------------------------------------------------

def test_check_stop_strings_semantics():
    assert check_stop_strings("hello world", 5, ["wor"], False) == ("wor", 6)
    assert check_stop_strings("hello world", 5, ["wor"], True) == ("wor", 9)
    assert check_stop_strings("hello world", 5, ["rld"], True) == ("rld", -1)
    # Only the new tail (plus len(stop) - 1 chars) is searched: "hello" was checked before.
    assert check_stop_strings("hello world", 3, ["hello"], False) is None
    assert check_stop_strings("hello world", 3, ["o w"], False) is None
    assert check_stop_strings("hello world", 5, ["o w"], False) == ("o w", 4)
    # The earliest match wins, whatever the order of the list.
    assert check_stop_strings("abcdef", 6, ["e", "b"], False) == ("b", 1)
    assert check_stop_strings("abc", 0, ["a"], False) is None


def _run(tokenizer, text, **params):
    sp = SamplingParams(**params)
    det = IncrementalDetokenizer.from_params(tokenizer, [], sp)
    streamed, stop_str = [], None
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        stop_str = det.update([token_id])
        streamed.append(det.get_next_output_text(finished=stop_str is not None, delta=True))
        if stop_str is not None:
            break
    if stop_str is None:
        streamed.append(det.get_next_output_text(finished=True, delta=True))
    return det, stop_str, streamed


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include):
    stop = "wörld 日"
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    assert len(tokenizer.encode(stop, add_special_tokens=False)) > 2  # spans several tokens
    det, stop_str, streamed = _run(tokenizer, MULTILINGUAL, stop=[stop, "never"],
                                   include_stop_str_in_output=include)
    assert stop_str == stop
    expected = "héllo wörld 日" if include else "héllo "
    assert det.output_text == expected
    assert "".join(streamed) == expected
    assert len(det.output_token_ids) < len(ids)  # stopped early
    if not include:
        # Streaming never sent any part of the stop string before the match was known.
        sent = ""
        for chunk in streamed:
            sent += chunk
            assert "w" not in sent


def test_stream_holds_only_possible_stop_prefixes(tokenizer):
    det = IncrementalDetokenizer(tokenizer, stop=["xyz"])
    for token_id in tokenizer.encode("hello world x", add_special_tokens=False):
        det.update([token_id])
    assert det.get_next_output_text(finished=False, delta=False) == "hello world "
    assert det.get_next_output_text(finished=False, delta=True) == "hello world "
    assert det.get_next_output_text(finished=True, delta=True) == "x"


def test_stop_terminated_token_text_excluded(tokenizer):
    eot = _id(tokenizer, "<|eot|>")
    ids = tokenizer.encode("hello", add_special_tokens=False)
    for include, expected in ((False, "hello"), (True, "hello<|eot|>")):
        det = IncrementalDetokenizer(tokenizer, skip_special_tokens=False,
                                     include_stop_str_in_output=include)
        assert det.update(ids) is None
        assert det.update([eot], stop_terminated=True) is None
        assert det.output_text == expected
        assert det.output_token_ids == ids + [eot]


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["he"], min_tokens=len(ids))
    results = [det.update([i]) for i in ids]
    assert results == [None] * len(ids)
    assert det.output_text == "hello world"


def test_finished_flushes_incomplete_bytes(tokenizer):
    lone = _id(tokenizer, "æ")
    det = IncrementalDetokenizer(tokenizer)
    det.update(tokenizer.encode("hi", add_special_tokens=False))
    det.update([lone])
    assert det.output_text == "hi"
    det.update([], finished=True)
    assert det.output_text == "hi\ufffd"
