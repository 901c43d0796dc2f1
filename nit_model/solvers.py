"""ODE/SDE solvers of the flow-matching probability path, t from 1 (noise) to 0 (data).

The path is linear: x_t = (1 - t) x_0 + t eps, the model predicts the velocity v = eps - x_0.
Samplers follow the semantics used by SiT/REPA and the NiT release (Ma et al. 2024, "SiT";
Yu et al. 2025, "REPA"):

- euler: t_i = linspace(1, 0, steps + 1), x <- x + (t_{i+1} - t_i) v(x, t_i).
- heun:  the same grid; every step but the last adds Heun's correction
         x <- x + dt (v(x, t_i) + v(x_euler, t_{i+1})) / 2.
- sde:   Euler-Maruyama on the reverse SDE with diffusion g(t)^2 = 2t:
         drift d = v - (g^2 / 2) * score,  score = -((1 - t) v + x) / t,
         x <- x + d dt + g sqrt(|dt|) w;  grid linspace(1, 0.04, steps) then a final
         deterministic step (no noise) from 0.04 to 0.

Classifier-free guidance is applied by the velocity function (see `guided`), only for t inside
the guidance interval [low, high]; outside it the conditional velocity is used alone.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["SOLVERS", "time_grid", "solve", "guided"]

SOLVERS = ("euler", "heun", "sde")
SDE_T_MIN = 0.04  # where the stochastic steps stop; the last step to 0 is deterministic

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int, solver: str) -> list[float]:
    """The times visited, from 1 to 0 (inclusive), as Python floats."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "sde":
        if steps < 2:
            raise ValueError("the sde solver needs steps >= 2 (stochastic steps plus the final deterministic one)")
        grid = torch.linspace(1.0, SDE_T_MIN, steps, dtype=torch.float64).tolist()
        return grid + [0.0]
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def _score(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    # linear path: alpha = 1 - t, sigma = t  ->  E[eps | x_t] = (1 - t) v + x, score = -E[eps | x_t] / t
    return -((1.0 - t) * v + x) / t


def solve(velocity: Velocity, x: torch.Tensor, *, steps: int, solver: str = "euler",
          noise: Optional[Callable[[int], torch.Tensor]] = None,
          progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Integrate from x at t = 1 to t = 0.

    velocity(x, t) -> v with x's shape; noise(i) -> standard normal tensor of x's shape for the
    i-th stochastic step (sde only; drawn per image by the caller so that packing does not change
    the result); progress(i) is called after every step. Math in x's dtype (use fp32 or fp64).
    """
    grid = time_grid(steps, solver)
    if solver == "sde" and noise is None:
        raise ValueError("the sde solver needs a noise(i) function")
    n_steps = len(grid) - 1
    for i in range(n_steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        if solver == "euler":
            x = x + dt * v
        elif solver == "heun":
            x_euler = x + dt * v
            if i < n_steps - 1:  # the last step ends at t = 0, where no second evaluation is needed
                x = x + dt * 0.5 * (v + velocity(x_euler, t_next))
            else:
                x = x_euler
        else:
            drift = v - t * _score(v, x, t)  # g^2 / 2 = t
            x = x + dt * drift
            if i < n_steps - 1:  # the final step to t = 0 is deterministic
                x = x + (2.0 * t) ** 0.5 * abs(dt) ** 0.5 * noise(i)
        if progress is not None:
            progress(i)
    return x


def guided(cond: Callable[[torch.Tensor, float], torch.Tensor],
           cond_and_uncond: Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
           cfg_scale: float, interval: tuple[float, float] = (0.0, 1.0)) -> Velocity:
    """Classifier-free guidance restricted to t in [low, high].

    Inside the interval (and for cfg_scale > 1): v = v_u + cfg_scale * (v_c - v_u), with both
    halves from one call of cond_and_uncond (one packed forward); otherwise v = v_c from cond.
    """
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the guidance interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        if cfg_scale > 1.0 and low <= t <= high:
            v_c, v_u = cond_and_uncond(x, t)
            return v_u + cfg_scale * (v_c - v_u)
        return cond(x, t)

    return velocity
