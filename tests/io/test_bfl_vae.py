"""FLUX.2 VAE names: BFL <-> diffusers, exact round trip, the BFL key set, folder conversion."""

import re

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import save_file

from cheers_pl import registry
from cheers_pl.io import bfl_vae

TINY = registry.config("vae", "tiny").kwargs


def bfl_names(ch_mult, num_res_blocks):
    """The BFL autoencoder's tensor names, written from its module layout (not from the mapping)."""
    names = ["encoder.conv_in", "decoder.conv_in", "encoder.norm_out", "encoder.conv_out"]
    names += ["decoder.norm_out", "decoder.conv_out", "encoder.quant_conv", "decoder.post_quant_conv"]

    def resnet(prefix, cin, cout):
        parts = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if cin != cout else [])
        return [f"{prefix}.{p}" for p in parts]

    chans = [ch_mult[0]] + list(ch_mult)
    for i in range(len(ch_mult)):  # encoder: down.i.block.j, downsample below the last level
        cin = chans[i]
        for j in range(num_res_blocks):
            names += resnet(f"encoder.down.{i}.block.{j}", cin, ch_mult[i])
            cin = ch_mult[i]
        if i != len(ch_mult) - 1:
            names.append(f"encoder.down.{i}.downsample.conv")
    cin = ch_mult[-1]
    for i in reversed(range(len(ch_mult))):  # decoder: up.i runs from the top level down
        for j in range(num_res_blocks + 1):
            names += resnet(f"decoder.up.{i}.block.{j}", cin, ch_mult[i])
            cin = ch_mult[i]
        if i != 0:
            names.append(f"decoder.up.{i}.upsample.conv")
    for side in ("encoder", "decoder"):
        names += resnet(f"{side}.mid.block_1", 1, 1) + resnet(f"{side}.mid.block_2", 1, 1)
        names += [f"{side}.mid.attn_1.{p}" for p in ("norm", "q", "k", "v", "proj_out")]
    out = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    return out | {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


@pytest.mark.parametrize("kwargs", [TINY, {}], ids=["tiny", "paper"])
def test_names_round_trip_and_match_bfl_layout(kwargs):
    state = bfl_vae.meta_autoencoder(**kwargs).state_dict()
    bfl = bfl_vae.diffusers_to_bfl(state)
    assert len(bfl) == len(state)  # injective: no two diffusers names on one BFL name
    back = bfl_vae.bfl_to_diffusers(bfl)
    assert list(back) == list(state)
    assert all(back[k].shape == state[k].shape for k in state)
    cfg = bfl_vae.meta_autoencoder(**kwargs).config
    assert set(bfl) == bfl_names(cfg.block_out_channels, cfg.layers_per_block)
    for name, t in bfl.items():  # BFL's attention projections are 1x1 convs
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name):
            assert t.ndim == 4 and t.shape[2:] == (1, 1)


def test_paper_layout_landmarks():
    bfl = bfl_vae.diffusers_to_bfl(bfl_vae.meta_autoencoder().state_dict())
    assert len(bfl) == 251  # 250 in BFL's files, which lack bn.num_batches_tracked
    assert bfl["encoder.quant_conv.weight"].shape == (64, 64, 1, 1)
    assert bfl["decoder.post_quant_conv.weight"].shape == (32, 32, 1, 1)
    assert bfl["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # highest resolution
    assert bfl["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # lowest resolution, runs first
    assert bfl["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert bfl["bn.running_mean"].shape == (128,)


def test_tiny_tensors_round_trip_exactly():
    torch.manual_seed(0)
    state = AutoencoderKLFlux2(**TINY).state_dict()
    back = bfl_vae.bfl_to_diffusers(bfl_vae.diffusers_to_bfl(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_unknown_names_are_refused_by_name():
    with pytest.raises(ValueError, match="encoder.down.0.block.0.bogus.weight"):
        bfl_vae.bfl_to_diffusers({"encoder.down.0.block.0.bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not diffusers-named"):
        bfl_vae.diffusers_to_bfl({"transformer.x": torch.zeros(1)})


def test_bfl_file_converts_to_a_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**TINY).eval()
    vae.bn.running_mean.normal_()
    vae.bn.running_var.uniform_(0.5, 2.0)
    bfl = bfl_vae.diffusers_to_bfl(vae.state_dict())
    del bfl["bn.num_batches_tracked"]  # as in BFL's ae.safetensors
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "ae.safetensors"))
    out = bfl_vae.convert_bfl_vae_folder(tmp_path / "ae.safetensors", tmp_path / "diffusers", TINY)
    loaded = AutoencoderKLFlux2.from_pretrained(out).eval()
    ref = vae.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items() if "num_batches" not in k)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    # the kit's pretrained flavor reads it
    kit_vae = registry.build("vae", "pretrained", path=str(out))
    assert torch.equal(kit_vae.vae.bn.running_mean, vae.bn.running_mean)


def test_wrong_config_fails_naming_the_shapes(tmp_path):
    bfl = bfl_vae.diffusers_to_bfl(AutoencoderKLFlux2(**TINY).state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match="missing|another shape"):
        bfl_vae.convert_bfl_vae_folder(tmp_path / "ae.safetensors", tmp_path / "out")  # paper config
