"""QR-DQN (Dabney et al. 2018): DQN whose network gives N quantiles of the return of each action.

act: epsilon-greedy (as DQN) on the mean of the quantiles, Q(s, a) = mean_i Z_i(s, a)
for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a* = argmax_a mean_j Z'_j(s', a)                      (the target network's)
    y_j = r + d (1 - done) Z'_j(s', a*)                   (N target atoms)
    loss = sum_i mean_j rho_tau_i(y_j - Z_i(s, a)),  tau_i = (i + 0.5) / N,  rho the quantile Huber loss (kappa 1)
           (summed over the predicted quantiles, averaged over the atoms and the batch: SB3-contrib's
           sum_over_quantiles=True)
every target_update_interval env steps: Z' <- (1 - tau) Z' + tau Z   (tau = 1: a hard copy)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.algos.dqn import DQNConfig, EpsilonGreedyActing
from policylab.algos.fused_offpolicy import fused_qrdqn_applies, fused_qrdqn_update
from policylab.algos.offpolicy import (
    FlatAdam,
    TargetNetwork,
    discrete_actions,
    obs_dim,
    seeded_generator,
)
from policylab.config import algorithm_of
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.cnn import ImageEncoder, flat_features, make_encoder
from policylab.nets.critics import act_on_values, masked_greedy
from policylab.nets.mlp import StackedMLP
from policylab.objectives.q_targets import allowed_only, quantile_huber_loss


@dataclass
class DistributionalDQNConfig(DQNConfig):
    """What QR-DQN and C51 share: Adam's epsilon 0.01 / batch_size unless set, and none of DQN's double Q, dueling
    heads or prioritized replay."""

    adam_eps: float | None = None
    """Adam's epsilon; None: 0.01 / batch_size, as the QR-DQN paper (0.01 / 32), SB3-contrib's QRDQN and CleanRL's
    C51."""

    def validate(self) -> None:
        super().validate()
        if self.adam_eps is not None and self.adam_eps <= 0:
            raise ConfigError(f"adam_eps={self.adam_eps} must be > 0", "drop adam_eps (0.01 / batch_size)")
        unsupported = [k for k in ("double_q", "dueling", "prioritized") if getattr(self, k)]
        if unsupported:
            raise ConfigError(
                f"{', '.join(unsupported)} is not part of {algorithm_of(self) or 'this algorithm'} here",
                f"drop --set {unsupported[0]}=true, or use dqn, which has it",
            )


@dataclass
class QRDQNConfig(DistributionalDQNConfig):
    """QR-DQN. Defaults follow SB3-contrib's QRDQN (its constructor's defaults; [64, 64] networks)."""

    lr: float = 5e-5
    learning_starts: int = 100
    exploration_fraction: float = 0.005
    eps_final: float = 0.01
    max_grad_norm: float | None = None
    n_quantiles: int = 200

    def validate(self) -> None:
        super().validate()
        if self.n_quantiles < 1:
            raise ConfigError(f"n_quantiles={self.n_quantiles} must be >= 1", "set n_quantiles to e.g. 50")


class QuantileQNetwork(nn.Module):
    """Z(s, .): [B, n_actions, n_quantiles] from one MLP with n_actions x n_quantiles outputs."""

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        n_quantiles: int,
        hidden_sizes: Sequence[int],
        activation: str,
        encoder: ImageEncoder | None = None,
        sample_epsilon: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_actions, self.n_quantiles = n_actions, n_quantiles
        self.sample_epsilon = sample_epsilon
        """`env_action(deterministic=False)`'s exploration rate (the run's eps_final)."""
        self.encoder = encoder
        self.body = StackedMLP(1, obs_dim, hidden_sizes, n_actions * n_quantiles, activation)

    def forward(self, obs: Tensor) -> Tensor:
        return self.body(flat_features(self.encoder, obs))[0].view(len(obs), self.n_actions, self.n_quantiles)

    def greedy_numpy(self, obs: np.ndarray, logit_bias: np.ndarray | None = None) -> np.ndarray:
        """argmax_a mean_i Z_i(s, a) in numpy (CPU acting; among the allowed actions with masks' `logit_bias`)."""
        y = self.body.numpy_forward(obs.reshape(len(obs), -1), member=0)
        return masked_greedy(y.reshape(len(obs), self.n_actions, self.n_quantiles).mean(-1), logit_bias)  # type: ignore[no-any-return]

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """The greedy action; not `deterministic`: epsilon-greedy with `sample_epsilon` (among the allowed actions,
        with action masks' `logit_bias`)."""
        return act_on_values(self(obs).mean(-1), deterministic, self.sample_epsilon, generator, logit_bias)


class DistributionalDQN:
    """What QR-DQN and C51 share besides their networks and losses: DQN's epsilon-greedy acting and target updates
    (EpsilonGreedyActing), one Adam over the network with the config's epsilon, a target copy."""

    name: str
    cfg: DistributionalDQNConfig

    def __init__(self, cfg: DistributionalDQNConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.n_actions = discrete_actions(act_space, self.name, cfg)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        eps = 0.01 / cfg.batch_size if cfg.adam_eps is None else cfg.adam_eps
        self.q_opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm, eps=eps)
        self.q_target = TargetNetwork(self.net, self.q_opt.params)
        self.modules = {"q_target": self.q_target.module}
        self.optimizers = {"q": self.q_opt.optimizer}
        self.action_shape: tuple[int, ...] = ()
        self.action_dtype = torch.long
        self.acting = EpsilonGreedyActing(cfg, self.net, self.q_target, self.n_actions, self.generator)
        self.random_actions, self.explore, self.greedy, self.after_step = self.acting.methods()
        self.fused = False

    @staticmethod
    def build_policy(cfg: DistributionalDQNConfig, obs_space: gym.Space, act_space: gym.Space) -> Any:
        raise NotImplementedError

    @staticmethod
    def encoder_and_features(cfg: DistributionalDQNConfig, obs_space: gym.Space) -> tuple[ImageEncoder | None, int]:
        """The image encoder for the observations (None for vectors) and the MLP's input size."""
        encoder = make_encoder(cfg.encoder, obs_space)
        return encoder, obs_dim(obs_space) if encoder is None else encoder.features

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions


class QRDQN(DistributionalDQN):
    name = "qrdqn"
    config_cls = QRDQNConfig
    cfg: QRDQNConfig

    def __init__(self, cfg: QRDQNConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = fused_qrdqn_applies(self)

    @staticmethod
    def build_policy(cfg: DistributionalDQNConfig, obs_space: gym.Space, act_space: gym.Space) -> QuantileQNetwork:
        assert isinstance(cfg, QRDQNConfig)
        n_actions = discrete_actions(act_space, "qrdqn", cfg)
        encoder, features = QRDQN.encoder_and_features(cfg, obs_space)
        return QuantileQNetwork(
            features, n_actions, cfg.n_quantiles, cfg.hidden_sizes, cfg.activation, encoder, cfg.eps_final
        )

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_qrdqn_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        loss, z = self.quantile_loss(batch)
        self.q_opt.step(loss)
        return {"loss": loss.detach(), "q": z.detach().mean()}

    @torch.no_grad()
    def quantile_target(self, batch: Batch) -> Tensor:
        """The target atoms [B, N]: r + d (1 - done) Z'(s', argmax_a mean Z'(s', a)) (a among the allowed actions
        at s', with action masks)."""
        next_z = self.q_target(batch.next_obs)
        best = allowed_only(next_z.mean(-1), batch.get("next_action_mask")).argmax(-1)
        next_best = next_z[torch.arange(len(batch), device=next_z.device), best]
        keep = (batch.discounts * (1.0 - batch.terminated.float())).unsqueeze(-1)
        return batch.rewards.unsqueeze(-1) + keep * next_best

    def quantile_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The loss of the module docstring, and Z(s, a) [B, N]."""
        target = self.quantile_target(batch)
        z = self.net(batch.obs)[torch.arange(len(batch), device=target.device), batch.actions.long()]
        return quantile_huber_loss(z.unsqueeze(0), target) * self.cfg.n_quantiles, z
