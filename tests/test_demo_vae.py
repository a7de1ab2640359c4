"""Stage 0 of the demo: the tiny VAE fitted as an autoencoder on the demo images, saved for ``pretrained``."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cheers_pl import demo_vae, registry
from cheers_pl.components.vae import FluxVAE, build_vae
from cheers_pl.data.schema import from_raw
from cheers_pl.data.shards import expand_shards, read_shard
from data_recipes.demo import main as demo

FIT_STEPS = 60


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo(["--out", str(out), "--digits", "40", "--texts", "5", "--reading", "0", "--heldout-reading", "0"])
    return [str(out / "understanding"), str(out / "generation"), str(out / "text")]


@pytest.fixture(scope="module")
def images(shards):
    return demo_vae.collect_images(shards, 32)


@pytest.fixture(scope="module")
def untrained():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxVAE(build_vae(registry.config("vae", "tiny")))


@pytest.fixture(scope="module")
def fitted(images):
    vae, losses = demo_vae.fit_vae(images, steps=FIT_STEPS, batch_size=8, progress=False)
    return vae, losses


def _mse(vae: FluxVAE, x: torch.Tensor) -> float:
    return (vae.decode(vae.encode(x)) - x).pow(2).mean().item()


def test_collect_images_deduplicates_by_bytes(shards, images):
    every = [b for u in expand_shards(shards) for r in read_shard(u) for b in from_raw(r).images]
    distinct = {hashlib.sha1(b).digest() for b in every}
    assert len(every) > 2 * len(distinct)  # each photo and digit sits in several samples
    assert images.shape == (len(distinct), 3, 32, 32) == (17 + 40, 3, 32, 32)  # 17 photos + 40 digits
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    # understanding alone already holds every distinct image: generation repeats them
    assert len(demo_vae.collect_images(shards[:1], 32)) == len(images)
    assert demo_vae.collect_images(shards, 16, limit=5).shape == (5, 3, 16, 16)


def test_fit_lowers_reconstruction_loss_well_below_untrained(images, untrained, fitted):
    vae, losses = fitted
    assert len(losses) == FIT_STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    before = demo_vae.reconstruction_mse(untrained.vae, images)
    after = demo_vae.reconstruction_mse(vae, images)
    assert after < 0.3 * before, (before, after)


def test_fitted_latents_are_normalised_and_kit_round_trip_reconstructs(images, untrained, fitted):
    kit = FluxVAE(fitted[0])
    z1 = kit.encode(images)
    assert z1.shape == (len(images), kit.latent_channels, 8, 8)
    mean, std = z1.mean(dim=(0, 2, 3)), z1.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.05, mean
    assert (std - 1).abs().max() < 0.05, std
    assert _mse(kit, images) < 0.3 * _mse(untrained, images)


def test_fit_vae_leaves_global_rng_untouched(images):
    state = torch.get_rng_state()
    demo_vae.fit_vae(images[:8], steps=2, batch_size=4, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_and_save_loads_as_pretrained_and_is_idempotent(shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vae"
    kw = dict(size=32, steps=5, limit=12, batch_size=4, seed=3)
    assert demo_vae.fit_and_save(shards, str(out), **kw) == str(out)
    fit = json.loads((out / "fit.json").read_text())
    assert fit["size"] == 32 and fit["steps"] == 5 and fit["images"] == 12 and len(fit["losses"]) == 5

    loaded = registry.build("vae", "pretrained", path=str(out))
    x = demo_vae.collect_images(shards, 32, limit=12)
    ref, _ = demo_vae.fit_vae(x, steps=5, batch_size=4, seed=3, progress=False)  # the fit is deterministic
    ref = FluxVAE(ref)
    assert torch.equal(loaded.vae.bn.running_mean, ref.vae.bn.running_mean)
    assert torch.allclose(loaded.encode(x), ref.encode(x), atol=1e-6)
    z1 = ref.encode(x)
    assert torch.allclose(loaded.decode(z1), ref.decode(z1), atol=1e-6)

    # the second call with the same size and steps does not fit again, and touches no file
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_fit(*a, **k):
        raise AssertionError("fit_vae called")

    monkeypatch.setattr(demo_vae, "fit_vae", no_fit)
    assert demo_vae.fit_and_save(shards, str(out), **kw) == str(out)
    assert demo_vae.main(["--shards", *shards, "--out", str(out), "--steps", "5"]) == 0
    assert "already fitted" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(AssertionError, match="fit_vae called"):  # force=True, or other steps, refit
        demo_vae.fit_and_save(shards, str(out), **{**kw, "force": True})
    with pytest.raises(AssertionError, match="fit_vae called"):
        demo_vae.fit_and_save(shards, str(out), **{**kw, "steps": 6})


def test_the_vae_path_a_demo_checkpoint_keeps_is_absolute(shards, tmp_path, monkeypatch):
    """Issue 14: a cwd-relative ``vae.path`` in the checkpoint's hparams only loaded from the fit's folder."""
    from cheers_pl.demo import _overlay

    monkeypatch.chdir(tmp_path)
    path = demo_vae.fit_and_save(
        shards, "runs/demo/vae", size=32, steps=2, limit=4, batch_size=4, progress=False
    )
    assert path == str(tmp_path / "runs" / "demo" / "vae")
    overlay = json.loads(_overlay(Path("runs/demo"), Path("runs/demo/vae"), 10, "o").read_text())
    assert overlay["model"]["init_args"]["spec"]["vae"]["path"] == path
    monkeypatch.chdir(tmp_path.parent)  # another working folder
    assert registry.build("vae", "pretrained", path=path).latent_channels > 0
