"""Gymnasium's numpy-vectorized CartPole with same-step autoreset.

Gymnasium's `CartPoleVectorEnv` resets a finished env on the *next* call to
`step` (its action is ignored and a zero-reward transition is emitted). The
training loop wants every transition to be real, so this subclass resets the
finished envs in the same step and hands back their final observations, as
Gymnasium's sync/async vector envs do with `AutoresetMode.SAME_STEP`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv


class SameStepCartPoleVectorEnv(CartPoleVectorEnv):
    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        done = self.prev_done
        if done.any():
            final_obs = obs.copy()
            count = int(done.sum())
            self.state[:, done] = self.np_random.uniform(low=self.low, high=self.high, size=(4, count))
            self.steps[done] = 0
            self.prev_done = np.zeros_like(done)
            obs = self.state.T.astype(np.float32)
            info = {"final_obs": final_obs, "_final_obs": done.copy()}
        return obs, reward, terminated, truncated, info

    def get_state(self) -> dict[str, Any]:
        return {
            "arrays": {"state": self.state.copy(), "steps": self.steps.copy()},
            "rng": self.np_random.bit_generator.state,
        }

    def set_state(self, snapshot: dict[str, Any]) -> None:
        self.state = np.array(snapshot["arrays"]["state"], dtype=np.float64)
        self.steps = np.array(snapshot["arrays"]["steps"], dtype=np.int32)
        self.prev_done = np.zeros(self.num_envs, dtype=np.bool_)
        self.np_random.bit_generator.state = snapshot["rng"]
