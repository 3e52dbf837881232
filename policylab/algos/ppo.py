"""PPO (Schulman et al. 2017, arXiv:1707.06347), clipped surrogate.

for each iteration:
    collect n_steps x num_envs transitions with pi_old           (the loop)
    A, R = GAE(lambda)(rewards, V)                                 (objectives.gae)
    for epoch in 1..epochs, for each minibatch:
        r = pi(a|s) / pi_old(a|s)
        L = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)        (objectives.pg_surrogate)
            + vf_coef (V(s) - R)^2 - ent_coef H[pi(.|s)]
        with demonstrations (a dataset): the policy term becomes
            (1 - mu) L_clip + mu mean_D [-w log pi(a_D | s_D)]         (objectives.imitation, mu on a schedule)
        Adam step on L with the gradient norm clipped
    stop early if the approximate KL exceeds 1.5 * target_kl
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.onpolicy import (
    ActorCriticLoss,
    Imitation,
    OnPolicyConfig,
    adam,
    annealed,
    build_actor_critic,
    make_learner,
    mean_metrics,
    normalize,
    rollout_advantages,
    with_logit_bias,
)
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.optim import set_lr


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO-clip. Defaults follow Stable-Baselines3 / the paper's MuJoCo settings."""

    batch_size: int = 64
    """Minibatch size; a rollout of n_steps * num_envs is split into minibatches of this size."""
    epochs: int = 10
    clip_eps: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_eps."""
    clip_eps_high: float | None = None
    """eps_high (clip-higher, as in DAPO); None: the same as clip_eps."""
    anneal_clip: bool = False
    """Decay clip_eps (and clip_eps_high) linearly to 0 over the run."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020) bounding the loss for negative advantages."""
    clip_value: float | None = None
    """Clip the value update around the old values (None: no value clipping)."""
    target_kl: float | None = None
    """Stop the epochs early once the approximate KL exceeds 1.5 * target_kl."""
    ratio_penalty: bool = False
    """SPO (algos/spo.py): instead of the clip, the penalty |A| / (2 clip_eps) (r - 1)^2 keeps r near 1."""
    rpo_alpha: float = 0.0
    """RPO (algos/rpo.py, Box actions): every gradient step evaluates log pi(a|s) with the Gaussian's mean moved by
    U(-rpo_alpha, rpo_alpha) noise per row and dimension (0: plain PPO)."""

    def validate(self) -> None:
        super().validate()
        rollout = self.n_steps * self.num_envs
        if self.batch_size <= 0 or self.batch_size > rollout:
            raise ConfigError(
                f"batch_size={self.batch_size} must be in 1..n_steps*num_envs={rollout}",
                f"set batch_size to a divisor of {rollout}, e.g. {min(rollout, 64)}",
            )
        if self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be > 0", "set epochs to e.g. 10")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps={self.clip_eps} must be > 0", "set clip_eps to e.g. 0.2")
        if self.rpo_alpha < 0 or (self.rpo_alpha > 0 and self.use_sde):
            raise ConfigError(
                f"rpo_alpha={self.rpo_alpha} must be >= 0, and is not for gSDE's state-dependent noise",
                "set rpo_alpha to e.g. 0.5 without use_sde (0: plain PPO)",
            )
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(
                f"dual_clip={self.dual_clip} must be > 1: it bounds the loss of negative advantages at dual_clip x "
                "the advantage",
                "set dual_clip to e.g. 3.0 (the dual-clip PPO paper's), or drop it (none: off)",
            )


