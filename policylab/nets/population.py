"""A deterministic policy whose parameters are searched directly (ARS), and its population forward pass.

`SearchPolicy` is an MLP (a linear map without bias in ARS's linear policy) from an observation to an action:
for Box actions, tanh squashed into the bounds or the raw output clipped to them; for Discrete, the argmax of
the outputs. Random search evaluates many perturbed copies of its parameters at once: `population_layers`
views a [P, n_params] matrix of candidate parameter vectors as per-layer weights, and `PopulationActor` keeps
one candidate's weights per env row, so all rows act in one batched numpy product per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.errors import ConfigError, EnvError
from policylab.nets.cnn import VectorObservationsOnly
from policylab.nets.mlp import ACTIVATION_FNS

NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


class SearchPolicy(nn.Module):
    def __init__(
        self,
        obs_space: gym.Space,
        act_space: gym.Space,
        hidden_sizes: Sequence[int],
        activation: str,
        bias: bool,
        squash: bool,
    ) -> None:
        super().__init__()
        obs_shape = tuple(obs_space.shape or ())
        if len(obs_shape) != 1:
            raise VectorObservationsOnly(f"observations of shape {obs_space.shape}: ars's policy reads vectors")
        if isinstance(act_space, gym.spaces.Discrete):
            if act_space.start != 0:
                raise EnvError(f"Discrete action space with start={act_space.start} is not supported", "use start=0")
            out_dim, self.low, self.high = int(act_space.n), None, None
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            out_dim = int(act_space.shape[0])
            self.low = act_space.low.astype(np.float32)
            self.high = act_space.high.astype(np.float32)
            if squash and not (np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high))):
                raise ConfigError(
                    "the mlp policy squashes its output into the action bounds, and this env's Box has infinite ones",
                    "use policy=linear (its output is clipped to the bounds, not squashed)",
                )
        else:
            raise ConfigError(
                f"ars acts in Discrete or 1-d Box action spaces, not {act_space}",
                "use ppo, a2c or dqn for MultiDiscrete and MultiBinary actions",
            )
        self.discrete = self.low is None
        self.squash = squash and not self.discrete
        self.activation = activation
        dims = [obs_shape[0], *hidden_sizes, out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:]))
        self.shapes: list[tuple[int, int, bool]] = [(o, i, bias) for i, o in zip(dims[:-1], dims[1:])]
        """(out, in, has a bias) of each layer."""
        self.requires_grad_(False)  # searched, never differentiated

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flat(self) -> Tensor:
        """All parameters as one vector (each layer's weight [out, in], then its bias)."""
        return nn.utils.parameters_to_vector(self.parameters()).detach()

    def load_flat(self, vector: Tensor) -> None:
        with torch.no_grad():
            nn.utils.vector_to_parameters(vector.to(torch.float32), self.parameters())

    def forward(self, obs: Tensor) -> Tensor:
        """The outputs: logits (Discrete; the action is their argmax), or the action before squashing or clipping."""
        x = obs
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = ACTIVATION_FNS[self.activation](x)
        return x

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: object = None, **_: object) -> Tensor:
        """The env's action for each row (the policy is deterministic: `deterministic` changes nothing)."""
        x = self(obs)
        if self.discrete:
            return x.argmax(dim=-1)
        low, high = torch.as_tensor(self.low, device=x.device), torch.as_tensor(self.high, device=x.device)
        if self.squash:
            return low + (torch.tanh(x) + 1.0) * 0.5 * (high - low)
        return torch.maximum(torch.minimum(x, high), low)

    def population_layers(self, candidates: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """[P, n_params] candidate vectors as per-layer (weights [P, out, in], biases [P, out] or None) views."""
        layers: list[tuple[np.ndarray, np.ndarray | None]] = []
        offset = 0
        for out_dim, in_dim, bias in self.shapes:
            weights = candidates[:, offset : offset + out_dim * in_dim].reshape(-1, out_dim, in_dim)
            offset += out_dim * in_dim
            biases = None
            if bias:
                biases = candidates[:, offset : offset + out_dim]
                offset += out_dim
            layers.append((weights, biases))
        return layers


class PopulationActor:
    """Env rows acting with candidates of a `SearchPolicy`: row r acts with the candidate `assign(r, c)` gave it,
    all rows in one batched product per layer."""

    def __init__(self, policy: SearchPolicy, rows: int) -> None:
        self.policy = policy
        self.rows: list[tuple[np.ndarray, np.ndarray | None]] = [
            (np.zeros((rows, out_dim, in_dim), np.float32), np.zeros((rows, out_dim), np.float32) if bias else None)
            for out_dim, in_dim, bias in policy.shapes
        ]
        self.candidates: list[tuple[np.ndarray, np.ndarray | None]] = []

    def use(self, candidates: np.ndarray) -> None:
        """The iteration's [P, n_params] candidate vectors."""
        self.candidates = self.policy.population_layers(candidates)

    def assign(self, rows: np.ndarray, candidates: np.ndarray) -> None:
        """Rows `rows` act with candidates `candidates` from now on."""
        for (weights, biases), (cand_weights, cand_biases) in zip(self.rows, self.candidates):
            weights[rows] = cand_weights[candidates]
            if biases is not None and cand_biases is not None:
                biases[rows] = cand_biases[candidates]

    def act(self, obs: np.ndarray) -> np.ndarray:
        """[rows, obs_dim] observations (normalized as the policy reads them) -> the env's actions."""
        policy, x = self.policy, obs.astype(np.float32, copy=False)
        last = len(self.rows) - 1
        for i, (weights, biases) in enumerate(self.rows):
            x = np.matmul(weights, x[:, :, None])[:, :, 0]
            if biases is not None:
                x += biases
            if i < last:
                x = NUMPY_ACTIVATIONS[policy.activation](x)
        if policy.discrete:
            return np.argmax(x, axis=1)
        assert policy.low is not None and policy.high is not None
        if policy.squash:
            return policy.low + (np.tanh(x) + 1.0) * 0.5 * (policy.high - policy.low)
        return np.clip(x, policy.low, policy.high)
