"""Pixel decoder D: the trainable copy of the VAE decoder that maps z_t back to pixels.

D(z_t) = decoder(post_quant_conv(unpatchify(z_t * std + mean))), with mean/std the frozen
VAE's ``bn`` running statistics. The frozen VAE keeps its own decoder for final decoding; D is
initialised from it and then trained with the rest of the model (DESIGN section 1).
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from cheers_pl.components import vae as vae_lib
from cheers_pl.components.flavor import Flavor


class PixelDecoder(nn.Module):
    """D: z_t (B, 4C, h, w) normalised latents -> pixels (B, 3, h*f, w*f). Trainable.

    ``fast`` / ``compile_decoder``: as :class:`~cheers_pl.components.vae.FluxVAE`'s (the fast path by
    default; ``fast = False`` runs the plain diffusers decoder, the reference)."""

    fast: bool = True
    compile_decoder: bool = False

    def __init__(self, decoder: nn.Module, post_quant_conv: nn.Module | None, bn: nn.BatchNorm2d):
        super().__init__()
        self.decoder = decoder
        self.post_quant_conv = post_quant_conv
        self.bn = bn  # only its running statistics are read; never called, never updated
        self.decoder.requires_grad_(True)
        if post_quant_conv is not None:
            post_quant_conv.requires_grad_(True)

    @classmethod
    def from_vae(cls, vae: vae_lib.FluxVAE) -> PixelDecoder:
        """A deep copy of ``vae``'s decoder, post-quant conv and ``bn`` statistics."""
        inner = vae.vae
        return cls(
            copy.deepcopy(inner.decoder), copy.deepcopy(inner.post_quant_conv), copy.deepcopy(inner.bn)
        )

    def forward(self, z: Tensor) -> Tensor:
        """z (B, 4C, h, w) -> (B, 3, H, W)."""
        return vae_lib.decode_latents(
            self.post_quant_conv, self.decoder, self.bn, z, self.fast, self.compile_decoder
        )


def _build(cfg: vae_lib.VAEConfig) -> PixelDecoder:
    return PixelDecoder.from_vae(vae_lib.FluxVAE(vae_lib.build_vae(cfg)))


# Same configs as the VAE's flavors; CheersModel itself copies D from its own frozen VAE.
FLAVORS = {name: Flavor(f.config, _build, f.doc) for name, f in vae_lib.FLAVORS.items()}
