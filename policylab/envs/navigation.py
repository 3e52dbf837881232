"""A multimodal 2-D navigation task: two equally good routes around a round obstacle, and an expert that takes
either. Registered as `Navigation2D-v0`.

A point starts at p0 = (-1, 0) + U([-0.05, 0.05] x [-0.03, 0.03]) and must reach the goal g = (1, 0); a disc of
radius 0.5 at the origin lies across the straight line. Observations are the position p (Box(2)); actions are a
velocity a in [-1, 1]^2, and p <- clip(p + 0.15 a, -2, 2). Each step's reward is the progress
|p_prev - g| - |p - g|, plus 1 on reaching the goal (|p - g| < 0.15: the episode terminates) or minus 1 on
entering the disc (a collision: it terminates); 50 steps at most. `info["is_success"]` marks the goal.

The expert (`expert(obs)`, a plain function of a batch of positions) flies around the disc above or below it:
    |y| < 0.08 (still on the start line): a = (0.3, s) / |(0.3, s)|, the side s = +-1 drawn per episode
    else:                                 a = unit vector to w = (0, 0.8 sign y) while x < -0.05, then to g
Both routes take 18-19 steps (return about 3). The side s is a coin flip read from the start position's
low-order digits (s = +1 when floor(10^4 x) is even), so the expert is stateless and reproducible from the env
seed, while to a policy it is random: at the start the dataset's actions are two clusters, (0.29, 0.96) and
(0.29, -0.96). Their average (0.6, 0) points at the disc, which is where a unimodal (Gaussian or
deterministic) behaviour-cloning policy goes; a diffusion or flow policy draws one of the two.

`navigation_dataset(out, episodes)` writes N expert episodes as a policylab dataset (the same writer and format
as `policylab collect`; `policylab collect --env Navigation2D-v0 --policy policylab.envs.navigation:expert`
makes the same one from the command line).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from policylab.errors import PolicylabError

if TYPE_CHECKING:
    from policylab.data.dataset import Dataset

ENV_ID = "Navigation2D-v0"

GOAL = np.array([1.0, 0.0], np.float32)
START = np.array([-0.6, 0.0], np.float32)
START_SPREAD = np.array([0.1, 0.0], np.float32)
OBSTACLE_RADIUS = 0.4
GOAL_RADIUS = 0.2
MAX_SPEED = 0.25
BOUND = 2.0
LINE_BAND = 0.1
WAYPOINT_Y = 0.9
TURN_FORWARD = 0.3
WAYPOINT_UNTIL_X = -0.05


class NavigationEnv(gym.Env[np.ndarray, np.ndarray]):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, max_steps: int = 50) -> None:
        self.max_steps = max_steps
        self.observation_space = gym.spaces.Box(-BOUND, BOUND, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.state = np.zeros(3, np.float64)
        """The position and the step count in one array (what policylab's checkpoints snapshot)."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.state = np.zeros(3, np.float64)
        self.state[:2] = START + self.np_random.uniform(-START_SPREAD, START_SPREAD)
        return self.state[:2].astype(np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        before = float(np.linalg.norm(self.state[:2] - GOAL))
        velocity = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        self.state[:2] = np.clip(self.state[:2] + MAX_SPEED * velocity, -BOUND, BOUND)
        self.state[2] += 1
        after = float(np.linalg.norm(self.state[:2] - GOAL))
        success = after < GOAL_RADIUS
        collision = float(np.linalg.norm(self.state[:2])) < OBSTACLE_RADIUS
        reward = before - after + (1.0 if success else 0.0) - (1.0 if collision else 0.0)
        terminated = success or collision
        truncated = bool(self.state[2] >= self.max_steps) and not terminated
        info = {"is_success": success, "collision": collision}
        return self.state[:2].astype(np.float32), reward, terminated, truncated, info


def expert(obs: np.ndarray) -> np.ndarray:
    """The expert's velocities [B, 2] for positions [B, 2] (see the module docstring): vectorized, no state."""
    pos = np.asarray(obs, np.float64).reshape(-1, 2)
    x, y = pos[:, 0], pos[:, 1]
    on_line = np.abs(y) < LINE_BAND
    coin = np.where(np.floor(x * 1e4).astype(np.int64) % 2 == 0, 1.0, -1.0)
    side = np.where(on_line, coin, np.sign(y))
    waypoint = np.stack([np.zeros_like(y), WAYPOINT_Y * side], -1)
    direction = np.where((x < WAYPOINT_UNTIL_X)[:, None], waypoint, GOAL[None].astype(np.float64)) - pos
    direction = np.where(on_line[:, None], np.stack([np.full_like(y, TURN_FORWARD), side], -1), direction)
    return (direction / np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-8)).astype(np.float32)


def navigation_dataset(
    out: str | Path | None = None, episodes: int = 200, seed: int = 0, mirror: bool = True, overwrite: bool = False
) -> Dataset:
    """`episodes` expert episodes of Navigation2D-v0 as a policylab Dataset (written to `out` if given).

    `mirror`: half of them collected, the other half their reflections y -> -y (the task is symmetric, so each is
    an expert episode too), so that the two routes are exactly equally common; else all collected (the same as
    `policylab collect --policy policylab.envs.navigation:expert`, where the routes' shares are coin flips)."""
    from policylab.collect import collect
    from policylab.data.dataset import concat_datasets, write_dataset

    if mirror and episodes % 2:
        raise PolicylabError(f"episodes={episodes} cannot be mirrored in halves", "pass an even number of episodes")
    collected = collect(ENV_ID, expert, episodes // 2 if mirror else episodes, seed=seed, name="navigation-expert")
    dataset = concat_datasets([collected, reflected(collected)]) if mirror else collected
    dataset.metadata = {**collected.metadata, "description": f"{episodes} expert episodes of {ENV_ID}"
                        + (" (half of them mirrored)" if mirror else ""), "mirrored": mirror}  # fmt: skip
    dataset.metadata["collected_with"] = {**collected.metadata["collected_with"], "episodes": episodes}
    dataset.ref_min_score, dataset.ref_max_score = collected.ref_min_score, collected.ref_max_score
    if out is not None:
        dataset.path = write_dataset(dataset, out, overwrite=overwrite)
    return dataset


def reflected(dataset: Dataset) -> Dataset:
    """The dataset with every position and velocity reflected in the x axis (y -> -y)."""
    flip = np.array([1.0, -1.0], np.float32)
    return replace(dataset, observations=dataset.observations * flip, actions=dataset.actions * flip, path=None)


def register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="policylab.envs.navigation:NavigationEnv")
