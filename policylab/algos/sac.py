"""SAC (Haarnoja et al. 2018, arXiv:1801.01290 and arXiv:1812.05905), continuous actions.

for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a~, log pi(a~|s) = pi(s)                                           (reparameterized)
    alpha step on -log_alpha (log pi(a~|s) + target_entropy)           (Temperature)
    y = r + d (1 - done) (min_k Q'_k(s', a') - alpha log pi(a'|s')),  a' ~ pi(s')   (objectives.sac_target)
    critic step on 1/2 sum_k mean (Q_k(s, a) - y)^2                    (K critics in one batched call)
    actor step on mean(alpha log pi(a~|s) - min_k Q_k(s, a~))          (critic weights frozen)
        with kl_coef > 0 (off-policy MDPO, algos/mdpo.py): + kl_coef mean KL(pi(.|s) || pi_old(.|s)),
        pi_old a copy of the actor refreshed every kl_refresh gradient steps
    Q' <- (1 - tau) Q' + tau Q                                          (one lerp over flat parameters)

Exploration: a = tanh(mean + std * noise) per step, or with use_sde gSDE's tanh(mean(s) + phi(s) W), each env's
matrix W held between two updates (SDEConfig, nets/sde.py); pi's log std is then per row, from the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_sac_applies, fused_sac_update
from policylab.algos.offpolicy import (
    FlatAdam,
    OffPolicyConfig,
    SDEConfig,
    SDEExploration,
    TanhGaussianActing,
    TargetNetwork,
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
from policylab.nets.heads import gaussian_kl
from policylab.objectives.q_targets import sac_target


@dataclass
class SACConfig(OffPolicyConfig, SDEConfig):
    """SAC with automatic entropy temperature. Defaults follow Stable-Baselines3."""

    n_critics: int = 2
    alpha: float = 1.0
    """Initial entropy temperature (the fixed one with auto_alpha=false)."""
    auto_alpha: bool = True
    target_entropy: float | None = None
    """None: -dim(A)."""
    critic_layer_norm: bool = False
    actor_delay: int = 1
    """Actor (and temperature) updates every this many gradient steps."""
    target_update_interval: int = 1
    """Polyak updates every this many gradient steps."""
    kl_coef: float = 0.0
    """1 / t of off-policy MDPO: the weight of KL(pi || pi_old) in the actor loss (0: plain SAC)."""
    kl_refresh: int = 1000
    """With kl_coef > 0: pi_old is the actor as it was at the last multiple of this many gradient steps."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics", "actor_delay", "target_update_interval", "kl_refresh")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0", "set kl_coef to 0 (SAC) or e.g. 1.0 (MDPO)")


class SAC(TanhGaussianActing):
    name = "sac"
    config_cls = SACConfig

    def __init__(self, cfg: SACConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = self.net.act_dim
        self.critic = ContinuousCritic(
            obs_dim(obs_space), self.act_dim, cfg.hidden_sizes, cfg.activation, cfg.n_critics, cfg.critic_layer_norm
        ).to(cfg.device)
        self.actor_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.temperature = temperature_for(cfg, self.act_dim)
        self.modules, self.optimizers = soft_actor_critic_state(
            self.actor_opt, self.critic_opt, self.critic_target, self.temperature
        )
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.sde: SDEExploration | None = sde_exploration(cfg, self.net, self.modules)
        self.old_actor: TargetNetwork | None = None
        if cfg.kl_coef > 0:  # off-policy MDPO's pi_old, checkpointed with the rest
            self.old_actor = TargetNetwork(self.net, self.actor_opt.params)
            self.modules["actor_old"] = self.old_actor.module
        self.fused = fused_sac_applies(self) and self.old_actor is None

    @staticmethod
    def build_policy(cfg: SACConfig, obs_space: gym.Space, act_space: gym.Space) -> TanhGaussianActor:
        return tanh_gaussian_policy(cfg, obs_space, act_space, "sac")

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_sac_update(self, batch, index) if self.fused else self.autograd_update(batch, index)

    def autograd_update(self, batch: Batch, index: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The update with autograd (`noise`: [2B, A] standard normal draws, obs rows then next-obs rows)."""
        cfg, actor, critic = self.cfg, self.net, self.critic
        n = len(batch)
        noise_pi, noise_next = (None, None) if noise is None else (noise[:n], noise[n:])
        update_actor = index % cfg.actor_delay == 0
        if update_actor:
            actions_pi, logp_pi = actor.sample(batch.obs, self.generator, noise_pi)
            alpha = self.temperature.update(logp_pi + self.temperature.target_entropy)
        else:
            alpha = self.temperature.log_alpha.detach().exp()
        with torch.no_grad():
            next_actions, next_logp = actor.sample(batch.next_obs, self.generator, noise_next)
            next_q = self.critic_target(batch.next_obs, next_actions)
            target = sac_target(batch.rewards, batch.discounts, batch.terminated, next_q, next_logp, alpha)
        td = critic(batch.obs, batch.actions) - target  # [K, B]
        weights = batch.get("weights")
        sq = td * td if weights is None else weights * td * td
        critic_loss = 0.5 * sq.mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"critic_loss": critic_loss.detach(), "q": (td.detach() + target).mean(), "alpha": alpha[0]}
        if update_actor:
            critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
            q_pi = critic(batch.obs, actions_pi).min(0).values
            critic.requires_grad_(True)
            actor_loss = (alpha * logp_pi - q_pi).mean()
            if self.old_actor is not None:
                kl = self._mirror_kl(batch.obs, index)
                actor_loss = actor_loss + cfg.kl_coef * kl
                metrics["kl_old"] = kl.detach()
            self.actor_opt.step(actor_loss)
            metrics.update(actor_loss=actor_loss.detach(), entropy=-logp_pi.detach().mean())
        if index % cfg.target_update_interval == 0:
            self.critic_target.update(cfg.tau)
        if cfg.prioritized:
            metrics["td_error"] = td.detach().abs().mean(0)
        return metrics

    def _mirror_kl(self, obs: Tensor, index: int) -> Tensor:
        """Mean KL(pi(.|s) || pi_old(.|s)) in closed form (pre-tanh Gaussians), pi_old refreshed to the actor first
        at every multiple of kl_refresh gradient steps."""
        assert self.old_actor is not None
        if index % self.cfg.kl_refresh == 0:
            self.old_actor.params.flat.data.copy_(self.actor_opt.params.flat.data)
        old: TanhGaussianActor = self.old_actor.module  # type: ignore[assignment]  # a copy of self.net
        mean, log_std = self.net._mean_log_std(obs)
        with torch.no_grad():
            old_mean, old_log_std = old._mean_log_std(obs)
        return gaussian_kl(mean, log_std, old_mean, old_log_std).mean()
