"""Llama4ForConditionalGeneration: the text decoder plus the vision tower and projector.

Subclasses the text model so everything that walks `model.model.layers`, `lm_head` or
`compute_logits` keeps working; images only change the input embeddings of a prefill.
"""
from __future__ import annotations

import torch

from herd.model.config import Llama4TextConfig
from herd.model.llama4 import Llama4ForCausalLM, QuantMethods
from herd.model.vision import Llama4MultiModalProjector, Llama4VisionConfig, Llama4VisionModel
from herd.parallel.context import SINGLE, TPContext


class Llama4ForConditionalGeneration(Llama4ForCausalLM):
    def __init__(self, cfg: Llama4TextConfig, dtype=torch.bfloat16, tp: TPContext = SINGLE,
                 quant: QuantMethods | None = None, expert_parallel: bool = False,
                 vision_config: Llama4VisionConfig | None = None):
        super().__init__(cfg, dtype, tp, quant, expert_parallel)
        self.vision_config = vision_config or Llama4VisionConfig.from_dict(cfg.raw.get("vision_config") or {})
        self.image_token_index = int(cfg.raw.get("image_token_index", 200092))
        # The tower is small next to the MoE and stays unquantized and replicated on every rank.
        self.vision_model = Llama4VisionModel(self.vision_config, dtype)
        self.multi_modal_projector = Llama4MultiModalProjector(self.vision_config.vision_output_dim,
                                                               cfg.hidden_size, dtype)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, C, S, S] -> [tiles, tokens_per_tile, hidden_size] text-space embeddings."""
        return self.multi_modal_projector(self.vision_model(pixel_values))

    def get_multimodal_embeddings(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per image ([tiles, C, S, S]) -> one [tiles * tokens_per_tile, hidden] per image,
        rows in the order of the image's <|patch|> tokens. All tiles run as one encoder batch."""
        if not pixel_values:
            return []
        feats = self.get_image_features(torch.cat(pixel_values, dim=0))
        sizes = [int(p.shape[0]) for p in pixel_values]
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(sizes, dim=0)]

    def get_input_embeddings(self, input_ids: torch.Tensor,
                             multimodal_embeddings: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with image features written, in order, over every <|patch|> token."""
        embeds = self.model.embed_tokens(input_ids)
        if not multimodal_embeddings:
            return embeds
        feats = torch.cat(multimodal_embeddings, dim=0).to(embeds.dtype)
        mask = input_ids == self.image_token_index
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens in the input but {feats.shape[0]} image "
                             "feature rows")
        embeds[mask] = feats
        return embeds
