"""Off-policy gradient steps with hand-derived gradients: the same updates as the algorithms' autograd
paths (checked against autograd in tests/test_fused_offpolicy.py), faster on the CPU.

Why they are faster: no autograd graph is built; every backward pass writes into the flat gradient
buffers with contiguous layouts (no transposed copies, no strided ReLU backward); SAC's actor runs once
on [s; s'] (2B rows) and DQN's double-Q online net once on [s; s']; actor losses propagate through the
critics without computing critic weight gradients, SAC's and CQL's (min over critics) through each row's minimizing
critic alone. Used for ReLU/tanh MLPs without LayerNorm (CrossQ's batch renormalization included)
(`analytic_grads=false` opts out).

SAC, with u = mean + std * noise, a = tanh(u), L_actor = mean_B(alpha log pi(a|s) - min_k Q_k(s, a)):
    d log pi / du = 2 a,  d log pi / d log_std = -1 (direct) + (d log pi / du) std noise
    dL/du = (2 alpha a) / B + dL/da|_Q (1 - a^2)       (dL/da|_Q through the critic's input gradient)
    dL/d log_std = (dL/du) std noise - alpha / B, zero where log_std was clamped.
    With gSDE (use_sde) the log std is per row, log sigma(s) from the features and the [latent, A] log_std
    (nets/sde.py: its gradient through sde_log_std_grad), and dL/d mean is zero where the mean was clipped.
TD3: L_actor = -mean_B Q_1(s, tanh(out)): dL/d out = dL/da|_Q1 (1 - a^2), through the first critic only.
IQL, with u = min_k Q'_k(s, a) - V(s), w(u) = tau or 1 - tau by the sign of u, m = tanh(out) the actor's mean:
    dL_V/dV = -2 w(u) u / B;
    Gaussian actor, L = -mean_B c log N(a; m, std), c = min(exp(beta u), 100), z = (a - m) / std:
    dL/d out = -(c / B) (z / std) (1 - m^2),  dL/d log_std = sum_B (c / B) (1 - z^2) (zero where clamped);
    deterministic actor, L = mean_B c |m - a|^2:  dL/d out = 2 (c / B) (m - a) (1 - m^2).
AWAC and CRR: the critics' step on 1/2 sum_k mean_B (Q_k - y)^2 (dL/dQ_k = td / B), the weights c from forward passes
alone (AWAC: exp(A / lambda) against one policy draw; CRR: f(A) against m draws), then IQL's actor step with them.
Discrete BCQ: DQN's gradient into the MLP's first member (Q), the imitation loss's into its second (the behaviour
classifier), one backward for both. PLAS: TD3's critic step; the actor's gradient through the first critic's input,
the perturbation, the frozen decoder's input and the latent tanh (fused_plas_update).
DQN: d huber(td) / d td = clamp(td, -1, 1); through a dueling head Q_a = V + A_a - mean(A):
    dQ_a/dV = 1, dQ_a/dA_j = [j = a] - 1/|A|.
CQL: dL/dQ_k at the B (1 + 3M) proposal rows from autograd on those [K, rows] values alone (the penalty's softmax
weights, Cal-QL's bound, the Lagrangian weight), then the critics' backward over the rows by hand; actor as SAC's.
CrossQ: SAC's losses; the batch renormalizations are folded into the products (StackedMLP.forward_cached and
backward, nets/mlp.py): the critics' joint pass over [s; s'] gets dL/dQ = td / B on the s rows and 0 on the s'
rows, whose gradient still reaches every row through the batch statistics; the actor's loss goes through the
critics' running statistics, an affine map per feature folded into their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from policylab.data import Batch
from policylab.nets.critics import _LOG_2PI, tanh_gaussian_log_prob
from policylab.nets.mlp import StackedMLP, member_rows
from policylab.nets.renorm import batch_statistics
from policylab.nets.sde import sde_log_std, sde_log_std_grad
from policylab.objectives.offline import advantage_weights, td3_bc_lambda
from policylab.objectives.q_targets import (
    allowed_only,
    bootstrap,
    dqn_target,
    quantile_huber_value_and_grads,
    sac_target,
    target_policy_smoothing,
    td3_target,
    tqc_target,
)

if TYPE_CHECKING:
    from policylab.algos.awac import AWAC
    from policylab.algos.bcq import PLAS, DiscreteBCQ
    from policylab.algos.c51 import C51
    from policylab.algos.cql import CQL, CQLNoise
    from policylab.algos.crossq import CrossQ
    from policylab.algos.crr import CRR
    from policylab.algos.dqn import DQN
    from policylab.algos.iql import IQL
    from policylab.algos.qrdqn import QRDQN
    from policylab.algos.sac import SAC
    from policylab.algos.td3 import TD3
    from policylab.algos.tqc import TQC


def fused_sac_applies(algo: SAC | TQC) -> bool:
    return bool(algo.cfg.analytic_grads and algo.net.body.analytic_backward and algo.critic.body.analytic_backward)


fused_tqc_applies = fused_sac_applies


@dataclass
class _PolicyDraws:
    """The tanh-Gaussian actor run once on [s; s'] (2B rows) and its draws: what the actor's backward needs."""

    inputs: list[Tensor]
    mean: Tensor  # clipped to +-clip_mean with gSDE
    log_std: Tensor  # clamped to the actor's bounds; gSDE's per-row log std
    raw: Tensor  # the body's output: [mean, log_std] before the clamp, or gSDE's mean before its clip
    std: Tensor
    noise: Tensor
    actions: Tensor  # tanh(u), u = mean + std * noise
    logp: Tensor


def _policy_draws(algo: SAC | TQC | CrossQ, batch: Batch, noise: Tensor | None) -> _PolicyDraws:
    return _draws_at(algo, torch.cat([batch.obs.flatten(1), batch.next_obs.flatten(1)]), noise)


def _draws_at(algo: SAC | TQC | CrossQ, obs: Tensor, noise: Tensor | None) -> _PolicyDraws:
    """The actor's draws at the rows of `obs` [N, obs_dim] (noise [N, A], else drawn)."""
    actor, act_dim = algo.net, algo.act_dim
    out, inputs = actor.body.forward_cached(obs)
    raw = out[0]
    if actor.sde:  # the per-row Gaussian of gSDE (nets/sde.py), from the last hidden features
        mean = raw.clamp(-actor.clip_mean, actor.clip_mean)
        log_std = sde_log_std(inputs[-1][0], actor.log_std)
    else:
        mean, log_std = raw[:, :act_dim], raw[:, act_dim:].clamp(*actor.log_std_bounds)
    std = log_std.exp()
    if noise is None:
        noise = torch.randn(mean.shape, generator=algo.generator, device=mean.device, dtype=mean.dtype)
    u = torch.addcmul(mean, std, noise)
    logp = tanh_gaussian_log_prob(noise, log_std, u)
    return _PolicyDraws(inputs, mean, log_std, raw, std, noise, torch.tanh(u), logp)


def _actor_step(algo: SAC | TQC | CrossQ, draws: _PolicyDraws, g_a: Tensor, alpha: Tensor, n: int) -> None:
    """The actor's step on L = mean_B (alpha log pi(a|s) - Q(s, a)) given dL/da|_Q = `g_a` [B, A] (module docstring).
    With gSDE the per-row log std's gradient goes into the [latent, A] `log_std` (nets/sde.py) and the mean's
    is zero where it was clipped."""
    actor = algo.net
    a_pi, std, noise = draws.actions[:n], draws.std[:n], draws.noise[:n]
    g_u = torch.addcmul(g_a * (1.0 - a_pi * a_pi), a_pi, alpha * (2.0 / n))
    g_log_std = g_u * std * noise - alpha / n
    inputs = draws.inputs if len(draws.actions) == n else [h[:, :n] for h in draws.inputs]
    algo.actor_opt.zero_grad_unless_written_by(actor.body)
    if actor.sde:
        assert actor.log_std.grad is not None
        features = inputs[-1][0]
        actor.log_std.grad.copy_(sde_log_std_grad(features, draws.log_std[:n], g_log_std, actor.log_std))
        g_out = g_u * (draws.raw[:n].abs() <= actor.clip_mean)
    else:
        low, high = actor.log_std_bounds
        raw_log_std = draws.raw[:n, algo.act_dim :]
        g_out = torch.cat([g_u, g_log_std * ((raw_log_std >= low) & (raw_log_std <= high))], -1)
    actor.body.backward(inputs, g_out.unsqueeze(0))
    algo.actor_opt.clip_and_step()


def fused_sac_update(algo: SAC, batch: Batch, index: int, noise: Tensor | None = None) -> dict[str, Tensor]:
    """One SAC gradient step; `noise` ([2B, A] standard normal, obs rows then next-obs rows) for tests."""
    cfg, critic = algo.cfg, algo.critic
    n = len(batch)
    update_actor = index % cfg.actor_delay == 0
    with torch.no_grad():
        draws = _policy_draws(algo, batch, noise)
        logp_pi = draws.logp[:n]
        if update_actor:
            alpha = algo.temperature.update(logp_pi + algo.temperature.target_entropy)
        else:
            alpha = algo.temperature.log_alpha.detach().exp()

        next_q = algo.critic_target(batch.next_obs, draws.actions[n:])
        target = sac_target(batch.rewards, batch.discounts, batch.terminated, next_q, draws.logp[n:], alpha)

        # critic: d/dQ_k of 1/2 sum_k mean_B w (Q_k - y)^2 = w (Q_k - y) / B
        q, critic_inputs = critic.body.forward_cached(torch.cat([batch.obs.flatten(1), batch.actions.flatten(1)], -1))
        td = q[..., 0] - target
        weights = batch.get("weights")
        g_q = td / n if weights is None else td * weights / n
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, g_q.unsqueeze(-1))
        algo.critic_opt.clip_and_step()
        critic_loss = 0.5 * ((td * td if weights is None else weights * td * td).mean(-1).sum())
        metrics = {"critic_loss": critic_loss, "q": q.mean(), "alpha": alpha[0]}

        if update_actor:
            q_min = _min_critic_actor_step(algo, batch, draws, alpha, n)
            metrics["actor_loss"] = (alpha * logp_pi - q_min).mean()
            metrics["entropy"] = -logp_pi.mean()
        if index % cfg.target_update_interval == 0:
            algo.critic_target.update(cfg.tau)
        if cfg.prioritized:
            metrics["td_error"] = td.abs().mean(0)
    return metrics


