"""Semantic encoder: SigLIP features and patch embeddings from one pass; latent (TUNA) mode."""

import pytest
import torch

from cheers_pl import registry
from cheers_pl.components.semantic_encoder import SemanticEncoder


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return registry.build("semantic_encoder", "tiny").eval()


def test_features_match_siglip_and_embeddings_are_the_patch_stage(enc):
    x = torch.rand(2, 3, 32, 32)
    feats, emb = enc(x)
    assert feats.shape == emb.shape == (2, 64, 32)
    torch.testing.assert_close(feats, enc.vit(pixel_values=x).last_hidden_state)
    conv = enc.vit.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
    pos = enc.vit.embeddings.position_embedding.weight
    torch.testing.assert_close(emb, conv + pos)


def test_pooling_head_is_frozen_and_rest_trains(enc):
    assert not any(p.requires_grad for p in enc.vit.head.parameters())
    assert all(p.requires_grad for n, p in enc.named_parameters() if not n.startswith("vit.head"))


def test_wrong_size_names_the_expected_size(enc):
    with pytest.raises(ValueError, match="32x32"):
        enc(torch.rand(1, 3, 64, 64))


def test_latent_mode_uses_a_new_patch_embedding(enc):
    lat = SemanticEncoder(enc.vit, "latent", latent_channels=16)
    z = torch.randn(2, 16, 8, 8)
    feats, emb = lat(z)
    assert feats.shape == (2, 64, 32)
    assert lat.latent_patch_embedding.in_channels == 16
    z2 = z.clone()
    z2[0, :, 3, 4] += 1.0  # one latent position -> exactly one token of the embedding
    _, emb2 = lat(z2)
    changed = (emb2 - emb).abs().sum(-1) > 0
    assert changed[0].nonzero().flatten().tolist() == [3 * 8 + 4] and not changed[1].any()
    with pytest.raises(ValueError, match="valid choices"):
        SemanticEncoder(enc.vit, "pixels")


def test_paper_parameter_count_is_siglip2_so400m():
    with torch.device("meta"):
        enc = registry.build("semantic_encoder", "paper")
    assert sum(p.numel() for p in enc.parameters()) == 428_772_800
    assert enc.num_tokens == 1024 and enc.hidden_size == 1152


def test_pretrained_round_trip(tmp_path, enc):
    enc.vit.save_pretrained(tmp_path / "siglip")
    loaded = registry.build("semantic_encoder", "pretrained", path=str(tmp_path / "siglip")).eval()
    x = torch.rand(1, 3, 32, 32)
    for a, b in zip(loaded(x), enc(x), strict=True):
        torch.testing.assert_close(a, b)
