"""The CPU fast path (``model.fast``, :mod:`cheers_pl.components.fast_conv`) gives the plain path's outputs.

Every comparison is fp32, fast against ``fast = False`` (the plain diffusers modules), within 1e-5
of the output's scale: the VAE latents, D's pixels, SigLIP's patch embeddings, the final image, the
training step's losses and gradients, the sampler's latents and the answer's tokens.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from cheers_pl.components import fast_conv
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from tests.helpers import tiny_random_model

EPS = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """max |a - b| <= 1e-5 x max(1, max |b|)."""
    assert a.shape == b.shape
    bound = EPS * max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max())
    assert diff <= bound, f"max |diff| {diff:.2e} > {bound:.2e}"


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


@pytest.fixture
def images(model):
    return torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))


def _both(model, fn):
    """fn() with the fast path, then with the plain one (the model left fast)."""
    try:
        model.fast = True
        fast = fn()
        model.fast = False
        plain = fn()
    finally:
        model.fast = True
    return fast, plain


def test_fast_is_the_default_and_reaches_both_decoders(model):
    assert model.fast and model.vae.fast and model.pixel_decoder.fast
    assert not model.compile_decoders
    model.fast = False
    assert not model.vae.fast and not model.pixel_decoder.fast
    model.fast = True


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upsample_as_four_2x2_convs(dtype):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).to(dtype)
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=dtype)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = fast_conv.upsample_conv(conv, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


@torch.no_grad()
def test_vae_d_and_patch_embeddings(model, images):
    def run():
        z = model.vae.encode(images)
        pixels = model.pixel_decoder(z)
        features, detail = model.semantic_encoder(pixels)
        return z, pixels, features, detail, model.vae.decode(z)

    for fast, plain in zip(*_both(model, run), strict=True):
        close(fast, plain)


def test_training_step_losses_and_gradients(model):
    batch = mixed_batch(model)

    def step():
        m = copy.deepcopy(model).train()
        out = m(batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        return out, grads

    (fo, fg), (po, pg) = _both(model, step)
    for key in ("loss", "loss_text", "loss_fm"):
        close(getattr(fo, key).detach(), getattr(po, key).detach())
    assert fg.keys() == pg.keys() and any(n.startswith("pixel_decoder.") for n in fg)
    for name in fg:
        close(fg[name], pg[name])


def test_generate_latents(model):
    def run():
        return model.generate(["a cup of coffee", "a red bicycle"], cfg_scale=4.0, steps=3, seed=1).latents

    close(*_both(model, run))


def test_answer_tokens(model, images):
    def run():
        return model.answer(images, ["What is it?", "Which colour?"], max_new_tokens=6, return_ids=True).ids

    fast, plain = _both(model, run)
    assert [r.tolist() for r in fast] == [r.tolist() for r in plain]


def test_unsupported_decoder_runs_as_it_is(model):
    """With diffusers' gradient checkpointing on (and recording) the module's own forward runs."""
    dec = copy.deepcopy(model.pixel_decoder.decoder)
    dec.gradient_checkpointing = True
    dec._gradient_checkpointing_func = lambda f, *args: f(*args)
    z = torch.randn(1, dec.conv_in.in_channels, 4, 4)
    calls = []
    dec.register_forward_hook(lambda *a: calls.append(1))
    fast_conv.decoder_forward(dec, z)
    assert calls == [1]


def test_compile_falls_back_with_one_line(monkeypatch, capsys):
    def broken(fn, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fast_conv, "_COMPILED", {})
    assert fast_conv.run_compiled(lambda x: x + 1, 0, torch.ones(2)).tolist() == [2.0, 2.0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile unavailable" in err[0] and "eagerly" in err[0]


def test_allocator_tuning_is_once_and_optional(monkeypatch):
    monkeypatch.setattr(fast_conv, "_TUNED", [])
    monkeypatch.setenv("CHEERS_TUNE_MALLOC", "0")
    assert fast_conv.tune_cpu_allocator() is False
    assert fast_conv.tune_cpu_allocator() is False and fast_conv._TUNED == [False]


def test_the_stage_modules_carry_the_switch():
    from cheers_pl.stages import PretrainStage

    plain = PretrainStage(spec=CheersSpec.tiny(), fast=False)
    plain.configure_model()
    assert not plain.model.fast and not plain.model.pixel_decoder.fast and not plain.model.vae.fast
    default = PretrainStage(spec=CheersSpec.tiny())
    default.configure_model()
    assert default.model.fast and not default.model.compile_decoders
    assert default.hparams["fast"] is True and plain.hparams["fast"] is False  # saved with the run
