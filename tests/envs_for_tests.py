"""Small envs that tests reach through the `module:function` form."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class NanRewardEnv(gym.Env):
    """Returns a NaN reward from step `nan_after` on, to trigger divergence detection."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, nan_after: int = 300) -> None:
        self.nan_after = nan_after
        self.t = 0
        self.total = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        self.total += 1
        reward = float("nan") if self.total > self.nan_after else 1.0
        obs = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return obs, reward, False, self.t >= 20, {}


class TupleActionEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(3)))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


def make_nan_env() -> gym.Env:
    return NanRewardEnv()
