"""Decision Transformer (Chen et al. 2021, arXiv:2106.01345): offline RL as sequence modelling. A causal
transformer reads windows of K steps of the dataset's episodes as tokens (R_t, s_t, a_t), R_t the return to go
from step t (the sum of r_t', t' >= t, times `reward_scale`), and learns to predict each a_t from the tokens up to
s_t (nets/transformer.py):

    Box actions:      loss = sum_t m_t |a_hat_t - a_t|^2 / (A sum_t m_t)      (a_hat = tanh(...), in [-1, 1] units)
    Discrete actions: loss = sum_t m_t CE(logits_t, a_t) / sum_t m_t
    m_t = 1 for the window's steps of the episode, 0 for the padding after its last step

No critic, no bootstrapping, no target network. It acts by asking for a return: the first step's R is
`target_return` (default: the dataset's best episode return), and each reward received lowers it. AdamW on every
parameter, the learning rate warmed up linearly over `warmup_steps` and then constant, gradients clipped at
`max_grad_norm`, dropout drawn from the run's generator (a resumed run continues the same draws).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

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
)
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.transformer import ACTIVATIONS, DecisionTransformer


@dataclass
class DTConfig(OfflineConfig):
    """CORL's defaults (algorithms/offline/dt.py; d3rlpy's DT reproduction uses the same): windows of 20 steps,
    3 blocks of 1 head, width 128, dropout 0.1, AdamW (lr 1e-4, weight decay 1e-4, linear warm-up over 10k steps),
    batch 64, gradient norm 0.25, returns to go in units of 1000 (reward_scale 0.001), undiscounted (gamma 1)."""

    context_length: int = 20
    """K: the steps in each training window and in the context the policy acts on."""
    embed_dim: int = 128
    n_layers: int = 3
    n_heads: int = 1
    dropout: float = 0.1
    """Dropout on the embeddings, the attention weights and both residual branches of every block."""
    activation: str = "relu"
    """The blocks' MLP activation: relu (the authors' GPT-2 settings and d3rlpy's) or gelu (CORL's)."""
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    max_timestep: int = 1000
    """Timesteps embedded: steps later in an episode share the last embedding (CORL's episode_len)."""
    target_return: float | None = None
    """The return the policy is asked for at an episode's start, in the env's units; None: the best episode return
    in the dataset (set when the run starts, and saved in its config)."""
    warmup_steps: int = 10_000
    """Linear learning-rate warm-up from lr / warmup_steps to lr over these gradient steps (0: none)."""
    weight_decay: float = 1e-4
    lr: float = 1e-4
    batch_size: int = 64
    max_grad_norm: float | None = 0.25
    reward_scale: float = 0.001
    gamma: float = 1.0
    """Returns to go are discounted by gamma per step (1: the plain sums of the paper)."""

    def validate(self) -> None:
        super().validate()
        for name in ("context_length", "embed_dim", "n_layers", "n_heads", "max_timestep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"set {name} to e.g. 20 / 128 / 3")
        if self.embed_dim % self.n_heads:
            raise ConfigError(
                f"embed_dim={self.embed_dim} is not a multiple of n_heads={self.n_heads}",
                "set n_heads to a divisor of embed_dim (e.g. 1, 2, 4)",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} is outside [0, 1)", "set dropout to e.g. 0.1 (0: none)")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps and weight_decay must be >= 0", "set e.g. warmup_steps=10000")
        refused = {
            "online_steps": (self.online_steps > 0, "drop --online-steps (online fine-tuning of a DT is not built)"),
            "offline_ratio": (self.offline_ratio is not None, "drop offline_ratio, or use sac/td3 for hybrid runs"),
            "prioritized": (self.prioritized, "drop prioritized (windows are drawn uniformly)"),
            "n_step": (self.n_step != 1, "drop n_step (returns to go are whole-episode sums)"),
            "anneal_lr": (self.anneal_lr, "drop anneal_lr (the learning rate warms up, then stays: warmup_steps)"),
            "reward_bias": (self.reward_bias != 0.0, "drop reward_bias (reward_scale sets the returns' units)"),
            "reward_normalization": (self.reward_normalization != "none", "use reward_scale"),
        }
        for name, (bad, fix) in refused.items():
            if bad:
                raise ConfigError(f"dt learns offline from whole episodes: it takes no {name}", fix)


class DT:
    name = "dt"
    config_cls = DTConfig
    needs_mc_returns = True
    """The returns to go come from the replay buffer's Monte-Carlo returns (discounted by gamma, 1 by default)."""

    def __init__(self, cfg: DTConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.n_actions = int(act_space.n) if isinstance(act_space, gym.spaces.Discrete) else 0
        self.act_dim = 0 if self.discrete else int(np.prod(act_space.shape or ()))
        self.action_shape: tuple[int, ...] = () if self.discrete else (self.act_dim,)
        self.action_dtype = torch.long if self.discrete else torch.float32
        self.sequence_length = cfg.context_length
        """The loop's replay batches are windows of this many steps (ReplayBuffer.windows)."""
        self.opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm, weight_decay=cfg.weight_decay)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers = {"actor": self.opt.optimizer}

    @staticmethod
    def build_policy(cfg: DTConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        if isinstance(act_space, gym.spaces.Discrete):
            act_dim, n_actions, low, high = 0, int(act_space.n), None, None
        else:
            low, high = box_bounds(act_space, "dt", cfg)
            act_dim, n_actions = low.numel(), 0
        return DecisionTransformer(
            obs_dim(obs_space), act_dim, n_actions, low, high, context=cfg.context_length, embed_dim=cfg.embed_dim,
            layers=cfg.n_layers, heads=cfg.n_heads, dropout=cfg.dropout, activation=cfg.activation,
            max_timestep=cfg.max_timestep,
            target_return=float(cfg.target_return or 0.0), reward_scale=cfg.reward_scale,
        )  # fmt: skip

    @staticmethod
    def resolve_config(cfg: DTConfig, notes: list[str]) -> DTConfig:
        """target_return=None: the dataset's best episode return, written into the config (and so saved)."""
        if cfg.target_return is not None or cfg.dataset is None:
            return cfg
        from policylab.data.dataset import load_dataset

        best = float(load_dataset(cfg.dataset, validate=False).episode_returns().max())
        notes.append(f"target_return = {best:g}, the dataset's best episode return (--set target_return=R to change)")
        return dataclasses.replace(cfg, target_return=best)

    def loss(self, batch: Batch) -> Tensor:
        predicted = self.net(batch.obs, batch.actions, batch.returns, batch.timesteps, self.generator)
        mask, steps = batch.mask, batch.mask.sum()
        if self.discrete:
            per_step = F.cross_entropy(predicted.flatten(0, 1), batch.actions.flatten().long(), reduction="none")
            return (per_step * mask.flatten()).sum() / steps
        return ((predicted - batch.actions).pow(2).sum(-1) * mask).sum() / (steps * self.act_dim)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        """One AdamW step on a batch of windows; `index` (the updates so far) places it on the warm-up."""
        warmup = self.cfg.warmup_steps
        self.opt.optimizer.param_groups[0]["lr"] = self.cfg.lr * (min(1.0, (index + 1) / warmup) if warmup else 1.0)
        loss = self.loss(batch)
        self.opt.step(loss)
        return {"dt_loss": loss.detach()}

    def after_step(self, step: int) -> None:
        pass
