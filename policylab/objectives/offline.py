"""The offline algorithms' loss terms, as pure functions over tensors (checked against hand-computed values in
tests/test_offline.py). The same terms serve offline, offline-to-online and hybrid batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.objectives.q_targets import bootstrap


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """IQL's value loss (Kostrikov et al. 2021): mean |tau - 1(u < 0)| u^2 over u = Q(s, a) - V(s). With tau > 0.5
    it pulls V towards an upper expectile of Q over the dataset's actions (tau = 0.5: the mean, squared error)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff * diff).mean()


def advantage_weights(advantages: Tensor, beta: float, max_weight: float = 100.0) -> Tensor:
    """Advantage-weighted regression's weights exp(beta A), clipped at `max_weight` (IQL, AWAC, CRR): the
    extracted policy imitates the dataset's actions in proportion to how much better than the value they are."""
    return torch.exp(beta * advantages).clamp(max=max_weight)


def crr_weights(advantages: Tensor, kind: str, temperature: float, max_weight: float) -> Tensor:
    """CRR's weights f(A) (Wang et al. 2020): exp, min(exp(A / temperature), max_weight); binary, 1(A > 0)."""
    if kind == "binary":
        return (advantages > 0).to(advantages.dtype)
    return advantage_weights(advantages, 1.0 / temperature, max_weight)


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


def rebrac_actor_loss(
    actions_pi: Tensor, data_actions: Tensor, q_pi: Tensor, bc_coef: float, normalize_q: bool = True
) -> Tensor:
    """ReBRAC's actor loss (Tarasov et al. 2023): mean_B [bc_coef sum_a (pi(s) - a)^2 - lambda min_k Q_k(s, pi(s))],
    lambda = 1 / mean_B |min_k Q_k(s, pi(s))| held constant (with `normalize_q`; else 1). Unlike TD3+BC's, the
    squared error is summed over action dims and Q is the ensemble's minimum. actions [B, A], q_pi [K, B]."""
    q_min = q_pi.min(0).values
    lam = td3_bc_lambda(q_min, 1.0) if normalize_q else 1.0
    return (bc_coef * (actions_pi - data_actions).pow(2).sum(-1) - lam * q_min).mean()


def rebrac_target(
    rewards: Tensor,
    discounts: Tensor,
    terminated: Tensor,
    next_q: Tensor,
    next_actions: Tensor,
    dataset_next_actions: Tensor,
    bc_coef: float,
) -> Tensor:
    """ReBRAC's critic target: r + d (1 - done) (min_k Q'_k(s', a') - bc_coef sum_a (a' - a'_data)^2), with a' the
    (smoothed) target policy's action and a'_data the dataset's next action: the value of s' is lowered where the
    policy leaves the data. next_q [K, B], actions [B, A]."""
    penalty = (next_actions - dataset_next_actions).pow(2).sum(-1)
    return bootstrap(rewards, discounts, terminated, next_q.min(0).values - bc_coef * penalty)


def ensemble_gradient_similarity(action_grads: Tensor, eps: float = 1e-10) -> Tensor:
    """EDAC's diversity term (An et al. 2021), normalized as CORL and the authors' code do: mean_B 1/(K-1)
    sum_{i != j} cos(g_i, g_j) over the members' action gradients g_k = grad_a Q_k(s, a), [K, B, A] in (each pair
    counts twice). With unit vectors u_k = g_k / (|g_k| + eps), sum_{i != j} u_i . u_j = |sum_k u_k|^2 -
    sum_k |u_k|^2: no K x K matrix. Minimizing it spreads the members' gradients apart, so the ensemble
    disagrees (and its minimum is low) away from the dataset's actions."""
    unit = action_grads / (action_grads.norm(dim=-1, keepdim=True) + eps)
    off_diagonal = unit.sum(0).pow(2).sum(-1) - unit.pow(2).sum((0, 2))
    return off_diagonal.mean() / (action_grads.shape[0] - 1)


def calibrated_values(q_policy: Tensor, lower_bound: Tensor) -> Tensor:
    """Cal-QL's calibration (Nakamoto et al. 2023): max(Q(s, a_pi), V_mu(s)) for the policy's sampled actions, with
    V_mu(s) the dataset (reference) policy's Monte-Carlo return from s. CQL's penalty then stops pushing Q down on
    them once it reaches the reference value, so the learned Q is conservative but not below the data's own
    value (which is what lets online fine-tuning start without an initial dip). q_policy [K, B, M], lower_bound
    [B] (-inf: no bound)."""
    return torch.maximum(q_policy, lower_bound.view(1, -1, 1))


