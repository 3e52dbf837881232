"""Gymnasium's numpy-vectorized CartPole with same-step autoreset and a leaner step.

Gymnasium's `CartPoleVectorEnv` resets a finished env on the *next* call to
`step` (its action is ignored and a zero-reward transition is emitted). The
training loop wants every transition to be real, so this subclass resets the
finished envs in the same step and hands back their final observations, as
Gymnasium's sync/async vector envs do with `AutoresetMode.SAME_STEP`.

`step` repeats Gymnasium's dynamics expression for expression (the
trajectories are bit-identical: tests/test_envs.py checks it) but skips the
per-step `action_space.contains` check and the next-step reset bookkeeping,
which cost more than the physics for 8 envs. Actions must be 0 or 1.

With one env (the off-policy presets) the same expressions (`_dynamics`) run on
Python floats instead of 1-element arrays: every numpy call on a tiny array
costs about half a microsecond, and the step takes about a quarter of the time
(`benchmarks/micro.py --only breakdown`: env steps 10 us per DQN update instead
of 43). The results are the same bits: IEEE float64 arithmetic either way,
numpy's cos and sin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

StepReturn = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


class SameStepCartPoleVectorEnv(CartPoleVectorEnv):
    state: Any  # [4, num_envs] float64 after reset (None before)

    def step(self, action: np.ndarray) -> StepReturn:
        assert self.state is not None, "Call reset before using step method."
        return self._step_single(action) if self.num_envs == 1 else self._step_vector(action)

    def _step_vector(self, action: np.ndarray) -> StepReturn:
        force = np.sign(action - 0.5) * self.force_mag
        x, x_dot, theta, theta_dot = self._dynamics(self.state, force, np.cos(self.state[2]), np.sin(self.state[2]))
        self.state = np.stack((x, x_dot, theta, theta_dot))
        terminated = (
            (x < -self.x_threshold)
            | (x > self.x_threshold)
            | (theta < -self.theta_threshold_radians)
            | (theta > self.theta_threshold_radians)
        )
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        if self._sutton_barto_reward:
            reward = -np.array(terminated, dtype=np.float32)
        else:
            reward = np.ones_like(terminated, dtype=np.float32)
        obs = self.state.T.astype(np.float32)
        done = terminated | truncated
        info: dict[str, Any] = {}
        if done.any():
            info = {"final_obs": obs, "_final_obs": done}
            self.state[:, done] = self.np_random.uniform(low=self.low, high=self.high, size=(4, int(done.sum())))
            self.steps[done] = 0
            obs = self.state.T.astype(np.float32)
        return obs, reward, terminated, truncated, info

    def _dynamics(self, state: Any, force: Any, costheta: Any, sintheta: Any) -> tuple[Any, Any, Any, Any]:
        """Gymnasium's CartPole physics, expression for expression, on arrays or on Python floats (t * t for
        np.square(t): the same bits). `state`: (x, x_dot, theta, theta_dot)."""
        x, x_dot, theta, theta_dot = state
        temp = (force + self.polemass_length * (theta_dot * theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * (costheta * costheta) / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        if self.kinematics_integrator == "euler":
            x = x + self.tau * x_dot
            x_dot = x_dot + self.tau * xacc
            theta = theta + self.tau * theta_dot
            theta_dot = theta_dot + self.tau * thetaacc
        else:  # semi-implicit euler
            x_dot = x_dot + self.tau * xacc
            x = x + self.tau * x_dot
            theta_dot = theta_dot + self.tau * thetaacc
            theta = theta + self.tau * theta_dot
        return x, x_dot, theta, theta_dot

    def _step_single(self, action: np.ndarray) -> StepReturn:
        """`step` for one env, expression for expression, on Python floats."""
        state = self.state[:, 0].tolist()
        force = self.force_mag if float(action[0]) > 0.5 else -self.force_mag  # np.sign(action - 0.5) * force_mag
        x, x_dot, theta, theta_dot = self._dynamics(state, force, float(np.cos(state[2])), float(np.sin(state[2])))
        self.state[:, 0] = (x, x_dot, theta, theta_dot)
        terminated = (
            x < -self.x_threshold
            or x > self.x_threshold
            or theta < -self.theta_threshold_radians
            or theta > self.theta_threshold_radians
        )
        self.steps += 1
        truncated = bool(self.steps[0] >= self.max_episode_steps)
        reward = -float(terminated) if self._sutton_barto_reward else 1.0
        obs = np.array([[x, x_dot, theta, theta_dot]], dtype=np.float32)
        info: dict[str, Any] = {}
        if terminated or truncated:
            info = {"final_obs": obs, "_final_obs": np.ones(1, dtype=bool)}
            self.state[:, :] = self.np_random.uniform(low=self.low, high=self.high, size=(4, 1))
            self.steps[0] = 0
            obs = self.state.T.astype(np.float32)
        return (
            obs,
            np.array([reward], dtype=np.float32),
            np.array([terminated]),
            np.array([truncated]),
            info,
        )

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
