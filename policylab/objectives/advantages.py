"""Advantage estimators over T x N (time x env) tensors.

All take `next_values[t]`: the value of the state after step t, i.e. V(s_{t+1})
inside an episode, V(final observation) at a truncation (time limit), and
anything at a termination (it is multiplied by 0 there). `terminated[t]` stops
bootstrapping; `episode_end[t]` (terminated or truncated) stops the recursion
from carrying the next episode's advantages back across the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.objectives.registry import ADVANTAGES, Registry


@ADVANTAGES.register("gae")
def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    episode_end: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016). Returns (advantages, returns).

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1}
    returns = A + values (the lambda-return, the value target)
    """
    not_terminal = (~terminated).to(values.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values
    carry = gamma * lam * (~episode_end).to(values.dtype)
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        running = torch.addcmul(deltas[t], carry[t], running)
        advantages[t] = running
    return advantages, advantages + values


@ADVANTAGES.register("mc")
def mc_returns(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    episode_end: Tensor,
    gamma: float,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo returns minus a baseline. Returns (returns - values, returns).

    G_t = r_t + gamma * G_{t+1} inside an episode; at an episode end
    G_t = r_t + gamma * (1 - terminated_t) * next_values_t (bootstrap at
    truncation only); at the end of the rollout G_t bootstraps from next_values.
    `lam` is ignored (Monte-Carlo is lambda = 1).
    """
    not_terminal = (~terminated).to(values.dtype)
    inside = (~episode_end).to(values.dtype)
    returns = torch.empty_like(rewards)
    running = next_values[-1]
    for t in range(rewards.shape[0] - 1, -1, -1):
        following = inside[t] * running + (1.0 - inside[t]) * not_terminal[t] * next_values[t]
        running = rewards[t] + gamma * following
        returns[t] = running
    return returns - values, returns


# --- sequence-level advantages over groups of completions (language models) -------------------------------------

GROUP_ADVANTAGES = Registry("group advantage estimator")
"""rewards [N] of N = prompts x group_size completions (the G completions of a prompt adjacent) -> advantages [N]."""


def _unscored(rewards: Tensor) -> bool:
    """Whether some reward is NaN: a completion no reward function applied to (their None, as TRL's). Every
    estimator below then leaves those out of the means and stds and gives them advantage 0; without any, each runs
    its plain arithmetic."""
    return bool(torch.isnan(rewards).any())


def _nan_stats(x: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, Bessel std, count) of x's non-NaN entries along `dim` (all of them: None), kept as dimensions; the
    std is 0 where fewer than two entries count (an advantage of 0 then, as TRL's nanstd's NaN)."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    count = (~torch.isnan(x)).sum(dims, keepdim=True)
    mean = torch.nansum(x, dims, keepdim=True) / count.clamp_min(1)
    squares = torch.nansum((x - mean) ** 2, dims, keepdim=True)
    std = torch.where(count > 1, (squares / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(squares))
    return mean, std, count


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


@GROUP_ADVANTAGES.register("grpo")
def group_normalized(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024): (r - mean_group) / (std_group + eps), the std with Bessel's correction (as TRL)."""
    grouped = _grouped(rewards, group_size)
    if _unscored(rewards):
        mean, std, _ = _nan_stats(grouped, 1)
        return ((grouped - mean) / (std + eps)).nan_to_num(0.0).view(-1)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


@GROUP_ADVANTAGES.register("dr_grpo")
def group_centered(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean_group, no division by the std."""
    grouped = _grouped(rewards, group_size)
    if _unscored(rewards):
        return (grouped - _nan_stats(grouped, 1)[0]).nan_to_num(0.0).view(-1)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


@GROUP_ADVANTAGES.register("grpo_batch")
def group_centered_batch_scaled(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's group mean with the whole batch's std of the rewards (Bessel-corrected): TRL's scale_rewards="batch",
    Lite PPO's advantage (Liu et al. 2025), which keeps a group whose rewards barely differ from being blown up."""
    centered = group_centered(rewards, group_size)
    if _unscored(rewards):
        return centered / (_nan_stats(rewards)[1].squeeze() + eps)
    return centered / (rewards.std() + eps) if rewards.numel() > 1 else centered


def decoupled_group_advantages(rewards: Tensor, weights: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GDPO (Liu et al. 2026; TRL's multi_objective_aggregation="normalize_then_sum"): rewards [N, K] of K reward
    functions -> advantages [N]. Each function's rewards are normalized within each group (mean, Bessel std), so
    that no function drowns the others by its scale; their `weights` [K]-weighted sum is then normalized over the
    whole batch."""
    grouped = _grouped(rewards, group_size * rewards.shape[1]).view(-1, group_size, rewards.shape[1])
    if _unscored(rewards):  # a function's None leaves it out of that completion's sum; all None: advantage 0
        mean, std, _ = _nan_stats(grouped, 1)
        normalized = ((grouped - mean) / (std + eps)).reshape(-1, rewards.shape[1])
        summed = torch.nansum(normalized * weights.to(normalized.dtype), 1)
        summed = summed.masked_fill(torch.isnan(rewards).all(1), float("nan"))
        mean, std, _ = _nan_stats(summed)
        return ((summed - mean.squeeze()) / (std.squeeze() + eps)).nan_to_num(0.0)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    normalized = ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1, rewards.shape[1])
    summed = normalized @ weights.to(normalized.dtype)
    return (summed - summed.mean()) / (summed.std() + eps) if summed.numel() > 1 else summed - summed.mean()


@GROUP_ADVANTAGES.register("rloo")
def leave_one_out(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the group's other rewards = G / (G - 1) (r_i - mean_group)."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    if _unscored(rewards):  # each completion against the mean of the others scored in its group
        count = (~torch.isnan(_grouped(rewards, group_size))).sum(1, keepdim=True)
        scale = torch.where(count > 1, count / (count - 1).clamp_min(1), torch.zeros_like(count, dtype=rewards.dtype))
        return (_grouped(group_centered(rewards, group_size), group_size) * scale).view(-1)
    return group_centered(rewards, group_size) * (group_size / (group_size - 1))


@GROUP_ADVANTAGES.register("reinforce++")
def batch_normalized(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """REINFORCE++ with a group baseline (Hu et al. 2025): r - mean_group, then normalized by the whole batch's
    mean and std (global, not per group)."""
    centered = group_centered(rewards, group_size)
    if _unscored(rewards):
        scored = centered.masked_fill(torch.isnan(rewards), float("nan"))
        mean, std, _ = _nan_stats(scored)
        return ((scored - mean.squeeze()) / (std.squeeze() + eps)).nan_to_num(0.0)
    return (centered - centered.mean()) / (centered.std() + eps) if centered.numel() > 1 else centered
