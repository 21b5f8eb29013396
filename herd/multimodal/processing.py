"""Prompt side of image input: tile the images and expand each <|image|> placeholder into the
Llama 4 token layout (<|image_start|>, <|patch|> × tokens per tile, separators, <|image_end|>)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from herd.model.image_processor import Llama4ImageProcessor, to_rgb_tensor
from herd.model.vision import Llama4VisionConfig
from herd.multimodal.inputs import MultiModalInputs, MultiModalItem

IMAGE_TOKENS = {
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x_separator": "<|tile_x_separator|>",
    "tile_y_separator": "<|tile_y_separator|>",
}


@dataclass(frozen=True)
class ImageTokenIds:
    image_start: int
    image_end: int
    image: int              # the placeholder the chat template emits, once per image
    patch: int              # positions whose embeddings become image features
    tile_x_separator: int
    tile_y_separator: int

    @classmethod
    def from_tokenizer(cls, tokenizer, hf_raw: dict | None = None) -> "ImageTokenIds":
        ids = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for field_name, token in IMAGE_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == unk or (isinstance(tid, list)):
                raise ValueError(f"the tokenizer has no {token} token, so it cannot take image input")
            ids[field_name] = int(tid)
        out = cls(**ids)
        raw = hf_raw or {}
        for key, name in (("image_token_index", "patch"), ("boi_token_index", "image_start"),
                          ("eoi_token_index", "image_end")):
            if raw.get(key) is not None and int(raw[key]) != getattr(out, name):
                raise ValueError(f"config.json {key}={raw[key]} but the tokenizer's {IMAGE_TOKENS[name]} "
                                 f"is {getattr(out, name)}")
        return out


def image_token_layout(aspect_ratio: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds) -> list[int]:
    """One image's prompt tokens: tiles row by row (x separators between tiles of a row, a y
    separator after each row), then <|image|> and the global tile; a single tile has only the latter.
    Length: tokens_per_tile·(h·w + 1) + h·w + 3 for h·w > 1, tokens_per_tile + 3 otherwise."""
    rows, cols = aspect_ratio
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [ids.patch] * tokens_per_tile
                if c < cols - 1:
                    out.append(ids.tile_x_separator)
            out.append(ids.tile_y_separator)
    out.append(ids.image)
    out += [ids.patch] * tokens_per_tile
    out.append(ids.image_end)
    return out


def _scan(prompt: list[int], ids: ImageTokenIds) -> tuple[list[int], list[tuple[int, int]]]:
    """Bare <|image|> placeholders, and already expanded spans [start, end) of the prompt."""
    bare, spans, open_at = [], [], None
    for i, t in enumerate(prompt):
        if t == ids.image_start and open_at is None:
            open_at = i
        elif t == ids.image_end and open_at is not None:
            spans.append((open_at, i + 1))
            open_at = None
        elif t == ids.image and open_at is None:
            bare.append(i)
    return bare, spans


class MultiModalProcessor:
    """Turns (prompt token ids, images) into the expanded prompt and its MultiModalInputs."""

    def __init__(self, image_processor: Llama4ImageProcessor, tokens_per_tile: int, ids: ImageTokenIds,
                 max_images_per_prompt: int | None = None):
        self.image_processor = image_processor
        self.tokens_per_tile = tokens_per_tile
        self.ids = ids
        self.max_images_per_prompt = max_images_per_prompt

    @classmethod
    def from_pretrained(cls, model_path: str, tokenizer, hf_raw: dict,
                        max_images_per_prompt: int | None = None) -> "MultiModalProcessor":
        if hf_raw.get("vision_config") is None:
            raise ValueError("the checkpoint has no vision_config: it takes text only")
        vision = Llama4VisionConfig.from_dict(hf_raw["vision_config"])
        proc = Llama4ImageProcessor.from_pretrained(model_path, tile_size=vision.image_size)
        return cls(proc, vision.tokens_per_tile, ImageTokenIds.from_tokenizer(tokenizer, hf_raw),
                   max_images_per_prompt)

    def check_image_count(self, n: int) -> None:
        """--limit-mm-per-prompt; servers call it before fetching the images."""
        if self.max_images_per_prompt is not None and n > self.max_images_per_prompt:
            raise ValueError(f"At most {self.max_images_per_prompt} image(s) may be provided in one prompt.")

    def num_prompt_tokens(self, aspect_ratio: tuple[int, int]) -> int:
        return len(image_token_layout(aspect_ratio, self.tokens_per_tile, self.ids))

    def process(self, prompt_token_ids: list[int], images,
                check: Callable[[list[int]], None] | None = None) -> tuple[list[int], MultiModalInputs]:
        """Expand the prompt for `images` (PIL images, HxWx3 uint8 arrays or [3, H, W] uint8 tensors).

        The prompt holds one <|image|> per image, or (re-submitted prompts) every image already
        expanded. `check(expanded_ids)` runs before the pixel work, so an over-long prompt is
        refused cheaply."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("multi_modal_data has an empty image list")
        self.check_image_count(len(images))
        rgb = [to_rgb_tensor(im) for im in images]
        ratios = [self.image_processor.num_tiles(int(t.shape[1]), int(t.shape[2])) for t in rgb]
        layouts = [image_token_layout(r, self.tokens_per_tile, self.ids) for r in ratios]
        prompt = list(prompt_token_ids)
        bare, spans = _scan(prompt, self.ids)
        n = len(images)
        if len(bare) == n and not spans:
            expanded, offsets, prev = [], [], 0
            for pos, layout in zip(bare, layouts):
                expanded += prompt[prev:pos]
                offsets.append(len(expanded))
                expanded += layout
                prev = pos + 1
            expanded += prompt[prev:]
        elif not bare and len(spans) == n:
            for i, ((s, e), layout) in enumerate(zip(spans, layouts)):
                if prompt[s:e] != layout:
                    raise ValueError(f"expanded image {i} in the prompt does not match the layout of the "
                                     f"image given ({e - s} tokens, expected {len(layout)})")
            expanded, offsets = prompt, [s for s, _ in spans]
        else:
            expanded_note = f" and {len(spans)} expanded image(s)" if spans else ""
            raise ValueError(f"the prompt has {len(bare)} {IMAGE_TOKENS['image']} placeholder(s){expanded_note} "
                             f"but {n} image(s) were given; put one {IMAGE_TOKENS['image']} where each "
                             "image goes (chat templates do this for image content parts)")
        if check is not None:
            check(expanded)
        items = []
        for t, off, layout in zip(rgb, offsets, layouts):
            processed = self.image_processor.preprocess_rgb(t)
            is_embed = torch.tensor(layout) == self.ids.patch
            items.append(MultiModalItem(processed.pixel_values, processed.aspect_ratio, off, is_embed))
        return expanded, MultiModalInputs(items)
