"""The network inside every generative policy head: a conditional MLP denoiser.

    out = MLP([obs, x, emb(s)])        obs [B, O] (flattened features), x [B, D] (noisy action or chunk),
                                       s [B] a noise level in [0, 1], emb its sinusoidal embedding:
    emb(s)_k     = sin(scale * s * f_k),   emb(s)_{k+E/2} = cos(scale * s * f_k),
    f_k          = exp(-ln(10000) k / (E/2 - 1)),  k = 0 .. E/2 - 1

(Vaswani et al. 2017's position code on a continuous time, as DDPM, Diffusion Policy and DPPO feed the step.)
What `out` means is the head's business: DDPM's noise, flow matching's velocity, a consistency model's skip
term. The heads map their own time (DDPM step t / T, flow time t, consistency log sigma) to s in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from policylab.nets.mlp import StackedMLP

TIME_SCALE = 1000.0
"""s in [0, 1] is embedded as s * 1000 (so one DDPM step of T = 100 moves the fastest frequency by 10 rad)."""


def sinusoidal_embedding(s: Tensor, dim: int, scale: float = TIME_SCALE) -> Tensor:
    """[B] -> [B, dim]: sin and cos of scale * s at dim / 2 geometric frequencies from 1 to 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=s.dtype) / max(half - 1, 1))
    angles = (scale * s).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class Denoiser(nn.Module):
    """MLP(obs, x, emb(s)) -> [B, out_dim]; one batched call for all samples (no loop over the batch)."""

    def __init__(
        self,
        obs_dim: int,
        x_dim: int,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        activation: str = "silu",
        time_dim: int = 32,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim={time_dim} must be an even number >= 2")
        self.obs_dim, self.x_dim, self.time_dim = obs_dim, x_dim, time_dim
        self.out_dim = x_dim if out_dim is None else out_dim
        self.body = StackedMLP(1, obs_dim + x_dim + time_dim, hidden_sizes, self.out_dim, activation)
        self._level_rows: dict[tuple[float, torch.dtype], Tensor] = {}

    def forward(self, obs: Tensor, x: Tensor, s: Tensor) -> Tensor:
        """obs [B, ...] (flattened here), x [B, x_dim], s [B] (or a scalar: one level for all) -> [B, out_dim]."""
        if s.dim() == 0:
            embedding = self._level_row(s, x.dtype).expand(x.shape[0], -1)
        else:
            embedding = sinusoidal_embedding(s.to(x.dtype), self.time_dim)
        return self.body(torch.cat([obs.flatten(1), x, embedding], -1))[0]

    def _level_row(self, s: Tensor, dtype: torch.dtype) -> Tensor:
        """The embedding [1, time_dim] of one level, kept per value on the CPU: a sampler's K levels repeat every
        call, and at batch 1 the embedding's seven operator calls were a third of a denoiser call (the same bits
        as embedding the level per row). Elsewhere the value would need a device sync to look up: computed."""
        if s.device.type != "cpu":
            return sinusoidal_embedding(s.to(dtype).reshape(1), self.time_dim)
        key = (float(s), dtype)
        row = self._level_rows.get(key)
        if row is None:
            if len(self._level_rows) >= 4096:  # levels drawn from a continuum (flow time): do not grow forever
                self._level_rows.clear()
            row = self._level_rows[key] = sinusoidal_embedding(s.to(dtype).reshape(1), self.time_dim)
        return row
