"""`cheers sweep`: a base stage under two overlays writes a results table with both rows."""

import csv

import pytest

from cheers_pl.cli import main
from cheers_pl.eval.clip_score import save_folder, tiny_clip, tiny_clip_config, tiny_preprocess_config
from cheers_pl.sweep import EXPERIMENTS, run_sweep


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert (
        main(["data", "demo", "--out", str(out), "--digits", "30", "--texts", "20", "--heldout", "16"]) == 0
    )
    return out


def test_two_overlay_sweep_writes_both_rows(tmp_path, demo):
    clip = save_folder(tiny_clip(), tiny_clip_config(), tiny_preprocess_config(), tmp_path / "clip")
    overlays = [
        str(EXPERIMENTS / "ablations" / f) for f in ("hfi_none.yaml", "pixel_reconstruct_latent.yaml")
    ]
    base = str(EXPERIMENTS / "stage2_pretrain.yaml")  # starts from a shared stage-I run
    rows = run_sweep(base, overlays, str(tmp_path / "sweep"), steps=3, data_root=str(demo), clip=str(clip))
    assert (tmp_path / "sweep" / "_stage1" / "checkpoints" / "last.ckpt").is_file()
    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["hfi_none", "pixel_reconstruct_latent"] == [r["run"] for r in rows]
    none, latent = table
    assert none["hfi/gate_mean"] == "n/a" and latent["hfi/gate_mean"] != "n/a"  # no gate without HFI
    assert latent["previews/reconstruction_mse"] == "n/a"  # the latent ablation has no pixel decoder
    for row in table:
        assert float(row["train/loss"]) > 0 and float(row["heldout/loss_fm"]) > 0
        assert 0.0 <= float(row["clip_score"]) <= 100.0
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "| hfi_none |" in md and "heldout" in md


def test_without_clip_weights_the_column_says_unavailable_and_a_vae_folder_is_used(tmp_path, demo):
    from cheers_pl import registry

    vae = registry.build("vae", "tiny")
    vae.vae.save_pretrained(tmp_path / "vae")
    rows = run_sweep(str(EXPERIMENTS / "stage1_alignment.yaml"), ["base"], str(tmp_path / "s"), steps=2,
                     data_root=str(demo), vae=str(tmp_path / "vae"))  # fmt: skip
    assert rows[0]["clip_score"].startswith("unavailable")
    config = sorted((tmp_path / "s" / "base" / "tb").glob("version_*/config.yaml"))[-1].read_text()
    assert str(tmp_path / "vae") in config
