"""The frozen FLUX.2 autoencoder, with the kit's 2x2 patchify and running-stat normalisation.

``diffusers.AutoencoderKLFlux2`` encodes an image to 32 latent channels at 1/8 resolution and
owns a ``bn`` (BatchNorm2d over the 128 patchified channels) whose running statistics normalise
latents; it applies neither the patchify nor the normalisation itself, so this wrapper does:

    encode: x (B,3,H,W) in [0,1] -> posterior mean (B,C,H/8,W/8) -> patchify (B,4C,H/16,W/16)
            -> (z - running_mean) / sqrt(running_var + eps)                      = z1
    decode: z1 -> z * sqrt(var + eps) + mean -> unpatchify -> VAE decoder -> (B,3,H,W)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2
from torch import Tensor, nn

from cheers_pl.components import fast_conv
from cheers_pl.components.flavor import Flavor, apply_overrides


def patchify(z: Tensor) -> Tensor:
    """2x2 space-to-channel, FLUX.2's order: (B,C,H,W) -> (B,4C,H/2,W/2), channel = c*4 + 2*dy + dx."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: Tensor) -> Tensor:
    """Inverse of :func:`patchify`: (B,4C,h,w) -> (B,C,2h,2w)."""
    b, c4, h, w = z.shape
    z = z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, h * 2, w * 2)


def bn_stats(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    """Running mean and std of ``bn`` as (1,C,1,1) tensors on ``like``'s device and dtype."""
    mean = bn.running_mean.view(1, -1, 1, 1).to(like)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps).to(like)
    return mean, std


@dataclass
class VAEConfig:
    """Constructor keywords of ``AutoencoderKLFlux2`` (``kwargs``), or a local folder (``path``)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


class FluxVAE(nn.Module):
    """Frozen FLUX.2 VAE: ``encode`` images to normalised patchified latents z1 and ``decode`` back.

    Attributes:
        latent_channels: channels of z1 (4 x the VAE's latent channels; 128 at paper size).
        downsample: pixels per z1 position along a side (16 at paper size).
        fast: run the encoder and decoder by :mod:`~cheers_pl.components.fast_conv` (channels-last,
            the upsample as 2x2 convolutions, ...); same outputs up to float rounding. False: the
            plain diffusers modules (the reference).
        compile_decoder: also ``torch.compile`` the fast decoder (off: it did not pay off on CPU).
    """

    fast: bool = True
    compile_decoder: bool = False

    def __init__(self, vae: AutoencoderKLFlux2):
        super().__init__()
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.latent_channels = 4 * vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1) * 2

    def train(self, mode: bool = True) -> FluxVAE:
        """Stays in eval mode: the VAE and its ``bn`` statistics are never updated."""
        return super().train(False)

    def check_size(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W), got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's {self.downsample}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) -> z1 (B, latent_channels, H/downsample, W/downsample), posterior mean."""
        self.check_size(images)
        dtype = next(self.vae.parameters()).dtype
        images = images.to(dtype)
        if self.fast and not self.vae.use_tiling:
            moments = fast_conv.encoder_forward(self.vae.encoder, images)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            mean = moments.chunk(2, dim=1)[0]
        else:
            mean = self.vae.encode(images).latent_dist.mean
        z = patchify(mean)
        mu, std = bn_stats(self.vae.bn, z)
        return (z - mu) / std

    @torch.no_grad()
    def decode(self, z1: Tensor) -> Tensor:
        """z1 (B, latent_channels, h, w) -> images (B,3,h*downsample,w*downsample)."""
        return decode_latents(
            self.vae.post_quant_conv, self.vae.decoder, self.vae.bn, z1, self.fast, self.compile_decoder
        )


def decode_latents(
    post_quant_conv: nn.Module | None,
    decoder: nn.Module,
    bn: nn.BatchNorm2d,
    z: Tensor,
    fast: bool = False,
    compile: bool = False,
) -> Tensor:
    """Undo ``bn``'s running stats, unpatchify, post-quant conv and decode: (B,4C,h,w) -> (B,3,H,W).

    ``fast``: the decoder by :func:`fast_conv.decoder_forward` (a channels-last result, same values
    up to float rounding); ``compile``: that, compiled with ``torch.compile``."""
    dtype = next(decoder.parameters()).dtype
    mu, std = bn_stats(bn, z)
    z = unpatchify(z * std + mu).to(dtype)
    if post_quant_conv is not None:
        z = post_quant_conv(z)
    if not fast:
        return decoder(z)
    if compile:
        return fast_conv.run_compiled(fast_conv.decoder_forward, id(decoder), decoder, z)
    return fast_conv.decoder_forward(decoder, z)


# ---------------------------------------------------------------------------------------------
# Flavors
_TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def _valid_keys() -> set[str]:
    return set(inspect.signature(AutoencoderKLFlux2.__init__).parameters) - {"self"}


def _config(base: dict[str, Any], **overrides: Any) -> VAEConfig:
    return VAEConfig(kwargs=apply_overrides(base, overrides, _valid_keys(), "vae"))


def _pretrained_config(path: str) -> VAEConfig:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vae: no config.json in {folder} (expected a diffusers AutoencoderKLFlux2 folder)"
        )
    kwargs = {k: v for k, v in AutoencoderKLFlux2.load_config(folder).items() if not k.startswith("_")}
    return VAEConfig(kwargs=kwargs, path=str(folder))


def build_vae(cfg: VAEConfig) -> AutoencoderKLFlux2:
    """The bare diffusers autoencoder for ``cfg``: random weights, or ``from_pretrained(cfg.path)``."""
    if cfg.path is None:
        return AutoencoderKLFlux2(**cfg.kwargs)
    return AutoencoderKLFlux2.from_pretrained(cfg.path)


FLAVORS = {
    "tiny": Flavor(lambda **o: _config(_TINY, **o), lambda c: FluxVAE(build_vae(c)), "2 blocks, 4 latent ch"),
    "paper": Flavor(lambda **o: _config({}, **o), lambda c: FluxVAE(build_vae(c)), "FLUX.2 VAE sizes"),
    "pretrained": Flavor(_pretrained_config, lambda c: FluxVAE(build_vae(c)), "diffusers folder (path=)"),
}
