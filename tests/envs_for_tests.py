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


class MultiTargetEnv(gym.Env):
    """MultiDiscrete([3, 4]) actions: each step shows a one-hot target per dimension; reward is the
    fraction of dimensions matched. 16 steps per episode: random play earns about 4.7, perfect play 16."""

    nvec = (3, 4)
    observation_space = gym.spaces.Box(0.0, 1.0, (7,), np.float32)
    action_space = gym.spaces.MultiDiscrete(list(nvec))

    def _observe(self) -> np.ndarray:
        self.target = np.array([self.np_random.integers(n) for n in self.nvec])
        obs = np.zeros(7, np.float32)
        obs[self.target[0]] = 1.0
        obs[3 + self.target[1]] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        reward = float(np.mean(np.asarray(action) == self.target))
        self.t += 1
        return self._observe(), reward, False, self.t >= 16, {}


class SparseGoalEnv(gym.Env):
    """A point on a line, x_0 = 0, x' = clip(x + 0.1 a, -2, 2) for a in [-1, 1]; reward 1 at every step that
    ends with x >= 1.5, else 0; 30 steps per episode. Moving right all the way earns 16; a random walk of 30
    steps (std about 0.3) almost never gets there, so exploration, not credit assignment, is what is hard."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.x, self.t = 0.0, 0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.1 * float(np.asarray(action).reshape(-1)[0]), -2.0, 2.0))
        self.t += 1
        reward = 1.0 if self.x >= 1.5 else 0.0
        return np.array([self.x], np.float32), reward, False, self.t >= 30, {}
