"""Batch renormalization (Ioffe 2017, arXiv:1702.03275) for the members of a `StackedMLP`, as CrossQ uses it
(Bhatt et al. 2024, arXiv:1902.05605): one normalization before each linear layer.

A layer normalizes its input x [K, B, d] per member and feature:

    with batch statistics (inside `batch_statistics(...)`, training steps only):
        mu_B, var_B = mean and unbiased variance of x over the batch; the running ones move towards them by
        `momentum`; after `warmup_steps` such calls the batch's normalization is corrected towards the running
        one by r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max), both
        without gradient (sigma = sqrt(var + eps)): x_hat = (x - (mu_B - d sqrt(var_B) / r)) / sqrt(var_B / r^2 + eps)
        (before the warmup: plain batch normalization, r = 1, d = 0)
    otherwise (acting, evaluation, target values, the actor's loss through the critic):
        x_hat = (x - mu) / sqrt(var + eps), the running statistics
    y = scale * x_hat + shift

Running statistics are the default so that a loaded policy, an evaluation or a single observation never
normalizes by its own batch; training code opts in to batch statistics with the context manager.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

R_MAX, D_MAX = 3.0, 5.0


@dataclass(frozen=True)
class RenormSettings:
    """Batch renormalization's settings; defaults are CrossQ's (sb3-contrib's)."""

    momentum: float = 0.01
    eps: float = 1e-3
    warmup_steps: int = 100_000
    """Calls with batch statistics before the running statistics correct them (r and d)."""


class StackedBatchRenorm(nn.Module):
    """Batch renormalization of a [K, B, d] input, each of the K members with its own statistics, scale and shift."""

    running_mean: Tensor
    running_var: Tensor
    steps: Tensor

    def __init__(self, members: int, dim: int, settings: RenormSettings) -> None:
        super().__init__()
        self.settings = settings
        self.scale = nn.Parameter(torch.ones(members, 1, dim))
        self.shift = nn.Parameter(torch.zeros(members, 1, dim))
        self.register_buffer("running_mean", torch.zeros(members, 1, dim))
        self.register_buffer("running_var", torch.ones(members, 1, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._steps = 0
        """The `steps` buffer as a Python int, so that the warmup test reads no tensor (no device sync)."""

    def forward(self, x: Tensor, batch_stats: bool) -> Tensor:
        """x: [k, B, d], the input of the first k members."""
        k = len(x)
        mean, var = self.running_mean[:k], self.running_var[:k]
        if batch_stats:
            mean, var = self._batch_statistics(x, k)
        return torch.addcmul(self.shift[:k], (x - mean) * torch.rsqrt(var + self.settings.eps), self.scale[:k])

    def _batch_statistics(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The (mean, variance) to normalize `x` with, and one step of the running statistics."""
        s = self.settings
        batch_var, batch_mean = torch.var_mean(x, dim=1, keepdim=True)
        mean, var = batch_mean, batch_var
        running_mean, running_var = self.running_mean[:k], self.running_var[:k]
        if self._steps > s.warmup_steps:
            with torch.no_grad():
                running_std = (running_var + s.eps).sqrt()
                r = ((batch_var + s.eps).sqrt() / running_std).clamp(1.0 / R_MAX, R_MAX)
                d = ((batch_mean - running_mean) / running_std).clamp(-D_MAX, D_MAX)
            mean = batch_mean - d * batch_var.sqrt() / r
            var = batch_var / (r * r)
        with torch.no_grad():
            running_mean.lerp_(batch_mean.detach(), s.momentum)
            running_var.lerp_(batch_var.detach(), s.momentum)
            self._steps += 1
            self.steps.fill_(self._steps)
        return mean, var

    def numpy_forward(self, x: np.ndarray, member: int | None) -> np.ndarray:
        """The running-statistics normalization in numpy (acting on the CPU): x [B, d] with `member`, else [K, B, d]."""
        index: Any = member if member is not None else slice(None)
        mean, var = self.running_mean.numpy()[index], self.running_var.numpy()[index]
        scale, shift = self.scale.detach().numpy()[index], self.shift.detach().numpy()[index]
        return (x - mean) * (scale / np.sqrt(var + self.settings.eps)) + shift

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.steps)


@contextmanager
def batch_statistics(*modules: nn.Module) -> Iterator[None]:
    """Inside: every batch-renormalized `StackedMLP` in `modules` normalizes by batch statistics and updates its
    running ones (CrossQ's training passes); outside, running statistics."""
    from policylab.nets.mlp import StackedMLP  # mlp.py imports this module

    bodies = [m for module in modules for m in module.modules() if isinstance(m, StackedMLP) and m.renorms]
    for body in bodies:
        body.batch_stats = True
    try:
        yield
    finally:
        for body in bodies:
            body.batch_stats = False
