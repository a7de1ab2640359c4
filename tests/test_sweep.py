"""`cheers sweep`: a base stage under two overlays writes a results table with both rows."""

import csv
import sys

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


def test_each_run_is_announced_on_stderr_before_it_starts(tmp_path, monkeypatch, capsys):
    from cheers_pl import sweep

    calls = []

    def fake_fit(configs, root, steps, seed, data_root, extra):
        calls.append(root.name)
        print(f"training {root.name}", file=sys.stderr)
        return root / "last.ckpt"

    monkeypatch.setattr(sweep, "fit", fake_fit)
    monkeypatch.setattr(sweep, "load_any", lambda ckpt: None)
    monkeypatch.setattr(sweep, "last_scalars", lambda root: {"train/loss": 1.0})
    monkeypatch.setattr(sweep, "heldout_fm_loss", lambda model, shards: 0.5)
    (tmp_path / "out").mkdir()
    overlay = str(EXPERIMENTS / "ablations" / "hfi_none.yaml")
    run_sweep(str(EXPERIMENTS / "stage2_pretrain.yaml"), ["base", overlay], str(tmp_path / "out"), seed=3)
    captured = capsys.readouterr()
    out = tmp_path / "out"
    assert captured.err.splitlines() == [
        f"cheers sweep: stage I first, shared by every run: {out / '_stage1'} (seed 3)",
        "training _stage1",
        f"cheers sweep: run 1/2: base -> {out / 'base'} (seed 3)",
        "training base",
        f"cheers sweep: run 2/2: {overlay} -> {out / 'hfi_none'} (seed 3)",
        "training hfi_none",
    ]
    assert captured.out.startswith("| run |")  # stdout: the table only


def test_a_missing_overlay_stops_before_any_run(tmp_path, monkeypatch, capsys):
    from cheers_pl import sweep

    monkeypatch.setattr(sweep, "fit", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--overlays", "base", "nope.yaml", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "cheers sweep: error: no such YAML: nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "word"), [("--clip", "CLIP weights folder not found"), ("--vae", "no diffusers VAE folder")]
)
def test_a_wrong_clip_or_vae_folder_stops_before_any_run(tmp_path, monkeypatch, capsys, flag, word):
    from cheers_pl import sweep

    monkeypatch.setattr(sweep, "fit", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--overlays", "base", "--out", str(tmp_path), flag, str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    assert word in capsys.readouterr().err
