"""Flow matching maths: path, target, time shift, schedule, Euler on analytic fields, CFG."""

import math

import pytest
import torch

from cheers_pl import flow


def test_path_and_target():
    z1, z0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    zt = flow.interpolate(z1, z0, t)
    torch.testing.assert_close(zt[0], z0[0])
    torch.testing.assert_close(zt[2], z1[2])
    torch.testing.assert_close(zt[1], 0.25 * z1[1] + 0.75 * z0[1])
    torch.testing.assert_close(flow.velocity_target(z1, z0), z1 - z0)


def test_sample_t_is_clamped_uniform():
    t = flow.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-6 and t.max() <= 1 - 1e-6
    assert abs(float(t.mean()) - 0.5) < 0.01


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_time_shift_formula_and_endpoints(shift):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ts = flow.time_shift(t, shift)
    ref = torch.tensor([shift * x / (1 + (shift - 1) * x) for x in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ts, ref)
    assert float(ts[0]) == 0.0 and float(ts[-1]) == pytest.approx(1.0)
    assert (ts.diff() > 0).all()
    if shift < 1:
        assert (ts[1:-1] < t[1:-1]).all()  # a < 1 spends more of the grid near the noise end


def test_time_shift_rejects_non_positive():
    with pytest.raises(ValueError, match="shift"):
        flow.time_shift(torch.tensor([0.5]), 0.0)


def test_released_schedule_uses_last_dt_one_over_n():
    t, dt = flow.sampling_schedule(5, shift=0.5, last_dt="released")
    grid = flow.time_shift(torch.linspace(0, 1, 5, dtype=torch.float64), 0.5)
    torch.testing.assert_close(t, grid)
    torch.testing.assert_close(dt[:-1], grid.diff())
    assert float(dt[-1]) == pytest.approx(1 / 5)
    assert float(dt.sum()) == pytest.approx(1 + 1 / 5)


def test_exact_schedule_lands_on_one():
    t, dt = flow.sampling_schedule(7, shift=2.0, last_dt="exact")
    assert float(t[0]) == 0.0 and float(t[-1] + dt[-1]) == pytest.approx(1.0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="steps"):
        flow.sampling_schedule(0)
    with pytest.raises(ValueError, match="valid choices"):
        flow.sampling_schedule(4, last_dt="midpoint")


def test_euler_on_the_straight_path_is_exact():
    z0, z1 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t, dt = flow.sampling_schedule(9, shift=0.5, last_dt="exact")
    out = flow.euler_sample(lambda z, ti, i: z1 - z0, z0, t, dt)
    torch.testing.assert_close(out, z1)


def test_euler_converges_at_first_order_on_a_time_varying_field():
    # dz/dt = cos(t) z  =>  z(1) = z(0) exp(sin 1)
    z0 = torch.ones(1, dtype=torch.float64)
    errors = []
    for n in (50, 100, 200):
        t, dt = flow.sampling_schedule(n, last_dt="exact")
        out = flow.euler_sample(lambda z, ti, i: math.cos(ti) * z, z0, t, dt)
        errors.append(abs(float(out) - math.exp(math.sin(1.0))))
    assert errors[0] < 0.02
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2


def test_euler_calls_back_every_step():
    seen = []
    t, dt = flow.sampling_schedule(4)
    flow.euler_sample(
        lambda z, ti, i: torch.zeros_like(z), torch.zeros(1), t, dt, lambda i, z: seen.append(i)
    )
    assert seen == [0, 1, 2, 3]


def test_cfg_combine():
    vc, vu = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 9.5), vu + 9.5 * (vc - vu))
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 1.0), vc)
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 0.0), vu)