def _min_critic_actor_step(
    algo: SAC | CQL | CrossQ, batch: Batch, draws: _PolicyDraws, alpha: Tensor, n: int
) -> Tensor:
    """SAC's actor step on mean_B (alpha log pi(a|s) - min_k Q_k(s, a)) through the critics as they are now;
    returns min_k Q_k(s, a) [B]."""
    q_pi, pi_inputs = _critic_at_policy_actions(algo, batch, draws, n)
    q_pi = q_pi[..., 0]  # [K, B]
    q_min, k_min = q_pi.min(0)
    if q_pi.device.type == "cpu":
        g_a = _min_critic_action_grad(algo, batch, pi_inputs, k_min, n)
    else:  # the rows' split needs their counts on the host: a sync per step on an accelerator
        # dL/dQ_k = -1/B for the minimizing critic, 0 for the others
        g_qpi = torch.zeros_like(q_pi).scatter_(0, k_min.unsqueeze(0), -1.0 / n)
        g_a = _action_grad(algo, batch, pi_inputs, g_qpi.unsqueeze(-1))
    _actor_step(algo, draws, g_a, alpha, n)
    return q_min


def _min_critic_action_grad(
    algo: SAC | CQL | CrossQ, batch: Batch, pi_inputs: list[Tensor], k_min: Tensor, n: int
) -> Tensor:
    """dL/da [B, A] of L = -mean_B min_k Q_k(s, a), each row through its minimizing critic alone: the other
    critics' gradient there is zero (adding it changes nothing), so the pass costs one critic's products per row
    instead of K's."""
    body, obs_dim = algo.critic.body, batch.obs.flatten(1).shape[1]
    g_a = pi_inputs[0].new_empty(n, pi_inputs[0].shape[-1] - obs_dim)
    for k in range(body.members):
        rows = (k_min == k).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        inputs = member_rows(pi_inputs, k, rows)
        g_out = inputs[0].new_full((1, len(rows), 1), -1.0 / n)
        g_input = body.backward(inputs, g_out, weight_grads=False, input_grad=True, members=slice(k, k + 1))
        assert g_input is not None
        g_a.index_copy_(0, rows, g_input[0, :, obs_dim:])
    return g_a


