"""An on-policy actor-critic whose actor is a generative head (nets/generative.py) and whose critic is an MLP V(s):
what DPPO and FPO train with the on-policy loop, its rollout buffer and its checkpoints.

The loop asks the network for `act(obs, noise=...)` -> (stored actions, log-probs, values), `predict_values`,
`env_action`, and asks `net.head` for pre-drawn noise and for the env's actions of stored ones. What is stored
depends on the algorithm:

    stored = "chain"   (DPPO): the whole denoising chain [K + 1, D] of each step, with its per-step log-probs [K]
                       (every DDIM/DDPM step a Gaussian; the env gets chain[-1] clipped to [-1, 1], scaled);
    stored = "action"  (FPO):  the action x [D] in [-1, 1]; no log-prob exists (FPO's ratio comes from flow-matching
                       losses), so 0 is stored.

Noise is drawn for a whole rollout in one call (`head.noise`), as for the Gaussian heads: the chain's noise
[K + 1, D] per step (the start and each step's z), or the flow's start x0 [D].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.errors import ConfigError, EnvError
from policylab.nets.consistency import ConsistencyHead
from policylab.nets.critics import scale_to_bounds
from policylab.nets.diffusion import DiffusionHead
from policylab.nets.flow import FlowHead
from policylab.nets.generative import GenerativeActor
from policylab.nets.mlp import StackedMLP


class RolloutHead:
    """The rollout side of a generative policy: the shapes the rollout buffer preallocates, the pre-drawn noise and
    stored -> env actions (what the on-policy loop asks of `net.head`)."""

    continuous = True
    action_dtype = torch.float32

    def __init__(self, act_space: gym.spaces.Box, dim: int, chain_steps: int | None) -> None:
        self.dim = dim
        self.chain_steps = chain_steps
        """K with stored chains (DPPO), None with stored actions (FPO)."""
        self.action_shape: tuple[int, ...] = (dim,) if chain_steps is None else (chain_steps + 1, dim)
        self.logp_shape: tuple[int, ...] = () if chain_steps is None else (chain_steps,)
        self.n_outputs = dim
        self.low = torch.as_tensor(act_space.low, dtype=torch.float32).reshape(-1)
        self.high = torch.as_tensor(act_space.high, dtype=torch.float32).reshape(-1)

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Standard normal noise for `shape` (steps x envs) samples: [..., K + 1, D] for chains, [..., D] else."""
        return torch.randn((*shape, *self.action_shape), generator=generator, device=device)

    def final(self, stored: Tensor) -> Tensor:
        """The action in [-1, 1] of stored chains or actions [B, ...] -> [B, D]."""
        x = stored[:, -1] if self.chain_steps is not None else stored
        return x.clamp(-1.0, 1.0)

    def to_env(self, stored: Tensor) -> Tensor:
        return scale_to_bounds(self.final(stored), self.low.to(stored.device), self.high.to(stored.device))

    def from_env(self, env_actions: Tensor) -> Tensor:
        raise ConfigError(
            "a generative on-policy policy cannot take demonstrations as an imitation term",
            "pretrain it with `policylab train bc --set head=diffusion` and pass that run as `pretrained`",
        )


def check_bounded_box(space: gym.Space, algo: str) -> gym.spaces.Box:
    bounded = isinstance(space, gym.spaces.Box) and np.isfinite(space.low).all() and np.isfinite(space.high).all()
    if not bounded:
        raise EnvError(
            f"{algo} needs Box actions with finite bounds, but the action space is {space}",
            "use an env with bounded continuous actions (or PPO for discrete ones)",
        )
    assert isinstance(space, gym.spaces.Box)
    return space


