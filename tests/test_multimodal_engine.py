"""Images through the engine on a tiny Llama4ForConditionalGeneration: greedy parity with
transformers' generate, chunked prefill splitting an image, chat content parts, preemption, and
prefix caching keyed on image content."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from herd import LLM, SamplingParams
from herd.engine.llm_engine import PromptTooLongError
from tests.tiny_models import load_hf, make_tiny_multimodal_checkpoint

N_NEW = 10
TEXT = "The fox <|image|> jumps over"


def picture(h, w, seed):
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 13) % 256, (x * y) % 251, (x ^ y) % 256], -1)
    return Image.fromarray(((base + g.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8))


IMG_A, IMG_B, IMG_WIDE = picture(60, 100, 1), picture(60, 100, 2), picture(30, 110, 3)


def greedy(n=N_NEW):
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n)


def make_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=256, max_model_len=200)
    args.update(kw)
    return LLM(path, **args)


def mm_prompt(text, images):
    return {"prompt": text, "multi_modal_data": {"image": images}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm_engine"), "scout")
    return path, load_hf(path), make_llm(path)


def test_greedy_matches_transformers_generate(setup):
    path, hf, llm = setup
    tok = llm.get_tokenizer()
    cases = [(TEXT, [IMG_A]),                                        # 2x2 tiles + global
             ("A <|image|> then <|image|> and the llamas", [IMG_WIDE, IMG_B]),
             ("<|image|>", [picture(20, 20, 4)])]                     # one tile, image at the start
    outs = llm.generate([mm_prompt(t, ims) for t, ims in cases], greedy(), use_tqdm=False)
    patch = llm.llm_engine.mm_processor.ids.patch
    for (text, images), out in zip(cases, outs):
        ids = tok.encode(text)
        assert out.prompt_token_ids.count(patch) == sum(
            4 * (1 + (r * c if r * c > 1 else 0)) for r, c in
            [llm.llm_engine.mm_processor.image_processor.num_tiles(im.height, im.width) for im in images])
        expanded, mm = llm.llm_engine.mm_processor.process(ids, images)
        assert out.prompt_token_ids == expanded
        pv = torch.cat([it.pixel_values for it in mm.items]).float()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([expanded]), pixel_values=pv, max_new_tokens=N_NEW,
                              min_new_tokens=N_NEW, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(expanded):].tolist()
    # the image changes the continuation
    other = llm.generate(mm_prompt(TEXT, [IMG_B]), greedy(), use_tqdm=False)[0]
    assert other.outputs[0].token_ids != outs[0].outputs[0].token_ids


def test_chunked_prefill_splits_images_and_encodes_each_once(setup):
    path, hf, llm = setup
    prompts = [mm_prompt(TEXT, [IMG_A]), mm_prompt("A <|image|> then <|image|> and", [IMG_WIDE, IMG_B])]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(), use_tqdm=False)]
    chunked = make_llm(path, max_num_batched_tokens=5, enable_prefix_caching=False)
    runner = chunked.llm_engine.executor.runner
    outs = chunked.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert runner.encoder_cache.num_encoded == 3  # three images, each split over several steps
    assert len(runner.encoder_cache) == 0         # released once their spans were computed
    # preemption by recompute re-encodes and still gives the same tokens
    tiny = make_llm(path, num_kv_blocks=26, max_model_len=80, enable_prefix_caching=False)
    outs = tiny.generate(prompts, greedy(), use_tqdm=False)
    assert tiny.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_prefix_cache_is_keyed_on_image_content(setup):
    path, hf, llm = setup
    fresh = make_llm(path, enable_prefix_caching=False)
    expect_b = fresh.generate(mm_prompt(TEXT, [IMG_B]), greedy(), use_tqdm=False)[0].outputs[0].token_ids
    cached = make_llm(path)
    runner = cached.llm_engine.executor.runner
    a = cached.generate(mm_prompt(TEXT, [IMG_A]), greedy(), use_tqdm=False)[0]
    b = cached.generate(mm_prompt(TEXT, [IMG_B]), greedy(), use_tqdm=False)[0]
    offset = b.prompt_token_ids.index(cached.llm_engine.mm_processor.ids.image_start)
    # same text, other image: only blocks ending before the image are shared, and B is computed afresh
    assert b.num_cached_tokens == offset // 4 * 4
    assert b.outputs[0].token_ids == expect_b != a.outputs[0].token_ids
    # the same image again: the whole image comes from the cache and is not encoded again
    encoded = runner.encoder_cache.num_encoded
    b2 = cached.generate(mm_prompt(TEXT, [IMG_B]), greedy(), use_tqdm=False)[0]
    assert b2.num_cached_tokens >= b2.prompt_token_ids.index(cached.llm_engine.mm_processor.ids.image_end)
    assert b2.outputs[0].token_ids == expect_b
    assert runner.encoder_cache.num_encoded == encoded


def test_block_hashes_include_image_hashes(setup):
    path, hf, llm = setup
    eng = llm.llm_engine
    states = [eng.add_request(f"h{i}", mm_prompt(TEXT, [img]), greedy(1)) for i, img in enumerate([IMG_A, IMG_B])]
    try:
        seqs = [s.seqs[0] for s in states]
        assert seqs[0].prompt_token_ids == seqs[1].prompt_token_ids
        n = len(seqs[0].prompt_token_ids) // 4
        ha, hb = (eng.block_manager._hashes(s, n) for s in seqs)
        first = seqs[0].multi_modal.items[0].offset // 4
        assert ha[:first] == hb[:first]
        assert all(x != y for x, y in zip(ha[first:], hb[first:]))
    finally:
        for i in range(2):
            eng.abort_request(f"h{i}")


def data_url(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_image_parts(setup, tmp_path):
    path, hf, llm = setup
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMG_A)}},
                                         {"type": "text", "text": "Describe this image."}]}]
    out = llm.chat(msgs, greedy(), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    ids = tok.encode("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>Describe this image."
                     "<|eot|><|header_start|>assistant<|header_end|>\n\n", add_special_tokens=False)
    direct = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": IMG_A}}, greedy(),
                          use_tqdm=False)[0]
    assert out.prompt_token_ids == direct.prompt_token_ids
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    pil = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": IMG_A},
                                                 {"type": "text", "text": "Describe this image."}]}],
                   greedy(), use_tqdm=False)[0]
    assert pil.outputs[0].token_ids == out.outputs[0].token_ids
    # local files need an allowed root
    IMG_A.save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="local image files are disabled"):
        file_part = {"type": "image_url", "image_url": {"url": f"file://{tmp_path}/a.png"}}
        llm.chat([{"role": "user", "content": [file_part]}], greedy(), use_tqdm=False)


def test_bad_image_requests(setup, scout_dir):
    path, hf, llm = setup
    with pytest.raises(ValueError, match="2 image"):
        llm.generate(mm_prompt(TEXT, [IMG_A, IMG_B]), greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="only 'image'"):
        llm.generate({"prompt": TEXT, "multi_modal_data": {"video": IMG_A}}, greedy(), use_tqdm=False)
    with pytest.raises(PromptTooLongError):
        llm.generate(mm_prompt("x " * 150 + "<|image|>", [IMG_A]), greedy(), use_tqdm=False)
    with pytest.raises(TypeError):
        llm.generate(mm_prompt(TEXT, ["not an image"]), greedy(), use_tqdm=False)
    # a text-only checkpoint refuses images
    text_llm = make_llm(scout_dir)
    with pytest.raises(ValueError, match="does not accept image input"):
        text_llm.generate(mm_prompt("hello", [IMG_A]), greedy(), use_tqdm=False)
    # nothing was left behind and the engine still works
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate(mm_prompt(TEXT, [IMG_A]), greedy(2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_preprocessed_prompt_can_be_resubmitted(setup):
    """The front-end path: process_prompt off the engine thread, then add_request validates only."""
    path, hf, llm = setup
    eng = llm.llm_engine
    text, ids, mm = eng.process_prompt(mm_prompt(TEXT, [IMG_A]), greedy())
    assert text == TEXT and len(mm) == 1 and mm.items[0].pixel_values.shape == (5, 3, 56, 56)
    direct = llm.generate(mm_prompt(TEXT, [IMG_A]), greedy(), use_tqdm=False)[0]
    again = llm.generate({"prompt": text, "prompt_token_ids": ids, "multi_modal_inputs": mm}, greedy(),
                         use_tqdm=False)[0]
    assert again.prompt_token_ids == direct.prompt_token_ids
    assert again.outputs[0].token_ids == direct.outputs[0].token_ids
    tampered = list(ids)
    tampered[mm.items[0].offset + 3] = 7  # a <|patch|> replaced by text
    with pytest.raises(ValueError, match="do not match the image layout"):
        llm.generate({"prompt_token_ids": tampered, "multi_modal_inputs": mm}, greedy(), use_tqdm=False)
