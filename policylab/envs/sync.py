"""N environments stepped one after another in this process, with same-step autoreset.

What Gymnasium's `SyncVectorEnv(autoreset_mode=SAME_STEP)` does, minus what the
training loop never reads (merged info dicts, space-generic batching): about
40 us less per call, which is more than a MuJoCo physics step of
InvertedPendulum. Seeds, resets and final observations are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np


class SyncEnvs:
    def __init__(self, make_one: Callable[[], gym.Env], num_envs: int) -> None:
        self.envs = [make_one() for _ in range(num_envs)]
        self.num_envs = num_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.metadata = self.envs[0].metadata

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        obs = [env.reset(seed=None if seed is None else seed + i)[0] for i, env in enumerate(self.envs)]
        return np.stack(obs), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        obs: list[Any] = [None] * n
        rewards = np.zeros(n, np.float64)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        finals: dict[int, Any] = {}
        for i, env in enumerate(self.envs):
            o, rewards[i], terminated[i], truncated[i], _ = env.step(actions[i])
            if terminated[i] or truncated[i]:
                finals[i] = o
                o, _ = env.reset()
            obs[i] = o
        batch = np.stack(obs)
        if not finals:
            return batch, rewards, terminated, truncated, {}
        final_obs = batch.copy()
        mask = np.zeros(n, bool)
        for i, o in finals.items():
            final_obs[i] = o
            mask[i] = True
        return batch, rewards, terminated, truncated, {"final_obs": final_obs, "_final_obs": mask}

    def close(self) -> None:
        for env in self.envs:
            env.close()
