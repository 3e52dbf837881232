"""CrossQ (Bhatt et al. 2024, arXiv:1902.05605): SAC without target networks, its critics and actor
batch-renormalized (nets/renorm.py), the critic evaluated on current and next state-actions in one pass.

for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a', log pi(a'|s') = pi(s')                                     (running statistics, no gradient)
    [Q_k(s, a); Q_k(s', a')] = Q_k([s; s'], [a; a'])                (one pass, batch statistics of both halves)
    y = r + d (1 - done) (min_k Q_k(s', a') - alpha log pi(a'|s'))   (second half, no gradient; objectives.sac_target)
    critic step on 1/2 sum_k mean (Q_k(s, a) - y)^2
    every actor_delay gradient steps:
        a~, log pi(a~|s) = pi(s)                                    (reparameterized, batch statistics)
        alpha step on -log_alpha (log pi(a~|s) + target_entropy)    (Temperature)
        actor step on mean(alpha log pi(a~|s) - min_k Q_k(s, a~))  (critic: running statistics, weights frozen)

The joint pass is the point of the method: the critic's batch statistics mix the replay's state-actions and the
policy's next ones, so the bootstrapped values are normalized like the regressed ones and no target network is
needed. Defaults follow sb3-contrib's CrossQ (Adam betas (0.5, 0.999), lr 1e-3, actor delay 3, critics of
[1024, 1024]); with `use_sde`, gSDE's features are the actor's last hidden activations before its final
renormalization. The step runs with hand-derived gradients (`fused_offpolicy.fused_crossq_update`; the autograd one
with `analytic_grads=false` or other activations), each renormalization folded into the product after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_crossq_applies, fused_crossq_update
from policylab.algos.offpolicy import (
    FlatAdam,
    OffPolicyConfig,
    SDEConfig,
    SDEExploration,
    TanhGaussianActing,
    obs_dim,
    sde_exploration,
    seeded_generator,
    soft_actor_critic_state,
    tanh_gaussian_policy,
    temperature_for,
)
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, TanhGaussianActor
from policylab.nets.renorm import RenormSettings, batch_statistics
from policylab.objectives.q_targets import sac_target


@dataclass
class CrossQConfig(OffPolicyConfig, SDEConfig):
    """CrossQ. Defaults follow sb3-contrib's CrossQ."""

    lr: float = 1e-3
    critic_hidden_sizes: list[int] = field(default_factory=lambda: [1024, 1024])
    """The critics' hidden layers (`hidden_sizes`: the actor's)."""
    n_critics: int = 2
    alpha: float = 1.0
    """Initial entropy temperature (the fixed one with auto_alpha=false)."""
    auto_alpha: bool = True
    target_entropy: float | None = None
    """None: -dim(A)."""
    actor_delay: int = 3
    """Actor (and temperature) updates every this many gradient steps (sb3-contrib's policy_delay)."""
    adam_beta1: float = 0.5
    """Adam's first-moment decay for the actor and critics (the temperature's Adam keeps 0.9)."""
    renorm_momentum: float = 0.01
    renorm_eps: float = 1e-3
    renorm_warmup: int = 100_000
    """Each renormalization's first renorm_warmup + 1 training passes use plain batch statistics; later ones are
    corrected towards the running statistics (sb3-contrib's count)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics", "actor_delay", "renorm_eps")
        if not 0.0 < self.renorm_momentum <= 1.0:
            raise ConfigError(
                f"renorm_momentum={self.renorm_momentum} must be in (0, 1]", "set renorm_momentum to e.g. 0.01"
            )
        if not 0.0 <= self.adam_beta1 < 1.0:
            raise ConfigError(f"adam_beta1={self.adam_beta1} must be in [0, 1)", "set adam_beta1 to e.g. 0.5")
        if self.renorm_warmup < 0:
            raise ConfigError(f"renorm_warmup={self.renorm_warmup} must be >= 0", "set renorm_warmup to e.g. 100000")
        if not self.critic_hidden_sizes:
            raise ConfigError("critic_hidden_sizes is empty", "set critic_hidden_sizes to e.g. [1024, 1024]")
        if self.tau != OffPolicyConfig.tau:
            raise ConfigError(
                f"tau={self.tau}: crossq has no target networks, so nothing reads tau",
                "drop tau (or use sac, whose target networks it sets)",
            )

    @property
    def renorm(self) -> RenormSettings:
        return RenormSettings(self.renorm_momentum, self.renorm_eps, self.renorm_warmup)


class CrossQ(TanhGaussianActing):
    name = "crossq"
    config_cls = CrossQConfig

    def __init__(self, cfg: CrossQConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = self.net.act_dim
        self.critic = ContinuousCritic(
            obs_dim(obs_space),
            self.act_dim,
            cfg.critic_hidden_sizes,
            cfg.activation,
            cfg.n_critics,
            batch_renorm=cfg.renorm,
        ).to(cfg.device)
        betas = (cfg.adam_beta1, 0.999)
        self.actor_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm, betas=betas)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm, betas=betas)
        self.temperature = temperature_for(cfg, self.act_dim)
        self.modules, self.optimizers = soft_actor_critic_state(self.actor_opt, self.critic_opt, None, self.temperature)
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.sde: SDEExploration | None = sde_exploration(cfg, self.net, self.modules)
        self.fused = fused_crossq_applies(self)

    @staticmethod
    def build_policy(cfg: CrossQConfig, obs_space: gym.Space, act_space: gym.Space) -> TanhGaussianActor:
        return tanh_gaussian_policy(cfg, obs_space, act_space, "crossq", batch_renorm=cfg.renorm)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_crossq_update(self, batch, index) if self.fused else self.autograd_update(batch, index)

    def autograd_update(self, batch: Batch, index: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        """One gradient step (`noise`: [2B, A] standard normal draws, obs rows then next-obs rows, else drawn)."""
        cfg, actor, critic = self.cfg, self.net, self.critic
        n = len(batch)
        noise_pi, noise_next = (None, None) if noise is None else (noise[:n], noise[n:])
        alpha = self.temperature.log_alpha.detach().exp()
        with torch.no_grad():
            next_actions, next_logp = actor.sample(batch.next_obs, self.generator, noise_next)
        with batch_statistics(critic.body):
            q_both = critic(torch.cat([batch.obs, batch.next_obs]), torch.cat([batch.actions, next_actions]))
        q, next_q = q_both[:, :n], q_both[:, n:].detach()  # [K, B] each
        target = sac_target(batch.rewards, batch.discounts, batch.terminated, next_q, next_logp, alpha)
        td = q - target
        weights = batch.get("weights")
        sq = td * td if weights is None else weights * td * td
        critic_loss = 0.5 * sq.mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"critic_loss": critic_loss.detach(), "q": q.detach().mean(), "alpha": alpha[0]}
        if (index + 1) % cfg.actor_delay == 0:  # sb3-contrib counts updates from 1
            metrics.update(self._actor_step(batch.obs, noise_pi))
        if cfg.prioritized:
            metrics["td_error"] = td.detach().abs().mean(0)
        return metrics

    def _actor_step(self, obs: Tensor, noise: Tensor | None) -> dict[str, Tensor]:
        """The temperature's and the actor's steps (the actor with batch statistics, the critic with running ones)."""
        with batch_statistics(self.net.body):
            actions_pi, logp_pi = self.net.sample(obs, self.generator, noise)
        alpha = self.temperature.update(logp_pi + self.temperature.target_entropy)
        self.critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
        q_pi = self.critic(obs, actions_pi).min(0).values
        self.critic.requires_grad_(True)
        actor_loss = (alpha * logp_pi - q_pi).mean()
        self.actor_opt.step(actor_loss)
        return {"actor_loss": actor_loss.detach(), "entropy": -logp_pi.detach().mean()}
