"""Vision side of Llama 4: image preprocessing, token layout, vision tower + projector and the
multimodal forward pass, against transformers (fp32, tiny random vision config).

The reference pixel values come from transformers' Llama4ImageProcessor (its torchvision backend,
transformers 5.23 / torchvision 0.28 on an AVX2 CPU), stored as SHA-256 digests of the bf16 tensors
of deterministic synthetic images. torchvision cannot be imported next to the CPU torch build this
project tests with, so the reference is not run here; the spec's worked examples are checked too.
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from herd.model.image_processor import Llama4ImageProcessor, best_canvas, supported_canvases
from herd.model.loader import load_model
from herd.model.vision import (Llama4MultiModalProjector, Llama4VisionConfig, Llama4VisionModel, pixel_shuffle,
                               vision_rope_angles)
from herd.multimodal.processing import ImageTokenIds, MultiModalProcessor, image_token_layout
from tests.tiny_models import TINY_MAX_TILES, TINY_TILE, load_hf, make_tiny_multimodal_checkpoint


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    return make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm_vision"), "scout")


def synthetic(h, w, mode="RGB"):
    """A deterministic image with edges and gradients in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 7 + y * 13) % 256, (x * y + 3 * x) % 251, (x ^ y) % 256, (x * 5 + y * y) % 256],
                   -1).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(arr[..., 0])
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    return Image.fromarray(arr[..., :3])


def digest(pixel_values: torch.Tensor) -> str:
    return hashlib.sha256(pixel_values.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:16]


# (height, width, mode, transformers aspect_ratios, digest of transformers' pixel_values)
REFERENCE_336 = [
    (336, 336, "RGB", (1, 1), "bd48cc8c4c88e0b1"),
    (480, 640, "RGB", (2, 2), "73f13e6243ebc765"),
    (200, 300, "RGB", (1, 1), "216afbefa2e1798a"),
    (5, 9, "RGB", (1, 1), "97acb8035e91ac53"),
    (336, 672, "L", (1, 2), "785ed417f94b8aac"),
    (1080, 1920, "RGB", (3, 5), "04a4129b262cc021"),
    (700, 350, "RGBA", (3, 2), "369b9a05bd97a6b7"),
]
# Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=4): the tiny test checkpoint's settings
REFERENCE_56 = [
    (56, 56, "RGB", (1, 1), "163581353fff96b9"),
    (60, 100, "RGB", (2, 2), "257338fd016119b4"),
    (90, 40, "RGBA", (2, 1), "c8c5d90e056908d0"),
    (20, 30, "L", (1, 1), "f3b0889875afdeea"),
    (300, 70, "RGB", (4, 1), "261c13230d672ef1"),
]


@pytest.mark.parametrize("h,w,mode,ratio,ref", REFERENCE_336)
def test_pixel_values_match_transformers_336(h, w, mode, ratio, ref):
    out = Llama4ImageProcessor().preprocess(synthetic(h, w, mode))
    tiles = ratio[0] * ratio[1]
    assert out.aspect_ratio == ratio
    assert out.pixel_values.shape == (tiles + (tiles > 1), 3, 336, 336)
    assert out.pixel_values.dtype == torch.bfloat16
    assert digest(out.pixel_values) == ref


@pytest.mark.parametrize("h,w,mode,ratio,ref", REFERENCE_56)
def test_pixel_values_match_transformers_small_tiles(h, w, mode, ratio, ref, mm_dir):
    proc = Llama4ImageProcessor.from_pretrained(mm_dir, tile_size=TINY_TILE)
    assert (proc.tile_size, proc.max_patches) == (TINY_TILE, TINY_MAX_TILES)
    out = proc.preprocess(synthetic(h, w, mode))
    assert out.aspect_ratio == ratio
    assert digest(out.pixel_values) == ref


