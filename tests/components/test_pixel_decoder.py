"""Pixel decoder D: a trainable copy of the frozen VAE's decoder, with the same maths."""

import torch

from cheers_pl import registry
from cheers_pl.components.pixel_decoder import PixelDecoder


def test_copy_decodes_like_the_vae_and_trains_separately():
    torch.manual_seed(0)
    vae = registry.build("vae", "tiny")
    d = PixelDecoder.from_vae(vae)
    z = torch.randn(2, vae.latent_channels, 8, 8)
    torch.testing.assert_close(d(z), vae.decode(z))
    assert all(p.requires_grad for p in d.parameters())
    assert not any(p.requires_grad for p in vae.parameters())
    # training D leaves the frozen VAE's decoder untouched
    d(z).square().mean().backward()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(1.0)
    assert not torch.allclose(d(z), vae.decode(z))
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(d.decoder.parameters(), vae.vae.decoder.parameters(), strict=True)
    )


def test_gradients_reach_the_input():
    d = registry.build("pixel_decoder", "tiny")
    z = torch.randn(1, 16, 8, 8, requires_grad=True)
    d(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pretrained_flavor_copies_the_saved_vae_decoder(tmp_path):
    torch.manual_seed(0)
    vae = registry.build("vae", "tiny")
    vae.vae.save_pretrained(tmp_path / "vae")
    d = registry.build("pixel_decoder", "pretrained", path=str(tmp_path / "vae"))
    z = torch.randn(1, vae.latent_channels, 8, 8)
    torch.testing.assert_close(d(z), vae.decode(z))