class PPO:
    name = "ppo"
    config_cls = PPOConfig

    def __init__(self, cfg: PPOConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.learner = make_learner(self.net, cfg, lambda params: adam(params, cfg.lr))
        self.optimizer, self.generator = self.learner.optimizer, self.learner.generator
        self.imitation: Imitation | None = None
        """Demonstrations mixed into every gradient step (set by the loop when the run has a dataset)."""
        if cfg.rpo_alpha > 0 and not (self.net.head.continuous and self.net.log_std is not None):
            raise ConfigError(
                "rpo_alpha moves a Gaussian policy's mean: this env's actions are not Box",
                "drop rpo_alpha (or use a Box-action env)",
            )

    @staticmethod
    def build_policy(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space) -> ActorCritic:
        return build_actor_critic(cfg, obs_space, act_space, "ppo")

    def update(
        self,
        rollout: Batch,
        progress: float,
        loss: ActorCriticLoss | None = None,
        after_step: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> dict[str, Tensor]:
        """Epochs of minibatch steps on the rollout. `loss`: another surrogate than the config's clip (the trust-
        region variants: SPO, MDPO, FixPO); `after_step(metrics)`: called after every step with its metrics."""
        cfg = self.cfg
        set_lr(self.optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        data = self.rollout_data(rollout)
        one_batch = not self.net.recurrent and cfg.batch_size >= len(data)
        if one_batch and cfg.normalize_advantage:  # the same minibatch every epoch: normalize once
            data.advantages = normalize(data.advantages)
        kl_limit = None if cfg.target_kl is None else 1.5 * cfg.target_kl
        loss = self.clip_loss(progress) if loss is None else loss
        history: dict[str, list[Tensor]] = defaultdict(list)
        last_epoch = cfg.epochs - 1  # losses, KL and clip fraction are reported for the last epoch
        for epoch in range(cfg.epochs):
            minibatches = self._sequences(rollout, data) if self.net.recurrent else self._minibatches(data, one_batch)
            for mb in minibatches:
                rows = len(mb.advantages)
                if cfg.normalize_advantage and not one_batch and rows > 1:
                    mb.advantages = normalize(mb.advantages)
                report = epoch == last_epoch
                if cfg.rpo_alpha > 0:  # RPO: the mean moved by U(-alpha, alpha), a bias on the head's inputs
                    shift = torch.rand(mb.actions.shape, generator=self.generator, device=mb.actions.device)
                    mb.logit_bias = shift.mul_(2.0 * cfg.rpo_alpha).sub_(cfg.rpo_alpha)
                term = None if self.imitation is None else self.imitation.term(progress, rows, self.generator)
                metrics, stepped = self.learner.step(
                    mb, loss, kl_limit=kl_limit, with_metrics=report or after_step is not None, imitation=term
                )
                if after_step is not None and stepped:
                    after_step(metrics)
                for key, value in metrics.items() if report or not stepped else ():
                    history[key].append(value)
                if not stepped:  # the KL that stopped it is among the metrics
                    history["early_stop_epoch"].append(torch.tensor(float(epoch)))
                    return self._metrics(history, data)
        return self._metrics(history, data)

    def clip_loss(self, progress: float) -> ActorCriticLoss:
        """The config's clipped surrogate (clip ranges annealed with `anneal_clip`) with the value and entropy terms."""
        cfg = self.cfg
        clip_low = annealed(cfg.clip_eps, progress, cfg.anneal_clip)
        clip_high = None if cfg.clip_eps_high is None else annealed(cfg.clip_eps_high, progress, cfg.anneal_clip)
        if cfg.ratio_penalty:  # SPO: the penalty's eps is the clip range (annealed alike)
            return ActorCriticLoss(
                None, None, cfg.dual_clip, cfg.clip_value, cfg.vf_coef, cfg.ent_coef, spo_eps=clip_low
            )
        return ActorCriticLoss(clip_low, clip_high, cfg.dual_clip, cfg.clip_value, cfg.vf_coef, cfg.ent_coef)

    def rollout_data(self, rollout: Batch) -> Batch:
        """The rollout, flattened, with its GAE advantages and returns."""
        advantages, returns = rollout_advantages(rollout, "gae", self.cfg)
        data = Batch(
            obs=rollout.obs,
            actions=rollout.actions,
            logp=rollout.logp,
            values=rollout.values,
            advantages=advantages,
            returns=returns,
        ).flatten()
        return with_logit_bias(data, rollout)

    def _minibatches(self, data: Batch, one_batch: bool) -> Iterator[Batch]:
        """One epoch's minibatches of batch_size shuffled samples (the whole rollout with `one_batch`)."""
        n, size = len(data), self.cfg.batch_size
        if one_batch:
            yield data
            return
        order = torch.randperm(n, generator=self.generator, device=data.obs.device)
        for start in range(0, n, size):
            yield data.select(order[start : start + size])

    def _sequences(self, rollout: Batch, data: Batch) -> Iterator[Batch]:
        """A recurrent network's minibatches: the whole rollouts of batch_size // n_steps envs (at least one), to be
        replayed through the LSTMs from their states at the rollout's start; the envs are shuffled each epoch."""
        steps, num_envs = rollout.rewards.shape
        per_batch = max(1, self.cfg.batch_size // steps)
        flat = Batch(**{k: v for k, v in data.items() if k != "obs"})  # obs go as [T, E] sequences instead
        time_rows = torch.arange(steps, device=flat.advantages.device).unsqueeze(1) * num_envs
        order = torch.randperm(num_envs, generator=self.generator, device=flat.advantages.device)
        for start in range(0, num_envs, per_batch):
            envs = order[start : start + per_batch]
            mb = flat.select((time_rows + envs).view(-1))  # time-major, as evaluate_sequences returns them
            mb.obs = rollout.obs[:, envs]
            mb.states, mb.starts = rollout.states[:, :, envs], rollout.starts[:, envs]
            yield mb

    def _metrics(self, history: dict[str, list[Tensor]], data: Batch) -> dict[str, Tensor]:
        metrics = mean_metrics(history)
        metrics["explained_variance"] = explained_variance(data.values, data.returns)
        metrics["lr"] = torch.tensor(self.optimizer.param_groups[0]["lr"])
        return metrics


def delegated(attr: str, member: str = "ppo") -> property:
    """An attribute read and written on a member: for algorithms built around a PPO instance (MDPO, FixPO), whose
    `imitation` the loop sets."""
    return property(
        lambda self: getattr(getattr(self, member), attr),
        lambda self, value: setattr(getattr(self, member), attr, value),
    )


def explained_variance(predicted: Tensor, target: Tensor) -> Tensor:
    """1 - Var[target - predicted] / Var[target]: 1 is a perfect value function, 0 no better than a constant."""
    var = target.var()
    return torch.where(var > 0, 1.0 - (target - predicted).var() / var, torch.zeros_like(var))
