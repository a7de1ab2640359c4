"""Semantic encoder S∘ViT: SigLIP2 (``transformers.SiglipVisionModel``, Conv2d patch 16).

One pass gives both outputs CHEERS needs (DESIGN sections 1 and 3):

    embeddings = S(x)             patch conv + position embedding      (B, T, D)   HFI detail
    features   = LN(ViT(S(x)))    encoder + post-layernorm             (B, T, D)   semantic tokens

with T = (H/16)^2 (1024 at 512x512) and D = 1152 at paper size. The pooling head is kept (it is
part of the released weights and of SigLIP2's published size) but unused, so it is frozen.

``pixel_reconstruct="latent"`` is the TUNA-style ablation (paper appendix A): normalised latents
z_t (B, Cz, h, w) enter the ViT through a new, randomly initialised 1x1 patch embedding (one
token per latent position) plus SigLIP's position embedding, and the pixel decoder is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from cheers_pl.components.flavor import Flavor, apply_overrides

PIXEL_RECONSTRUCT_MODES = ("decode", "latent")


class SemanticEncoder(nn.Module):
    """SigLIP vision tower returning (features, embeddings), from pixels or (latent mode) latents."""

    def __init__(self, vit: SiglipVisionModel, pixel_reconstruct: str = "decode", latent_channels: int = 0):
        super().__init__()
        if pixel_reconstruct not in PIXEL_RECONSTRUCT_MODES:
            raise ValueError(
                f"pixel_reconstruct={pixel_reconstruct!r}; valid choices are {list(PIXEL_RECONSTRUCT_MODES)}"
            )
        self.vit = vit
        self.pixel_reconstruct = pixel_reconstruct
        cfg = vit.config
        self.hidden_size, self.patch_size, self.image_size = cfg.hidden_size, cfg.patch_size, cfg.image_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        if getattr(vit, "head", None) is not None:
            vit.head.requires_grad_(False)
        if pixel_reconstruct == "latent":
            if latent_channels <= 0:
                raise ValueError("pixel_reconstruct='latent' needs latent_channels > 0")
            self.latent_patch_embedding = nn.Conv2d(latent_channels, cfg.hidden_size, kernel_size=1)

    def embed(self, pixels: Tensor) -> Tensor:
        """S(x): pixels (B,3,H,W) at the ViT's image size -> patch embeddings (B, T, D)."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"semantic encoder expects {self.image_size}x{self.image_size} images, "
                f"got {tuple(pixels.shape[-2:])}"
            )
        return self.vit.embeddings(pixels.to(self.vit.embeddings.patch_embedding.weight.dtype))

    def embed_latents(self, z: Tensor) -> Tensor:
        """Latent mode: z (B, Cz, h, w) -> (B, h*w, D) through the new patch embedding + positions."""
        side = self.image_size // self.patch_size
        if z.shape[-2:] != (side, side):
            raise ValueError(f"latent mode expects a {side}x{side} latent grid, got {tuple(z.shape[-2:])}")
        emb = self.latent_patch_embedding(z.to(self.latent_patch_embedding.weight.dtype))
        emb = emb.flatten(2).transpose(1, 2)
        pos = self.vit.embeddings.position_embedding(torch.arange(emb.shape[1], device=emb.device))
        return emb + pos

    def encode(self, embeddings: Tensor) -> Tensor:
        """ViT encoder + post-layernorm: (B, T, D) -> (B, T, D)."""
        hidden = self.vit.encoder(inputs_embeds=embeddings).last_hidden_state
        return self.vit.post_layernorm(hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: pixels (decode mode) or latents (latent mode) -> (features (B,T,D), embeddings (B,T,D))."""
        emb = self.embed_latents(x) if self.pixel_reconstruct == "latent" else self.embed(x)
        return self.encode(emb), emb


# ---------------------------------------------------------------------------------------------
# Flavors: config() -> SiglipVisionConfig; build() -> SemanticEncoder (decode mode; the model
# rebuilds the wrapper for latent mode).
_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
)
_PAPER = dict(  # SigLIP2 so400m patch16 512 (= the released vision_representation_config)
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=512,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def _config(base: dict[str, Any], **overrides: Any) -> SiglipVisionConfig:
    valid = SiglipVisionConfig().to_dict().keys()
    return SiglipVisionConfig(**apply_overrides(base, overrides, valid, "semantic_encoder"))


def _pretrained_config(path: str) -> SiglipVisionConfig:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"semantic_encoder: no config.json in {folder} (expected a SigLIP2 folder)")
    cfg = SiglipVisionConfig.from_pretrained(folder)
    cfg.name_or_path = str(folder)  # the standard field; _build loads weights from it
    return cfg


def _build(cfg: SiglipVisionConfig) -> SemanticEncoder:
    """Random weights for a config made from scratch; the folder's weights for one read from a folder."""
    path = cfg.name_or_path
    vit = SiglipVisionModel.from_pretrained(path) if path else SiglipVisionModel(cfg)
    return SemanticEncoder(vit)


FLAVORS = {
    "tiny": Flavor(lambda **o: _config(_TINY, **o), _build, "2 layers, width 32, patch 4, 32 px"),
    "paper": Flavor(lambda **o: _config(_PAPER, **o), _build, "SigLIP2 so400m patch16 512"),
    "pretrained": Flavor(_pretrained_config, _build, "transformers folder (path=)"),
}
