"""Hindsight experience replay (Andrychowicz et al. 2017, arXiv:1707.01495) as a way of drawing replay batches.

The buffer stores what the envs returned (the goal-conditioned Dict observations encoded as one vector, see
envs/encode.py). When a batch is drawn, a share `1 - 1 / (1 + her_goals)` of its rows (0.8 with 4 goals per
transition, as SB3's `n_sampled_goal=4`) gets a new goal: the goal the agent reached later in the same episode
(`future`), at its end (`final`) or anywhere in it (`episode`). The row's `desired_goal` in obs and next_obs
becomes that goal, and its reward `compute_reward(next achieved_goal, new goal, info)` from the env, vectorized
over the rows. So any off-policy algorithm trains with hindsight goals without knowing it: the batch has the
same fields, and relabelling costs one gather and one call per batch, not a pass over the buffer.

As in SB3, `terminated` keeps its stored value (an episode that ended because it reached its own goal stays
ended under the new goal). Goals are drawn from running episodes too (up to their latest step), and
relabelling happens before running observation normalization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from policylab.errors import ConfigError

if TYPE_CHECKING:
    from policylab.data.batch import Batch
    from policylab.data.replay import ReplayBuffer

HER_STRATEGIES = ("future", "final", "episode")
GOAL_KEYS = ("achieved_goal", "desired_goal")


class HindsightRelabeler:
    """Rewrites the goals and rewards of a share of each batch drawn from a `ReplayBuffer` that tracks episodes."""

    def __init__(
        self,
        compute_reward: Callable[[np.ndarray, np.ndarray, Any], Any],
        achieved: slice,
        desired: slice,
        goal_shape: tuple[int, ...],
        strategy: str = "future",
        goals_per_transition: int = 4,
        reward_scale: float = 1.0,
        reward_bias: float = 0.0,
    ) -> None:
        self.compute_reward = compute_reward
        self.achieved, self.desired, self.goal_shape = achieved, desired, goal_shape
        self.strategy = strategy
        self.ratio = 1.0 - 1.0 / (1.0 + goals_per_transition)
        self.reward_scale, self.reward_bias = reward_scale, reward_bias

    def __call__(self, buffer: ReplayBuffer, batch: Batch, generator: torch.Generator | None) -> None:
        """Relabel the first `ratio * B` rows of `batch` in place (the rows are in random order already)."""
        n = int(self.ratio * len(batch))
        if n == 0:
            return
        assert buffer.episode_first is not None and buffer.episode_last is not None
        index = batch.indices[:n]
        slots, envs = index // buffer.num_envs, index % buffer.num_envs
        last = buffer.episode_last[slots, envs]
        running = last < 0  # the episode has not ended: its latest step so far
        last = torch.where(running, (buffer.ptr[envs] - 1) % buffer.slots, last)
        u = torch.rand(n, generator=generator, device=index.device)
        if self.strategy == "final":
            chosen = last
        elif self.strategy == "future":  # a step from this one to the last, uniformly
            span = (last - slots) % buffer.slots + 1
            chosen = (slots + (u * span).long()) % buffer.slots
        else:
            first = buffer.episode_first[slots, envs]
            span = (last - first) % buffer.slots + 1
            chosen = (first + (u * span).long()) % buffer.slots
        # the goal reached by the chosen step: the achieved goal of its next observation (the slot after it)
        goals = buffer.obs[(chosen + 1) % buffer.slots, envs][:, self.achieved]
        batch.obs[:n, self.desired] = goals
        batch.next_obs[:n, self.desired] = goals
        shape = (n, *self.goal_shape)
        achieved = batch.next_obs[:n, self.achieved].cpu().numpy().reshape(shape)
        rewards = self.compute_reward(achieved, goals.cpu().numpy().reshape(shape), [{} for _ in range(n)])
        rewards = torch.as_tensor(np.asarray(rewards, np.float32).reshape(n), device=batch.rewards.device)
        if (self.reward_scale, self.reward_bias) != (1.0, 0.0):
            rewards = rewards * self.reward_scale + self.reward_bias
        batch.rewards[:n] = rewards


def her_relabeler(env: gym.Env, raw_space: gym.Space, env_id: str, cfg: Any) -> HindsightRelabeler:
    """The relabeler of a run with `her=true`, checked against its env: goal-conditioned Dict observations (with
    `achieved_goal` and `desired_goal` of the same vector shape) and a `compute_reward` on the env."""
    from policylab.envs.encode import ObservationEncoder, needs_encoding

    keys = list(raw_space.spaces) if isinstance(raw_space, gym.spaces.Dict) else []
    if not set(GOAL_KEYS) <= set(keys) or not needs_encoding(raw_space):
        raise ConfigError(
            f"her=true needs goal-conditioned observations, a Dict with {' and '.join(GOAL_KEYS)}; {env_id!r} "
            f"observes {raw_space}",
            "use a goal-conditioned env (e.g. BitFlipping-v0, Gymnasium-Robotics' Fetch tasks), or drop her",
        )
    assert isinstance(raw_space, gym.spaces.Dict)
    achieved, desired = raw_space[GOAL_KEYS[0]], raw_space[GOAL_KEYS[1]]
    if not all(isinstance(s, (gym.spaces.Box, gym.spaces.MultiBinary)) for s in (achieved, desired)) or (
        achieved.shape != desired.shape
    ):
        raise ConfigError(
            f"her=true relabels goals that are vectors of one shape; {env_id!r} has achieved_goal {achieved} and "
            f"desired_goal {desired}",
            "give the env Box goals of the same shape, or drop her",
        )
    compute_reward = getattr(env.unwrapped, "compute_reward", None)
    if not callable(compute_reward):
        raise ConfigError(
            f"her=true recomputes rewards for new goals with the env's compute_reward(achieved_goal, desired_goal, "
            f"info), and {env_id!r} ({type(env.unwrapped).__name__}) has none",
            "add a vectorized compute_reward method to the env (as Gymnasium-Robotics' GoalEnv has), or drop her",
        )
    slices = ObservationEncoder(raw_space).slices
    return HindsightRelabeler(
        compute_reward,
        slices[GOAL_KEYS[0]],
        slices[GOAL_KEYS[1]],
        tuple(desired.shape or ()),
        cfg.her_strategy,
        cfg.her_goals,
        cfg.reward_scale,
        cfg.reward_bias,
    )


def check_her_config(cfg: Any) -> None:
    """The settings HER cannot run with: one error naming the fix."""
    if cfg.her_strategy not in HER_STRATEGIES:
        raise ConfigError(f"her_strategy={cfg.her_strategy!r} is not one of {', '.join(HER_STRATEGIES)}", "use future")
    if cfg.her_goals < 1:
        raise ConfigError(f"her_goals={cfg.her_goals} must be >= 1", "set her_goals to e.g. 4 (SB3's n_sampled_goal)")
    if not cfg.her:
        return
    refusals = {
        "a dataset": cfg.dataset,
        "n_step > 1": cfg.n_step > 1,
        "prioritized replay": cfg.prioritized,
    }
    for what, present in refusals.items():
        if present:
            raise ConfigError(f"her=true does not combine with {what}", "drop her, or the other setting")
