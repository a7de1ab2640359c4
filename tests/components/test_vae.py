"""FLUX.2 VAE wrapper: patchify order, normalisation maths, frozen, pretrained round trip."""

import pytest
import torch
from diffusers import AutoencoderKLFlux2

from cheers_pl import registry
from cheers_pl.components.vae import FluxVAE, patchify, unpatchify


def test_patchify_matches_flux2_layout_and_inverts():
    z = torch.randn(2, 3, 8, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 4, 3)
    # channel c*4 + 2*dy + dx at (i, j) holds z[c, 2i+dy, 2j+dx]
    c, dy, dx, i, j = 1, 1, 0, 2, 1
    assert p[0, c * 4 + 2 * dy + dx, i, j] == z[0, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(unpatchify(p), z)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    vae = registry.build("vae", "tiny")
    vae.vae.bn.running_mean.normal_()
    vae.vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def test_encode_is_normalised_patchified_posterior_mean(tiny_vae):
    x = torch.rand(2, 3, 32, 32)
    z1 = tiny_vae.encode(x)
    assert z1.shape == (2, tiny_vae.latent_channels, 32 // tiny_vae.downsample, 32 // tiny_vae.downsample)
    inner = tiny_vae.vae
    mean = inner.encode(x).latent_dist.mean.double()
    bn = inner.bn
    ref = (patchify(mean) - bn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.double().view(1, -1, 1, 1) + bn.eps
    )
    torch.testing.assert_close(z1.double(), ref, rtol=1e-5, atol=1e-5)
    assert bn.eps == pytest.approx(1e-4)


def test_decode_inverts_the_normalisation(tiny_vae):
    z1 = torch.randn(1, tiny_vae.latent_channels, 8, 8)
    inner = tiny_vae.vae
    bn = inner.bn
    raw = unpatchify(
        z1 * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) + bn.running_mean.view(1, -1, 1, 1)
    )
    torch.testing.assert_close(tiny_vae.decode(z1), inner.decode(raw).sample)


def test_frozen_and_stays_in_eval(tiny_vae):
    assert not any(p.requires_grad for p in tiny_vae.parameters())
    tiny_vae.train()
    assert not tiny_vae.vae.training and not tiny_vae.vae.bn.training
    before = tiny_vae.vae.bn.running_mean.clone()
    tiny_vae.encode(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, tiny_vae.vae.bn.running_mean)


def test_bad_image_size_names_the_size(tiny_vae):
    with pytest.raises(ValueError, match="30x30"):
        tiny_vae.encode(torch.rand(1, 3, 30, 30))


def test_paper_flavor_is_flux2_vae_sizes():
    cfg = registry.config("vae", "paper")
    with torch.device("meta"):
        vae = registry.get("vae", "paper").build(cfg)
    c = vae.vae.config
    assert tuple(c.block_out_channels) == (128, 256, 512, 512) and c.latent_channels == 32
    assert vae.latent_channels == 128 and vae.downsample == 16
    assert sum(p.numel() for p in vae.parameters()) == 84_046_115  # AutoencoderKLFlux2() in diffusers 0.42


def test_pretrained_round_trip(tmp_path, tiny_vae):
    tiny_vae.vae.save_pretrained(tmp_path / "vae")
    loaded = registry.build("vae", "pretrained", path=str(tmp_path / "vae"))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode(x), tiny_vae.encode(x))
    torch.testing.assert_close(loaded.vae.bn.running_var, tiny_vae.vae.bn.running_var)


def test_unknown_override_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="latent_channel.*valid keys"):
        registry.config("vae", "tiny", latent_channel=8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        registry.config("vae", "pretrained", path=str(tmp_path / "nowhere"))
    assert isinstance(AutoencoderKLFlux2(**registry.config("vae", "tiny").kwargs), AutoencoderKLFlux2)


def test_wrapper_type():
    assert isinstance(registry.build("vae", "tiny"), FluxVAE)
