"""Running statistics for observation normalization and reward scaling (numpy, float64)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class RunningMeanStd:
    """Mean and variance of a stream of batches (parallel Welford / Chan et al.)."""

    def __init__(self, shape: tuple[int, ...] = (), count: float = 1e-4) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = count

    def update(self, batch: np.ndarray) -> None:
        n = batch.shape[0]
        if n == 1:  # one env: the batch variance is 0 (skipping np.var halves the cost of a step)
            batch_mean, batch_m2 = batch[0], 0.0
        else:  # np.mean's and np.var's arithmetic without their dispatch (a fifth of the time on 2-row batches)
            batch_mean = np.add.reduce(batch, axis=0) / n
            centred = batch - batch_mean
            batch_m2 = np.add.reduce(centred * centred, axis=0)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.var = (self.var * self.count + batch_m2 + delta * delta * (self.count * n / total)) / total
        self.count = total

    def merge(self, other: dict[str, np.ndarray]) -> None:
        """Add the statistics of another stream (`state()` of a RunningMeanStd), as if its batches came here."""
        n = float(other["count"])
        if n <= 0:
            return
        delta = np.asarray(other["mean"]) - self.mean
        total = self.count + n
        m2 = np.asarray(other["var"]) * n
        self.mean = self.mean + delta * (n / total)
        self.var = (self.var * self.count + m2 + delta * delta * (self.count * n / total)) / total
        self.count = total

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var, "count": np.array(self.count)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.mean = np.asarray(state["mean"], np.float64).copy()
        self.var = np.asarray(state["var"], np.float64).copy()
        self.count = float(state["count"])


class ObsNormalizer:
    """(obs - mean) / sqrt(var + eps), clipped; statistics update only while training."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8, frozen: bool = False) -> None:
        self.rms = RunningMeanStd(shape)
        self.clip = clip
        self.eps = eps
        self.frozen = frozen
        """Never update (a fine-tuned policy keeps the statistics it was pretrained with)."""
        self.updates: RunningMeanStd | None = None
        """When set (a rollout worker), updates go here and `rms` stays frozen until the learner merges them."""

    def update(self, obs: np.ndarray) -> None:
        if not self.frozen:
            (self.rms if self.updates is None else self.updates).update(obs)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        scaled = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def tensor(self, obs: Tensor) -> Tensor:
        """`self(obs)` for a tensor of stored raw observations (replay or dataset batches), with the statistics of
        the moment."""
        mean = torch.as_tensor(self.rms.mean, dtype=obs.dtype, device=obs.device)
        std = torch.as_tensor(np.sqrt(self.rms.var + self.eps), dtype=obs.dtype, device=obs.device)
        return ((obs - mean) / std).clamp_(-self.clip, self.clip)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as SB3's VecNormalize does)."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.rms = RunningMeanStd(())
        self.returns = np.zeros(num_envs, np.float64)
        self.gamma = gamma
        self.clip = clip
        self.eps = eps
        self.updates: RunningMeanStd | None = None
        """As ObsNormalizer.updates: a rollout worker's updates, `rms` frozen meanwhile."""

    def __call__(self, reward: np.ndarray, episode_end: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + reward
        (self.rms if self.updates is None else self.updates).update(self.returns)
        scaled = np.clip(reward / np.sqrt(self.rms.var + self.eps), -self.clip, self.clip)
        self.returns[episode_end] = 0.0
        return scaled.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.rms.state(), "returns": self.returns}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.rms.load(state)
        self.returns = np.asarray(state["returns"], np.float64).copy()