class GenerativeActorCritic(nn.Module):
    """`actor` (a GenerativeActor over one action, in [-1, 1]) + `critic` (an MLP V(s)); see the module docstring.
    A diffusion head stores chains (DPPO), a flow head actions (FPO)."""

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.spaces.Box,
        head: DiffusionHead | FlowHead | ConsistencyHead,
        critic_hidden_sizes: Sequence[int] = (256, 256, 256),
        critic_activation: str = "tanh",
        eta: float = 1.0,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(head, DiffusionHead | FlowHead):
            raise ValueError("an on-policy generative policy needs a diffusion head (chains) or a flow head")
        self.obs_dim = int(np.prod(observation_space.shape or ()))
        low = torch.as_tensor(action_space.low, dtype=torch.float32)
        high = torch.as_tensor(action_space.high, dtype=torch.float32)
        self.actor = GenerativeActor(head, low, high)
        self.critic = StackedMLP(1, self.obs_dim, critic_hidden_sizes, 1, critic_activation)
        self.stored = "chain" if isinstance(head, DiffusionHead) else "action"
        self.eta, self.min_std = eta, min_std
        chain_steps = head.sample_steps if self.stored == "chain" else None
        self.head = RolloutHead(action_space, head.dim, chain_steps)
        self.encoder = None
        self.memory = 0
        self.numpy_acting = False
        self.rollout_state: Tensor | None = None
        """Always None: no recurrent memory (the on-policy loop checkpoints it for LSTM policies)."""

    @property
    def generative(self) -> DiffusionHead | FlowHead:
        return self.actor.head  # type: ignore[return-value]

    @property
    def recurrent(self) -> bool:
        return False

    def values(self, obs: Tensor) -> Tensor:
        return self.critic(obs.reshape(obs.shape[0], self.obs_dim))[0, :, 0]

    def predict_values(self, obs: Tensor, rows: Tensor | None = None) -> Tensor:
        return self.values(obs)

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(stored chains or actions, their log-probs, V(obs)) of a batch, from pre-drawn `noise` if given."""
        flat = obs.reshape(obs.shape[0], self.obs_dim)
        if noise is None:
            noise = self.head.noise((obs.shape[0],), generator, obs.device)
        head = self.generative
        if self.stored == "chain":
            assert isinstance(head, DiffusionHead)
            chain, logp = head.sample_chain(flat, eta=self.eta, min_std=self.min_std, noise=noise.transpose(0, 1))
            return chain.transpose(0, 1), logp.transpose(0, 1), self.values(flat)
        assert isinstance(head, FlowHead)
        actions = head.sample(flat, noise=noise)
        return actions, torch.zeros(obs.shape[0], device=obs.device), self.values(flat)

    def chain_log_prob(self, obs: Tensor, chains: Tensor) -> Tensor:
        """log-probs [B, K] of stored chains [B, K + 1, D] under the current weights (DPPO's new log-probs)."""
        head = self.generative
        assert isinstance(head, DiffusionHead)
        flat = obs.reshape(obs.shape[0], self.obs_dim)
        return head.chain_log_prob(flat, chains.transpose(0, 1), eta=self.eta, min_std=self.min_std).transpose(0, 1)

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        state: Tensor | None = None,
    ) -> Tensor:
        """The env's action: a fresh sample of the head (a generative policy draws even when `deterministic`, since
        its zero-noise sample may fall between modes)."""
        return self.actor.env_action(obs.reshape(obs.shape[0], self.obs_dim), deterministic, generator)

    def load_pretrained(
        self, tensors: dict[str, Tensor], theirs: dict[str, Any] | None = None, mine: Any = None, run_dir: str = ""
    ) -> None:
        """Take a behaviour-cloned generative policy's weights (`policylab train bc --set head=...`): its
        `head.*` tensors go into the actor's head; the critic starts fresh. `theirs` (the BC run's config) and
        `mine` (this run's) are checked first: the head kind this network needs, the env and the head settings the
        weights were trained under, each difference named with the setting that removes it."""
        kind = "diffusion" if self.stored == "chain" else "flow"
        if theirs is not None and mine is not None:
            check_pretrained_config(theirs, mine, kind, run_dir)
        mine_tensors = self.actor.head.state_dict()
        given = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        if set(given) != set(mine_tensors) or any(given[k].shape != mine_tensors[k].shape for k in mine_tensors):
            raise ConfigError(
                "the pretrained policy's generative head does not match this run's (its tensors differ in names "
                "or shapes: a different head kind, denoiser_hidden_sizes or action space)",
                f"pretrain with `policylab train bc --set head={kind}` on this run's env, with this run's "
                "denoiser_hidden_sizes",
            )
        self.actor.head.load_state_dict(given)


PRETRAINED_HEAD_FIELDS = ("denoiser_hidden_sizes", "denoiser_activation", "diffusion_steps", "beta_schedule")
"""The head settings a BC run's weights were trained under and a fine-tuning run must share (sample_steps and
ddim_eta only change acting, so they may differ; flow_time only changes flow training)."""

ALGO_OF_KIND = {"diffusion": "dppo", "flow": "fpo"}


def set_value(value: Any) -> str:
    """`value` as `--set key=VALUE` parses it back (lists without spaces, so no shell quoting is needed)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(set_value(v) for v in value) + "]"
    return str(value)


def check_pretrained_config(theirs: dict[str, Any], mine: Any, kind: str, run_dir: str = "") -> None:
    """One clear error when the BC run whose config is `theirs` cannot start this run (`mine`, whose head is
    `kind`): not a bc run, a head of another kind, another env, or other weight-shaping head settings."""
    algo = ALGO_OF_KIND[kind]
    name = f"pretrained={run_dir}" if run_dir else "the pretrained run"
    if theirs.get("algo", "bc") != "bc":
        raise ConfigError(
            f"{name} is a {theirs.get('algo')} run, not a bc run",
            f"pretrain with `policylab train bc --set head={kind}`",
        )
    head = theirs.get("head", "deterministic")
    if head != kind:
        other = ALGO_OF_KIND.get(str(head))
        raise ConfigError(
            f"{name} is a bc run with head={head}, but {algo} fine-tunes a {kind} head",
            f"pretrain with `policylab train bc --set head={kind}`"
            + (f", or fine-tune this {head} head with `policylab train {other}`" if other else ""),
        )
    env = getattr(mine, "env", None)
    if theirs.get("env") and env and theirs["env"] != env:
        raise ConfigError(
            f"{name} was trained on {theirs['env']}, this run is on {env}",
            f"run this one with --env {theirs['env']}, or pretrain on {env}",
        )
    differ = [k for k in PRETRAINED_HEAD_FIELDS if k in theirs and theirs[k] != getattr(mine, k)]
    if differ:
        detail = "; ".join(f"{k}={set_value(theirs[k])} there, {set_value(getattr(mine, k))} here" for k in differ)
        sets = " ".join(f"--set {k}={set_value(theirs[k])}" for k in differ)
        raise ConfigError(
            f"the pretrained bc run's {kind} head does not match this run's ({detail})",
            f"add {sets} to this run (or pretrain with this run's settings)",
        )
