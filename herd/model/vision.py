"""Llama 4 vision tower: unfold patch embedding, ViT encoder with 2-D complex RoPE, pixel shuffle,
adapter MLP, and the multi-modal projector into the text model's width.

Module and parameter names follow the HF checkpoint (`vision_model.*`, `multi_modal_projector.*`) so
the loader copies tensors by name. The tower always runs unquantized in the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Llama4VisionConfig:
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5           # informational: HF's LayerNorms always use 1e-5
    hidden_act: str = "gelu"         # informational, see _gelu

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per tile side (24 for 336 / 14)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Text positions one tile fills after pixel shuffle (144 for the released checkpoints)."""
        return int(round(self.grid ** 2 * self.pixel_shuffle_ratio ** 2))

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.hidden_size}/{self.num_attention_heads} must be a "
                             "multiple of 4 (two RoPE axes of complex pairs)")
        side = self.grid * self.pixel_shuffle_ratio
        if self.image_size % self.patch_size or side != int(side):
            raise ValueError(f"image_size {self.image_size} must split into patches of {self.patch_size} "
                             f"whose grid shuffles evenly by {self.pixel_shuffle_ratio}")

    @classmethod
    def from_dict(cls, d: dict) -> "Llama4VisionConfig":
        """Read `vision_config` of a Llama4ForConditionalGeneration config.json (v4 or v5 keys)."""
        rope = d.get("rope_parameters") or {}
        size = d.get("image_size", 336)
        patch = d.get("patch_size", 14)
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise ValueError(f"non-square vision image_size {size} is not supported")
            size = size[0]
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        return cls(
            hidden_size=int(d.get("hidden_size", 1408)),
            num_hidden_layers=int(d.get("num_hidden_layers", 34)),
            num_attention_heads=int(d.get("num_attention_heads", 16)),
            intermediate_size=int(d.get("intermediate_size", 5632)),
            image_size=int(size),
            patch_size=int(patch),
            num_channels=int(d.get("num_channels", 3)),
            pixel_shuffle_ratio=float(d.get("pixel_shuffle_ratio", 0.5)),
            projector_input_dim=int(d.get("projector_input_dim", 4096)),
            projector_output_dim=int(d.get("projector_output_dim", 4096)),
            vision_output_dim=int(d.get("vision_output_dim", 4096)),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            hidden_act=d.get("hidden_act", "gelu"),
        )


class VisionLinear(nn.Module):
    """A plain linear without random init (weights come from the checkpoint). Its own class name keeps
    FP8 tooling, which matches linears by class, off the vision tower."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


# HF builds every vision LayerNorm with the nn.LayerNorm default and ignores `norm_eps`.
LAYER_NORM_EPS = 1e-5


def _layer_norm(dim, dtype):
    norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, dtype=dtype)
    norm.requires_grad_(False)
    return norm


def _gelu():
    # exact (erf) GELU everywhere in the tower: HF hard-codes nn.GELU() and ignores `hidden_act`
    return nn.GELU()


def vision_rope_angles(cfg: Llama4VisionConfig) -> torch.Tensor:
    """[grid² + 1, head_dim / 2] rotation angles (fp32). Pair j < half rotates by (col+1)·θ_j, pair
    half + j by (row+1)·θ_j, θ_j = theta^(-2j / (head_dim/2)); the CLS token (last) is not rotated."""
    g, quarter = cfg.grid, cfg.head_dim // 4
    freq_dim = cfg.head_dim // 2
    theta = 1.0 / cfg.rope_theta ** (torch.arange(0, freq_dim, 2)[:quarter].float() / freq_dim)
    idx = torch.arange(g * g)
    col, row = (idx % g + 1).float(), (idx // g + 1).float()
    angles = torch.cat([col[:, None] * theta[None], row[:, None] * theta[None]], dim=-1)
    return torch.cat([angles, torch.zeros(1, 2 * quarter)], dim=0)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (x[2i], x[2i+1]) as complex numbers times e^{i·angle}; fp32 math, cast back."""
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


