"""Bit flipping (Andrychowicz et al. 2017, arXiv:1707.01495, section 3.1), the goal-conditioned task HER was
introduced with: n bits, one flipped per step, reward -1 until the bits equal a random goal (0 then, and the
episode ends), n steps at most. With n = 15 or more, random exploration almost never sees a reward of 0, so an
agent learns only by hindsight relabelling. Registered as `BitFlipping-v0` (`--set env_kwargs={n_bits: 15}`;
`continuous: true` takes a Box action and flips the bits whose entry is > 0, for SAC, TD3 and TQC).

Observations are a Dict of `observation` (the bits), `achieved_goal` (the bits again) and `desired_goal`, as
goal-conditioned Gymnasium(-Robotics) envs give them; `compute_reward(achieved_goal, desired_goal, info)` works
on batches, as hindsight relabelling calls it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class BitFlippingEnv(gym.Env[dict[str, np.ndarray], Any]):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, n_bits: int = 10, continuous: bool = False, max_steps: int | None = None) -> None:
        if n_bits < 1:
            raise ValueError(f"n_bits={n_bits} must be >= 1")
        self.n_bits = n_bits
        self.continuous = continuous
        self.max_steps = n_bits if max_steps is None else max_steps
        bits = gym.spaces.Box(0.0, 1.0, (n_bits,), np.float32)
        self.observation_space = gym.spaces.Dict(  # type: ignore[assignment]
            [("observation", bits), ("achieved_goal", bits), ("desired_goal", bits)]
        )
        self.action_space: gym.Space = (
            gym.spaces.Box(-1.0, 1.0, (n_bits,), np.float32) if continuous else gym.spaces.Discrete(n_bits)
        )
        self.state = np.zeros(2 * n_bits + 1, np.int64)
        """The bits, the goal and the step count in one array (what policylab's checkpoints snapshot)."""

    def _obs(self) -> dict[str, np.ndarray]:
        n = self.n_bits
        bits = self.state[:n].astype(np.float32)
        goal = self.state[n : 2 * n].astype(np.float32)
        return {"observation": bits, "achieved_goal": bits.copy(), "desired_goal": goal}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.state = np.zeros(2 * self.n_bits + 1, np.int64)
        self.state[: 2 * self.n_bits] = self.np_random.integers(0, 2, 2 * self.n_bits)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        n = self.n_bits
        if self.continuous:
            flip = np.asarray(action).reshape(n) > 0
            self.state[:n] = np.where(flip, 1 - self.state[:n], self.state[:n])
        else:
            self.state[int(action)] = 1 - self.state[int(action)]
        self.state[-1] += 1
        obs = self._obs()
        reward = float(self.compute_reward(obs["achieved_goal"], obs["desired_goal"], {}))
        success = reward == 0.0
        return obs, reward, success, bool(self.state[-1] >= self.max_steps) and not success, {"is_success": success}

    def compute_reward(self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any) -> np.ndarray:
        """0 where the goal is reached, -1 elsewhere ([B] for batches of goals [B, n])."""
        missed = np.any(np.asarray(achieved_goal) != np.asarray(desired_goal), axis=-1)
        return np.where(missed, np.float32(-1.0), np.float32(0.0))


def register() -> None:
    if "BitFlipping-v0" not in gym.registry:
        gym.register(id="BitFlipping-v0", entry_point="policylab.envs.bitflip:BitFlippingEnv")
