"""A Q-network that acts in the on-policy loop: epsilon-greedy from pre-drawn noise, max_a Q(s, a) as the value the
rollout stores. What PQN (algos/pqn.py) collects its rollouts with.

The loop asks the network for `act(obs, noise=...)` / `act_numpy(obs, noise)` -> (actions, log-probs, values),
`predict_values` (bootstraps at time limits and after the rollout's last step) and `env_action` (evaluation,
`pl.load`), and asks `net.head` for the rollout's noise and the env's actions of stored ones. The noise of one
step is two uniforms per env: the first below `epsilon` explores, the second picks the uniform action. The
exploration rate is a buffer of the network, so checkpoints keep it and a resumed run acts as the uninterrupted
one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from policylab.nets.critics import QNetwork


class EpsilonGreedyHead:
    """The rollout side of an epsilon-greedy Q-network over Discrete(n) actions: stored actions are the env's."""

    continuous = False
    action_dtype = torch.long

    def __init__(self, n: int) -> None:
        self.n_outputs = n
        self.action_shape: tuple[int, ...] = ()

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Uniforms [..., 2] for `shape` (steps x envs) samples, in one RNG call: explore?, which action."""
        return torch.rand((*shape, 2), generator=generator, device=device)

    def uniform_actions(self, draws: Tensor) -> Tensor:
        return (draws * self.n_outputs).long().clamp_max(self.n_outputs - 1)

    def to_env(self, actions: Tensor) -> Tensor:
        return actions

    def to_env_numpy(self, actions: np.ndarray) -> np.ndarray:
        return actions

    def from_env(self, env_actions: Tensor) -> Tensor:
        return env_actions.long()


class EpsilonGreedyQNetwork(QNetwork):
    """Q(s, .) of a vector observation (see the module docstring); `epsilon` is the rollouts' exploration rate,
    `sample_epsilon` the one of `env_action(deterministic=False)` (the schedule's final rate)."""

    epsilon: Tensor

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden_sizes: Sequence[int],
        activation: str,
        layer_norm: bool,
        epsilon: float,
        final_epsilon: float,
    ) -> None:
        super().__init__(obs_dim, n_actions, hidden_sizes, activation, sample_epsilon=final_epsilon,
                         layer_norm=layer_norm)  # fmt: skip
        self.obs_dim = obs_dim
        self.register_buffer("epsilon", torch.tensor(float(epsilon)))
        self.head = EpsilonGreedyHead(n_actions)
        self.encoder = None
        self.rollout_state: Tensor | None = None
        """Always None: no recurrent memory (the on-policy loop checkpoints it for LSTM policies)."""

    @property
    def recurrent(self) -> bool:
        return False

    @property
    def numpy_acting(self) -> bool:
        """Acting in numpy (CPU, tanh or relu): a numpy call costs a fifth of a torch call on a few envs' rows."""
        return self.body.activation in ("tanh", "relu") and self.body.weights[0].device.type == "cpu"

    def values_of(self, obs: Tensor) -> Tensor:
        """Q(s, .) [B, n] of a batch of vector observations."""
        return self(obs.reshape(obs.shape[0], self.obs_dim))[0]

    def predict_values(self, obs: Tensor, rows: Tensor | None = None) -> Tensor:
        """max_a Q(s, a): the greedy policy's value, which Q(lambda)'s returns bootstrap from."""
        return self.values_of(obs).amax(-1)

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(epsilon-greedy actions, zeros for the unused log-probs, max_a Q(s, a)) of a batch."""
        q = self.values_of(obs)
        if noise is None:
            noise = self.head.noise((obs.shape[0],), generator, obs.device)
        greedy = q.argmax(-1)
        actions = torch.where(noise[:, 0] < self.epsilon, self.head.uniform_actions(noise[:, 1]), greedy)
        return actions, torch.zeros(obs.shape[0], device=obs.device), q.amax(-1)

    def act_numpy(self, obs: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`act` in numpy with pre-drawn `noise` [B, 2] (rollouts on the CPU)."""
        q = self.body.numpy_forward(obs.reshape(obs.shape[0], self.obs_dim), member=0)
        n = self.head.n_outputs
        uniform = np.minimum((noise[:, 1] * n).astype(np.int64), n - 1)
        actions = np.where(noise[:, 0] < float(self.epsilon), uniform, q.argmax(-1))
        return actions, np.zeros(len(obs), np.float32), q.max(-1)
