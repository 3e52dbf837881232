"""What the on-policy family (REINFORCE, A2C, PPO) shares: config fields, the network, the learner
(flat parameters, optimizer, RNG) and the gradient step (autograd here, analytic in fused.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.config import CommonConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.objectives import ADVANTAGES, entropy_bonus, pg_surrogate, value_loss
from policylab.optim import Adam, Optimizer, ParameterBuffer


@dataclass
class OnPolicyConfig(CommonConfig):
    n_steps: int = 2048
    """Steps per env per rollout (a rollout has n_steps * num_envs transitions)."""
    lr: float = 3e-4
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the run."""
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float | None = 0.5
    """Clip the global gradient norm (None: no clipping)."""
    normalize_advantage: bool = True
    shared_net: bool = False
    """One body for actor and critic (else two separate MLPs, evaluated in one batched call)."""
    ortho_init: bool = True
    log_std_init: float = 0.0
    squash_actions: bool = False
    """Box actions: tanh-squash into the bounds (else sample a Gaussian and clip)."""
    analytic_grads: bool = True
    """Fast path: hand-derived gradients for tanh/relu MLP actor-critics (same result as autograd, ~3x faster
    on small networks); false forces autograd. Other networks always use autograd."""

    def validate(self) -> None:
        super().validate()
        if self.n_steps <= 0:
            raise ConfigError(f"n_steps={self.n_steps} must be > 0", "set n_steps to e.g. 128")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "set lr to e.g. 3e-4")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ConfigError(f"gae_lambda={self.gae_lambda} is outside [0, 1]", "set gae_lambda to e.g. 0.95")


def build_actor_critic(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space, algo: str) -> ActorCritic:
    return ActorCritic(
        obs_space,  # type: ignore[arg-type]
        act_space,
        hidden_sizes=cfg.hidden_sizes,
        activation=cfg.activation,
        shared=cfg.shared_net,
        ortho_init=cfg.ortho_init,
        log_std_init=cfg.log_std_init,
        squash=cfg.squash_actions,
        algo=algo,
    )


def adam(params: list[nn.Parameter], lr: float, eps: float = 1e-5) -> Adam:
    """policylab's Adam: torch's fused kernel without torch.optim's import and per-step overhead."""
    return Adam(params, lr=lr, eps=eps)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def annealed(value: float, progress: float, anneal: bool) -> float:
    """`value` decayed linearly to 0 over the run (progress 0 -> 1), if `anneal`; the last rollout may
    overshoot the step budget, so the factor is clamped at 0."""
    return value * max(0.0, 1.0 - progress) if anneal else value


def rollout_advantages(rollout: Batch, estimator: str, cfg: OnPolicyConfig) -> tuple[Tensor, Tensor]:
    """(advantages, returns) of a T x N rollout by a registered estimator ("gae", "mc")."""
    return ADVANTAGES.get(estimator)(
        rollout.rewards,
        rollout.values,
        rollout.next_values,
        rollout.terminated,
        rollout.episode_end,
        cfg.gamma,
        cfg.gae_lambda,
    )


def optimizer_step(
    optimizer: Optimizer, loss: Tensor, params: ParameterBuffer, max_grad_norm: float | None
) -> Tensor | None:
    """Zero the gradients, backward, optional global-norm clipping, step. Returns the pre-clip gradient norm."""
    params.zero_grad()
    loss.backward()
    norm = params.clip_grad_norm_(max_norm=max_grad_norm) if max_grad_norm is not None else None
    optimizer.step()
    return norm


@dataclass(frozen=True)
class ActorCriticLoss:
    """The actor-critic loss: pg_surrogate(clip_low, clip_high, dual_clip) + vf_coef * value_loss(clip_value)
    - ent_coef * entropy. clip_low=None is the unclipped (REINFORCE / A2C) surrogate."""

    clip_low: float | None = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    clip_value: float | None = None
    vf_coef: float = 0.5
    ent_coef: float = 0.0


StepFn = Callable[..., tuple[dict[str, Tensor], bool]]
"""step(batch, loss, *, kl_limit=None, with_metrics=True) -> (metrics, stepped).

`batch` has obs, actions, advantages, returns, and optionally logp and values
from collection time (without logp the step is on-policy: ratio 1)."""


class AutogradStep:
    """One gradient step of the actor-critic loss through autograd (the reference path)."""

    def __init__(
        self, net: ActorCritic, params: ParameterBuffer, optimizer: Optimizer, max_grad_norm: float | None
    ) -> None:
        self.net = net
        self.params = params
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm

    def __call__(
        self, batch: Batch, loss_spec: ActorCriticLoss, *, kl_limit: float | None = None, with_metrics: bool = True
    ) -> tuple[dict[str, Tensor], bool]:
        """One autograd step; `with_metrics` is accepted for symmetry (the metrics cost nothing extra here)."""
        spec = loss_spec
        logp, entropy, values = self.net.evaluate(batch.obs, batch.actions)
        old_logp = batch.get("logp")
        old = logp.detach() if old_logp is None else old_logp
        pg_loss, stats = pg_surrogate(
            logp, old, batch.advantages, clip_low=spec.clip_low, clip_high=spec.clip_high, dual_clip=spec.dual_clip
        )
        if kl_limit is not None and stats["approx_kl"].item() > kl_limit:
            return stats, False
        v_loss = value_loss(values, batch.returns, old_values=batch.get("values"), clip=spec.clip_value)
        ent = entropy_bonus(entropy)
        loss = pg_loss + spec.vf_coef * v_loss - spec.ent_coef * ent
        grad_norm = optimizer_step(self.optimizer, loss, self.params, self.max_grad_norm)
        metrics = {**stats, "loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": v_loss.detach()}
        metrics["entropy"] = ent.detach()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics, True


@dataclass
class ActorCriticLearner:
    """What every on-policy algorithm is built from: the network, its flat parameters, the optimizer,
    the RNG for sampling and minibatches, and the gradient step (analytic where possible)."""

    net: ActorCritic
    params: ParameterBuffer
    optimizer: Optimizer
    generator: torch.Generator
    step: StepFn


def make_learner(
    net: ActorCritic, cfg: OnPolicyConfig, optimizer: Callable[[list[nn.Parameter]], Optimizer]
) -> ActorCriticLearner:
    """Flatten `net`'s parameters, build the optimizer over them and pick the gradient step."""
    from policylab.algos.fused import FusedActorCriticStep

    params = ParameterBuffer(net.parameters())
    opt = optimizer([params.flat])
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    if cfg.analytic_grads and FusedActorCriticStep.supports(net):
        step: StepFn = FusedActorCriticStep(net, params, opt, cfg.max_grad_norm)
    else:
        step = AutogradStep(net, params, opt, cfg.max_grad_norm)
    return ActorCriticLearner(net, params, opt, generator, step)


def whole_rollout_step(
    learner: ActorCriticLearner, rollout: Batch, advantages: Tensor, returns: Tensor, cfg: OnPolicyConfig
) -> dict[str, Tensor]:
    """One on-policy gradient step on the whole rollout (A2C, REINFORCE)."""
    data = Batch(obs=rollout.obs, actions=rollout.actions, advantages=advantages, returns=returns).flatten()
    if cfg.normalize_advantage:
        data.advantages = normalize(data.advantages)
    loss = ActorCriticLoss(clip_low=None, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)
    metrics, _ = learner.step(data, loss)
    return metrics


def normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    return (x - x.mean()) / (x.std() + eps)


def mean_metrics(history: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Stack per-step metric tensors once at the end of an update (no per-step host syncs)."""
    return {k: torch.stack(v).mean() for k, v in history.items() if v}
