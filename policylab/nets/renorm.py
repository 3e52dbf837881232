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
        k, s = len(x), self.settings
        running_mean, running_var = self.running_mean[:k], self.running_var[:k]
        if not batch_stats:
            return torch.addcmul(self.shift[:k], x - running_mean, self.scale[:k] * torch.rsqrt(running_var + s.eps))
        r = d = None
        with torch.no_grad():
            batch_mean = x.mean(1, keepdim=True)
            centred = x - batch_mean
            batch_var = (centred * centred).sum(1, keepdim=True) / max(x.shape[1] - 1, 1)
            if self._steps > s.warmup_steps:
                running_std = (running_var + s.eps).sqrt()
                r = ((batch_var + s.eps).sqrt() / running_std).clamp(1.0 / R_MAX, R_MAX)
                d = ((batch_mean - running_mean) / running_std).clamp(-D_MAX, D_MAX)
            running_mean.lerp_(batch_mean, s.momentum)
            running_var.lerp_(batch_var, s.momentum)
            self._steps += 1
            self.steps.fill_(self._steps)
        return _Renormalize.apply(x, centred, batch_var, self.scale[:k], self.shift[:k], r, d, s.eps)

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
    warmup), with mu_B and the unbiased var_B computed by the caller (`centred` = x - mu_B) and r, d constants.

    The backward is written out: with G = scale r / sqrt(var_B + eps), g = dL/dy, S = sum_B g (x - mu_B),
    dL/dx = G (g - mean_B g) - (x - mu_B) S G / ((B - 1)(var_B + eps)); dL/dscale = S r / sqrt(var_B + eps)
    + d sum_B g; dL/dshift = sum_B g. Five passes over the [K, B, d] tensors each way (fewer than autograd's chain
    of the same operations), and two in the backward when x needs no gradient (a network's inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        centred: Tensor,
        batch_var: Tensor,
        scale: Tensor,
        shift: Tensor,
        r: Tensor | None,
        d: Tensor | None,
        eps: float,
    ) -> Tensor:
        norm = torch.rsqrt(batch_var + eps)
        if r is not None:
            norm = norm * r
        gain = scale * norm
        offset = shift if d is None else torch.addcmul(shift, scale, d)
        ctx.save_for_backward(centred, batch_var, norm, gain, d)
        ctx.eps = eps
        return torch.addcmul(offset, centred, gain)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        centred, batch_var, norm, gain, d = ctx.saved_tensors
        n = grad.shape[1]
        grad_sum = grad.sum(1, keepdim=True)
        grad_dot = (grad * centred).sum(1, keepdim=True)
        grad_scale = grad_dot * norm if d is None else torch.addcmul(grad_dot * norm, grad_sum, d)
        grad_x = None
        if ctx.needs_input_grad[0]:
            coef = -grad_dot * gain / (max(n - 1, 1) * (batch_var + ctx.eps))
            grad_x = torch.addcmul(gain * grad_sum * (-1.0 / n), grad, gain).addcmul_(centred, coef)
        return grad_x, None, None, grad_scale, grad_sum, None, None, None


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
