"""Behaviour cloning: supervised learning of the dataset's actions, with any policy head.

Box actions (in [-1, 1] units, as the replay buffer holds them), by `head`:
    deterministic (CORL's BC):  a = tanh(mu(s)),  loss = mean (a - a_data)^2
    gaussian:                   a ~ N(tanh(mu(s)), std),  loss = -mean log pi(a_data | s)
    diffusion:                  DDPM on a_data (epsilon prediction), acting by K-step DDIM (nets/diffusion.py)
    flow:                       conditional flow matching on a_data, acting by K Euler steps (nets/flow.py)
    consistency:                consistency training on a_data, acting in one step (nets/consistency.py)
    loss (generative heads)   = mean over the batch of the head's per-sample loss
With `horizon` H > 1 a generative head models the dataset's next H actions as one chunk (padded with the
episode's last action) and acts by receding horizon: the first `act_steps` actions of each plan, then a new plan.
Discrete actions: a softmax policy, loss = cross-entropy with the dataset's actions; it acts greedily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
    uniform_discrete_actions,
)
from policylab.config import ACTIVATIONS
from policylab.data import Batch
from policylab.errors import ConfigError, EnvError
from policylab.nets import DeterministicActor, DiscreteBCActor, GaussianActor
from policylab.nets.generative import GENERATIVE_HEADS, GenerativeActor, make_generative_head

HEADS = ("deterministic", "gaussian", *GENERATIVE_HEADS)


@dataclass
class BCConfig(OfflineConfig):
    """Behaviour cloning; CORL's values (lr 3e-4, [256, 256] ReLU, batch 256, observations normalized)."""

    head: str = "deterministic"
    """Box actions: deterministic, gaussian, diffusion, flow or consistency (see the module docstring)."""
    gaussian: bool = False
    """The older switch for head=gaussian (kept: true with head=deterministic means gaussian)."""
    action_noise: float = 0.1
    """Std of the exploration noise (Box) or epsilon (Discrete) when the run continues online (deterministic and
    gaussian heads; generative heads explore by their own sampling)."""
    denoiser_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    """Generative heads: the denoiser MLP's hidden layers (three of 256 as Diffusion-QL and IDQL's MLPs)."""
    denoiser_activation: str = "silu"
    """Generative heads: the denoiser's activation (tanh, relu, elu or silu)."""
    diffusion_steps: int = 20
    """diffusion: DDPM's training steps T (DPPO's 20; Diffusion Policy uses 100); consistency: the grid's N."""
    sample_steps: int | None = None
    """Steps when acting: DDIM's K (default T), flow's Euler steps (default 10), consistency's (default 1)."""
    beta_schedule: str = "cosine"
    """diffusion: cosine or linear."""
    ddim_eta: float = 0.0
    """diffusion: DDIM's eta when acting (0: deterministic steps from the drawn noise; 1 with K = T: DDPM)."""
    flow_time: str = "uniform"
    """flow: the training distribution of t, uniform or beta (pi_0's)."""
    consistency_sigma_max: float = 80.0
    """consistency: the largest noise level."""
    horizon: int = 1
    """Generative heads: actions per chunk H (1: one action per observation)."""
    act_steps: int = 1
    """Generative heads: actions of each chunk executed before planning again (1 .. horizon)."""
    draw_when_deterministic: bool = True
    """Generative heads: deterministic acting (evaluation) still draws the initial noise from the policy's seeded
    generator; false takes the head's zero-noise sample, which falls between the modes of multimodal data."""

    def validate(self) -> None:
        super().validate()
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {', '.join(HEADS)}", "set head to e.g. diffusion")
        if self.gaussian and self.head not in ("deterministic", "gaussian"):
            raise ConfigError(f"gaussian=true contradicts head={self.head}", "drop gaussian (head names the policy)")
        if self.horizon < 1 or not 1 <= self.act_steps <= self.horizon:
            raise ConfigError(
                f"horizon={self.horizon}, act_steps={self.act_steps}: need horizon >= 1 and 1 <= act_steps <= horizon",
                "set e.g. horizon=4, act_steps=2 (or both 1)",
            )
        if self.horizon > 1 and self.head not in GENERATIVE_HEADS:
            raise ConfigError(
                f"horizon={self.horizon} (action chunks) needs a generative head, not head={self.head}",
                f"set head to one of {', '.join(GENERATIVE_HEADS)}, or horizon=1",
            )
        if self.diffusion_steps < 2:
            raise ConfigError(f"diffusion_steps={self.diffusion_steps} must be >= 2", "set diffusion_steps to e.g. 20")
        limit = self.diffusion_steps if self.head == "diffusion" else None
        if self.sample_steps is not None and (self.sample_steps < 1 or (limit and self.sample_steps > limit)):
            raise ConfigError(
                f"sample_steps={self.sample_steps} must be >= 1"
                + (f" and <= diffusion_steps={limit}" if limit else ""),
                "set sample_steps to e.g. 5 (or drop it for the head's default)",
            )
        if self.beta_schedule not in ("cosine", "linear"):
            raise ConfigError(f"beta_schedule={self.beta_schedule!r} is not cosine or linear", "set it to cosine")
        if self.flow_time not in ("uniform", "beta"):
            raise ConfigError(f"flow_time={self.flow_time!r} is not uniform or beta", "set it to uniform")
        if not 0.0 <= self.ddim_eta <= 1.0:
            raise ConfigError(f"ddim_eta={self.ddim_eta} is outside [0, 1]", "set ddim_eta to 0 (DDIM) or 1 (DDPM)")
        if self.denoiser_activation not in ACTIVATIONS:
            raise ConfigError(
                f"denoiser_activation={self.denoiser_activation!r} is not one of {', '.join(ACTIVATIONS)}",
                "set denoiser_activation to silu",
            )
        if not self.consistency_sigma_max > 0.002:
            raise ConfigError(f"consistency_sigma_max={self.consistency_sigma_max} must be > 0.002", "set it to 80")

    @property
    def policy_head(self) -> str:
        """The head in effect (`gaussian=true` read as head=gaussian)."""
        return "gaussian" if self.gaussian and self.head == "deterministic" else self.head


