"""TQC (Kuznetsov et al. 2020, arXiv:2005.04269): SAC with distributional critics whose pooled target
quantiles are truncated at the top, which controls overestimation.

for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a~, log pi(a~|s) = pi(s); alpha step as in SAC                           (Temperature)
    Z = the K x M target quantiles Z'_k(s', a'), a' ~ pi(s'), pooled and sorted; drop the top K * drop_per_critic
    y_j = r + d (1 - done) (Z_j - alpha log pi(a'|s'))                        (objectives.tqc_target)
    critic step on the quantile Huber loss of every Z_k(s, a) against every y_j   (objectives.quantile_huber_loss)
    actor step on mean(alpha log pi(a~|s) - mean_{k,m} Z_k,m(s, a~))         (critic weights frozen)
    Z' <- (1 - tau) Z' + tau Z
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_tqc_applies, fused_tqc_update
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
from policylab.objectives.q_targets import quantile_huber_loss, tqc_target


@dataclass
class TQCConfig(OffPolicyConfig, SDEConfig):
    """TQC. Defaults follow sb3-contrib."""

    n_critics: int = 2
    n_quantiles: int = 25
    drop_per_critic: int = 2
    """Top quantiles dropped per critic from the pooled target (d in the paper)."""
    alpha: float = 1.0
    auto_alpha: bool = True
    target_entropy: float | None = None
    """None: -dim(A)."""
    critic_layer_norm: bool = False

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics", "n_quantiles")
        if not 0 <= self.drop_per_critic < self.n_quantiles:
            raise ConfigError(
                f"drop_per_critic={self.drop_per_critic} must be in 0..n_quantiles-1 ({self.n_quantiles - 1})",
                "set drop_per_critic to e.g. 2",
            )
        if self.prioritized:
            raise ConfigError("tqc does not support prioritized replay", "drop prioritized (or use sac / td3)")


class TQC(TanhGaussianActing):
    name = "tqc"
    config_cls = TQCConfig

    def __init__(self, cfg: TQCConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = self.net.act_dim
        self.critic = ContinuousCritic(
            obs_dim(obs_space),
            self.act_dim,
            cfg.hidden_sizes,
            cfg.activation,
            cfg.n_critics,
            cfg.critic_layer_norm,
            cfg.n_quantiles,
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
        self.fused = fused_tqc_applies(self)

    @staticmethod
    def build_policy(cfg: TQCConfig, obs_space: gym.Space, act_space: gym.Space) -> TanhGaussianActor:
        return tanh_gaussian_policy(cfg, obs_space, act_space, "tqc")

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_tqc_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The update with autograd (`noise`: [2B, A] standard normal draws, obs rows then next-obs rows)."""
        cfg, actor, critic = self.cfg, self.net, self.critic
        n = len(batch)
        noise_pi, noise_next = (None, None) if noise is None else (noise[:n], noise[n:])
        actions_pi, logp_pi = actor.sample(batch.obs, self.generator, noise_pi)
        alpha = self.temperature.update(logp_pi + self.temperature.target_entropy)
        with torch.no_grad():
            next_actions, next_logp = actor.sample(batch.next_obs, self.generator, noise_next)
            next_quantiles = self.critic_target(batch.next_obs, next_actions)  # [K, B, M]
            target = tqc_target(
                batch.rewards, batch.discounts, batch.terminated, next_quantiles, cfg.drop_per_critic, next_logp, alpha
            )
        quantiles = critic(batch.obs, batch.actions)
        critic_loss = quantile_huber_loss(quantiles, target)
        self.critic_opt.step(critic_loss)
        critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
        q_pi = critic(batch.obs, actions_pi).mean((0, 2))
        critic.requires_grad_(True)
        actor_loss = (alpha * logp_pi - q_pi).mean()
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        return {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "q": quantiles.detach().mean(),
            "alpha": alpha[0],
            "entropy": -logp_pi.detach().mean(),
        }
