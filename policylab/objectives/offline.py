"""The offline algorithms' loss terms, as pure functions over tensors (checked against hand-computed values in
tests/test_offline.py). The same terms serve offline, offline-to-online and hybrid batches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """IQL's value loss (Kostrikov et al. 2021): mean |tau - 1(u < 0)| u^2 over u = Q(s, a) - V(s). With tau > 0.5
    it pulls V towards an upper expectile of Q over the dataset's actions (tau = 0.5: the mean, squared error)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff * diff).mean()


def advantage_weights(advantages: Tensor, beta: float, max_weight: float = 100.0) -> Tensor:
    """Advantage-weighted regression's weights exp(beta A), clipped at `max_weight` (IQL, AWAC, CRR): the
    extracted policy imitates the dataset's actions in proportion to how much better than the value they are."""
    return torch.exp(beta * advantages).clamp(max=max_weight)


def td3_bc_lambda(q: Tensor, alpha: float) -> Tensor:
    """TD3+BC's Q scale, alpha / mean |Q(s, pi(s))| (held constant in the gradient): it makes the RL term's size
    independent of the reward scale, so one alpha suits every task."""
    return alpha / q.detach().abs().mean()


def cql_penalty(q_data: Tensor, q_sampled: Tensor, log_density: Tensor, temperature: float = 1.0) -> Tensor:
    """CQL's conservative term (Kumar et al. 2020), per critic: mean_B [T logsumexp_j ((Q(s, a_j) - log mu(a_j)) / T)
    - Q(s, a_data)] over actions a_j drawn from proposals mu (uniform, the policy; importance-weighted by their
    densities, as CQL(H)'s implementation does). It pushes Q down on actions the policy or chance would pick and
    up on the dataset's. q_data [K, B], q_sampled [K, B, M], log_density [B, M] (or [K, B, M]); returns [K]."""
    pushed_down = temperature * torch.logsumexp((q_sampled - log_density) / temperature, dim=-1)
    return (pushed_down - q_data).mean(-1)


def discrete_cql_penalty(q_all: Tensor, q_data: Tensor) -> Tensor:
    """Discrete CQL's term: mean_B [logsumexp_a Q(s, a) - Q(s, a_data)], q_all [B, A], q_data [B]."""
    return (torch.logsumexp(q_all, dim=-1) - q_data).mean()
