"""Value-function regression loss, optionally clipped (PPO's value clipping)."""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.objectives.aggregation import aggregate


def value_loss(
    values: Tensor,
    returns: Tensor,
    *,
    old_values: Tensor | None = None,
    clip: float | None = None,
    mask: Tensor | None = None,
    aggregation: str = "token-mean",
) -> Tensor:
    """(V - R)^2, or with `clip`: max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    No factor 1/2 (as in Stable-Baselines3; the coefficient `vf_coef` scales it).
    """
    err = (values - returns) ** 2
    if clip is not None:
        if old_values is None:
            raise ValueError("value clipping needs old_values (the values at collection time)")
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped_values - returns) ** 2)
    return aggregate(err, mask, aggregation)


def value_loss_grad(
    values: Tensor,
    returns: Tensor,
    *,
    old_values: Tensor | None = None,
    clip: float | None = None,
    scale: float = 1.0,
    with_loss: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """`value_loss` (token-mean, no mask) and d(scale * loss)/d(values), without autograd (the fast path)."""
    with torch.no_grad():
        diff = values - returns
        grad = diff * (2.0 * scale / values.numel())
        if clip is None:
            return ((diff * diff).mean() if with_loss else None), grad
        if old_values is None:
            raise ValueError("value clipping needs old_values (the values at collection time)")
        err = diff * diff
        clipped_diff = old_values + torch.clamp(values - old_values, -clip, clip) - returns
        clipped_err = clipped_diff * clipped_diff
        use_clipped = clipped_err > err
        grad = torch.where(use_clipped, 0.0, grad)
        return (torch.where(use_clipped, clipped_err, err).mean() if with_loss else None), grad
