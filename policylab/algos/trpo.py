"""TRPO (Schulman et al. 2015, arXiv:1502.05477): a natural-gradient step of bounded KL, then a critic fit.

for each iteration:
    collect n_steps x num_envs transitions with pi_old           (the loop)
    A, R = GAE(lambda)(rewards, V);  A normalized
    L(theta) = mean r A,  r = pi_theta(a|s) / pi_old(a|s)          (objectives.pg_surrogate, unclipped)
    g = grad L;  F v = grad((grad mean KL(pi_old || pi_theta)) . v) + damping v   (Fisher-vector products at
                                    theta_old: forward- then reverse-mode through the actor, `ActorFisher`)
    x = F^-1 g by cg_max_steps conjugate-gradient iterations        (optim.conjugate_gradient)
    step = sqrt(2 target_kl / x.F x) x                              (the largest step the KL bound allows)
    backtracking line search: theta = theta_old + shrink^j step, j = 0..line_search_max_iter-1, the first with
        L(theta) > L(theta_old) and mean KL(pi_old || pi_theta) <= target_kl  (closed form, nets/heads.py);
        none: theta stays theta_old
    n_critic_updates epochs of Adam minibatch steps on (V(s) - R)^2  (the fused step, critic member alone)

The actor and the critic are two members of one stacked MLP whose parameters are one flat vector: the policy
gradient and every Fisher-vector product are zero on the critic's entries, so CG and the line search work on the
whole vector and move the actor only; the critic's Adam steps get zero policy gradient, so they move the critic
only. Defaults follow SB3-contrib's TRPO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.fused import FusedActorCriticStep
from policylab.algos.onpolicy import (
    ActorCriticLoss,
    OnPolicyConfig,
    adam,
    annealed,
    build_actor_critic,
    make_learner,
    normalize,
    rollout_advantages,
    with_logit_bias,
)
from policylab.algos.ppo import explained_variance
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.nets.actor_critic import masked
from policylab.nets.sde import sde_log_std_grad
from policylab.objectives import pg_surrogate
from policylab.optim import ParameterBuffer, conjugate_gradient, set_lr


@dataclass
class TRPOConfig(OnPolicyConfig):
    """TRPO. Defaults follow SB3-contrib's TRPO (lr is the critic's; the policy step is set by target_kl)."""

    lr: float = 1e-3
    """The critic's Adam learning rate."""
    max_grad_norm: float | None = None
    """Clip the critic's gradient norm (None: no clipping, as in SB3-contrib)."""
    batch_size: int = 128
    """Minibatch size of the critic updates."""
    n_critic_updates: int = 10
    """Epochs of critic minibatch steps per rollout."""
    target_kl: float = 0.01
    """The trust region: the mean KL(pi_old || pi) of an accepted policy step is at most this."""
    anneal_kl: bool = False
    """Shrink target_kl linearly to 0 over the run (as `anneal_lr` does a learning rate): the policy's last steps
    are small, so the policy at the end of the budget is the one the run converged to."""
    cg_max_steps: int = 15
    cg_damping: float = 0.1
    """Added to the Fisher matrix's diagonal (F + damping I) for a well-conditioned CG solve."""
    line_search_shrinking_factor: float = 0.8
    line_search_max_iter: int = 10
    sub_sampling_factor: int = 1
    """Compute the policy step on every k-th sample of the rollout only (faster; 1: all)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "batch_size", "n_critic_updates", "target_kl", "cg_max_steps", "line_search_max_iter")
        positive(self, "sub_sampling_factor")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping={self.cg_damping} must be >= 0", "set cg_damping to e.g. 0.1")
        if not 0.0 < self.line_search_shrinking_factor < 1.0:
            raise ConfigError(
                f"line_search_shrinking_factor={self.line_search_shrinking_factor} is outside (0, 1)",
                "set line_search_shrinking_factor to e.g. 0.8",
            )
        if self.dataset is not None:
            raise ConfigError(
                "trpo has no imitation term for demonstrations (a dataset)", "drop --dataset, or use ppo with it"
            )
        if self.shared_net or self.recurrent:
            given = [key for key in ("shared_net", "recurrent") if getattr(self, key)]
            raise ConfigError(
                "trpo needs separate actor and critic networks without memory (shared_net=false, recurrent=false): "
                "a shared body would let the critic's updates move the policy out of the trust region",
                f"drop {' and '.join(given)} ({' '.join(f'--set {key}=false' for key in given)})",
            )


class TRPO:
    name = "trpo"
    config_cls = TRPOConfig

    def __init__(self, cfg: TRPOConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.learner = make_learner(self.net, cfg, lambda params: adam(params, cfg.lr))
        self.optimizer, self.generator = self.learner.optimizer, self.learner.generator
        self.imitation = None
        """Part of the on-policy interface; TRPO has no imitation term (its config rejects a dataset)."""

    @staticmethod
    def build_policy(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space) -> ActorCritic:
        return build_actor_critic(cfg, obs_space, act_space, "trpo")

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        set_lr(self.optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        advantages, returns = rollout_advantages(rollout, "gae", cfg)
        data = Batch(
            obs=rollout.obs, actions=rollout.actions, logp=rollout.logp, advantages=advantages, returns=returns
        ).flatten()
        with_logit_bias(data, rollout)
        target_kl = annealed(cfg.target_kl, progress, cfg.anneal_kl)
        metrics = self.policy_step(data.select(torch.arange(0, len(data), cfg.sub_sampling_factor)), target_kl)
        metrics.update(self.critic_steps(data))
        metrics["explained_variance"] = explained_variance(rollout.values.flatten(), returns.flatten())
        return metrics

    def policy_step(self, data: Batch, target_kl: float) -> dict[str, Tensor]:
        """The natural-gradient step with its line search (KL bound `target_kl`), on the actor's entries of the
        flat parameters."""
        cfg, net, params = self.cfg, self.net, self.learner.params
        adv = normalize(data.advantages) if cfg.normalize_advantage else data.advantages
        bias = data.get("logit_bias")  # the action masks' (the masked actions have probability 0 on both sides)
        with torch.no_grad():
            old_out, old_log_std = net.policy_distribution(data.obs)
            old_out = masked(old_out, bias)
            old_log_std = None if old_log_std is None else old_log_std.detach().clone()

        def surrogate_and_kl() -> tuple[Tensor, Tensor]:
            out, log_std = net.policy_distribution(data.obs)
            logp, _ = net.masked_log_prob_entropy(out, log_std, data.actions, bias)
            out = masked(out, bias)
            loss, _ = pg_surrogate(logp, data.logp, adv, clip_low=None)
            return -loss, net.head.kl(old_out, old_log_std, out, log_std).mean()  # type: ignore[arg-type]

        objective, kl = surrogate_and_kl()
        analytic = ActorFisher.supports(net)  # else double backprop through this graph: keep it
        grads = torch.autograd.grad(objective, params.params, retain_graph=not analytic, allow_unused=True)
        g = _flat(grads, params.params)
        fisher_vector: Callable[[Tensor], Tensor]
        if analytic:
            fisher_vector = ActorFisher(net, params, data.obs, cfg.cg_damping, bias)
        else:
            fisher_vector = _autograd_fisher(kl, params.params, cfg.cg_damping)
        direction = conjugate_gradient(fisher_vector, g, cfg.cg_max_steps)
        step = direction * torch.sqrt(2.0 * target_kl / (direction @ fisher_vector(direction)).clamp_min(1e-12))
        theta_old, objective_old = params.flat.detach().clone(), float(objective.detach())
        accepted, coef, kl_new, objective_new = -1, 1.0, 0.0, objective_old
        with torch.no_grad():
            for j in range(cfg.line_search_max_iter):
                params.flat.copy_(theta_old + coef * step)
                candidate, candidate_kl = (float(x) for x in surrogate_and_kl())  # the search's one sync a try
                if candidate_kl <= target_kl and candidate > objective_old:
                    accepted, kl_new, objective_new = j, candidate_kl, candidate
                    break
                coef *= cfg.line_search_shrinking_factor
            if accepted < 0:
                params.flat.copy_(theta_old)
        return {
            "policy_objective": torch.tensor(objective_new),
            "kl": torch.tensor(kl_new),
            "line_search_success": torch.tensor(float(accepted >= 0)),
            "line_search_backtracks": torch.tensor(float(max(accepted, 0))),
            "step_norm": coef * step.norm() if accepted >= 0 else torch.zeros(()),
        }

    def critic_steps(self, data: Batch) -> dict[str, Tensor]:
        """n_critic_updates epochs of shuffled minibatches of Adam on (V - R)^2: through the critic's member alone
        (`value_step`) on the fused path, else the actor-critic step with zero advantages (so the policy gets no
        gradient) and vf_coef 1."""
        step = self.learner.step
        fused = step if isinstance(step, FusedActorCriticStep) else None
        if fused is not None:
            self.learner.params.zero_grad()  # the actor's entries stay zero through value_step
        critic = Batch(obs=data.obs, actions=data.actions, advantages=torch.zeros_like(data.returns))
        critic.returns = data.returns
        loss = ActorCriticLoss(clip_low=None, vf_coef=1.0, ent_coef=0.0)
        values: list[Tensor] = []
        # An image encoder feeds actor and critic: the value loss's gradient into it is dropped (SB3-contrib's TRPO
        # does the same), else the critic's steps would move the policy outside the trust region. The encoder then
        # learns through the natural-gradient step alone (its Adam moments stay zero: Adam never moves it).
        encoder = [] if self.net.encoder is None else list(self.net.encoder.parameters())
        hooks = [p.register_hook(torch.zeros_like) for p in encoder]
        try:
            self._critic_epochs(data, critic, loss, fused, values)
        finally:
            for hook in hooks:
                hook.remove()
        return {"value_loss": torch.stack(values).mean()}

    def _critic_epochs(
        self,
        data: Batch,
        critic: Batch,
        loss: ActorCriticLoss,
        fused: FusedActorCriticStep | None,
        values: list[Tensor],
    ) -> None:
        cfg, step, n = self.cfg, self.learner.step, len(critic)
        for epoch in range(cfg.n_critic_updates):
            order = torch.randperm(n, generator=self.generator, device=data.obs.device)
            last = epoch == cfg.n_critic_updates - 1
            for start in range(0, n, cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                if fused is not None:
                    obs, returns = data.obs.index_select(0, rows), data.returns.index_select(0, rows)
                    v_loss = fused.value_step(obs, returns, with_metrics=last)
                else:
                    metrics, _ = step(critic.select(rows), loss, with_metrics=last)
                    v_loss = metrics["value_loss"]
                if last:
                    values.append(v_loss)  # type: ignore[arg-type]


class ActorFisher:
    """Fisher-vector products of the actor at its current weights, without double backprop.

    F v = mean_i J_i^T M_i J_i v (+ the head's log-std block), with J_i the Jacobian of sample i's head inputs
    (means or logits) in the actor's weights and M_i the head's Fisher matrix in them (`head.fisher_product`):
    the Hessian of the mean KL(pi_old || pi) at pi = pi_old, which double backprop computes through autograd's
    graph. Here J v is one forward-mode pass (`StackedMLP.jvp`) and J^T u one backward (`StackedMLP.backward`),
    both through the actor's member alone, at the activations of one cached forward. v and F v are the
    learner's flat vectors: the critic's entries of F v are damping * v's (zero in TRPO's solve). Under gSDE the
    log-std block is mean_i K_i^T 2 K_i, K_i the Jacobian of sample i's log sigma in the [features, actions]
    parameter (the features held fixed, as in the policy's gradient)."""

    def __init__(
        self, net: ActorCritic, params: ParameterBuffer, obs: Tensor, damping: float, logit_bias: Tensor | None = None
    ) -> None:
        self.net, self.damping = net, damping
        body = net.body
        self.out, self.inputs = body.forward_cached(obs.reshape(obs.shape[0], net.obs_dim), members=1)
        self.head_inputs = masked(self.out[0], logit_bias)
        """The head's inputs (logits with the action masks' bias, or means) at the cached forward."""
        self.scale = 1.0 / obs.shape[0]
        self._where: dict[int, tuple[int, torch.Size]] = {}
        offset = 0
        for p in params.params:
            self._where[id(p)] = (offset, p.shape)
            offset += p.numel()
        self.result = torch.empty(offset, dtype=params.flat.dtype, device=params.flat.device)
        self._layers = list(zip(body.weights, body.biases))
        self.log_std_at = self._where[id(net.log_std)][0] if net.log_std is not None else None
        self.features = self.inputs[-1][0]  # the actor's last hidden layer: gSDE's features
        with torch.no_grad():
            self.row_log_std = net.row_log_std(self.features)

    @staticmethod
    def supports(net: torch.nn.Module) -> bool:
        return (
            isinstance(net, ActorCritic)
            and net.encoder is None
            and not net.recurrent
            and not net.shared
            and net.body.analytic_backward
        )

    def _actor(self, flat: Tensor, p: Tensor) -> Tensor:
        """The actor's member of stacked parameter p, as a view of a flat vector in the learner's layout."""
        start, shape = self._where[id(p)]
        return flat[start : start + p.numel()].view(shape)[:1]

    def __call__(self, v: Tensor) -> Tensor:
        net, view = self.net, self._actor
        w_tangents = [view(v, w) for w, _ in self._layers]
        b_tangents = [view(v, b) for _, b in self._layers]
        tangent = net.body.jvp(self.inputs, w_tangents, b_tangents, members=1)[0]
        u = net.head.fisher_product(self.head_inputs, self.row_log_std, tangent).mul_(self.scale)
        result = self.result.zero_()
        into = [(view(result, w), view(result, b)) for w, b in self._layers]
        net.body.backward(self.inputs, u.unsqueeze(0), members=1, into=into)
        if self.log_std_at is not None:
            at, n = self.log_std_at, net.log_std.numel()  # type: ignore[union-attr]
            if net.sde:
                result[at : at + n] = self._sde_block(v[at : at + n]).reshape(-1)
            else:
                result[at : at + n] = v[at : at + n] * net.head.log_std_fisher  # type: ignore[union-attr]
        return result.add_(v, alpha=self.damping)

    def _sde_block(self, v: Tensor) -> Tensor:
        """gSDE's log-std block times v: mean_i K_i^T (2 K_i v), K_i v = (phi_i^2 (S^2 * V)) / sigma_i^2."""
        log_std, rows, features = self.net.log_std, self.row_log_std, self.features
        assert log_std is not None and rows is not None
        with torch.no_grad():
            along = (features * features) @ (torch.exp(2.0 * log_std) * v.view(log_std.shape))
            along = along * torch.exp(-2.0 * rows)
            weight = self.net.head.log_std_fisher * self.scale  # type: ignore[union-attr]
            return sde_log_std_grad(features, rows, along * weight, log_std)


def _autograd_fisher(kl: Tensor, params: list[torch.nn.Parameter], damping: float) -> Callable[[Tensor], Tensor]:
    """Fisher-vector products by double backprop through the mean KL's graph (any network)."""
    kl_grads = _flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)

    def fisher_vector(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(kl_grads @ v, params, retain_graph=True, allow_unused=True)
        return _flat(hv, params) + damping * v

    return fisher_vector


def _flat(grads: tuple[Tensor | None, ...], params: list[torch.nn.Parameter]) -> Tensor:
    """Gradients concatenated in the flat buffer's order (zeros for parameters a quantity does not depend on)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