def _critic_at_policy_actions(
    algo: SAC | TQC | CrossQ, batch: Batch, draws: _PolicyDraws, n: int
) -> tuple[Tensor, list[Tensor]]:
    return algo.critic.body.forward_cached(torch.cat([batch.obs.flatten(1), draws.actions[:n]], -1))


def _action_grad(algo: SAC | TQC | CQL | CrossQ, batch: Batch, pi_inputs: list[Tensor], g_out: Tensor) -> Tensor:
    """dL/da [B, A] through the critics (summed over them) given dL/d(critic outputs), no weight gradients."""
    g_input = algo.critic.body.backward(pi_inputs, g_out, weight_grads=False, input_grad=True)
    assert g_input is not None
    return g_input[:, :, batch.obs.flatten(1).shape[1] :].sum(0)


def fused_crossq_applies(algo: CrossQ) -> bool:
    return bool(algo.cfg.analytic_grads and algo.net.body.numpy_acting and algo.critic.body.numpy_acting)


def fused_crossq_update(algo: CrossQ, batch: Batch, index: int, noise: Tensor | None = None) -> dict[str, Tensor]:
    """One CrossQ gradient step, the same as `CrossQ.autograd_update`: the critics once over [s; s'] with batch
    statistics of both halves (the bootstrapped half's values held fixed, its rows still in the statistics' gradient),
    then every `actor_delay`-th step the actor on s with batch statistics through the critics' running ones (each
    row through its minimizing critic, as SAC's). `noise`: [2B, A], obs rows then next-obs rows."""
    cfg, critic = algo.cfg, algo.critic
    n = len(batch)
    noise_pi, noise_next = (None, None) if noise is None else (noise[:n], noise[n:])
    with torch.no_grad():
        alpha = algo.temperature.log_alpha.detach().exp()
        next_draws = _draws_at(algo, batch.next_obs.flatten(1), noise_next)  # running statistics
        rows = torch.cat(
            [
                torch.cat([batch.obs.flatten(1), batch.actions.flatten(1)], -1),
                torch.cat([batch.next_obs.flatten(1), next_draws.actions], -1),
            ]
        )
        with batch_statistics(critic.body):
            q_both, critic_inputs = critic.body.forward_cached(rows)
        q = q_both[:, :n, 0]
        target = sac_target(batch.rewards, batch.discounts, batch.terminated, q_both[:, n:, 0], next_draws.logp, alpha)
        td = q - target
        weights = batch.get("weights")
        g_q = torch.zeros_like(q_both)  # the bootstrapped half is a constant of the loss
        torch.div(td if weights is None else td * weights, n, out=g_q[:, :n, 0])
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, g_q)
        algo.critic_opt.clip_and_step()
        critic_loss = 0.5 * ((td * td if weights is None else weights * td * td).mean(-1).sum())
        metrics = {"critic_loss": critic_loss, "q": q.mean(), "alpha": alpha[0]}
        if (index + 1) % cfg.actor_delay == 0:  # sb3-contrib counts updates from 1
            with batch_statistics(algo.net.body):
                draws = _draws_at(algo, batch.obs.flatten(1), noise_pi)
            alpha = algo.temperature.update(draws.logp + algo.temperature.target_entropy)
            q_min = _min_critic_actor_step(algo, batch, draws, alpha, n)
            metrics["actor_loss"] = (alpha * draws.logp - q_min).mean()
            metrics["entropy"] = -draws.logp.mean()
        if cfg.prioritized:
            metrics["td_error"] = td.abs().mean(0)
    return metrics


