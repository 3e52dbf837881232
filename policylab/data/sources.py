"""Where the off-policy loop's batches come from: online replay, a dataset, or both.

The data regime is a setting, not a trainer: the same `ReplayBuffer` holds a dataset (loaded once, with
`add_episodes`, into preallocated tensors: sampling from a dataset costs what sampling from replay costs,
n-step returns included) or env experience, and `BatchSource` draws each batch from one of them or, with an
offline share p, p * B rows from the dataset and the rest from online replay (RLPD's symmetric sampling).
Every algorithm sees the same `Batch` fields whichever way a batch was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.data.batch import Batch
from policylab.data.replay import ReplayBuffer
from policylab.errors import DatasetError

if TYPE_CHECKING:
    from policylab.data.dataset import Dataset
    from policylab.envs import ObsNormalizer


def replay_actions(actions: np.ndarray, action_space: gym.Space) -> np.ndarray:
    """Env actions -> the replay format: Box actions scaled from [low, high] to [-1, 1] (what the off-policy
    actors and critics work in), Discrete actions as they are."""
    if isinstance(action_space, gym.spaces.Box):
        low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
        return (2.0 * (actions.astype(np.float32) - low) / (high - low) - 1.0).astype(np.float32)
    return actions


def dataset_buffer(
    dataset: Dataset,
    action_shape: tuple[int, ...],
    action_dtype: torch.dtype,
    *,
    n_step: int = 1,
    gamma: float = 0.99,
    extra_capacity: int = 0,
    prioritized: bool = False,
    per_alpha: float = 0.6,
    per_beta: float = 0.4,
    obs_normalizer: ObsNormalizer | None = None,
    device: str = "cpu",
    next_actions: bool = False,
    mc_returns: bool = False,
    reward_scale: float = 1.0,
    reward_bias: float = 0.0,
    action_chunk: int = 1,
    sequence_length: int = 0,
) -> ReplayBuffer:
    """A one-env replay buffer holding `dataset` (observations normalized by `obs_normalizer` if given), with
    room for `extra_capacity` more transitions (offline-to-online runs keep adding to it); `next_actions`: its
    batches carry the dataset's next actions, `mc_returns` the discounted returns-to-go (ReplayBuffer's flags).
    Rewards are stored as r * reward_scale + reward_bias; `action_chunk` > 1: batches carry the next H actions;
    `sequence_length` > 0: batches are windows of that many steps (ReplayBuffer.windows)."""
    obs = dataset.observations if obs_normalizer is None else obs_normalizer(dataset.observations)
    shape = tuple(obs.shape[1:])
    capacity = dataset.num_steps + dataset.num_episodes + 1 + extra_capacity
    buffer = ReplayBuffer(
        capacity,
        1,
        shape,
        action_shape,
        action_dtype,
        n_step=n_step,
        gamma=gamma,
        prioritized=prioritized,
        alpha=per_alpha,
        beta=per_beta,
        device=device,
        next_actions=next_actions,
        mc_returns=mc_returns,
        action_chunk=action_chunk,
        sequence_length=sequence_length,
        memory_fix=lambda fit: (
            f"use a dataset of at most about {fit:,} steps"
            + (f" with the online phase's buffer_size ({extra_capacity:,}) included" if extra_capacity else "")
        ),
    )
    actions = replay_actions(dataset.actions, dataset.action_space).reshape(len(dataset.actions), *action_shape)
    rewards = dataset.rewards
    if (reward_scale, reward_bias) != (1.0, 0.0):
        rewards = rewards * reward_scale + reward_bias
    buffer.add_episodes(obs, actions, rewards, dataset.terminations, dataset.episode_lengths)
    return buffer


def return_range_scale(dataset: Dataset) -> float:
    """1000 / (max - min episode return): the reward multiplier of the IQL paper's locomotion runs (and CORL's
    `normalize_reward`), so that advantages, and hence exp(beta A), have the same scale on every dataset."""
    returns = dataset.episode_returns()
    spread = float(returns.max() - returns.min()) if len(returns) else 0.0
    if not spread > 0.0:
        raise DatasetError(
            f"{dataset.name}: every episode has the same return, so reward_normalization=return_range is undefined",
            "drop reward_normalization (or set reward_scale instead)",
        )
    return 1000.0 / spread


def dataset_transitions(
    dataset: Dataset, action_shape: tuple[int, ...], obs_normalizer: ObsNormalizer | None = None
) -> tuple[Tensor, Tensor]:
    """Every step's observation (normalized by `obs_normalizer` if given) and action (replay format), as two
    float tensors [N, ...]: what algorithms that search the whole dataset (PRDC's nearest neighbours) take."""
    obs = dataset.observations[dataset.obs_index()]
    obs = obs if obs_normalizer is None else obs_normalizer(obs)
    actions = replay_actions(dataset.actions, dataset.action_space).reshape(len(dataset.actions), *action_shape)
    return torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(actions, dtype=torch.float32)


def dataset_normalizer(dataset: Dataset, clip: float) -> ObsNormalizer:
    """Observation normalization with the dataset's mean and variance (fixed for the whole run)."""
    from policylab.envs import ObsNormalizer

    normalizer = ObsNormalizer(tuple(dataset.observations.shape[1:]), clip)
    obs = dataset.observations.astype(np.float64)
    normalizer.rms.load({"mean": obs.mean(0), "var": obs.var(0), "count": np.array(float(len(obs)))})
    return normalizer


class BatchSource:
    """Draws replay batches: all from `online`, all from `offline`, or a fixed share from each."""

    def __init__(self, online: ReplayBuffer | None, offline: ReplayBuffer | None, offline_ratio: float) -> None:
        if online is None and offline is None:
            raise ValueError("a BatchSource needs a buffer")
        if not 0.0 <= offline_ratio <= 1.0:
            raise DatasetError(f"offline_ratio={offline_ratio} is outside [0, 1]", "set offline_ratio to e.g. 0.5")
        self.online, self.offline, self.offline_ratio = online, offline, offline_ratio

    def split(self, batch_size: int) -> tuple[int, int]:
        """(rows from the dataset, rows from online replay) of one batch."""
        if self.online is None:
            return batch_size, 0
        if self.offline is None:
            return 0, batch_size
        offline = int(round(batch_size * self.offline_ratio))
        return offline, batch_size - offline

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, fields: tuple[str, ...] | None = None
    ) -> Batch:
        """`fields`: the only ones the algorithm reads (ReplayBuffer.sample); None: all."""
        n_offline, n_online = self.split(batch_size)
        if n_online == 0:
            assert self.offline is not None
            return self.offline.sample(batch_size, generator, fields)
        if n_offline == 0:
            assert self.online is not None
            return self.online.sample(batch_size, generator, fields)
        assert self.offline is not None and self.online is not None
        first = self.offline.sample(n_offline, generator, fields)
        second = self.online.sample(n_online, generator, fields)
        mixed = [k for k in first.keys() if k != "indices"]  # indices of two buffers do not mix
        return Batch(**{k: torch.cat([getattr(first, k), getattr(second, k)]) for k in mixed})

    def update_priorities(self, batch: Batch, td_errors: torch.Tensor) -> None:
        """Prioritized replay: new priorities for a batch drawn from one buffer (mixed batches are refused by
        the config: their indices belong to two buffers)."""
        n_offline, _ = self.split(len(batch))
        buffer = self.offline if n_offline else self.online
        if buffer is not None and buffer.prioritized:
            buffer.update_priorities(batch.indices, td_errors)


