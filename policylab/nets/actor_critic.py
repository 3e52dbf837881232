"""Actor-critic network: policy head + value function, separate or with a shared body."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.nets.cnn import make_encoder
from policylab.nets.heads import make_head
from policylab.nets.mlp import StackedMLP


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (two members of one StackedMLP) or one shared body.

    forward(obs) -> (policy outputs [B, n], values [B]). The policy outputs are
    logits (Discrete) or Gaussian means (Box, with the parameter `log_std`).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        shared: bool = False,
        ortho_init: bool = True,
        log_std_init: float = 0.0,
        squash: bool = False,
        algo: str = "this algorithm",
        encoder: str = "auto",
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder, observation_space, orthogonal=ortho_init)
        """The image encoder shared by actor and critic (nets/cnn.py), None for vector observations."""
        self.obs_dim = int(np.prod(observation_space.shape)) if self.encoder is None else self.encoder.features
        self.head = make_head(action_space, squash, algo)
        n = self.head.n_outputs
        self.n_outputs = n
        self.shared = shared
        out_dim = n + 1 if shared else n
        self.body = StackedMLP(1 if shared else 2, self.obs_dim, hidden_sizes, out_dim, activation)
        if ortho_init:
            gains = [0.01] * n + [1.0] if shared else [0.01, 1.0]
            self.body.orthogonal_init(gains)
        if self.head.continuous:
            self.log_std = nn.Parameter(torch.full((n,), float(log_std_init)))
        else:
            self.register_parameter("log_std", None)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        x = obs.reshape(obs.shape[0], self.obs_dim) if self.encoder is None else self.encoder(obs)
        y = self.body.forward(x)  # .forward: no hook overhead on the hot path
        if self.shared:
            return y[0, :, : self.n_outputs], y[0, :, self.n_outputs]
        return y[0, :, : self.n_outputs], y[1, :, 0]

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions (with pre-drawn `noise` from `head.noise`, if given); returns (actions, log-probs, values)."""
        out, values = self.forward(obs)
        actions, logp = self.head.sample(out, self.log_std, generator, noise)
        return actions, logp, values

    @property
    def numpy_acting(self) -> bool:
        """Whether `act_numpy` applies: tanh/relu MLPs on vectors, on the CPU."""
        return self.encoder is None and self.body.analytic_backward and self.body.weights[0].device.type == "cpu"

    def act_numpy(self, obs: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`act` in numpy with pre-drawn noise (rollouts on CPU); returns (actions, log-probs, values)."""
        y = self.body.numpy_forward(obs.reshape(obs.shape[0], self.obs_dim))
        values = y[0, :, self.n_outputs] if self.shared else y[1, :, 0]
        log_std = None if self.log_std is None else self.log_std.detach().numpy()
        actions, logp = self.head.sample_numpy(y[0, :, : self.n_outputs], log_std, noise)
        return actions, logp, values

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs of `actions`, entropies, values) under the current parameters."""
        out, values = self(obs)
        logp, entropy = self.head.log_prob_entropy(out, self.log_std, actions)
        return logp, entropy, values

    def predict_values(self, obs: Tensor) -> Tensor:
        return self.forward(obs)[1]

    def deterministic(self, obs: Tensor) -> Tensor:
        return self.head.mode(self.forward(obs)[0])

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Actions as the env takes them (every policy network has this method; `Policy.act` calls it)."""
        raw = self.deterministic(obs) if deterministic else self.act(obs, generator)[0]
        return self.head.to_env(raw)