class BC:
    name = "bc"
    config_cls = BCConfig

    def __init__(self, cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.generative = isinstance(self.net, GenerativeActor)
        self.n_actions = int(act_space.n) if isinstance(act_space, gym.spaces.Discrete) else 0
        self.act_dim = 0 if self.discrete else int(np.prod(act_space.shape or ()))
        self.action_chunk = cfg.horizon
        """The loop's replay batches carry `action_chunks` of this many steps when > 1."""
        self.opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers = {"actor": self.opt.optimizer}
        self.action_shape = () if self.discrete else (self.act_dim,)
        self.action_dtype = torch.long if self.discrete else torch.float32

    @staticmethod
    def build_policy(cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        head = cfg.policy_head
        if isinstance(act_space, gym.spaces.Discrete):
            if head != "deterministic":
                raise EnvError(f"head={head} needs Box actions; this env's are Discrete", "drop head (softmax BC)")
            return DiscreteBCActor(obs_dim(obs_space), int(act_space.n), cfg.hidden_sizes, cfg.activation)
        low, high = box_bounds(act_space, "bc")
        if head in GENERATIVE_HEADS:
            return GenerativeActor(generative_head(cfg, obs_dim(obs_space), low.numel()), low, high,
                                   cfg.horizon, cfg.act_steps, cfg.draw_when_deterministic)  # fmt: skip
        actor = GaussianActor if head == "gaussian" else DeterministicActor
        return actor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        if self.discrete:
            return uniform_discrete_actions(n, self.n_actions, self.generator)
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=self.cfg.device)
            if self.discrete:
                greedy = self.net.env_action(x, True)
                explore = torch.rand(len(obs), generator=self.generator, device=self.generator.device)
                random = torch.from_numpy(self.random_actions(len(obs))).to(greedy.device)
                return torch.where(explore < self.cfg.action_noise, random, greedy).cpu().numpy()
            if self.generative:
                return self.net.act(x, self.generator).cpu().numpy()
            mean = self.net(x)
            noise = torch.randn(mean.shape, generator=self.generator, device=mean.device)
            return (mean + self.cfg.action_noise * noise).clamp(-1.0, 1.0).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions if self.discrete else self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def loss(self, batch: Batch) -> Tensor:
        if self.discrete:
            return F.cross_entropy(self.net(batch.obs), batch.actions.long())
        if self.generative:
            targets = batch.action_chunks if self.action_chunk > 1 else batch.actions
            return self.net.loss(batch.obs, targets, self.generator).mean()
        if self.cfg.policy_head == "gaussian":
            return -self.net.log_prob(batch.obs, batch.actions).mean()
        return (self.net(batch.obs) - batch.actions).pow(2).mean()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        loss = self.loss(batch)
        self.opt.step(loss)
        return {"bc_loss": loss.detach()}


def generative_head(cfg: BCConfig, obs_size: int, act_dim: int) -> Any:
    """The config's diffusion / flow / consistency head over chunks of `horizon` actions."""
    return make_generative_head(
        cfg.policy_head,
        obs_size,
        cfg.horizon * act_dim,
        cfg.denoiser_hidden_sizes,
        cfg.denoiser_activation,
        train_steps=cfg.diffusion_steps,
        sample_steps=cfg.sample_steps,
        schedule=cfg.beta_schedule,
        eta=cfg.ddim_eta,
        time_sampling=cfg.flow_time,
        sigma_max=cfg.consistency_sigma_max,
    )
