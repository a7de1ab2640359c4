"""The sampler: the cached, batched-CFG ``generate`` against ``generate_reference``, and cfg_interval."""

import pytest
import torch

from cheers_pl import flow
from cheers_pl.model import generate_reference
from tests.helpers import tiny_random_model

PROMPTS = ["a cup of coffee", "a photo of a cat sitting on a red sofa"]  # different lengths
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


def _gen(model, **kw):
    args = dict(cfg_scale=4.0, steps=4, shift=0.5, seed=1)
    return model.generate(PROMPTS, **{**args, **kw}).latents


@pytest.mark.parametrize("last_dt", ["released", "exact"])
def test_reference_equals_generate(model, last_dt):
    ref = generate_reference(model, PROMPTS, cfg_scale=4.0, steps=4, shift=0.5, seed=1, last_dt=last_dt)
    for use_cache in (True, False):
        ours = _gen(model, last_dt=last_dt, use_cache=use_cache)
        torch.testing.assert_close(ours, ref.latents, **TOL)
    assert ref.images.shape == (2, 3, model.image_size, model.image_size)


def test_reference_without_cfg_equals_generate(model):
    ref = generate_reference(model, PROMPTS, cfg_scale=1.0, steps=3, shift=0.5, seed=2)
    torch.testing.assert_close(_gen(model, cfg_scale=1.0, steps=3, seed=2), ref.latents, **TOL)


def test_no_interval_is_the_old_default_bit_for_bit(model):
    fixed = _gen(model)
    assert torch.equal(_gen(model, cfg_interval=None), fixed)
    assert torch.equal(_gen(model, cfg_interval=(0.0, 1.0)), fixed)  # every t lies in [0, 1]
    assert torch.equal(_gen(model, cfg_interval=(0.0, 1.0), use_cache=False), _gen(model, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False])
def test_interval_excluding_every_step_is_conditional_only(model, use_cache):
    none = _gen(model, cfg_interval=(2.0, 3.0), use_cache=use_cache)
    torch.testing.assert_close(none, _gen(model, cfg_scale=1.0, use_cache=use_cache), **TOL)


def test_middle_interval_differs_from_both_and_matches_the_reference(model):
    t = flow.sampling_schedule(4, 0.5)[0].tolist()  # about 0, 0.2, 0.5, 1
    window = ((t[0] + t[1]) / 2, (t[1] + t[2]) / 2)  # CFG at the second step only
    mid = _gen(model, cfg_interval=window)
    assert not torch.allclose(mid, _gen(model), **TOL)
    assert not torch.allclose(mid, _gen(model, cfg_scale=1.0), **TOL)
    torch.testing.assert_close(mid, _gen(model, cfg_interval=window, use_cache=False), **TOL)
    ref = generate_reference(model, PROMPTS, cfg_scale=4.0, steps=4, shift=0.5, seed=1, cfg_interval=window)
    torch.testing.assert_close(mid, ref.latents, **TOL)


def test_interval_gates_and_bad_interval(model):
    out = model.generate(PROMPTS, cfg_scale=4.0, steps=4, seed=1, cfg_interval=(0.1, 0.3), return_gates=True)
    assert out.gates.shape == (4, 2, model.latent_side, model.latent_side)
    with pytest.raises(ValueError, match="cfg_interval"):
        model.generate(PROMPTS, steps=1, cfg_interval=(0.8, 0.2))


def test_bf16_autocast_cached_equals_recomputed(model):
    """Under autocast the image tokens come out of the projector in bf16; the cache holds one dtype."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached, full = _gen(model, steps=2), _gen(model, steps=2, use_cache=False)
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, full, rtol=0.05, atol=0.05)
