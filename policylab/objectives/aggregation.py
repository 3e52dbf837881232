"""Reducing per-element losses to a scalar over a mask: step/token mean vs sequence mean.

`loss` and `mask` are [B] (one element per step) or [B, L] (a sequence of L
tokens per row). With no mask, every element counts.
  token-mean           sum(loss * mask) / sum(mask): each token (or step) weighs the same
  seq-mean-token-mean  mean over rows of each row's token mean: each sequence weighs the same
  seq-mean-token-sum   mean over rows of each row's token sum (no length normalization)
  seq-mean-token-sum-norm  sum(loss * mask) / (rows * L): Dr. GRPO's constant normalizer, L the padded length
                           (the generation budget), so no sequence's tokens weigh more for being short
"""

from __future__ import annotations

from torch import Tensor

from policylab.objectives.registry import AGGREGATIONS


@AGGREGATIONS.register("token-mean")
def token_mean(loss: Tensor, mask: Tensor | None = None) -> Tensor:
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor | None = None) -> Tensor:
    if loss.dim() == 1:
        return token_mean(loss, mask)
    if mask is None:
        return loss.mean(dim=-1).mean()
    mask = mask.to(loss.dtype)
    per_row = (loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return per_row.mean()


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss: Tensor, mask: Tensor | None = None) -> Tensor:
    if loss.dim() == 1:
        return token_mean(loss, mask)
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss.sum(-1).mean()


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor | None = None) -> Tensor:
    if loss.dim() == 1:
        return token_mean(loss, mask)
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss.sum() / (loss.shape[0] * loss.shape[1])


def aggregate(loss: Tensor, mask: Tensor | None = None, mode: str = "token-mean") -> Tensor:
    return AGGREGATIONS.get(mode)(loss, mask)
