"""DQN (Mnih et al. 2015) with the Rainbow-era options: double Q (van Hasselt et al. 2016), dueling heads
(Wang et al. 2016), n-step returns and prioritized replay (Schaul et al. 2016) from the replay buffer.

act: epsilon-greedy, epsilon decayed linearly from eps_start to eps_final over exploration_fraction of the run
for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    y = r + d (1 - done) max_a Q'(s', a)                       (double: Q'(s', argmax_a Q(s', a)))
    step on mean w * huber(Q(s, a) - y)                         (w: importance weights, 1 without PER)
every target_update_interval env steps: Q' <- (1 - tau) Q' + tau Q   (tau = 1: a hard copy)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_dqn_applies, fused_dqn_update
from policylab.algos.offpolicy import (
    FlatAdam,
    OffPolicyConfig,
    TargetNetwork,
    discrete_actions,
    obs_dim,
    seeded_generator,
    uniform_discrete_actions,
)
from policylab.config import check_unit_interval
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import QNetwork
from policylab.nets.cnn import make_encoder
from policylab.objectives.q_targets import MASKED_Q, allowed_only, dqn_target


@dataclass
class DQNConfig(OffPolicyConfig):
    """DQN. Defaults follow Stable-Baselines3."""

    lr: float = 1e-4
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    batch_size: int = 32
    train_freq: int = 4
    tau: float = 1.0
    target_update_interval: int = 10_000
    """Env steps between target updates (as SB3 counts them)."""
    exploration_fraction: float = 0.1
    eps_start: float = 1.0
    eps_final: float = 0.05
    max_grad_norm: float | None = 10.0
    double_q: bool = False
    dueling: bool = False
    loss: str = "huber"
    """huber (smooth L1, as SB3) or mse."""

    def validate(self) -> None:
        super().validate()
        if self.loss not in ("huber", "mse"):
            raise ConfigError(f"loss={self.loss!r} is not huber or mse", "use --set loss=huber (or mse)")
        if self.target_update_interval <= 0:
            raise ConfigError(
                f"target_update_interval={self.target_update_interval} must be > 0",
                "set target_update_interval to e.g. 10000",
            )
        if not 0.0 <= self.exploration_fraction <= 1.0:
            raise ConfigError(
                f"exploration_fraction={self.exploration_fraction} is outside [0, 1]",
                "set exploration_fraction to e.g. 0.1",
            )
        check_unit_interval(self, "eps_start", "eps_final")


def epsilon(cfg: Any, progress: float) -> float:
    """Linear from eps_start to eps_final over the first exploration_fraction of the run, then constant (any config
    with those three fields: the DQN family's, PQN's)."""
    if cfg.exploration_fraction == 0 or progress >= cfg.exploration_fraction:
        return cfg.eps_final
    return cfg.eps_start + progress / cfg.exploration_fraction * (cfg.eps_final - cfg.eps_start)


def epsilon_greedy(
    obs: np.ndarray,
    eps: float,
    greedy: Callable[[np.ndarray], np.ndarray],
    n_actions: int,
    generator: torch.Generator,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Epsilon-greedy per env, from one RNG call: a uniform draw decides, a second one picks the random action
    (with action masks `allowed` [N, A], among each env's allowed actions); the greedy and random actions are only
    computed where some env needs them."""
    draws = torch.rand((2, len(obs)), generator=generator, device=generator.device).cpu().numpy()
    explore = draws[0] < eps
    if not explore.any():
        return greedy(obs)
    random = uniform_choice(draws[1], n_actions, allowed)
    return random if explore.all() else np.where(explore, random, greedy(obs))


def uniform_choice(u: np.ndarray, n_actions: int, allowed: np.ndarray | None) -> np.ndarray:
    """Actions uniform over all n_actions, or over each row's allowed ones, from one uniform draw u [N] per row."""
    if allowed is None:
        return np.minimum((u * n_actions).astype(np.int64), n_actions - 1)
    counts = allowed.sum(1)
    k = np.minimum((u * counts).astype(np.int64), counts - 1)  # the k-th allowed action of each row
    return np.argmax(np.cumsum(allowed, 1) > k[:, None], axis=1)