def fused_tqc_update(algo: TQC, batch: Batch, noise: Tensor | None = None) -> dict[str, Tensor]:
    """One TQC gradient step, the same as `TQC.autograd_update`: SAC's actor and temperature steps, a critic of
    K x M quantiles trained by the quantile Huber loss against the truncated pooled target, and the actor's Q the
    mean of every quantile of every critic (dL/dZ_{k,b,m} = -1 / (K B M))."""
    cfg, critic = algo.cfg, algo.critic
    n = len(batch)
    with torch.no_grad():
        draws = _policy_draws(algo, batch, noise)
        logp_pi = draws.logp[:n]
        alpha = algo.temperature.update(logp_pi + algo.temperature.target_entropy)
        next_quantiles = algo.critic_target(batch.next_obs, draws.actions[n:])
        target = tqc_target(
            batch.rewards, batch.discounts, batch.terminated, next_quantiles, cfg.drop_per_critic, draws.logp[n:], alpha
        )
        z, critic_inputs = critic.body.forward_cached(torch.cat([batch.obs.flatten(1), batch.actions.flatten(1)], -1))
        critic_loss, g_z, _ = quantile_huber_value_and_grads(z, target)
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, g_z)
        algo.critic_opt.clip_and_step()

        z_pi, pi_inputs = _critic_at_policy_actions(algo, batch, draws, n)
        _actor_step(
            algo, draws, _action_grad(algo, batch, pi_inputs, torch.full_like(z_pi, -1.0 / z_pi.numel())), alpha, n
        )
        algo.critic_target.update(cfg.tau)
        return {
            "critic_loss": critic_loss,
            "actor_loss": (alpha * logp_pi - z_pi.mean((0, 2))).mean(),
            "q": z.mean(),
            "alpha": alpha[0],
            "entropy": -logp_pi.mean(),
        }


def fused_cql_update(algo: CQL, batch: Batch, index: int, noise: CQLNoise | None = None) -> dict[str, Tensor]:
    """One CQL (or Cal-QL) gradient step, the same as `CQL.autograd_update` after its cloning phase. The critics'
    loss (TD plus penalty, Lagrangian step included) is the autograd path's own function of their values at the
    B (1 + 3M) proposal rows, differentiated by autograd on those values only; the critics' forward and backward
    over the rows, the one large part of the step, are hand-done. The proposals' policy draws come from the
    actor's one pass over [s; s'] that also gives SAC's draws."""
    from policylab.nets.critics import draw_many

    cfg, critic = algo.cfg, algo.critic
    n = len(batch)
    with torch.no_grad():
        draws = _policy_draws(algo, batch, None if noise is None else noise.policy)
        logp_pi = draws.logp[:n]
        alpha = algo.temperature.update(logp_pi + algo.temperature.target_entropy)
        target = algo.td_target(batch, draws.actions[n:], draws.logp[n:], alpha)
        proposal_noise = None if noise is None else noise.proposals
        sampled, sampled_logp = draw_many(
            draws.mean, draws.log_std, cfg.n_action_samples, algo.generator, proposal_noise
        )
        uniform = algo.uniform_proposals(n, noise)
        q_all, critic_inputs = critic.body.forward_cached(algo.proposal_rows(batch, uniform, sampled))
    values = q_all[..., 0].requires_grad_()
    with torch.enable_grad():
        critic_loss, metrics = algo.critic_loss(values, target, sampled_logp, batch)
        (g_values,) = torch.autograd.grad(critic_loss, values)
    with torch.no_grad():
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, g_values.unsqueeze(-1))
        algo.critic_opt.clip_and_step()

        q_min = _min_critic_actor_step(algo, batch, draws, alpha, n)
        algo.critic_target.update(cfg.tau)
        metrics.update(alpha=alpha[0], actor_loss=(alpha * logp_pi - q_min).mean(), entropy=-logp_pi.mean())
    return metrics


def fused_dqn_applies(algo: DQN) -> bool:
    return bool(algo.cfg.analytic_grads and algo.net.encoder is None and algo.net.body.analytic_backward)


