"""Batch renormalization (Ioffe 2017, arXiv:1702.03275) for the members of a `StackedMLP`, as CrossQ uses it
(Bhatt et al. 2024, arXiv:1902.05605): one normalization before each linear layer.

A layer normalizes its input x [K, B, d] per member and feature:

    with batch statistics (inside `batch_statistics(...)`, training steps only):
        mu_B, var_B = mean and unbiased variance of x over the batch, sigma_B = sqrt(var_B + eps);
        x_hat = r (x - mu_B) / sigma_B + d, with r = 1, d = 0 for the first `warmup_steps` + 1 such passes and then
        r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max) from the running
        mu, sigma = sqrt(var + eps), both constants (no gradient) as in the paper's algorithm 1; the running
        statistics then move towards the batch's by `momentum`
    otherwise (acting, evaluation, the actor's loss through the critic):
        x_hat = (x - mu) / sqrt(var + eps), the running statistics
    y = scale * x_hat + shift

sb3-contrib's BatchRenorm puts eps inside the corrected variance (sqrt(var_B / r^2 + eps)) and lets gradients
flow through sqrt(var_B) in the mean's correction: the two differ by where eps enters, and after the warmup its
input gradient is NaN for a feature constant over the batch (var_B = 0), where this one's is finite.

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
    """The first warmup_steps + 1 training passes normalize by plain batch statistics (sb3-contrib's count); later
    ones are corrected towards the running statistics (r and d)."""


@dataclass
class RenormStats:
    """One training pass's batch statistics over the B rows of x [K, B, d] and what follows from them ([K, 1, d]
    each): x_hat = (x - mean) * norm + d, y = scale * x_hat + shift = (x - mean) * gain + offset."""

    mean: Tensor
    centred: Tensor  # x - mean, [K, B, d]
    var_eps: Tensor  # the unbiased batch variance + eps
    norm: Tensor  # r / sqrt(var + eps)
    d: Tensor | None  # None (and r = 1) during the warmup
    gain: Tensor  # scale * norm
    offset: Tensor  # shift + scale * d
    rows: int

    def input_grad_terms(self, grad_sum: Tensor, grad_dot: Tensor) -> tuple[Tensor, Tensor]:
        """dL/dx = gain * dL/dy + coef * (x - mean) + const, given grad_sum = sum_B dL/dy and
        grad_dot = sum_B dL/dy (x - mean) (`_Renormalize`'s docstring): returns (coef, const)."""
        coef = -grad_dot * self.gain / (max(self.rows - 1, 1) * self.var_eps)
        return coef, (self.gain * grad_sum).mul_(-1.0 / self.rows)

    def param_grads(self, grad_sum: Tensor, grad_dot: Tensor) -> tuple[Tensor, Tensor]:
        """(dL/dscale, dL/dshift) given grad_sum and grad_dot as in `input_grad_terms`."""
        grad_scale = grad_dot * self.norm if self.d is None else torch.addcmul(grad_dot * self.norm, grad_sum, self.d)
        return grad_scale, grad_sum


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
        if not batch_stats:
            mean, gain = self.running_affine(k)
            return torch.addcmul(self.shift[:k], x - mean, gain)
        stats = self.batch_pass(x)
        return _Renormalize.apply(x, stats, self.scale[:k], self.shift[:k])

    def _params(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) typed as tensors, so that their slices may take the same names."""
        return self.scale, self.shift

    def running_affine(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The running-statistics normalization of the first k members, y = (x - mean) * gain + shift: returns
        (mean, gain), [k, 1, d] each."""
        mean, var, scale = self.running_mean, self.running_var, self._params()[0]
        if k is not None and k != len(scale):
            mean, var, scale = mean[:k], var[:k], scale[:k]
        return mean, scale * torch.rsqrt(var + self.settings.eps)

    def batch_pass(self, x: Tensor) -> RenormStats:
        """A training pass's statistics of x [k, B, d] (the first k members), r and d included; moves the running
        statistics towards the batch's and counts the pass."""
        k, s = len(x), self.settings
        running_mean, running_var = self.running_mean, self.running_var
        scale, shift = self._params()
        if k != len(scale):
            running_mean, running_var, scale, shift = running_mean[:k], running_var[:k], scale[:k], shift[:k]
        with torch.no_grad():
            batch_mean = x.mean(1, keepdim=True)
            centred = x - batch_mean
            batch_var = (centred * centred).sum(1, keepdim=True) / max(x.shape[1] - 1, 1)
            var_eps = batch_var + s.eps
            norm = torch.rsqrt(var_eps)
            r = d = None
            if self._steps > s.warmup_steps:
                running_std = (running_var + s.eps).sqrt()
                r = (var_eps.sqrt() / running_std).clamp(1.0 / R_MAX, R_MAX)
                d = ((batch_mean - running_mean) / running_std).clamp(-D_MAX, D_MAX)
                norm = norm * r
            running_mean.lerp_(batch_mean, s.momentum)
            running_var.lerp_(batch_var, s.momentum)
            self._steps += 1
            self.steps.fill_(self._steps)
            gain = scale * norm
            offset = shift if d is None else torch.addcmul(shift, scale, d)
        return RenormStats(batch_mean, centred, var_eps, norm, d, gain, offset, x.shape[1])

    def numpy_forward(self, x: np.ndarray, member: int | None) -> np.ndarray:
        """The running-statistics normalization in numpy (acting on the CPU): x [B, d] with `member`, else [K, B, d]."""
        index: Any = member if member is not None else slice(None)
        mean, var = self.running_mean.numpy()[index], self.running_var.numpy()[index]
        scale, shift = self.scale.detach().numpy()[index], self.shift.detach().numpy()[index]
        return (x - mean) * (scale / np.sqrt(var + self.settings.eps)) + shift

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.steps)