def test_spec_worked_examples():
    """Canvas, resize target and prompt tokens of §4.1 / §4.7."""
    proc = Llama4ImageProcessor()
    ids = ImageTokenIds(image_start=1, image_end=2, image=3, patch=4, tile_x_separator=5, tile_y_separator=6)
    cases = [((336, 336), (336, 336), (336, 336), 147), ((480, 640), (672, 672), (480, 640), 727),
             ((768, 1024), (1008, 1344), (768, 1024), 1887), ((1080, 1920), (1008, 1680), (945, 1680), 2322),
             ((200, 300), (336, 336), (224, 336), 147), ((336, 672), (336, 672), (336, 672), 437)]
    for (h, w), canvas, resized, n_tokens in cases:
        assert proc.plan(h, w) == (canvas, resized)
        ratio = (canvas[0] // 336, canvas[1] // 336)
        assert len(image_token_layout(ratio, 144, ids)) == n_tokens
    assert len(supported_canvases(16, 336)) == 50
    assert len(image_token_layout((4, 4), 144, ids)) == 2467
    # among canvases of equal scale the smallest area wins: 200x300 fits 224x448 and 672x224
    assert best_canvas(200, 300, [(224, 672), (672, 224), (224, 448), (448, 224), (224, 224)]) == (224, 448)


def test_padding_normalisation_and_global_tile():
    proc = Llama4ImageProcessor(tile_size=56, max_patches=4)
    img = synthetic(30, 100)  # canvas 56x112 (1x2 tiles), resized to 30x100 and padded
    out = proc.preprocess(img)
    assert out.aspect_ratio == (1, 2) and out.num_tiles == 3
    left, right, thumb = out.pixel_values
    assert torch.all(left[:, 30:, :] == -1) and torch.all(right[:, :, 44:] == -1)  # black padding
    raw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    # the un-resized region holds the exact bf16 normalisation of the source pixels
    expected = (raw.to(torch.bfloat16) * (1 / 255) - 0.5) / 0.5
    assert torch.equal(left[:, :30, :56], expected[:, :, :56])
    assert torch.equal(right[:, :30, :44], expected[:, :, 56:])
    assert thumb.shape == (3, 56, 56) and not torch.all(thumb == -1)


def test_layout_matches_transformers_processor(mm_dir):
    from transformers import AutoTokenizer
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    tok = AutoTokenizer.from_pretrained(mm_dir)
    ids = ImageTokenIds.from_tokenizer(tok)
    for ratio in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)]:
        text = Llama4Processor._prompt_split_image(None, ratio, 4)  # does not use the processor's state
        assert image_token_layout(ratio, 4, ids) == tok.encode(text, add_special_tokens=False)


def test_prompt_expansion(mm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mm_dir)
    proc = MultiModalProcessor.from_pretrained(mm_dir, tok, load_config(mm_dir))
    ids = proc.ids
    prompt = [1, 50, ids.image, 60, ids.image, 70]
    images = [synthetic(60, 100), synthetic(40, 40)]
    expanded, mm = proc.process(prompt, images)
    lay = [image_token_layout(it.aspect_ratio, 4, ids) for it in mm.items]
    assert [it.aspect_ratio for it in mm.items] == [(2, 2), (1, 1)]
    assert expanded == [1, 50] + lay[0] + [60] + lay[1] + [70]
    assert [it.offset for it in mm.items] == [2, 3 + len(lay[0])]
    assert [it.num_embeds for it in mm.items] == [20, 4]
    # a prompt that is already expanded is accepted as it is
    again, mm2 = proc.process(expanded, images)
    assert again == expanded and [it.hash for it in mm2.items] == [it.hash for it in mm.items]
    with pytest.raises(ValueError, match="1 <\\|image\\|> placeholder"):
        proc.process([1, ids.image, 5], images)
    with pytest.raises(ValueError, match="does not match the layout"):
        proc.process(expanded, images[::-1])
    # the length check runs before any pixel work
    def too_long(expanded):
        raise ValueError(f"too long: {len(expanded)}")

    def no_pixels(_):
        raise AssertionError("images were processed before the length check")

    proc.image_processor.preprocess_rgb = no_pixels
    with pytest.raises(ValueError, match=f"too long: {len(expanded)}"):
        proc.process(prompt, images, check=too_long)


def load_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_pixel_shuffle_and_rope_layout():
    """The layouts of §4.3 / §4.4 written out independently."""
    g, C = 4, 3
    x = torch.randn(2, g * g, C)
    y = pixel_shuffle(x, 0.5)
    assert y.shape == (2, 4, 4 * C)
    for t in range(4):
        r, c = divmod(t, 2)
        cells = [(2 * r, 2 * c), (2 * r, 2 * c + 1), (2 * r + 1, 2 * c), (2 * r + 1, 2 * c + 1)]
        assert torch.equal(y[:, t], torch.cat([x[:, a * g + b] for a, b in cells], dim=-1))
    cfg = Llama4VisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=128, image_size=56)
    ang = vision_rope_angles(cfg)  # head_dim 16 -> 8 pairs: 4 on columns, 4 on rows
    theta = 10000.0 ** (-torch.arange(4) * 2 / 8)
    p = 6  # row 1, col 2
    assert torch.allclose(ang[p, :4], 3 * theta) and torch.allclose(ang[p, 4:], 2 * theta)
    assert torch.all(ang[-1] == 0)  # CLS is not rotated