class EpsilonGreedyActing:
    """How the DQN family (DQN, discrete CQL, QR-DQN) acts and refreshes its target, held by composition:
    uniform random actions before learning starts, epsilon-greedy on the network's greedy action (numpy on the
    CPU: `greedy_numpy`), and the target network's update every target_update_interval env steps."""

    def __init__(
        self, cfg: DQNConfig, net: Any, q_target: TargetNetwork, n_actions: int, generator: torch.Generator
    ) -> None:
        self.cfg, self.net, self.q_target, self.n_actions, self.generator = cfg, net, q_target, n_actions, generator
        self.target_every = max(cfg.target_update_interval // cfg.num_envs, 1)
        self.numpy_acting = net.encoder is None and bool(net.body.analytic_backward) and cfg.device == "cpu"

    def methods(self) -> tuple[Callable[..., Any], ...]:
        """(random_actions, explore, greedy, after_step): the algorithm's own methods of those names."""
        return self.random_actions, self.explore, self.greedy, self.after_step

    def random_actions(self, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Uniform actions (among each env's `allowed` ones, with action masks)."""
        if allowed is None:
            return uniform_discrete_actions(n, self.n_actions, self.generator)
        u = torch.rand(n, generator=self.generator, device=self.generator.device).cpu().numpy()
        return uniform_choice(u, self.n_actions, allowed)

    def explore(self, obs: np.ndarray, progress: float, allowed: np.ndarray | None = None) -> np.ndarray:
        greedy = self.greedy if allowed is None else lambda x: self.greedy(x, allowed)
        return epsilon_greedy(obs, epsilon(self.cfg, progress), greedy, self.n_actions, self.generator, allowed)

    def greedy(self, obs: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """argmax_a Q(s, a), among the `allowed` actions with action masks."""
        bias = None if allowed is None else np.where(allowed, np.float32(0.0), np.float32(MASKED_Q))
        if self.numpy_acting:
            return self.net.greedy_numpy(obs, bias)
        device = self.generator.device
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=device)
            if bias is None:
                return self.net.env_action(x).cpu().numpy()
            return self.net.env_action(x, logit_bias=torch.from_numpy(bias).to(device)).cpu().numpy()

    def after_step(self, step: int) -> None:
        if (step // self.cfg.num_envs) % self.target_every == 0:
            self.q_target.update(self.cfg.tau)


class DQN:
    name = "dqn"
    config_cls = DQNConfig

    def __init__(self, cfg: DQNConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.n_actions = discrete_actions(act_space, "dqn", cfg)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.q_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.q_target = TargetNetwork(self.net, self.q_opt.params)
        self.modules = {"q_target": self.q_target.module}
        self.optimizers = {"q": self.q_opt.optimizer}
        self.action_shape: tuple[int, ...] = ()
        self.action_dtype = torch.long
        self.acting = EpsilonGreedyActing(cfg, self.net, self.q_target, self.n_actions, self.generator)
        self.random_actions, self.explore, self.greedy, self.after_step = self.acting.methods()
        self.fused = fused_dqn_applies(self)

    @staticmethod
    def build_policy(cfg: DQNConfig, obs_space: gym.Space, act_space: gym.Space) -> QNetwork:
        n_actions = discrete_actions(act_space, "dqn", cfg)
        encoder = make_encoder(cfg.encoder, obs_space)
        features = obs_dim(obs_space) if encoder is None else encoder.features
        return QNetwork(
            features, n_actions, cfg.hidden_sizes, cfg.activation, cfg.dueling, encoder=encoder,
            sample_epsilon=cfg.eps_final,
        )  # fmt: skip

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_dqn_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        loss, q_all, q, target = self.td_loss(batch)
        self.q_opt.step(loss)
        metrics = {"loss": loss.detach(), "q": q.detach().mean()}
        if self.cfg.prioritized:
            metrics["td_error"] = (q - target).detach()
        return metrics

    def td_loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """DQN's loss on a batch, with Q(s, .) [B, A], Q(s, a) [B] and the target [B] (for losses built on it)."""
        cfg = self.cfg
        allowed = batch.get("next_action_mask")  # with action masks: the max over the allowed actions at s'
        with torch.no_grad():
            next_q_target = allowed_only(self.q_target(batch.next_obs)[0], allowed)
        if cfg.double_q:  # online Q on s and s' in one call
            both = self.net(torch.cat([batch.obs, batch.next_obs]))[0]
            q_all, next_q_online = both[: len(batch)], allowed_only(both[len(batch) :].detach(), allowed)
        else:
            q_all, next_q_online = self.net(batch.obs)[0], None
        target = dqn_target(batch.rewards, batch.discounts, batch.terminated, next_q_target, next_q_online)
        q = q_all.gather(1, batch.actions.long().unsqueeze(1)).squeeze(1)
        if cfg.loss == "huber":
            per_sample = F.smooth_l1_loss(q, target, reduction="none")
        else:
            per_sample = F.mse_loss(q, target, reduction="none")
        weights = batch.get("weights")
        loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
        return loss, q_all, q, target