class Demonstrations:
    """A dataset's steps as the on-policy algorithms' imitation term draws them: observations (raw; normalized
    when drawn, with the run's running statistics of the moment), actions in the policy head's stored format
    and discounted returns-to-go (for advantage weighting), preallocated once; `sample` is three index_selects."""

    def __init__(self, obs: Tensor, actions: Tensor, returns: Tensor, normalizer: ObsNormalizer | None) -> None:
        self.obs, self.actions, self.returns, self.normalizer = obs, actions, returns, normalizer

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        to_head: Callable[[Tensor], Tensor],
        gamma: float,
        normalizer: ObsNormalizer | None,
        device: str = "cpu",
    ) -> Demonstrations:
        """`to_head` maps env actions to the head's format (`head.from_env`)."""
        obs = torch.as_tensor(dataset.observations[dataset.obs_index()], dtype=torch.float32, device=device)
        actions = to_head(torch.as_tensor(dataset.actions, device=device))
        returns = torch.as_tensor(dataset.returns_to_go(gamma), device=device)
        return cls(obs, actions, returns, normalizer)

    def __len__(self) -> int:
        return len(self.returns)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Batch:
        index = torch.randint(len(self), (n,), generator=generator, device=self.returns.device)
        obs = self.obs.index_select(0, index)
        if self.normalizer is not None:
            obs = self.normalizer.tensor(obs)
        return Batch(obs=obs, actions=self.actions.index_select(0, index), returns=self.returns.index_select(0, index))
