"""TD3 (Fujimoto et al. 2018, arXiv:1802.09477); DDPG (Lillicrap et al. 2015) is TD3 with one critic, no
target smoothing and no delay (its registry entry pairs this class with DDPGConfig).

act: a = clip(mu(s) + N(0, action_noise), -1, 1)                      (exploration, in [-1, 1] units)
for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a' = clip(mu'(s') + clip(N(0, target_noise), -c, c), -1, 1)         (objectives.target_policy_smoothing)
    y = r + d (1 - done) min_k Q'_k(s', a')                              (objectives.td3_target)
    critic step on sum_k mean (Q_k(s, a) - y)^2                          (K critics in one batched call)
    every policy_delay steps:
        actor step on -mean Q_1(s, mu(s))                                 (first critic, weights frozen)
        mu' <- (1 - tau) mu' + tau mu;  Q' <- (1 - tau) Q' + tau Q

TD3+BC (Fujimoto & Gu 2021, arXiv:2106.06860) is TD3 with `bc_alpha` > 0: the actor step is on
    -lambda mean Q_1(s, mu(s)) + mean (mu(s) - a)^2,  lambda = bc_alpha / mean |Q_1(s, mu(s))| (held constant)
with a the batch's (dataset) actions in [-1, 1] units (its registry entry pairs this class with TD3BCConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_td3_applies, fused_td3_update
from policylab.algos.offpolicy import (
    FlatAdam,
    OffPolicyConfig,
    TargetNetwork,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
)
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, DeterministicActor
from policylab.objectives.offline import td3_bc_lambda
from policylab.objectives.q_targets import target_policy_smoothing, td3_target


@dataclass
class TD3Config(OffPolicyConfig):
    """TD3. Defaults follow Stable-Baselines3 (plus Gaussian exploration noise, which SB3 leaves to the user)."""

    lr: float = 1e-3
    hidden_sizes: list[int] = field(default_factory=lambda: [400, 300])
    n_critics: int = 2
    policy_delay: int = 2
    """Actor and target updates every this many gradient steps."""
    target_noise: float = 0.2
    """Target policy smoothing: std of the noise added to mu'(s') (0: none)."""
    target_noise_clip: float = 0.5
    action_noise: float = 0.1
    """Std of the Gaussian exploration noise, in units of half the action range."""
    critic_layer_norm: bool = False
    bc_alpha: float = 0.0
    """TD3+BC's alpha (> 0: the actor loss adds a behaviour-cloning term, see the module docstring)."""

    def validate(self) -> None:
        super().validate()
        if self.bc_alpha < 0:
            raise ConfigError(f"bc_alpha={self.bc_alpha} must be >= 0", "set bc_alpha to e.g. 2.5 (0: plain TD3)")
        if self.n_critics < 1 or self.policy_delay < 1:
            raise ConfigError(
                f"n_critics={self.n_critics} and policy_delay={self.policy_delay} must be >= 1",
                "set n_critics to e.g. 2 and policy_delay to e.g. 2",
            )


@dataclass
class DDPGConfig(TD3Config):
    """DDPG as in Stable-Baselines3: TD3 with one critic, no target smoothing, an actor update every step."""

    n_critics: int = 1
    policy_delay: int = 1
    target_noise: float = 0.0


@dataclass
class TD3BCConfig(TD3Config):
    """TD3+BC with the paper's and CORL's values (alpha 2.5, lr 3e-4, [256, 256], observations normalized with
    the dataset's statistics); an offline algorithm, so `steps` counts gradient steps."""

    lr: float = 3e-4
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    bc_alpha: float = 2.5
    normalize_obs: bool = True
    learning_starts: int = 0


class TD3:
    name = "td3"
    config_cls = TD3Config

    def __init__(self, cfg: TD3Config, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = int(self.net.low.numel())
        self.critic = ContinuousCritic(
            obs_dim(obs_space), self.act_dim, cfg.hidden_sizes, cfg.activation, cfg.n_critics, cfg.critic_layer_norm
        ).to(cfg.device)
        self.actor_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.actor_target = TargetNetwork(self.net, self.actor_opt.params)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.modules = {
            "actor_target": self.actor_target.module,
            "critic": self.critic,
            "critic_target": self.critic_target.module,
        }
        self.optimizers = {"actor": self.actor_opt.optimizer, "critic": self.critic_opt.optimizer}
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = fused_td3_applies(self)

    @staticmethod
    def build_policy(cfg: TD3Config, obs_space: gym.Space, act_space: gym.Space) -> DeterministicActor:
        low, high = box_bounds(act_space, "td3/ddpg", cfg)
        return DeterministicActor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        noise = torch.randn((len(obs), self.act_dim), generator=self.generator, device=self.generator.device)
        if self.net.body.analytic_backward and self.cfg.device == "cpu":
            mean = self.net.forward_numpy(obs)
        else:
            with torch.inference_mode():
                mean = self.net(torch.as_tensor(obs, device=noise.device)).cpu().numpy()
        return np.clip(mean + self.cfg.action_noise * noise.cpu().numpy(), -1.0, 1.0)

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_td3_update(self, batch, index) if self.fused else self.autograd_update(batch, index)

    def autograd_update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        with torch.no_grad():
            target = self.td_target(batch)
        td = self.critic(batch.obs, batch.actions) - target  # [K, B]
        weights = batch.get("weights")
        critic_loss = (td * td if weights is None else weights * td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"critic_loss": critic_loss.detach(), "q": (td.detach() + target).mean()}
        if (index + 1) % cfg.policy_delay == 0:  # SB3 counts updates from 1
            self.critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
            actor_loss = self.actor_loss(batch)
            self.critic.requires_grad_(True)
            self.actor_opt.step(actor_loss)
            self.actor_target.update(cfg.tau)
            self.critic_target.update(cfg.tau)
            metrics["actor_loss"] = actor_loss.detach()
        if cfg.prioritized:
            metrics["td_error"] = td.detach().abs().mean(0)
        return metrics

    def smoothed_next_actions(self, batch: Batch) -> Tensor:
        """a' = clip(mu'(s') + clip(N(0, target_noise), -c, c), -1, 1)."""
        next_actions = self.actor_target(batch.next_obs)
        if self.cfg.target_noise > 0:
            next_actions = target_policy_smoothing(
                next_actions, self.cfg.target_noise, self.cfg.target_noise_clip, -1.0, 1.0, self.generator
            )
        return next_actions

    def td_target(self, batch: Batch) -> Tensor:
        """y = r + d (1 - done) min_k Q'_k(s', a') (called without gradients; ReBRAC overrides it)."""
        next_q = self.critic_target(batch.next_obs, self.smoothed_next_actions(batch))
        return td3_target(batch.rewards, batch.discounts, batch.terminated, next_q)

    def actor_loss(self, batch: Batch) -> Tensor:
        """-mean Q_1(s, mu(s)), or TD3+BC's loss with bc_alpha > 0 (critic weights frozen; ReBRAC overrides it)."""
        pi = self.net(batch.obs)
        q_pi = self.critic(batch.obs, pi, members=1)
        if self.cfg.bc_alpha > 0:
            lam = td3_bc_lambda(q_pi, self.cfg.bc_alpha)
            return -lam * q_pi.mean() + (pi - batch.actions).pow(2).mean()
        return -q_pi.mean()
