"""C51: categorical DQN (Bellemare et al. 2017, arXiv:1707.06887). The network gives, for each action, a
distribution of the return over N fixed atoms z_1 < ... < z_N evenly spaced in [v_min, v_max].

act: epsilon-greedy (as DQN) on Q(s, a) = sum_j p_j(s, a) z_j
for each gradient step on a replay batch (s, a, r, s', done, d = gamma^n):
    a* = argmax_a sum_j p'_j(s', a) z_j                              (the target network's)
    m = the projection of p'(s', a*) moved to the atoms r + d (1 - done) z_j (clipped to [v_min, v_max]) back onto
        z_1..z_N, each moved atom's mass split between its two neighbours (objectives.q_targets.categorical_projection)
    loss = mean_B -sum_j m_j log p_j(s, a)                           (cross-entropy, m held fixed)
every target_update_interval env steps: p' <- (1 - tau) p' + tau p   (tau = 1: a hard copy)

Defaults are CleanRL's `c51.py` (101 atoms in [-100, 100], [120, 84] ReLU network, lr 2.5e-4 with Adam's epsilon
0.01 / batch, batch 128, an update every 10 steps after 10k, a hard target copy every 500, epsilon 1 -> 0.05 over
half the run); its Atari script's (51 atoms in [-10, 10]) are `--set n_atoms=51 --set v_min=-10 --set v_max=10`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.algos.fused_offpolicy import fused_c51_update, fused_qrdqn_applies
from policylab.algos.offpolicy import discrete_actions
from policylab.algos.qrdqn import DistributionalDQN, DistributionalDQNConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.cnn import ImageEncoder, flat_features
from policylab.nets.critics import act_on_values, masked_greedy
from policylab.nets.mlp import StackedMLP
from policylab.objectives.q_targets import allowed_only, categorical_projection


@dataclass
class C51Config(DistributionalDQNConfig):
    """C51 with CleanRL's values (module docstring)."""

    lr: float = 2.5e-4
    hidden_sizes: list[int] = field(default_factory=lambda: [120, 84])
    batch_size: int = 128
    learning_starts: int = 10_000
    train_freq: int = 10
    target_update_interval: int = 500
    exploration_fraction: float = 0.5
    max_grad_norm: float | None = None
    n_atoms: int = 101
    v_min: float = -100.0
    v_max: float = 100.0

    def validate(self) -> None:
        super().validate()
        if self.n_atoms < 2 or not self.v_min < self.v_max:
            raise ConfigError(
                f"n_atoms={self.n_atoms} must be >= 2 and v_min={self.v_min} below v_max={self.v_max}",
                "set n_atoms to e.g. 51 and v_min / v_max around the returns the env gives (e.g. -10 and 10)",
            )


class CategoricalQNetwork(nn.Module):
    """The logits of p(s, .): [B, n_actions, n_atoms] from one MLP with n_actions x n_atoms outputs; the atoms are a
    buffer (saved with the weights)."""

    atoms: Tensor

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        atoms: Tensor,
        hidden_sizes: Sequence[int],
        activation: str,
        encoder: ImageEncoder | None = None,
        sample_epsilon: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, len(atoms)
        self.sample_epsilon = sample_epsilon
        """`env_action(deterministic=False)`'s exploration rate (the run's eps_final)."""
        self.encoder = encoder
        self.register_buffer("atoms", atoms.float())
        self.body = StackedMLP(1, obs_dim, hidden_sizes, n_actions * self.n_atoms, activation)

    def forward(self, obs: Tensor) -> Tensor:
        return self.body(flat_features(self.encoder, obs))[0].view(len(obs), self.n_actions, self.n_atoms)

    def q_values(self, logits: Tensor) -> Tensor:
        """Q(s, a) = sum_j p_j z_j from the logits [..., N]."""
        return torch.softmax(logits, -1) @ self.atoms

    def greedy_numpy(self, obs: np.ndarray, logit_bias: np.ndarray | None = None) -> np.ndarray:
        """argmax_a Q(s, a) in numpy (CPU acting; among the allowed actions with masks' `logit_bias`)."""
        y = self.body.numpy_forward(obs.reshape(len(obs), -1), member=0).reshape(len(obs), self.n_actions, -1)
        p = np.exp(y - y.max(-1, keepdims=True))
        q = (p @ self.atoms.numpy()) / p.sum(-1)
        return masked_greedy(q, logit_bias)  # type: ignore[no-any-return]

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """The greedy action; not `deterministic`: epsilon-greedy with `sample_epsilon` (among the allowed actions,
        with action masks' `logit_bias`)."""
        return act_on_values(self.q_values(self(obs)), deterministic, self.sample_epsilon, generator, logit_bias)


class C51(DistributionalDQN):
    name = "c51"
    config_cls = C51Config
    cfg: C51Config
    net: CategoricalQNetwork

    @staticmethod
    def build_policy(cfg: DistributionalDQNConfig, obs_space: gym.Space, act_space: gym.Space) -> CategoricalQNetwork:
        assert isinstance(cfg, C51Config)
        n_actions = discrete_actions(act_space, "c51", cfg)
        encoder, features = C51.encoder_and_features(cfg, obs_space)
        atoms = torch.linspace(cfg.v_min, cfg.v_max, cfg.n_atoms)
        return CategoricalQNetwork(features, n_actions, atoms, cfg.hidden_sizes, cfg.activation, encoder, cfg.eps_final)

    def __init__(self, cfg: C51Config, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = fused_qrdqn_applies(self)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_c51_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        target = self.projected_target(batch)
        logits = self.net(batch.obs)[torch.arange(len(batch), device=target.device), batch.actions.long()]
        log_p = F.log_softmax(logits, -1)
        loss = -(target * log_p).sum(-1).mean()
        self.q_opt.step(loss)
        return {"loss": loss.detach(), "q": (log_p.detach().exp() @ self.net.atoms).mean()}

    @torch.no_grad()
    def projected_target(self, batch: Batch) -> Tensor:
        """m [B, N]: p'(s', a*) moved to r + d (1 - done) z and projected onto the atoms (a* among the allowed
        actions at s', with action masks)."""
        target_net = self.q_target.module
        next_p = torch.softmax(target_net(batch.next_obs), -1)  # [B, A, N]
        best = allowed_only(next_p @ self.net.atoms, batch.get("next_action_mask")).argmax(-1)
        next_best = next_p[torch.arange(len(batch), device=next_p.device), best]
        keep = batch.discounts * (1.0 - batch.terminated.float())
        return categorical_projection(next_best, self.net.atoms, batch.rewards, keep)