def fused_dqn_update(algo: DQN, batch: Batch) -> dict[str, Tensor]:
    """One DQN gradient step (double Q, dueling, Huber or MSE, importance weights)."""
    cfg, net = algo.cfg, algo.net
    n = len(batch)
    with torch.no_grad():
        allowed = batch.get("next_action_mask")  # with action masks: the max over the allowed actions at s'
        next_q_target = allowed_only(algo.q_target(batch.next_obs)[0], allowed)
        x = batch.obs.flatten(1)
        if cfg.double_q:  # the online net on [s; s'] in one call
            x = torch.cat([x, batch.next_obs.flatten(1)])
        out, inputs = net.body.forward_cached(x)
        y = out[0]
        q_all = y if not cfg.dueling else y[:, :1] + y[:, 1:] - y[:, 1:].mean(-1, keepdim=True)
        next_q_online = allowed_only(q_all[n:], allowed) if cfg.double_q else None
        target = dqn_target(batch.rewards, batch.discounts, batch.terminated, next_q_target, next_q_online)
        actions = batch.actions.long().unsqueeze(1)
        q = q_all[:n].gather(1, actions).squeeze(1)
        td = q - target
        weights = batch.get("weights")
        # g = d loss_i / d td_i; with g = clamp(td, -1, 1) the Huber loss is g (td - g / 2) (td^2 / 2 inside,
        # |td| - 1/2 outside), the MSE loss (g / 2) td with g = 2 td. The mean over B is one dot product.
        g = td.clamp(-1.0, 1.0) if cfg.loss == "huber" else 2.0 * td
        g_q = g * (1.0 / n) if weights is None else g * weights * (1.0 / n)
        g_out = torch.zeros((n, y.shape[1]), dtype=y.dtype, device=y.device)
        if cfg.dueling:  # dQ_a/dV = 1, dQ_a/dA_j = [j = a] - 1/|A|
            g_out[:, :1] = g_q.unsqueeze(1)
            g_out[:, 1:] = (-g_q / algo.n_actions).unsqueeze(1)
            g_out[:, 1:].scatter_add_(1, actions, g_q.unsqueeze(1))
        else:
            g_out.scatter_(1, actions, g_q.unsqueeze(1))
        algo.q_opt.zero_grad_unless_written_by(net.body)
        net.body.backward([h[:, :n] for h in inputs], g_out.unsqueeze(0))
        algo.q_opt.clip_and_step()
        loss = torch.dot(g_q, torch.add(td, g, alpha=-0.5) if cfg.loss == "huber" else 0.5 * td)
        metrics = {"loss": loss, "q": q.mean()}
        if cfg.prioritized:
            metrics["td_error"] = td
    return metrics


def fused_bcq_discrete_update(algo: DiscreteBCQ, batch: Batch) -> dict[str, Tensor]:
    """One discrete BCQ step, the same as `DiscreteBCQ.autograd_update`: both members of the MLP (Q and the
    behaviour classifier) forward on [s; s'] and backward on the s rows at once, member 0 with DQN's TD gradient,
    member 1 with the imitation loss's, d/d logits = (softmax - onehot(a)) / B + 2 beta logits / (B A)."""
    from policylab.nets.support import filtered_greedy

    cfg, net = algo.cfg, algo.net
    n, n_actions = len(batch), algo.n_actions
    with torch.no_grad():
        out, inputs = net.body.forward_cached(torch.cat([batch.obs.flatten(1), batch.next_obs.flatten(1)]))
        q_all, logits_all = net.values(out[:1])[0], out[1, :, -n_actions:]
        mask = batch.get("next_action_mask")
        bias = None if mask is None else allowed_only(torch.zeros_like(logits_all[n:]), mask)
        next_actions = filtered_greedy(q_all[n:], logits_all[n:], cfg.threshold, bias)
        next_value = algo.q_target(batch.next_obs)[0].gather(1, next_actions.unsqueeze(1)).squeeze(1)
        target = bootstrap(batch.rewards, batch.discounts, batch.terminated, next_value)
        actions = batch.actions.long().unsqueeze(1)
        q = q_all[:n].gather(1, actions).squeeze(1)
        td = q - target
        g = td.clamp(-1.0, 1.0) if cfg.loss == "huber" else 2.0 * td
        g_q = g * (1.0 / n)
        g_out = torch.zeros((2, n, out.shape[-1]), dtype=out.dtype, device=out.device)
        if cfg.dueling:  # dQ_a/dV = 1, dQ_a/dA_j = [j = a] - 1/|A|
            g_out[0, :, :1] = g_q.unsqueeze(1)
            g_out[0, :, 1:] = (-g_q / n_actions).unsqueeze(1)
            g_out[0, :, 1:].scatter_add_(1, actions, g_q.unsqueeze(1))
        else:
            g_out[0].scatter_(1, actions, g_q.unsqueeze(1))
        logits = logits_all[:n]
        log_p = torch.log_softmax(logits, -1)
        imitation_loss = -log_p.gather(1, actions).mean() + cfg.imitation_beta * logits.pow(2).mean()
        g_logits = log_p.exp_().scatter_add_(1, actions, torch.full_like(g_q, -1.0).unsqueeze(1)).mul_(1.0 / n)
        g_out[1, :, -n_actions:] = g_logits.add_(logits, alpha=2.0 * cfg.imitation_beta / logits.numel())
        algo.q_opt.zero_grad_unless_written_by(net.body)
        net.body.backward([h[:, :n] for h in inputs], g_out)
        algo.q_opt.clip_and_step()
        td_loss = torch.dot(g_q, torch.add(td, g, alpha=-0.5) if cfg.loss == "huber" else 0.5 * td)
    return {"loss": td_loss, "imitation_loss": imitation_loss, "q": q.mean()}


def fused_qrdqn_applies(algo: QRDQN | C51) -> bool:
    """QR-DQN's and C51's steps: an MLP on vectors whose backward is hand-derived."""
    return bool(algo.cfg.analytic_grads and algo.net.encoder is None and algo.net.body.analytic_backward)


