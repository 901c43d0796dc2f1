"""Sampler math on a flow whose exact velocity is known: Gaussian data x0 ~ N(mu, s^2)."""
import math

import pytest
import torch

from nit_model.solvers import SDE_T_MIN, guided, solve, time_grid

MU, S = 1.5, 0.4


def exact_velocity(x, t):
    """E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps, x0 ~ N(MU, S^2), eps ~ N(0, 1)."""
    m = (1 - t) * MU
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    e_x0 = MU + (1 - t) * S ** 2 / var * (x - m)
    e_eps = t / var * (x - m)
    return e_eps - e_x0


def _noise_fn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(shape, generator=g, dtype=torch.float64)


def test_time_grids():
    assert time_grid(4, "euler") == [1.0, 0.75, 0.5, 0.25, 0.0]
    g = time_grid(5, "sde")
    assert g[0] == 1.0 and g[-2] == pytest.approx(SDE_T_MIN) and g[-1] == 0.0 and len(g) == 6
    with pytest.raises(ValueError, match="solver must be"):
        time_grid(4, "dpm")
    with pytest.raises(ValueError, match="steps"):
        time_grid(0, "euler")


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ode_converges_to_the_exact_transport_map(solver):
    # The exact probability-flow ODE maps z = x_1 to x_0 = MU + S z (an affine map); the
    # per-sample error must shrink as steps grow, and Heun must beat Euler.
    z = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = MU + S * z
    errs = [(solve(exact_velocity, z.clone(), steps=n, solver=solver) - target).abs().max().item()
            for n in (4, 16, 64)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < (5e-2 if solver == "euler" else 2e-3)


def test_heun_is_second_order_and_more_accurate_than_euler():
    z = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = MU + S * z
    err = {s: [(solve(exact_velocity, z.clone(), steps=n, solver=s) - target).abs().max().item() for n in (8, 16)]
           for s in ("euler", "heun")}
    assert err["heun"][1] < err["euler"][1]
    # halving the step roughly halves Euler's error and quarters Heun's
    assert err["euler"][0] / err["euler"][1] == pytest.approx(2, rel=0.35)
    assert err["heun"][0] / err["heun"][1] > 3


def test_sde_samples_the_right_distribution():
    n = 20000
    z = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = solve(exact_velocity, z, steps=200, solver="sde", noise=_noise_fn((n,), 3))
    # mean and std of N(MU, S^2) within a few standard errors (plus the final-step bias)
    assert x.mean().item() == pytest.approx(MU, abs=4 * S / math.sqrt(n) + 0.01)
    assert x.std().item() == pytest.approx(S, rel=0.05)


def test_sde_needs_noise_and_last_step_is_deterministic():
    with pytest.raises(ValueError, match="noise"):
        solve(exact_velocity, torch.zeros(3, dtype=torch.float64), steps=4, solver="sde")
    calls = []

    def noise(i):
        calls.append(i)
        return torch.zeros(3, dtype=torch.float64)

    solve(exact_velocity, torch.zeros(3, dtype=torch.float64), steps=5, solver="sde", noise=noise)
    assert calls == [0, 1, 2, 3]  # 5 steps: 4 stochastic, then the deterministic one to t = 0


def test_cfg_only_inside_the_guidance_interval():
    seen = []

    def cond(x, t):
        seen.append(("cond", t))
        return torch.ones_like(x)

    def both(x, t):
        seen.append(("both", t))
        return torch.ones_like(x), -torch.ones_like(x)

    v = guided(cond, both, cfg_scale=3.0, interval=(0.3, 0.6))
    for t in (1.0, 0.6, 0.45, 0.3, 0.1):
        out = v(torch.zeros(2), t)
        inside = 0.3 <= t <= 0.6
        assert torch.equal(out, torch.full((2,), 5.0 if inside else 1.0))  # v_u + 3 (v_c - v_u) = -1 + 6
    assert seen == [("cond", 1.0), ("both", 0.6), ("both", 0.45), ("both", 0.3), ("cond", 0.1)]
    # cfg_scale <= 1 never runs the unconditional half
    seen.clear()
    guided(cond, both, cfg_scale=1.0)(torch.zeros(2), 0.5)
    assert seen == [("cond", 0.5)]
    with pytest.raises(ValueError, match="interval"):
        guided(cond, both, cfg_scale=2.0, interval=(0.7, 0.2))