def test_vision_tower_and_projector_match_transformers(mm_dir):
    hf = load_hf(mm_dir)
    model = load_model(mm_dir, dtype=torch.float32, multimodal=True)
    proc = Llama4ImageProcessor.from_pretrained(mm_dir, tile_size=TINY_TILE)
    pv = torch.cat([proc.preprocess(synthetic(60, 100)).pixel_values, torch.randn(2, 3, 56, 56).bfloat16()])
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pv.float(), return_dict=True).last_hidden_state
        ref_proj = hf.multi_modal_projector(ref)
        ours = model.vision_model(pv)
        ours_proj = model.get_image_features(pv)
    assert ours.shape == ref.shape == (7, 4, 64)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ours_proj - ref_proj).abs().max().item() <= 1e-4
    assert ref_proj.abs().mean().item() > 1e-2  # not trivially zero


def test_multimodal_logits_match_transformers(mm_dir):
    from transformers import AutoTokenizer

    hf = load_hf(mm_dir)
    model = load_model(mm_dir, dtype=torch.float32, multimodal=True)
    tok = AutoTokenizer.from_pretrained(mm_dir)
    proc = MultiModalProcessor.from_pretrained(mm_dir, tok, load_config(mm_dir))
    prompt = tok.encode("The fox <|image|> and the llamas <|image|> graze")
    images = [synthetic(60, 100), synthetic(90, 40, "RGBA")]
    ids, mm = proc.process(prompt, images)
    pixel_values = [it.pixel_values for it in mm.items]
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids_t[None], pixel_values=torch.cat(pixel_values).float()).logits[0]
        embeds = model.get_input_embeddings(ids_t, model.get_multimodal_embeddings(pixel_values))
        ours = model.compute_logits(model(ids_t, torch.arange(len(ids)), inputs_embeds=embeds))
        text_only = model.compute_logits(model(ids_t, torch.arange(len(ids))))
    assert len(ids) > 2 * 8  # spans several attention chunks
    assert (ours - ref).abs().max().item() <= 1e-4
    first_patch = ids.index(proc.ids.patch)
    assert (ours[first_patch:] - text_only[first_patch:]).abs().max() > 1e-2  # the image matters
    assert (ours[:first_patch] - text_only[:first_patch]).abs().max() < 1e-5  # causal: earlier rows unchanged


def test_loader_vision_tensors(mm_dir, tmp_path):
    text_only = load_model(mm_dir, dtype=torch.float32)  # default: the tower is not built or loaded
    assert not hasattr(text_only, "vision_model")
    model = load_model(mm_dir, dtype=torch.float32, multimodal=True)
    names = {n for n, _ in model.named_parameters()}
    assert "vision_model.model.layers.1.self_attn.q_proj.bias" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.startswith("vision_model."))
    # a checkpoint missing a vision tensor is refused
    broken = tmp_path / "broken"
    shutil.copytree(mm_dir, broken)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["vision_model.layernorm_post.bias"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_model(str(broken), dtype=torch.float32, multimodal=True)


@pytest.mark.parametrize("rope_key", ["rope_theta", "rope_parameters"])
def test_released_vision_config_parameter_counts(rope_key):
    """§6: 850,960,896 vision parameters and a 20,971,520-parameter projector for Scout and Maverick."""
    raw = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
               image_size=336, patch_size=14, num_channels=3, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
               projector_output_dim=4096, vision_output_dim=4096, norm_eps=1e-5, hidden_act="gelu")
    raw[rope_key] = 10000 if rope_key == "rope_theta" else {"rope_theta": 10000, "rope_type": "default"}
    cfg = Llama4VisionConfig.from_dict(raw)
    assert (cfg.head_dim, cfg.grid, cfg.tokens_per_tile, cfg.rope_theta) == (88, 24, 144, 10000.0)
    with torch.device("meta"):
        tower = Llama4VisionModel(cfg, torch.bfloat16)
        proj = Llama4MultiModalProjector(cfg.vision_output_dim, 5120, torch.bfloat16)
    assert sum(p.numel() for p in tower.parameters()) == 850_960_896
    assert sum(p.numel() for p in proj.parameters()) == 20_971_520