def fused_qrdqn_update(algo: QRDQN, batch: Batch) -> dict[str, Tensor]:
    """One QR-DQN gradient step, the same as its autograd path: the quantile Huber loss's gradient (computed with
    its value) lands in the taken action's N outputs, zero elsewhere."""
    net, n_quantiles = algo.net, algo.cfg.n_quantiles
    n = len(batch)
    with torch.no_grad():
        target = algo.quantile_target(batch)
        out, inputs = net.body.forward_cached(batch.obs.flatten(1))
        actions = batch.actions.long()
        z_all = out[0].view(n, algo.n_actions, n_quantiles)
        z = z_all[torch.arange(n, device=z_all.device), actions]
        loss, g_z, _ = quantile_huber_value_and_grads(z.unsqueeze(0), target)
        g_out = torch.zeros_like(z_all)
        index = actions.view(n, 1, 1).expand(n, 1, n_quantiles)
        g_out.scatter_(1, index, g_z[0].unsqueeze(1).mul_(n_quantiles))  # the loss is scaled by N
        algo.q_opt.zero_grad_unless_written_by(net.body)
        net.body.backward(inputs, g_out.view(1, n, -1))
        algo.q_opt.clip_and_step()
    return {"loss": loss * n_quantiles, "q": z.mean()}


def fused_c51_update(algo: C51, batch: Batch) -> dict[str, Tensor]:
    """One C51 gradient step, the same as its autograd path: d/dlogits of -mean_B sum_j m_j log softmax_j is
    (p sum_j m_j - m) / B in the taken action's N outputs, zero elsewhere."""
    net = algo.net
    n = len(batch)
    with torch.no_grad():
        target = algo.projected_target(batch)
        out, inputs = net.body.forward_cached(batch.obs.flatten(1))
        logits_all = out[0].view(n, algo.n_actions, net.n_atoms)
        rows, actions = torch.arange(n, device=logits_all.device), batch.actions.long()
        log_p = torch.log_softmax(logits_all[rows, actions], -1)
        loss = -(target * log_p).sum(-1).mean()
        p = log_p.exp()
        g_out = torch.zeros_like(logits_all)
        g_out[rows, actions] = (p * target.sum(-1, keepdim=True) - target).div_(n)
        algo.q_opt.zero_grad_unless_written_by(net.body)
        net.body.backward(inputs, g_out.view(1, n, -1))
        algo.q_opt.clip_and_step()
    return {"loss": loss, "q": (p @ net.atoms).mean()}


def fused_td3_applies(algo: TD3) -> bool:
    return bool(algo.cfg.analytic_grads and algo.net.body.analytic_backward and algo.critic.body.analytic_backward)


def fused_td3_update(algo: TD3, batch: Batch, index: int) -> dict[str, Tensor]:
    """One TD3 (or DDPG) gradient step, drawing the target-smoothing noise in the same order as autograd's."""
    cfg, actor, critic = algo.cfg, algo.net, algo.critic
    n = len(batch)
    obs = batch.obs.flatten(1)
    with torch.no_grad():
        next_actions = algo.actor_target(batch.next_obs)
        if cfg.target_noise > 0:
            next_actions = target_policy_smoothing(
                next_actions, cfg.target_noise, cfg.target_noise_clip, -1.0, 1.0, algo.generator
            )
        next_q = algo.critic_target(batch.next_obs, next_actions)
        target = td3_target(batch.rewards, batch.discounts, batch.terminated, next_q)
        # critic: d/dQ_k of sum_k mean_B w (Q_k - y)^2 = 2 w (Q_k - y) / B
        q, critic_inputs = critic.body.forward_cached(torch.cat([obs, batch.actions.flatten(1)], -1))
        td = q[..., 0] - target
        weights = batch.get("weights")
        g_q = 2.0 * td / n if weights is None else 2.0 * td * weights / n
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, g_q.unsqueeze(-1))
        algo.critic_opt.clip_and_step()
        critic_loss = (td * td if weights is None else weights * td * td).mean(-1).sum()
        metrics = {"critic_loss": critic_loss, "q": q.mean()}
        if (index + 1) % cfg.policy_delay == 0:
            out, actor_inputs = actor.body.forward_cached(obs)
            a = torch.tanh(out[0])
            q1, pi_inputs = critic.body.forward_cached(torch.cat([obs, a], -1), members=1)
            # TD3+BC: L = -lambda mean Q_1 + mean (a - a_data)^2, dL/da = -lambda dQ_1/da / B + 2 (a - a_data) / (B A)
            lam = td3_bc_lambda(q1, cfg.bc_alpha) if cfg.bc_alpha > 0 else None
            g_q1 = torch.full_like(q1, -1.0 / n) if lam is None else (-lam / n).expand_as(q1)
            g_input = critic.body.backward(pi_inputs, g_q1, weight_grads=False, input_grad=True, members=1)
            assert g_input is not None
            g_a = g_input[:, :, obs.shape[1] :]
            if lam is not None:
                gap = a - batch.actions.flatten(1)
                g_a = torch.add(g_a, gap, alpha=2.0 / gap.numel())
            g_out = g_a * (1.0 - a * a)
            algo.actor_opt.zero_grad_unless_written_by(actor.body)
            actor.body.backward(actor_inputs, g_out)
            algo.actor_opt.clip_and_step()
            algo.actor_target.update(cfg.tau)
            algo.critic_target.update(cfg.tau)
            metrics["actor_loss"] = -q1.mean() if lam is None else -lam * q1.mean() + gap.pow(2).mean()
        if cfg.prioritized:
            metrics["td_error"] = td.abs().mean(0)
    return metrics


def fused_iql_applies(algo: IQL) -> bool:
    bodies = (algo.net.body, algo.critic.body, algo.value)
    return bool(algo.cfg.analytic_grads and all(body.analytic_backward for body in bodies))


