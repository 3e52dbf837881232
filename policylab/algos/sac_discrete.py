"""SAC for discrete actions (Christodoulou 2019, arXiv:1910.07207): the expectations over actions are exact
sums over the softmax policy, so no reparameterization is needed.

for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    pi(.|s), log pi(.|s) = the actor's softmax
    alpha step on -log_alpha sum_a pi(a|s) (log pi(a|s) + target_entropy)        (Temperature)
    y = r + d (1 - done) sum_a' pi(a'|s') (min_k Q'_k(s', a') - alpha log pi(a'|s'))  (objectives.discrete_sac_target)
    critic step on 1/2 sum_k mean (Q_k(s, a) - y)^2                               (K Q-heads in one batched call)
    actor step on mean sum_a pi(a|s) (alpha log pi(a|s) - min_k Q_k(s, a))         (Q after the critic step)
    Q' <- (1 - tau) Q' + tau Q
The target entropy is target_entropy_scale * log |A| (a fraction of the uniform policy's entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.algos.offpolicy import (
    FlatAdam,
    OffPolicyConfig,
    TargetNetwork,
    Temperature,
    discrete_actions,
    obs_dim,
    seeded_generator,
    soft_actor_critic_state,
    uniform_discrete_actions,
)
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import CategoricalActor, QNetwork
from policylab.objectives.q_targets import discrete_sac_target


@dataclass
class DiscreteSACConfig(OffPolicyConfig):
    """Discrete SAC; the temperature target follows CleanRL's sac_atari (0.89 log |A|)."""

    n_critics: int = 2
    alpha: float = 1.0
    auto_alpha: bool = True
    target_entropy_scale: float = 0.89

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics")
        if not 0.0 < self.target_entropy_scale <= 1.0:
            raise ConfigError(
                f"target_entropy_scale={self.target_entropy_scale} is outside (0, 1]",
                "set target_entropy_scale to e.g. 0.89",
            )


class DiscreteSAC:
    name = "sac_discrete"
    config_cls = DiscreteSACConfig

    def __init__(self, cfg: DiscreteSACConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.n_actions = discrete_actions(act_space, "sac_discrete", cfg)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.critic = QNetwork(
            obs_dim(obs_space), self.n_actions, cfg.hidden_sizes, cfg.activation, members=cfg.n_critics
        ).to(cfg.device)
        self.actor_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        target_entropy = cfg.target_entropy_scale * math.log(self.n_actions)
        self.temperature = Temperature(cfg.alpha, cfg.auto_alpha, target_entropy, cfg.lr).to(cfg.device)
        self.modules, self.optimizers = soft_actor_critic_state(
            self.actor_opt, self.critic_opt, self.critic_target, self.temperature
        )
        self.action_shape: tuple[int, ...] = ()
        self.action_dtype = torch.long

    @staticmethod
    def build_policy(cfg: DiscreteSACConfig, obs_space: gym.Space, act_space: gym.Space) -> CategoricalActor:
        n_actions = discrete_actions(act_space, "sac_discrete", cfg)
        return CategoricalActor(obs_dim(obs_space), n_actions, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_discrete_actions(n, self.n_actions, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        uniform = torch.rand(len(obs), generator=self.generator, device=self.generator.device)
        if self.net.body.analytic_backward and uniform.device.type == "cpu":
            return self.net.sample_numpy(obs, uniform.numpy())
        with torch.inference_mode():
            probs, _ = self.net(torch.as_tensor(obs, device=uniform.device))
            cdf = probs.cumsum(-1)
            index = (cdf < uniform.unsqueeze(-1) * cdf[:, -1:]).sum(-1)
            return index.clamp(max=self.n_actions - 1).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions

    def after_step(self, step: int) -> None:
        pass

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg, actor, critic = self.cfg, self.net, self.critic
        probs, logp = actor(batch.obs)
        gap = (probs.detach() * (logp.detach() + self.temperature.target_entropy)).sum(-1)
        alpha = self.temperature.update(gap)
        with torch.no_grad():
            next_probs, next_logp = actor(batch.next_obs)
            next_q = self.critic_target(batch.next_obs)
            target = discrete_sac_target(
                batch.rewards, batch.discounts, batch.terminated, next_q, next_probs, next_logp, alpha
            )
        q_all = critic(batch.obs)  # [K, B, A]
        index_ = batch.actions.long().view(1, -1, 1).expand(q_all.shape[0], -1, 1)
        td = q_all.gather(-1, index_).squeeze(-1) - target
        weights = batch.get("weights")
        critic_loss = 0.5 * (td * td if weights is None else weights * td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        with torch.no_grad():
            q_min = critic(batch.obs).min(0).values
        actor_loss = (probs * (alpha * logp - q_min)).sum(-1).mean()
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        entropy = -(probs.detach() * logp.detach()).sum(-1).mean()
        metrics = {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "q": (td.detach() + target).mean(),
            "alpha": alpha[0],
            "entropy": entropy,
        }
        if cfg.prioritized:
            metrics["td_error"] = td.detach().abs().mean(0)
        return metrics
