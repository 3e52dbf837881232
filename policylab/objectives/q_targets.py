"""Bootstrapped targets of the off-policy family, as pure functions over tensors.

Every target takes the replay batch's `rewards` (n-step sums), `discounts`
(gamma^m for the m steps summed) and `terminated` (no bootstrap after a
terminal state; truncations do bootstrap), so 1-step and n-step batches,
from envs or from datasets, use the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bootstrap(rewards: Tensor, discounts: Tensor, terminated: Tensor, next_value: Tensor) -> Tensor:
    """r + discount * (1 - terminated) * V(s')."""
    return torch.addcmul(rewards, discounts.masked_fill(terminated, 0.0), next_value)


MASKED_Q = -1e9
"""What a forbidden action's value becomes before a max over actions (action masks)."""


def allowed_only(q: Tensor, allowed: Tensor | None) -> Tensor:
    """Action values [B, A] with the forbidden actions' (where the bool mask `allowed` is false) at -1e9, so that a
    max or argmax over actions picks an allowed one; `q` itself without a mask."""
    return q if allowed is None else q.masked_fill(~allowed, MASKED_Q)


def dqn_target(
    rewards: Tensor, discounts: Tensor, terminated: Tensor, next_q_target: Tensor, next_q_online: Tensor | None = None
) -> Tensor:
    """max_a Q_target(s', a), or with `next_q_online` double DQN: Q_target(s', argmax_a Q_online(s', a)). [B, A] in."""
    if next_q_online is None:
        next_value = next_q_target.amax(-1)
    else:
        next_value = next_q_target.gather(-1, next_q_online.argmax(-1, keepdim=True)).squeeze(-1)
    return bootstrap(rewards, discounts, terminated, next_value)


def target_policy_smoothing(
    actions: Tensor,
    noise_std: float,
    noise_clip: float,
    low: Tensor | float,
    high: Tensor | float,
    generator: torch.Generator | None,
) -> Tensor:
    """TD3: a' = clip(mu'(s') + clip(N(0, std), -c, c), low, high)."""
    noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype) * noise_std
    return torch.clamp(actions + noise.clamp(-noise_clip, noise_clip), low, high)  # type: ignore[arg-type]


def td3_target(rewards: Tensor, discounts: Tensor, terminated: Tensor, next_q: Tensor) -> Tensor:
    """Clipped double Q: r + d (1 - done) min_k Q_k(s', a'). `next_q` is [K, B]."""
    return bootstrap(rewards, discounts, terminated, next_q.min(0).values)


def soft_clipped_double_q(next_q: Tensor, lam: float, candidates: int) -> Tensor:
    """BCQ's value of s': max over its N candidate actions of lam min_k Q_k + (1 - lam) max_k Q_k. `next_q`:
    [K, B N], a state's N candidates adjacent; returns [B]. lam = 1 is TD3's min over critics, lam = 0 the max."""
    mixed = torch.lerp(next_q.amax(0), next_q.amin(0), lam)
    return mixed.view(-1, candidates).amax(-1)


def categorical_projection(probs: Tensor, atoms: Tensor, rewards: Tensor, keep: Tensor) -> Tensor:
    """C51's target distribution: the masses `probs` [B, N] of the atoms [N] (evenly spaced) moved to
    rewards + keep * atoms (keep = d (1 - done), [B]), clipped to the support, then each moved atom's mass split
    between its two neighbouring atoms in proportion to closeness (all of it to one atom it lands on). [B, N]."""
    v_min, v_max, n = atoms[0], atoms[-1], atoms.numel()
    moved = (rewards.unsqueeze(-1) + keep.unsqueeze(-1) * atoms).clamp(v_min, v_max)
    position = (moved - v_min) / (v_max - v_min) * (n - 1)  # in atom units, [0, N - 1]
    lower = position.floor().clamp(0, n - 1)
    upper = position.ceil().clamp(0, n - 1)
    to_lower = probs * (upper - position + (lower == upper).to(probs.dtype))  # all of it where it lands on an atom
    to_upper = probs * (position - lower)
    projected = torch.zeros_like(probs)
    projected.scatter_add_(-1, lower.long(), to_lower)
    return projected.scatter_add_(-1, upper.long(), to_upper)


def sac_target(
    rewards: Tensor, discounts: Tensor, terminated: Tensor, next_q: Tensor, next_logp: Tensor, alpha: Tensor | float
) -> Tensor:
    """Soft target: r + d (1 - done) (min_k Q_k(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s'). [K, B], [B] in."""
    return bootstrap(rewards, discounts, terminated, next_q.min(0).values - alpha * next_logp)


