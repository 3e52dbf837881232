"""CartPoleNoVel: CartPole-v1 without the velocities (cart position and pole angle only), the memory task rl-zoo
uses for SB3-contrib's RecurrentPPO (its `CartPoleNoVel-v1`). Importable by both sides as
`memory_envs:CartPoleNoVel` (benchmarks/ is on the path of a benchmark's workers).

A helper module of `recurrent.py`, not a benchmark: it has nothing to run."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class CartPoleNoVel(CartPoleEnv):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        high = np.array([self.x_threshold * 2, self.theta_threshold_radians * 2], dtype=np.float32)
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)

    @staticmethod
    def _positions(obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32)[[0, 2]]

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super().reset(**kwargs)
        return self._positions(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        return self._positions(obs), float(reward), terminated, truncated, info


def make() -> gym.Env:
    """CartPoleNoVel with CartPole-v1's 500-step limit."""
    return gym.wrappers.TimeLimit(CartPoleNoVel(), max_episode_steps=500)


if __name__ == "__main__":
    print(__doc__)
