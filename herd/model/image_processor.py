"""Llama 4 image preprocessing: best-fit tiling canvas, aspect-preserving resize, pad, bf16 normalise.

Produces the same pixel values as transformers' Llama4ImageProcessor(Fast): the resize is torch's
antialiased bilinear on uint8 (native uint8 kernel on CPUs where torchvision uses it, float + round
elsewhere), and rescale/normalise run in bfloat16. Everything runs on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor       # [tiles (+ global), 3, S, S] bfloat16
    aspect_ratio: tuple[int, int]    # (tiles down, tiles across)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (rows·tile, cols·tile) with rows·cols <= max_tiles, in transformers' candidate order:
    grouped by aspect ratio in order of first appearance, walking tile counts from max_tiles down
    and each count's factor pairs with the row count ascending (the order breaks area ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in range(1, count + 1):
            if count % rows == 0:
                by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [(r * tile, c * tile) for group in by_ratio.values() for r, c in group]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]],
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas needing the least upscaling (any scale >= 1), else the least downscaling; ties go
    to the smallest area. Scales are float32, as the reference computes them."""
    cand = torch.tensor(canvases, dtype=torch.long)
    scale_h = cand[:, 0] / height  # int64 / int -> float32
    scale_w = cand[:, 1] / width
    scales = torch.minimum(scale_h, scale_w)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    options = cand[scales == chosen]
    best = options[torch.argmin(options[:, 0] * options[:, 1])]
    return int(best[0]), int(best[1])


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Largest (h, w) inside the target that keeps the aspect ratio (floors the free side)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


def _native_uint8_resize() -> bool:
    """torchvision resizes uint8 directly only where torch has the vectorised uint8 kernel."""
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 [3, H, W] tensor (torchvision's semantics)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = img[None]
    if _native_uint8_resize():
        out = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().to(torch.uint8)
    return out[0]


def to_rgb_tensor(image) -> torch.Tensor:
    """PIL image / HxW(x3) uint8 array / [3, H, W] uint8 tensor -> contiguous uint8 [3, H, W].
    Transparency is composited onto white, like the reference processor."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        arr = np.asarray(image.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
        if image.dim() == 3 and image.shape[-1] in (1, 3):
            image = image.permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8, got {image.dtype}")
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensors must be [3, H, W] or [H, W, 3], got {tuple(image.shape)}")
        return image.expand(3, -1, -1).contiguous()
    raise TypeError(f"unsupported image type {type(image).__name__} (PIL.Image, numpy array or uint8 tensor)")


@dataclass
class Llama4ImageProcessor:
    tile_size: int = 336
    max_patches: int = 16                   # most tiles per image, not counting the global tile
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        if self.tile_size <= 0 or self.max_patches <= 0:
            raise ValueError("tile_size and max_patches must be positive")
        self.canvases = supported_canvases(self.max_patches, self.tile_size)

    @classmethod
    def from_pretrained(cls, path: str, tile_size: int | None = None) -> "Llama4ImageProcessor":
        """Settings from the checkpoint's preprocessor_config.json; tile_size defaults to the vision
        config's image_size when the file is absent."""
        cfg = {}
        file = os.path.join(os.fspath(path), "preprocessor_config.json")
        if os.path.isfile(file):
            with open(file) as f:
                cfg = json.load(f)
        size = cfg.get("size") or {}
        tile = size.get("height") or tile_size or 336
        if size.get("width", tile) != tile:
            raise ValueError(f"preprocessor size {size} must be square")
        if tile_size is not None and tile != tile_size:
            raise ValueError(f"preprocessor tile size {tile} differs from the vision image_size {tile_size}")
        kw = {k: cfg[k] for k in ("max_patches", "resize_to_max_canvas", "rescale_factor", "image_mean",
                                  "image_std") if cfg.get(k) is not None}
        return cls(tile_size=int(tile), **kw)

    def plan(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(canvas (h, w), resized image (h, w)) for an image of this size."""
        canvas = best_canvas(height, width, self.canvases, self.resize_to_max_canvas)
        target = canvas
        if not self.resize_to_max_canvas:  # never upscale past the image, unless smaller than a tile
            target = (min(max(height, self.tile_size), canvas[0]), min(max(width, self.tile_size), canvas[1]))
        return canvas, fit_size(height, width, *target)

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        # bf16 arithmetic, exactly as the reference: (x·factor - mean) / std in bfloat16
        x = img.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def preprocess(self, image) -> ProcessedImage:
        return self.preprocess_rgb(to_rgb_tensor(image))

    def num_tiles(self, height: int, width: int) -> tuple[int, int]:
        """(tiles down, tiles across) for an image of this size, without touching pixels."""
        canvas, _ = self.plan(height, width)
        return canvas[0] // self.tile_size, canvas[1] // self.tile_size

    def preprocess_rgb(self, img: torch.Tensor) -> ProcessedImage:
        """uint8 [3, H, W] -> tiles."""
        h, w = int(img.shape[1]), int(img.shape[2])
        if h < 1 or w < 1:
            raise ValueError(f"image has no pixels ({w}x{h})")
        canvas, new = self.plan(h, w)
        resized = resize_uint8(img, new)
        padded = F.pad(resized, (0, canvas[1] - new[1], 0, canvas[0] - new[0]), value=0)
        x = self._normalize(padded)
        t = self.tile_size
        rows, cols = canvas[0] // t, canvas[1] // t
        tiles = x.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        if rows * cols > 1:  # a thumbnail of the whole image, aspect ratio not kept
            thumb = self._normalize(resize_uint8(img, (t, t)))
            tiles = torch.cat([tiles, thumb[None]], dim=0)
        return ProcessedImage(tiles.contiguous(), (rows, cols))

    def __call__(self, images) -> list[ProcessedImage]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [self.preprocess(im) for im in images]