def fused_iql_update(algo: IQL, batch: Batch) -> dict[str, Tensor]:
    """One IQL gradient step (value, critics, actor), the same as `IQL.autograd_update`."""
    cfg, value = algo.cfg, algo.value
    n = len(batch)
    obs, actions = batch.obs.flatten(1), batch.actions.flatten(1)
    with torch.no_grad():
        obs_actions = torch.cat([obs, actions], -1)  # one input for the target critics and the critics
        target_body = cast(StackedMLP, algo.critic_target.module.body)
        target_q = target_body(obs_actions)[..., 0].min(0).values
        v, value_inputs = value.forward_cached(obs)
        advantage = target_q - v[0, :, 0]
        weighted = torch.where(advantage < 0, 1.0 - cfg.expectile, cfg.expectile).mul_(advantage)  # w(u) u
        value_loss = (weighted * advantage).mean()
        algo.value_opt.zero_grad_unless_written_by(value)
        value.backward(value_inputs, (weighted * (-2.0 / n)).view(1, n, 1))
        algo.value_opt.clip_and_step()

        next_v = value(batch.next_obs.flatten(1))[0, :, 0]
        y = bootstrap(batch.rewards, batch.discounts, batch.terminated, next_v)
        critic_loss = _half_squared_td_step(algo, obs_actions, y)
        c = advantage_weights(advantage, cfg.beta, cfg.max_weight)
        actor_loss = _weighted_regression_step(algo, algo.net, obs, actions, c)
        algo.critic_target.update(cfg.tau)
    return {
        "value_loss": value_loss,
        "critic_loss": critic_loss,
        "actor_loss": actor_loss,
        "q": target_q.mean(),
        "adv_weight": c.mean(),
    }


def _half_squared_td_step(algo: IQL | AWAC | CRR, obs_actions: Tensor, y: Tensor) -> Tensor:
    """The critics' step on 1/2 sum_k mean_B (Q_k(s, a) - y)^2 (dL/dQ_k = td / B); returns the loss."""
    critic = algo.critic
    q, critic_inputs = critic.body.forward_cached(obs_actions)
    td = q[..., 0] - y
    algo.critic_opt.zero_grad_unless_written_by(critic.body)
    critic.body.backward(critic_inputs, (td / len(y)).unsqueeze(-1))
    algo.critic_opt.clip_and_step()
    return 0.5 * (td * td).mean(-1).sum()


def _weighted_regression_step(algo: IQL | AWAC | CRR, actor: Any, obs: Tensor, actions: Tensor, c: Tensor) -> Tensor:
    """The actor's step on advantage-weighted regression towards the dataset's actions (IQL, AWAC, CRR): a Gaussian
    actor on -mean_B c log N(a; m, std), a deterministic one on mean_B c |m - a|^2 (module docstring); returns the
    loss."""
    from policylab.nets import GaussianActor

    n = len(obs)
    out, actor_inputs = actor.body.forward_cached(obs)
    mean = torch.tanh(out[0])
    algo.actor_opt.zero_grad_unless_written_by(actor.body)
    if isinstance(actor, GaussianActor):
        raw = actor.log_std
        log_std = raw.clamp(*actor.log_std_bounds)
        inv_std = torch.exp(-log_std)
        z = (actions - mean).mul_(inv_std)
        zz = z * z
        logp = (-0.5 * zz - log_std - 0.5 * _LOG_2PI).sum(-1)
        actor_loss = -(c * logp).mean()
        cn = (c / n).unsqueeze(1)
        g_out = (cn * z).mul_(inv_std).mul_(mean * mean - 1.0)
        inside = (raw >= actor.log_std_bounds[0]) & (raw <= actor.log_std_bounds[1])
        assert raw.grad is not None
        torch.sum(cn * (1.0 - zz), 0, out=raw.grad).mul_(inside)
    else:
        gap = mean - actions
        actor_loss = (c * gap.pow(2).sum(-1)).mean()
        g_out = (2.0 / n) * c.unsqueeze(1) * gap * (1.0 - mean * mean)
    actor.body.backward(actor_inputs, g_out.unsqueeze(0))
    algo.actor_opt.clip_and_step()
    return actor_loss


def fused_awac_applies(algo: AWAC) -> bool:
    return bool(algo.cfg.analytic_grads and algo.net.body.analytic_backward and algo.critic.body.analytic_backward)


def fused_awac_update(algo: AWAC, batch: Batch) -> dict[str, Tensor]:
    """One AWAC gradient step, the same as `AWAC.autograd_update` (the same draws, in the same order)."""
    from policylab.nets import GaussianActor

    cfg, actor, critic = algo.cfg, algo.net, algo.critic
    obs, next_obs, actions = batch.obs.flatten(1), batch.next_obs.flatten(1), batch.actions.flatten(1)
    gaussian = isinstance(actor, GaussianActor)
    with torch.no_grad():
        next_actions = actor.sample(next_obs, algo.generator) if gaussian else actor(next_obs)
        y = td3_target(batch.rewards, batch.discounts, batch.terminated, algo.critic_target(next_obs, next_actions))
        critic_loss = _half_squared_td_step(algo, torch.cat([obs, actions], -1), y)
        policy_actions = actor.sample(obs, algo.generator) if gaussian else actor(obs)
        q = critic(torch.cat([obs, obs]), torch.cat([actions, policy_actions])).min(0).values  # one call for both
        q_data, v = q.chunk(2)
        c = advantage_weights(q_data - v, 1.0 / cfg.awac_lambda, cfg.max_weight)
        actor_loss = _weighted_regression_step(algo, actor, obs, actions, c)
        algo.critic_target.update(cfg.tau)
    return {"critic_loss": critic_loss, "actor_loss": actor_loss, "q": q_data.mean(), "adv_weight": c.mean()}


