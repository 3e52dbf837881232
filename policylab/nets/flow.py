"""Conditional flow-matching policy head (Lipman et al. 2023, arXiv:2210.02747; the linear "rectified" path of
Liu et al. 2023, arXiv:2209.03003), sampled by Euler steps.

With x0 ~ N(0, I) the noise, x1 the data (an action or a chunk in [-1, 1]) and t in [0, 1]:
    x_t   = (1 - t) x0 + t x1,        target velocity u = x1 - x0
    loss  = mean_dims (v_theta(obs, x_t, t) - u)^2                                      (per sample, [B])
    t     ~ U(0, 1) ("uniform"), or "beta": t = 0.999 (1 - w), w ~ Beta(1.5, 1) (pi_0, Black et al. 2024,
            arXiv:2410.24164: more weight on the noisy end; drawn as w = u^(1 / 1.5) by the inverse CDF)
Sampling: x = x0 ~ N(0, I), then K Euler steps  x <- x + v_theta(obs, x, k / K) / K,  k = 0 .. K-1;
the action is x clipped to [-1, 1].

FPO (McAllister et al. 2025, arXiv:2507.21053) replaces PPO's likelihood ratio by exp(L_old - L_new), with L the
flow-matching loss of the taken action at the same (noise, t) draws: `per_sample_loss(obs, actions, noise, t)`
takes them as arguments (draw them once per rollout; repeat the rows for several draws per action).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policylab.nets.denoiser import Denoiser

BETA_SHAPE = 1.5
BETA_CUTOFF = 0.999


class FlowHead(nn.Module):
    """A velocity field over x in R^D conditioned on obs; see the module docstring."""

    def __init__(self, denoiser: Denoiser, sample_steps: int = 10, time_sampling: str = "uniform") -> None:
        super().__init__()
        if sample_steps < 1:
            raise ValueError(f"sample_steps={sample_steps} must be >= 1")
        if time_sampling not in ("uniform", "beta"):
            raise ValueError(f"time_sampling={time_sampling!r} is not uniform or beta")
        self.denoiser = denoiser
        self.dim = denoiser.x_dim
        self.sample_steps = sample_steps
        self.time_sampling = time_sampling

    def velocity(self, obs: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v_theta(obs, x, t) [B, D]; t [B] or a scalar in [0, 1]."""
        return self.denoiser(obs, x, t)

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """t [n] from the training distribution."""
        u = torch.rand(n, generator=generator, device=device)
        if self.time_sampling == "uniform":
            return u
        return BETA_CUTOFF * (1.0 - u.pow(1.0 / BETA_SHAPE))

    def loss(self, obs: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample flow-matching loss [B] at random (noise, t)."""
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        return self.per_sample_loss(obs, x1, noise, self.sample_time(x1.shape[0], generator, x1.device))

    def per_sample_loss(self, obs: Tensor, x1: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """mean_dims (v_theta(obs, (1 - t) noise + t x1, t) - (x1 - noise))^2: [B] (FPO's L at given draws)."""
        tt = t.unsqueeze(-1)
        x_t = (1.0 - tt) * noise + tt * x1
        return (self.velocity(obs, x_t, t) - (x1 - noise)).pow(2).mean(-1)

    def sample(
        self,
        obs: Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        deterministic: bool = False,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Actions [B, D] in [-1, 1] by K Euler steps from x ~ N(0, I) (`deterministic`: from x = 0; `noise`: from
        these pre-drawn standard normals [B, D])."""
        k_steps = self.sample_steps if steps is None else steps
        shape = (obs.shape[0], self.dim)
        if noise is not None:
            x = noise
        elif deterministic:
            x = torch.zeros(shape, device=obs.device)
        else:
            x = torch.randn(shape, generator=generator, device=obs.device)
        dt = 1.0 / k_steps
        for k in range(k_steps):
            x = x + dt * self.velocity(obs, x, torch.tensor(k * dt, device=obs.device))
        return x.clamp(-1.0, 1.0)