class _Renormalize(torch.autograd.Function):
    """y = scale (r (x - mu_B) / sqrt(var_B + eps) + d) + shift over dim 1 of x [K, B, d] (r = 1, d = 0 during the
    warmup), with mu_B, the unbiased var_B, r and d in `stats` (r and d constants).

    The backward is written out: with G = scale r / sqrt(var_B + eps), g = dL/dy, S = sum_B g (x - mu_B),
    dL/dx = G (g - mean_B g) - (x - mu_B) S G / ((B - 1)(var_B + eps)); dL/dscale = S r / sqrt(var_B + eps)
    + d sum_B g; dL/dshift = sum_B g. Five passes over the [K, B, d] tensors each way (fewer than autograd's chain
    of the same operations), and two in the backward when x needs no gradient (a network's inputs)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, stats: RenormStats, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        ctx.stats = stats
        return torch.addcmul(stats.offset, stats.centred, stats.gain)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        stats: RenormStats = ctx.stats
        grad_sum = grad.sum(1, keepdim=True)
        grad_dot = (grad * stats.centred).sum(1, keepdim=True)
        grad_scale, grad_shift = stats.param_grads(grad_sum, grad_dot)
        grad_x = None
        if ctx.needs_input_grad[0]:
            coef, const = stats.input_grad_terms(grad_sum, grad_dot)
            grad_x = torch.addcmul(const, grad, stats.gain).addcmul_(stats.centred, coef)
        return grad_x, None, grad_scale, grad_shift


@contextmanager
def batch_statistics(*modules: nn.Module) -> Iterator[None]:
    """Inside: every batch-renormalized `StackedMLP` in `modules` (or among them: passing the bodies themselves
    spares the search through submodules, for hot paths) normalizes by batch statistics and updates its
    running ones (CrossQ's training passes); outside, running statistics."""
    from policylab.nets.mlp import StackedMLP  # mlp.py imports this module

    found = (m for module in modules for m in ([module] if isinstance(module, StackedMLP) else module.modules()))
    bodies = [m for m in found if isinstance(m, StackedMLP) and m.renorms]
    for body in bodies:
        body.batch_stats = True
    try:
        yield
    finally:
        for body in bodies:
            body.batch_stats = False
