"""Augmented Random Search (Mania, Guy & Recht 2018, "Simple random search of static linear policies is
competitive for reinforcement learning"), as sb3-contrib's ARS: no gradients, no value function.

for each iteration:
    draw n_delta directions delta_i ~ N(0, I) over the policy's parameters theta
    run the 2 n_delta candidates theta + delta_std delta_i and theta - delta_std delta_i for n_eval_episodes
        whole episodes each; a candidate's score r is the mean of return + alive_bonus_offset x length   (the loop)
    keep the n_top directions with the largest max(r+_i, r-_i)
    sigma_R = std of the 2 n_top kept scores
    theta <- theta + lr / (n_top sigma_R + 1e-6) sum_i (r+_i - r-_i) delta_i
With normalize_obs (ARS V2), observations are normalized by running statistics of every state the candidates
saw, frozen during an iteration and updated after it, as in the paper.

The policy is linear without bias (`policy=linear`, the paper's) or an MLP with biases and a tanh-squashed
output (`policy=mlp`, sb3-contrib's ARSPolicy); Discrete actions take the argmax of its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.algos.onpolicy import annealed
from policylab.config import CommonConfig, positive
from policylab.errors import ConfigError
from policylab.nets.population import SearchPolicy

POLICIES = ("linear", "mlp")


@dataclass
class ARSConfig(CommonConfig):
    """sb3-contrib's defaults (n_delta 8, lr 0.02, delta_std 0.05, zero_policy)."""

    policy: str = "linear"
    """linear: observation -> action, no bias (the paper's); mlp: hidden_sizes with biases, output squashed by
    tanh into the action bounds (sb3-contrib's ARSPolicy)."""
    activation: str = "relu"
    n_delta: int = 8
    """Random directions per iteration (2 n_delta candidates)."""
    n_top: int | None = None
    """Directions kept for the step, by their best score (None: all n_delta)."""
    lr: float = 0.02
    delta_std: float = 0.05
    """The perturbations' scale."""
    anneal_lr: bool = False
    """lr decays linearly to 0 over the run (SB3-contrib's learning-rate schedule `lin_X`)."""
    anneal_delta_std: bool = False
    """delta_std decays linearly to 0 over the run (SB3-contrib's delta_std schedule)."""
    n_eval_episodes: int = 1
    """Episodes per candidate (its score is their mean)."""
    alive_bonus_offset: float = 0.0
    """Added to a candidate's return per step (e.g. -1 on Hopper takes out the healthy reward)."""
    zero_policy: bool = True
    """Start from all-zero parameters (the paper's and sb3-contrib's), else PyTorch's default initialization."""
    num_envs: int = 16
    """Env rows running the candidates' episodes at once; fewer than 2 n_delta n_eval_episodes take the
    episodes in turns, as rows become free."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    """The mlp policy's hidden layers (the linear policy has none)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_delta", "n_eval_episodes", "lr", "delta_std")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is not one of {', '.join(POLICIES)}", "use policy=linear")
        if self.n_top is not None and not 1 <= self.n_top <= self.n_delta:
            raise ConfigError(
                f"n_top={self.n_top} must be between 1 and n_delta={self.n_delta}",
                f"set n_top to at most {self.n_delta}, or drop it (all directions)",
            )
        unused = {
            "dataset": self.dataset is not None,
            "rollout_workers": self.rollout_workers > 0,
            "action_masks": self.action_masks,
            "recurrent": self.recurrent,
            "normalize_reward": self.normalize_reward,
        }
        for name, used in unused.items():
            if used:
                raise ConfigError(
                    f"ars does not take {name}: it scores whole episodes of perturbed policies in its own envs",
                    f"drop {name}, or use ppo (which takes it)",
                )
        if self.device != "cpu":
            raise ConfigError(
                f"ars runs on the CPU (device={self.device!r}): its population acts in numpy, and its step is a sum",
                "drop device (device=cpu)",
            )

    @property
    def top(self) -> int:
        return self.n_delta if self.n_top is None else self.n_top


class ARS:
    name = "ars"
    config_cls = ARSConfig

    def __init__(self, cfg: ARSConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space)
        if cfg.zero_policy:
            self.net.load_flat(torch.zeros(self.net.n_params))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.directions = torch.zeros(cfg.n_delta, self.net.n_params)
        """This iteration's directions delta_i (drawn by `candidates`)."""

    @staticmethod
    def build_policy(cfg: ARSConfig, obs_space: gym.Space, act_space: gym.Space) -> SearchPolicy:
        linear = cfg.policy == "linear"
        hidden = [] if linear else cfg.hidden_sizes
        return SearchPolicy(obs_space, act_space, hidden, cfg.activation, bias=not linear, squash=not linear)

    def candidates(self, progress: float = 0.0) -> np.ndarray:
        """[2 n_delta, n_params]: theta + delta_std delta_i for every i, then theta - delta_std delta_i
        (`progress`: the run's share done, for anneal_delta_std)."""
        cfg = self.cfg
        self.directions = torch.randn(cfg.n_delta, self.net.n_params, generator=self.generator)
        theta, step = self.net.flat(), annealed(cfg.delta_std, progress, cfg.anneal_delta_std) * self.directions
        return torch.cat([theta + step, theta - step]).numpy()

    def update(self, scores: np.ndarray, progress: float = 0.0) -> dict[str, Tensor]:
        """The step from the candidates' scores (in `candidates`' order; `progress` as there, for anneal_lr)."""
        cfg = self.cfg
        plus, minus = scores[: cfg.n_delta], scores[cfg.n_delta :]
        top = np.argsort(-np.maximum(plus, minus), kind="stable")[: cfg.top]
        plus, minus = plus[top], minus[top]
        kept = np.concatenate([plus, minus])
        score_std = float(kept.std(ddof=1)) if len(kept) > 1 else 0.0
        step_size = annealed(cfg.lr, progress, cfg.anneal_lr) / (cfg.top * score_std + 1e-6)
        direction = torch.from_numpy(plus - minus) @ self.directions[torch.from_numpy(top)].double()
        theta = self.net.flat().double() + step_size * direction
        self.net.load_flat(theta)
        return {
            "score_mean": torch.tensor(float(scores.mean())),
            "score_max": torch.tensor(float(scores.max())),
            "top_score_std": torch.tensor(score_std),
            "step_size": torch.tensor(step_size),
            "param_norm": theta.norm().float(),
        }