def discrete_sac_target(
    rewards: Tensor,
    discounts: Tensor,
    terminated: Tensor,
    next_q: Tensor,
    next_probs: Tensor,
    next_logp: Tensor,
    alpha: Tensor | float,
) -> Tensor:
    """Discrete SAC: the expectation over a' is exact: sum_a pi(a|s') (min_k Q_k(s', a) - alpha log pi(a|s')).
    `next_q` is [K, B, A]; `next_probs`, `next_logp` are [B, A]."""
    next_value = (next_probs * (next_q.min(0).values - alpha * next_logp)).sum(-1)
    return bootstrap(rewards, discounts, terminated, next_value)


def tqc_target(
    rewards: Tensor,
    discounts: Tensor,
    terminated: Tensor,
    next_quantiles: Tensor,
    drop_per_critic: int,
    next_logp: Tensor,
    alpha: Tensor | float,
) -> Tensor:
    """TQC (Kuznetsov et al. 2020): pool the K x M target quantiles, sort them, drop the K * drop_per_critic
    largest (the overestimation), and shift the rest by the entropy term. [K, B, M] in, [B, K*M - K*drop] out."""
    k, batch, m = next_quantiles.shape
    pooled = next_quantiles.permute(1, 0, 2).reshape(batch, k * m).sort(-1).values
    kept = pooled[:, : k * m - k * drop_per_critic]
    next_atoms = kept - (alpha * next_logp).unsqueeze(-1)
    return rewards.unsqueeze(-1) + (discounts * (~terminated).to(kept.dtype)).unsqueeze(-1) * next_atoms


def quantile_huber_loss(quantiles: Tensor, target: Tensor, kappa: float = 1.0) -> Tensor:
    """Quantile regression with the Huber loss (QR-DQN / TQC): quantiles [K, B, M] at midpoints
    tau_i = (i + 0.5) / M against target atoms [B, N]; mean over everything.

    With u = y_j - z_i, c = clamp(u, -kappa, kappa) and w = |tau_i - 1(u < 0)|, the Huber loss (u^2 / 2 inside
    [-kappa, kappa], kappa (|u| - kappa / 2) outside) is c (u - c / 2), so the loss is mean (w c) (u - c / 2)
    and its gradient dL/dz_i = -sum_j w c / (K B M N), where w c = tau c + (1 - 2 tau) min(c, 0). The
    forward computes both in eight passes over the [K, B, M, N] differences and no comparison tensor; autograd's
    graph of the textbook formula took about 25 passes (10x the time at TQC's Pendulum shapes, 1 thread)."""
    return _QuantileHuber.apply(quantiles, target, kappa)  # type: ignore[no-any-return]


def quantile_huber_value_and_grads(
    quantiles: Tensor, target: Tensor, kappa: float = 1.0, target_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`quantile_huber_loss` and its gradients w.r.t. the quantiles and (`target_grad`) the targets, no autograd."""
    m = quantiles.shape[-1]
    taus = ((torch.arange(m, device=quantiles.device, dtype=quantiles.dtype) + 0.5) / m).unsqueeze(-1)
    diff = target.unsqueeze(-2) - quantiles.unsqueeze(-1)  # [K, B, M, N]
    clipped = diff.clamp(-kappa, kappa)
    slope = clipped * taus  # becomes w c = (K B M N) dL/du
    half_step = diff.sub_(clipped, alpha=0.5)  # u - c / 2, in place: u is not needed again
    slope.addcmul_(clipped.clamp_max_(0.0), 1.0 - 2.0 * taus)
    count = diff.numel()
    loss = torch.dot(slope.view(-1), half_step.view(-1)) / count
    grad_quantiles = slope.sum(-1).mul_(-1.0 / count)
    grad_target = slope.sum(-2).sum(0).mul_(1.0 / count) if target_grad else None
    return loss, grad_quantiles, grad_target


class _QuantileHuber(torch.autograd.Function):
    @staticmethod
    def forward(ctx, quantiles: Tensor, target: Tensor, kappa: float) -> Tensor:  # type: ignore[override]
        loss, grad_quantiles, grad_target = quantile_huber_value_and_grads(
            quantiles, target, kappa, target_grad=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_quantiles, grad_target)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_quantiles, grad_target = ctx.saved_tensors
        grad_q = grad_quantiles * g if ctx.needs_input_grad[0] else None
        return grad_q, None if grad_target is None else grad_target * g, None


@torch.no_grad()
def polyak_update(target: list[Tensor], online: list[Tensor], tau: float) -> None:
    """target <- (1 - tau) target + tau online, in one foreach call (tau = 1: a hard copy)."""
    torch._foreach_lerp_(target, online, tau)
