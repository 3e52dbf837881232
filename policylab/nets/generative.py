"""Expressive policy heads behind one interface, and the actor that acts with them (chunks, receding horizon).

Every head is an `nn.Module` over x in R^D (D = horizon * act_dim: one action, or a chunk of H actions flattened),
in [-1, 1] units, conditioned on observation features [B, O] through its `denoiser` (nets/denoiser.py):

    head.loss(obs, x, generator)                          -> [B]  per-sample training loss at fresh random draws
    head.sample(obs, generator, steps=None, deterministic=False) -> [B, D] in [-1, 1]
    head.dim, head.denoiser, head.sample_steps

    DiffusionHead (nets/diffusion.py): DDPM training, DDIM / DDPM sampling; DPPO's per-step Gaussians:
        sample_chain(obs, generator, steps, eta, min_std) -> (chain [K+1, B, D], log-probs [K, B])
        chain_log_prob(obs, chain, eta, min_std) -> [K, B]
        per_sample_loss(obs, x0, noise, t)
    FlowHead (nets/flow.py): conditional flow matching, Euler sampling; FPO's
        per_sample_loss(obs, x1, noise, t) -> [B]
    ConsistencyHead (nets/consistency.py): consistency training, one-step sampling.

`deterministic=True` of a head is its zero-noise sample, a fixed function of obs: on multimodal data it may fall
between the modes, so the actor below draws even when asked to act "deterministically" unless told otherwise.

Action chunks (Diffusion Policy, Chi et al. 2023): with horizon H the head models the next H actions as one x;
acting executes the first `act_steps` = k of them, then plans again (receding horizon). Per env the actor keeps
its plan [B, H, A] and how many of its actions were used [B] as tensors; the envs whose plan ran out (or whose
episode ended: `reset_memory(ended)`) are planned again in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from policylab.nets.consistency import ConsistencyHead
from policylab.nets.critics import _BoundedActor, scale_to_bounds
from policylab.nets.denoiser import Denoiser
from policylab.nets.diffusion import DiffusionHead
from policylab.nets.flow import FlowHead

GENERATIVE_HEADS = ("diffusion", "flow", "consistency")


class GenerativeHead(Protocol):
    """What DiffusionHead, FlowHead and ConsistencyHead share (see the module docstring)."""

    dim: int
    denoiser: Denoiser
    sample_steps: int

    def loss(self, obs: Tensor, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def sample(
        self, obs: Tensor, generator: torch.Generator | None = None, steps: int | None = None,
        deterministic: bool = False,
    ) -> Tensor: ...  # fmt: skip


def make_generative_head(
    kind: str,
    obs_dim: int,
    dim: int,
    hidden_sizes: Sequence[int] = (256, 256, 256),
    activation: str = "silu",
    *,
    train_steps: int = 20,
    sample_steps: int | None = None,
    schedule: str = "cosine",
    eta: float = 0.0,
    time_sampling: str = "uniform",
    sigma_max: float = 80.0,
    consistency_loss: str = "ict",
    consistency_sigmas: Sequence[float] | None = None,
) -> DiffusionHead | FlowHead | ConsistencyHead:
    """A head of `kind` (diffusion, flow, consistency) over x in R^dim with a fresh MLP denoiser.
    `train_steps`: DDPM's T, or the consistency grid's N; `sample_steps`: DDIM's K (default T), Euler's K (default
    10), consistency evaluations (default 1)."""
    denoiser = Denoiser(obs_dim, dim, hidden_sizes, activation)
    if kind == "diffusion":
        return DiffusionHead(denoiser, train_steps, schedule, sample_steps, eta)
    if kind == "flow":
        return FlowHead(denoiser, sample_steps or 10, time_sampling)
    if kind == "consistency":
        return ConsistencyHead(
            denoiser,
            train_steps,
            sigma_max=sigma_max,
            sample_steps=sample_steps or 1,
            loss_kind=consistency_loss,
            sigmas=consistency_sigmas,
        )
    raise ValueError(f"unknown generative head {kind!r}: use one of {', '.join(GENERATIVE_HEADS)}")


class GenerativeActor(_BoundedActor):
    """A Box policy acting through a generative head: actions in [-1, 1] (the replay format), chunks of
    `horizon` actions executed `act_steps` at a time; `env_action` scales them to the env's bounds."""

    def __init__(
        self,
        head: DiffusionHead | FlowHead | ConsistencyHead,
        low: Tensor,
        high: Tensor,
        horizon: int = 1,
        act_steps: int = 1,
        draw_when_deterministic: bool = True,
    ) -> None:
        super().__init__(low, high)
        self.act_dim = low.numel()
        if head.dim != horizon * self.act_dim or not 1 <= act_steps <= horizon:
            raise ValueError(f"head dim {head.dim} != horizon {horizon} x act_dim {self.act_dim}, or act_steps "
                             f"{act_steps} not in 1 .. horizon")  # fmt: skip
        self.head = head
        self.horizon, self.act_steps = horizon, act_steps
        self.draw_when_deterministic = draw_when_deterministic
        """`env_action(deterministic=True)` still draws the initial noise (from the caller's generator) and only
        uses the head's zero-noise sample when this is false."""
        self._plan: Tensor | None = None  # [B, H, A]
        self._used: Tensor | None = None  # [B] actions of each plan already executed

    def loss(self, obs: Tensor, chunks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss [B] of dataset actions [B, A] or chunks [B, H, A] in [-1, 1]."""
        return self.head.loss(obs, chunks.reshape(chunks.shape[0], -1), generator)

    def plan(self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
        """A fresh chunk [B, H, A] in [-1, 1] for each observation."""
        x = self.head.sample(obs, generator, deterministic=deterministic)
        return x.view(obs.shape[0], self.horizon, self.act_dim)

    def forward(self, obs: Tensor) -> Tensor:
        """The head's zero-noise first action [B, A] (no plan kept): a fixed function of obs."""
        return self.plan(obs, deterministic=True)[:, 0]

    def act(self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
        """This step's action [B, A] in [-1, 1]: the next of each env's plan; envs without one left plan again."""
        zero_noise = deterministic and not self.draw_when_deterministic
        if self.horizon == 1:
            return self.plan(obs, generator, zero_noise)[:, 0]
        n = obs.shape[0]
        if self._plan is None or self._used is None or self._plan.shape[0] != n:
            self._plan = torch.empty((n, self.horizon, self.act_dim), device=obs.device)
            self._used = torch.full((n,), self.act_steps, dtype=torch.long, device=obs.device)
        stale = self._used >= self.act_steps
        if bool(stale.all()):  # the common case (all envs step together): one plan for all, no gather
            self._plan = self.plan(obs, generator, zero_noise)
            self._used.zero_()
        elif bool(stale.any()):
            self._plan[stale] = self.plan(obs[stale], generator, zero_noise)
            self._used[stale] = 0
        action = self._plan[torch.arange(n, device=obs.device), self._used]
        self._used += 1
        return action

    def reset_memory(self, ended: np.ndarray | None = None) -> None:
        """Drop the plans of every env (None) or of the envs where `ended` is true: they plan at their next step."""
        if self._used is None:
            return
        if ended is None:
            self._plan = self._used = None
        elif bool(np.any(ended)):
            with torch.inference_mode():  # the plans were made while acting, in inference mode
                mask = torch.as_tensor(np.asarray(ended, bool), device=self._used.device)
                self._used[mask] = self.act_steps

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        return scale_to_bounds(self.act(obs, generator, deterministic), self.low, self.high)
