"""IQL: implicit Q-learning (Kostrikov et al. 2021, arXiv:2110.06169), Box actions. Never queries Q at actions
outside the dataset: V is an upper expectile of Q over the dataset's actions, and the policy is extracted by
advantage-weighted regression.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    u = min_k Q'_k(s, a) - V(s)
    V step on mean |tau - 1(u < 0)| u^2                               (objectives.offline.expectile_loss)
    y = r + d (1 - done) V(s')                                         (V after its step, as CORL)
    Q step on 1/2 sum_k mean (Q_k(s, a) - y)^2                          (K critics in one batched call)
    actor step on -mean min(exp(beta u), 100) log pi(a | s)            (objectives.offline.advantage_weights)
    Q' <- (1 - tau) Q' + tau Q

Defaults are CORL's for the D4RL locomotion tasks (expectile 0.7, beta 3, lr 3e-4, [256, 256], batch 256);
CORL also anneals the actor's learning rate with a cosine schedule, which `anneal_lr` (linear) replaces here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.algos.fused_offpolicy import fused_iql_applies, fused_iql_update
from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    TargetNetwork,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
)
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, DeterministicActor, GaussianActor, StackedMLP
from policylab.objectives.offline import advantage_weights, expectile_loss
from policylab.objectives.q_targets import bootstrap


@dataclass
class IQLConfig(OfflineConfig):
    """IQL with CORL's locomotion values."""

    expectile: float = 0.7
    beta: float = 3.0
    """Inverse temperature of the advantage weights."""
    max_weight: float = 100.0
    n_critics: int = 2
    deterministic_actor: bool = False
    """A deterministic actor trained by weighted squared error (CORL's option) instead of a Gaussian one."""
    action_noise: float = 0.1
    """Std of the exploration noise of a deterministic actor online (a Gaussian actor samples)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics")
        if not 0.0 < self.expectile < 1.0:
            raise ConfigError(f"expectile={self.expectile} is outside (0, 1)", "set expectile to e.g. 0.7")


class IQL:
    name = "iql"
    config_cls = IQLConfig
    uses_value = True
    """AWAC shares IQL's actor, critics and exploration, without the value network."""

    def __init__(self, cfg: IQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = int(np.prod(act_space.shape or ()))
        self.critic = ContinuousCritic(
            obs_dim(obs_space), self.act_dim, cfg.hidden_sizes, cfg.activation, cfg.n_critics
        )
        self.critic.to(cfg.device)
        self.actor_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.modules: dict[str, nn.Module] = {"critic": self.critic, "critic_target": self.critic_target.module}
        self.optimizers = {"actor": self.actor_opt.optimizer, "critic": self.critic_opt.optimizer}
        if self.uses_value:
            self.value = StackedMLP(1, obs_dim(obs_space), cfg.hidden_sizes, 1, cfg.activation).to(cfg.device)
            self.value_opt = FlatAdam(self.value, cfg.lr, cfg.max_grad_norm)
            self.modules["value"] = self.value
            self.optimizers["value"] = self.value_opt.optimizer
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = self.uses_value and fused_iql_applies(self)

    @staticmethod
    def build_policy(cfg: IQLConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        low, high = box_bounds(act_space, "iql", cfg)
        actor = DeterministicActor if cfg.deterministic_actor else GaussianActor
        return actor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=self.cfg.device)
            if isinstance(self.net, GaussianActor):
                return self.net.sample(x, self.generator).cpu().numpy()
            mean = self.net(x)
            noise = torch.randn(mean.shape, generator=self.generator, device=mean.device)
            return (mean + self.cfg.action_noise * noise).clamp(-1.0, 1.0).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_iql_update(self, batch) if self.fused else self.autograd_update(batch)

    def value_and_critic_steps(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """IQL's V step (expectile of Q' over the dataset's actions) and Q step (towards r + d V(s')); returns the
        detached advantages min_k Q'_k(s, a) - V(s) and the metrics. IDQL reuses this critic as it is."""
        cfg = self.cfg
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        with torch.no_grad():
            target_q = self.critic_target(obs, batch.actions).min(0).values
        v = self.value(obs)[0, :, 0]
        advantage = target_q - v
        value_loss = expectile_loss(advantage, cfg.expectile)
        self.value_opt.step(value_loss)
        with torch.no_grad():
            next_v = self.value(next_obs)[0, :, 0]
            y = bootstrap(batch.rewards, batch.discounts, batch.terminated, next_v)
        td = self.critic(obs, batch.actions) - y  # [K, B]
        critic_loss = 0.5 * (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(), "q": target_q.mean()}
        return advantage.detach(), metrics

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        obs = batch.obs.flatten(1)
        advantage, metrics = self.value_and_critic_steps(batch)
        weights = advantage_weights(advantage, cfg.beta, cfg.max_weight)
        if isinstance(self.net, GaussianActor):
            bc_losses = -self.net.log_prob(obs, batch.actions)
        else:
            bc_losses = (self.net(obs) - batch.actions).pow(2).sum(-1)
        actor_loss = (weights * bc_losses).mean()
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        return {**metrics, "actor_loss": actor_loss.detach(), "adv_weight": weights.mean()}