class Llama4VisionAttention(nn.Module):
    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = VisionLinear(h, h, True, dtype)
        self.k_proj = VisionLinear(h, h, True, dtype)
        self.v_proj = VisionLinear(h, h, True, dtype)
        self.o_proj = VisionLinear(h, h, True, dtype)

    def forward(self, x, cos, sin):
        N, L, _ = x.shape
        shape = (N, L, self.num_heads, self.head_dim)
        q = rotate_pairs(self.q_proj(x).view(shape), cos, sin)
        k = rotate_pairs(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        # every token of a tile attends to every other (no mask, not causal)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(o.transpose(1, 2).reshape(N, L, -1))


class Llama4VisionMLP(nn.Module):
    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.fc1 = VisionLinear(cfg.hidden_size, cfg.intermediate_size, True, dtype)
        self.fc2 = VisionLinear(cfg.intermediate_size, cfg.hidden_size, True, dtype)
        self.act = _gelu()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Llama4VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.input_layernorm = _layer_norm(cfg.hidden_size, dtype)
        self.self_attn = Llama4VisionAttention(cfg, dtype)
        self.post_attention_layernorm = _layer_norm(cfg.hidden_size, dtype)
        self.mlp = Llama4VisionMLP(cfg, dtype)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, cos, sin):
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class Llama4UnfoldConvolution(nn.Module):
    """Non-overlapping patches flattened in (channel, ky, kx) order, then one linear (no bias)."""

    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = VisionLinear(cfg.num_channels * cfg.patch_size ** 2, cfg.hidden_size, False, dtype)

    def forward(self, pixel_values):
        patches = F.unfold(pixel_values, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, g², C] -> [N, (g·r)², C / r²]. For r = 0.5 output token (r', c') concatenates the grid cells
    (2r', 2c'), (2r', 2c'+1), (2r'+1, 2c'), (2r'+1, 2c'+1) in that order."""
    N, P, C = x.shape
    g = math.isqrt(P)
    k = int(round(1 / ratio))
    out = x.view(N, g // k, k, g // k, k, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(N, (g // k) ** 2, k * k * C)


class Llama4VisionMLP2(nn.Module):
    """The adapter MLP after pixel shuffle: GELU after both linears, no biases."""

    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.fc1 = VisionLinear(cfg.intermediate_size, cfg.projector_input_dim, False, dtype)
        self.fc2 = VisionLinear(cfg.projector_output_dim, cfg.projector_output_dim, False, dtype)
        self.act = _gelu()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, cfg: Llama4VisionConfig, dtype):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = Llama4VisionMLP2(cfg, dtype)

    def forward(self, x):
        return self.mlp(pixel_shuffle(x, self.ratio))


class Llama4VisionModel(nn.Module):
    """pixel_values [N tiles, C, S, S] -> adapter features [N, tokens_per_tile, projector_output_dim]."""

    def __init__(self, cfg: Llama4VisionConfig, dtype=torch.bfloat16):
        super().__init__()
        self.config, self.dtype = cfg, dtype
        h, n_pos = cfg.hidden_size, cfg.grid ** 2 + 1
        self.patch_embedding = Llama4UnfoldConvolution(cfg, dtype)
        self.class_embedding = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.positional_embedding_vlm = nn.Parameter(torch.empty(n_pos, h, dtype=dtype), requires_grad=False)
        self.layernorm_pre = _layer_norm(h, dtype)
        self.layernorm_post = _layer_norm(h, dtype)
        self.model = Llama4VisionEncoder(cfg, dtype)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(cfg, dtype)
        angles = vision_rope_angles(cfg)
        self.register_buffer("rope_cos", angles.cos()[:, None, :], persistent=False)  # [L, 1, d/2]
        self.register_buffer("rope_sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, cfg.image_size,
                                                                        cfg.image_size):
            raise ValueError(f"pixel_values must be [tiles, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}], got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.dtype))
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # CLS goes last
        x = self.layernorm_pre(x)
        x = self.model(x, self.rope_cos, self.rope_sin)
        x = self.layernorm_post(x)[:, :-1]  # drop CLS before the pixel shuffle
        return self.vision_adapter(x)


class Llama4MultiModalProjector(nn.Module):
    def __init__(self, vision_output_dim: int, text_hidden_size: int, dtype):
        super().__init__()
        self.linear_1 = VisionLinear(vision_output_dim, text_hidden_size, False, dtype)

    def forward(self, x):
        return self.linear_1(x)
