"""Pendulum-v1 for N envs in numpy: Gymnasium's dynamics on arrays, the same trajectories as N separate envs.

Gymnasium has no vector Pendulum, so N envs were N Python `step` calls behind `SyncEnvs` (with the wrappers'
checks around each), a large part of an A2C Pendulum run's time (`benchmarks/gsde.py --algo a2c`). Here one call
steps all N with Gymnasium's expressions, expression for expression and in the same dtypes (the action's float32
terms, float64 state), so every observation, reward and reset is the same bits as N `gym.make("Pendulum-v1")`
envs behind `SyncEnvs` (tests/test_envs.py checks it): each env keeps its own generator, seeded seed + i, that
draws its starts, and the TimeLimit's 200 steps are counted per env. Snapshots have `SyncEnvs`'s per-env format, so
checkpoints move between the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.classic_control.pendulum import DEFAULT_X, DEFAULT_Y, PendulumEnv
from gymnasium.utils import seeding

StepReturn = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


class PendulumVectorEnv:
    """N Pendulum-v1 envs with same-step autoreset (the `SyncEnvs` contract)."""

    def __init__(self, num_envs: int, max_episode_steps: int = 200, g: float = 10.0) -> None:
        single = PendulumEnv(g=g)
        self.num_envs, self.max_episode_steps = num_envs, max_episode_steps
        self.single_observation_space = single.observation_space
        self.single_action_space = single.action_space
        self.metadata = single.metadata
        self.max_speed, self.max_torque, self.dt = single.max_speed, single.max_torque, single.dt
        self.g, self.m, self.length = single.g, single.m, single.l
        single.close()
        self.high = np.array([DEFAULT_X, DEFAULT_Y])
        self.state = np.zeros((2, num_envs))  # theta, theta_dot (float64, as Gymnasium's)
        self.steps = np.zeros(num_envs, np.int64)
        self.generators: list[np.random.Generator] = []

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Env i seeded with seed + i (as `SyncEnvs`), or from fresh entropy without a seed the first time."""
        if seed is not None or not self.generators:
            self.generators = [seeding.np_random(None if seed is None else seed + i)[0] for i in range(self.num_envs)]
        for i in range(self.num_envs):
            self._start(i)
        return self._obs(), {}

    def _start(self, i: int) -> None:
        self.state[:, i] = self.generators[i].uniform(low=-self.high, high=self.high)
        self.steps[i] = 0

    def _obs(self) -> np.ndarray:
        theta, theta_dot = self.state
        return np.stack([np.cos(theta), np.sin(theta), theta_dot], axis=1).astype(np.float32)

    def step(self, actions: np.ndarray) -> StepReturn:
        """PendulumEnv.step's expressions on arrays (u keeps the action's dtype, as there)."""
        th, thdot = self.state
        g, m, length, dt = self.g, self.m, self.length, self.dt
        u = np.clip(np.asarray(actions).reshape(self.num_envs, -1)[:, 0], -self.max_torque, self.max_torque)
        costs = (((th + np.pi) % (2 * np.pi)) - np.pi) ** 2 + 0.1 * thdot**2 + 0.001 * (u**2)
        newthdot = thdot + (3 * g / (2 * length) * np.sin(th) + 3.0 / (m * length**2) * u) * dt
        newthdot = np.clip(newthdot, -self.max_speed, self.max_speed)
        newth = th + newthdot * dt
        self.state = np.stack([newth, newthdot])
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        terminated = np.zeros(self.num_envs, bool)
        obs = self._obs()
        if not truncated.any():
            return obs, -costs, terminated, truncated, {}
        final_obs = obs.copy()
        for i in np.flatnonzero(truncated):
            self._start(int(i))
        obs[truncated] = self._obs()[truncated]
        return obs, -costs, terminated, truncated, {"final_obs": final_obs, "_final_obs": truncated.copy()}

    def get_state(self) -> dict[str, Any]:
        """`SyncEnvs`'s snapshot format: per env its state, generator and elapsed steps."""
        return {
            "envs": [
                {
                    "arrays": {"state": self.state[:, i].copy()},
                    "rng": generator.bit_generator.state,
                    "elapsed": int(self.steps[i]),
                }
                for i, generator in enumerate(self.generators)
            ]
        }

    def set_state(self, snapshot: dict[str, Any]) -> None:
        envs = snapshot["envs"]
        self.generators = [np.random.Generator(np.random.PCG64()) for _ in envs]
        for i, (generator, env) in enumerate(zip(self.generators, envs, strict=True)):
            self.state[:, i] = np.asarray(env["arrays"]["state"], dtype=np.float64)
            generator.bit_generator.state = env["rng"]
            self.steps[i] = int(env["elapsed"] or 0)

    def close(self) -> None:
        pass