def fused_crr_applies(algo: CRR) -> bool:
    return bool(algo.cfg.analytic_grads and algo.actor.body.analytic_backward and algo.critic.body.analytic_backward)


def fused_crr_update(algo: CRR, batch: Batch, index: int) -> dict[str, Tensor]:
    """One CRR gradient step, the same as `CRR.autograd_update` (the same draws, in the same order)."""
    obs, next_obs, actions = batch.obs.flatten(1), batch.next_obs.flatten(1), batch.actions.flatten(1)
    with torch.no_grad():
        next_actions = cast(Any, algo.actor_target.module).sample(next_obs, algo.generator)
        y = td3_target(batch.rewards, batch.discounts, batch.terminated, algo.critic_target(next_obs, next_actions))
        critic_loss = _half_squared_td_step(algo, torch.cat([obs, actions], -1), y)
        q_data, weights = algo.advantage_weights(obs, actions)
        actor_loss = _weighted_regression_step(algo, algo.actor, obs, actions, weights)
        algo.update_targets(index)
    return {"critic_loss": critic_loss, "actor_loss": actor_loss, "q": q_data.mean(), "adv_weight": weights.mean()}


def fused_plas_applies(algo: PLAS) -> bool:
    bodies = [algo.net.latent, algo.vae.decoder, algo.critic.body]
    if algo.net.perturbation is not None:
        bodies.append(algo.net.perturbation.body)
    return bool(algo.cfg.analytic_grads and all(body.analytic_backward for body in bodies))


def fused_plas_update(algo: PLAS, batch: Batch, index: int) -> dict[str, Tensor]:
    """One PLAS step after the VAE's, the same as `PLAS.autograd_update`. The actor's gradient goes from the first
    critic's input through the perturbation (where the clip lets it; its weights trained too), the frozen decoder
    (input gradient only) and max_latent tanh into the latent policy:
        g_a0 = g_a 1(|a0 + phi m| <= 1) + (g_a 1(...) phi (1 - m^2)) dxi/da0,  g_z = (g_a0 (1 - a0^2)) dD/dz,
        g_f = g_z max_latent (1 - t^2)
    for a0 = tanh(D(s, z)), z = max_latent t, t = tanh(f(s)), m = tanh(xi(s, a0))."""
    cfg, net, critic = algo.cfg, algo.net, algo.critic
    obs, actions = batch.obs.flatten(1), batch.actions.flatten(1)
    n, n_obs = len(obs), obs.shape[1]
    with torch.no_grad():
        target = algo.td_target(batch)
        q, critic_inputs = critic.body.forward_cached(torch.cat([obs, actions], -1))
        td = q[..., 0] - target
        algo.critic_opt.zero_grad_unless_written_by(critic.body)
        critic.body.backward(critic_inputs, (2.0 * td / n).unsqueeze(-1))
        algo.critic_opt.clip_and_step()
        metrics = {"critic_loss": (td * td).mean(-1).sum(), "q": q.mean()}
        if (index + 1) % cfg.policy_delay == 0:
            out, latent_inputs = net.latent.forward_cached(obs)
            t = torch.tanh(out[0])
            decoded, decoder_inputs = algo.vae.decoder.forward_cached(torch.cat([obs, net.max_latent * t], -1))
            a0 = torch.tanh(decoded[0])
            xi = net.perturbation
            if xi is not None:
                moved, xi_inputs = xi.body.forward_cached(torch.cat([obs, a0], -1))
                m = torch.tanh(moved[0])
                unclipped = a0 + xi.scale * m
                a = unclipped.clamp(-1.0, 1.0)
            else:
                a = a0
            q1, pi_inputs = critic.body.forward_cached(torch.cat([obs, a], -1), members=1)
            g_in = critic.body.backward(pi_inputs, torch.full_like(q1, -1.0 / n), weight_grads=False,
                                        input_grad=True, members=1)  # fmt: skip
            assert g_in is not None
            g_a = g_in[:, :, n_obs:]
            algo.actor_opt.zero_grad_unless_written_by(net.latent)
            if xi is not None:
                g_a = g_a * (
                    (unclipped >= -1.0) & (unclipped <= 1.0)
                )  # torch.clamp's gradient: 1 inside, bounds included
                g_xi = xi.body.backward(xi_inputs, g_a * (xi.scale * (1.0 - m * m)), input_grad=True)
                assert g_xi is not None
                g_a = g_a + g_xi[:, :, n_obs:]
            g_decoder = algo.vae.decoder.backward(decoder_inputs, g_a * (1.0 - a0 * a0), weight_grads=False,
                                                  input_grad=True)  # fmt: skip
            assert g_decoder is not None
            g_latent = g_decoder[:, :, n_obs:] * (net.max_latent * (1.0 - t * t))
            net.latent.backward(latent_inputs, g_latent)
            algo.actor_opt.clip_and_step()
            algo.actor_target.update(cfg.tau)
            algo.critic_target.update(cfg.tau)
            metrics["actor_loss"] = -q1.mean()
    return metrics