def gaussian_kl_to_standard_normal(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per latent dimension, averaged over the last dim (as BCQ's and SPOT's VAEs
    weigh it): -1/2 mean_d (1 + log std^2 - mean^2 - std^2). [B, D] -> [B]."""
    return -0.5 * (1.0 + 2.0 * std.log() - mean.pow(2) - std.pow(2)).mean(-1)


def vae_negative_elbo(reconstructed: Tensor, actions: Tensor, mean: Tensor, std: Tensor, kl_weight: float) -> Tensor:
    """SPOT's density term (Wu et al. 2022), a negative ELBO of a under a conditional VAE up to a positive scale
    and a shift: mean squared reconstruction error + kl_weight KL(q(z | s, a) || N(0, I)), per state. The VAE's
    own loss is its batch mean. reconstructed [B, S, A] or [B, A] (S latent samples), actions broadcastable to it,
    mean and std [B, D]; returns [B]."""
    squared = (reconstructed - actions).pow(2)
    return squared.flatten(1).mean(-1) + kl_weight * gaussian_kl_to_standard_normal(mean, std)


def vae_importance_weighted_log_likelihood(
    actions: Tensor, reconstructed: Tensor, latents: Tensor, mean: Tensor, std: Tensor, decoder_std: float
) -> Tensor:
    """SPOT's importance-sampled estimate of log pi_beta(a | s) (the IWAE bound, Burda et al. 2016):
    log 1/S sum_j p(a | z_j) p(z_j) / q(z_j | s, a) over z_j ~ q(. | s, a) = N(mean, std^2), with the decoder
    p(a | z) = N(reconstructed, decoder_std^2) (SPOT: decoder_std = sqrt(kl_weight / 4), the variance under
    which the ELBO's kl_weight is exact). actions [B, A], reconstructed [B, S, A], latents [B, S, D], mean and
    std [B, D]; returns [B]."""
    log_2pi = math.log(2.0 * math.pi)
    log_decoder = -0.5 * (((actions.unsqueeze(1) - reconstructed) / decoder_std).pow(2) + log_2pi).sum(-1)
    log_decoder = log_decoder - actions.shape[-1] * math.log(decoder_std)
    log_prior = -0.5 * (latents.pow(2) + log_2pi).sum(-1)
    noise = (latents - mean.unsqueeze(1)) / std.unsqueeze(1)
    log_posterior = -0.5 * (noise.pow(2) + log_2pi).sum(-1) - std.log().sum(-1, keepdim=True)
    return torch.logsumexp(log_decoder + log_prior - log_posterior, dim=-1) - math.log(latents.shape[1])


def discrete_imitation_loss(logits: Tensor, actions: Tensor, beta: float) -> Tensor:
    """Discrete BCQ's behaviour-cloning loss for its classifier G(a|s): mean cross-entropy of the dataset's
    actions plus beta mean logit^2 (keeps the logits from growing without bound). logits [B, A], actions [B]."""
    return F.cross_entropy(logits, actions.long()) + beta * logits.pow(2).mean()


def mmd(x: Tensor, y: Tensor, kernel: str, sigma: float) -> Tensor:
    """BEAR's maximum mean discrepancy between two sets of m samples per row, x and y [B, m, A]:
    sqrt(mean k(x, x') + mean k(y, y') - 2 mean k(x, y) + 1e-6), k(u, v) = exp(-|u - v|_1 / (2 sigma)) ("laplacian")
    or exp(-|u - v|^2 / (2 sigma)) ("gaussian"), each mean over all m x m pairs (a sample with itself included). [B]."""

    def mean_kernel(u: Tensor, v: Tensor) -> Tensor:
        diff = u.unsqueeze(2) - v.unsqueeze(1)  # [B, m, m, A]
        distance = diff.abs().sum(-1) if kernel == "laplacian" else diff.pow(2).sum(-1)
        return torch.exp(-distance / (2.0 * sigma)).mean((1, 2))

    return (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y) + 1e-6).sqrt()
