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


class LongChain(gym.Env):
    """A corridor of `n` cells seen as one-hot vectors, starting in cell 0: action 1 moves right, action 0 left (the
    left wall holds); reaching the last cell pays 1 and ends the episode, nothing else pays; `horizon` steps per
    episode. With n 60 and horizon 80 a uniform random walk reaches the end about once in 10^8 episodes, so only
    directed exploration finds the reward (RND's test)."""

    action_space = gym.spaces.Discrete(2)

    def __init__(self, n: int = 60, horizon: int = 80) -> None:
        self.n, self.horizon = n, horizon
        self.observation_space = gym.spaces.Box(0.0, 1.0, (n,), np.float32)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.n, np.float32)
        obs[self.cell] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.cell, self.t = 0, 0
        return self._obs(), {}

    def step(self, action):
        self.cell = max(0, self.cell + (1 if int(action) == 1 else -1))
        self.t += 1
        reached = self.cell == self.n - 1
        return self._obs(), float(reached), reached, self.t >= self.horizon and not reached, {}


class ChainMDP(gym.Env):
    """A 4-state chain with known dynamics, one-hot observations: action 1 moves right with probability 0.8
    (else stays), action 0 moves left with probability 0.8; reaching state 3 pays 1 and ends the episode, every
    other step pays -0.1 and ends it with probability 0.1 (so every policy's value is finite and exact)."""

    n_states = 4
    observation_space = gym.spaces.Box(0.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    @staticmethod
    def transitions() -> tuple[np.ndarray, np.ndarray]:
        """(P[s, a, s'] of the moves, the expected reward R[s, a] of a step)."""
        n = ChainMDP.n_states
        move = np.zeros((n, 2, n))
        for s in range(n - 1):
            move[s, 1, min(s + 1, n - 1)] += 0.8
            move[s, 1, s] += 0.2
            move[s, 0, max(s - 1, 0)] += 0.8
            move[s, 0, s] += 0.2
        reward = np.zeros((n, 2))
        for s in range(n - 1):
            for a in range(2):
                reward[s, a] = move[s, a, n - 1] * 1.0 + (1 - move[s, a, n - 1]) * -0.1
        return move, reward

    def reset(self, *, seed: int | None = None, options: dict | None = None):  # type: ignore[override]
        super().reset(seed=seed)
        self.state = 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.n_states, np.float32)
        obs[self.state] = 1.0
        return obs

    def step(self, action):  # type: ignore[override]
        rng = self.np_random
        if rng.random() < 0.8:
            self.state = min(self.state + 1, 3) if int(action) == 1 else max(self.state - 1, 0)
        if self.state == 3:
            return self._obs(), 1.0, True, False, {}
        return self._obs(), -0.1, bool(rng.random() < 0.1), False, {}


def chain_value(probs: np.ndarray, gamma: float) -> float:
    """The exact discounted value from state 0 of a policy with action probabilities probs[s, a] on ChainMDP."""
    move, reward = ChainMDP.transitions()
    n = ChainMDP.n_states
    # the episode goes on from s' with probability 0.9 unless s' is the end state 3
    cont = move.copy()
    cont[:, :, n - 1] = 0.0
    cont *= 0.9
    p_pi = np.einsum("sa,sat->st", probs, cont)[: n - 1, : n - 1]
    r_pi = (probs * reward).sum(1)[: n - 1]
    values = np.linalg.solve(np.eye(n - 1) - gamma * p_pi, r_pi)
    return float(values[0])


class HandOneHot(gym.ObservationWrapper):
    """A Discrete-observation env one-hot encoded by hand (float32 Box in [0, 1])."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.n = int(env.observation_space.n)  # type: ignore[attr-defined]
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.n,), np.float32)

    def observation(self, observation: int) -> np.ndarray:
        out = np.zeros(self.n, np.float32)
        out[observation] = 1.0
        return out


def hand_one_hot_frozen_lake(**kwargs) -> gym.Env:
    return HandOneHot(gym.make("FrozenLake-v1", **kwargs))


class _GoalEnvWithoutReward(gym.Wrapper):
    """Bit flipping's goal-conditioned observations without its compute_reward (for HER's error)."""

    def __getattr__(self, name: str):  # hide the inner env's compute_reward from attribute lookups
        if name == "compute_reward":
            raise AttributeError(name)
        return getattr(self.env, name)

    @property
    def unwrapped(self) -> gym.Env:
        return self


def goal_env_without_compute_reward(**kwargs) -> gym.Env:
    from policylab.envs.bitflip import BitFlippingEnv

    return _GoalEnvWithoutReward(BitFlippingEnv(**kwargs))


class PixelGrid(gym.Env):
    """A size x size grid seen only as a uint8 image (8 pixels per cell): the agent (255) and the goal (128) start
    in two random cells, and reaching the goal within 20 steps is rewarded 1. `layout`: "hw" frames (H, W), "hwc"
    (H, W, 1) or "chw" (1, H, W). Actions: up, down, left, right."""

    cell = 8

    def __init__(self, layout: str = "hw", max_steps: int = 20, size: int = 5) -> None:
        self.size = size
        side = self.size * self.cell
        shape = {"hw": (side, side), "hwc": (side, side, 1), "chw": (1, side, side)}[layout]
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.action_space = gym.spaces.Discrete(4)
        self.max_steps = max_steps
        self.state = np.zeros(5, np.int64)
        """The agent's row and column, the goal's, and the steps taken (what policylab's checkpoints snapshot)."""

    def _frame(self) -> np.ndarray:
        side, c = self.size * self.cell, self.cell
        frame = np.zeros((side, side), np.uint8)
        for (row, col), value in ((self.state[2:4], 128), (self.state[0:2], 255)):
            frame[row * c : (row + 1) * c, col * c : (col + 1) * c] = value
        return frame.reshape(self.observation_space.shape)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        agent, goal = self.np_random.choice(self.size * self.size, 2, replace=False)
        self.state = np.array([agent // self.size, agent % self.size, goal // self.size, goal % self.size, 0])
        return self._frame(), {}

    def step(self, action):
        moves = ((-1, 0), (1, 0), (0, -1), (0, 1))
        d_row, d_col = moves[int(action)]
        self.state[0] = min(max(self.state[0] + d_row, 0), self.size - 1)
        self.state[1] = min(max(self.state[1] + d_col, 0), self.size - 1)
        self.state[4] += 1
        reached = bool(self.state[0] == self.state[2] and self.state[1] == self.state[3])
        truncated = bool(self.state[4] >= self.max_steps) and not reached
        return self._frame(), float(reached), reached, truncated, {}


class _BoxMoves(gym.ActionWrapper):
    """PixelGrid's four moves from a Box action: the larger coordinate's sign picks the move."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def action(self, action):
        axis = int(abs(action[1]) > abs(action[0]))
        return 2 * axis + int(action[axis] > 0)


def box_action_pixel_grid(**kwargs) -> gym.Env:
    """PixelGrid with Box actions (for the algorithms that take only those)."""
    return _BoxMoves(PixelGrid(**kwargs))


def float_pixel_grid(**kwargs) -> gym.Env:
    """PixelGrid's frames as float32 in [0, 1] (for the error that asks for uint8 frames)."""
    env = PixelGrid(**kwargs)
    space = gym.spaces.Box(0.0, 1.0, env.observation_space.shape, np.float32)
    return gym.wrappers.TransformObservation(env, lambda o: o.astype(np.float32) / 255.0, space)


class CounterFrames(gym.Env):
    """4x4 uint8 frames that count: frame value = 16 * (episode % 16) + step; episodes end at random (terminated)
    or after 9 steps (truncated). For checking stacked-frame replay against full stacks."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (4, 4), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self.episode, self.t = -1, 0

    def _frame(self) -> np.ndarray:
        return np.full((4, 4), 16 * (self.episode % 16) + self.t, np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        terminated = bool(self.np_random.random() < 0.15)
        return self._frame(), 1.0, terminated, self.t >= 9 and not terminated, {}


def stacked_pixel_grid(stack: int = 2, **kwargs) -> gym.Env:
    return gym.wrappers.FrameStackObservation(PixelGrid(**kwargs), stack)


class CueMemory(gym.Env):
    """A cue (+1 or -1) shown at the first step only, then `delay` blank steps, then a query: the action that names
    the cue (1 for +1, 0 for -1) earns +1 and the other -1, and the episode ends. Observations [cue, query flag].
    Without memory a policy earns 0 on average; with it, 1."""

    def __init__(self, delay: int = 3) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.delay = delay
        self.state = np.zeros(2, np.int64)
        """The cue and the steps taken (what policylab's checkpoints snapshot)."""

    def _obs(self) -> np.ndarray:
        cue, t = int(self.state[0]), int(self.state[1])
        return np.array([cue if t == 0 else 0.0, 1.0 if t == self.delay else 0.0], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = np.array([1 if self.np_random.random() < 0.5 else -1, 0])
        return self._obs(), {}

    def step(self, action):
        if self.state[1] < self.delay:
            self.state[1] += 1
            return self._obs(), 0.0, False, False, {}
        right = (int(action) == 1) == (self.state[0] == 1)
        return self._obs(), 1.0 if right else -1.0, True, False, {}


class PixelGridDict(gym.Wrapper):
    """PixelGrid's frame in a Dict beside a vector: the share of the episode's steps taken so far."""

    def __init__(self, **kwargs) -> None:
        super().__init__(PixelGrid(**kwargs))
        self.observation_space = gym.spaces.Dict(
            [("frame", self.env.observation_space), ("clock", gym.spaces.Box(0.0, 1.0, (1,), np.float32))]
        )

    def _dict(self, frame: np.ndarray) -> dict:
        inner = self.env.unwrapped
        return {"frame": frame, "clock": np.array([inner.state[4] / inner.max_steps], np.float32)}

    def reset(self, **kwargs):
        frame, info = self.env.reset(**kwargs)
        return self._dict(frame), info

    def step(self, action):
        frame, reward, terminated, truncated, info = self.env.step(action)
        return self._dict(frame), reward, terminated, truncated, info


class MaskedChoice(gym.Env):
    """Each step shows a target action (one-hot) and allows it plus `extra` random others (the masks: in
    info["action_mask"] as Gymnasium's Taxi-v4 gives them; MaskedChoiceWithMethod adds SB3-contrib's
    `action_masks()`); reward 1 for the target, 0 for another allowed action. A forbidden action is an error with
    `strict` (a masked run must never take one), else reward -1 and the episode ends. `multi`: MultiDiscrete([n, 2])
    actions, whose second dimension allows only 0 (masks of n + 2 flags).

    `ranked`: the observation shows nothing (zeros) and the target is the highest allowed action. A masked policy
    solves it by ranking the actions (logits rising with the index); without masks the allowed ones are unknown,
    and the best a policy can do is about one step in (extra + 1) / n."""

    def __init__(
        self,
        n: int = 8,
        extra: int = 1,
        length: int = 20,
        strict: bool = True,
        multi: bool = False,
        ranked: bool = False,
    ) -> None:
        self.n, self.extra, self.length, self.strict, self.multi, self.ranked = n, extra, length, strict, multi, ranked
        self.observation_space = gym.spaces.Box(0.0, 1.0, (n,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([n, 2]) if multi else gym.spaces.Discrete(n)
        self.state = np.zeros(2 + n)
        """[steps so far, target, allowed flags]: one array, so that runs on this env resume exactly."""

    t = property(lambda self: int(self.state[0]), lambda self, v: self.state.__setitem__(0, v))
    target = property(lambda self: int(self.state[1]), lambda self, v: self.state.__setitem__(1, v))
    allowed = property(
        lambda self: self.state[2:].astype(bool), lambda self, v: self.state.__setitem__(slice(2, None), v)
    )

    def _draw(self) -> tuple[np.ndarray, dict]:
        self.target = int(self.np_random.integers(self.n))
        others = np.delete(np.arange(self.n), self.target)
        allowed = np.zeros(self.n, bool)
        allowed[[self.target, *self.np_random.choice(others, self.extra, replace=False)]] = True
        self.allowed = allowed
        obs = np.zeros(self.n, np.float32)
        if self.ranked:
            self.target = int(np.flatnonzero(self.allowed).max())
        else:
            obs[self.target] = 1.0
        return obs, {"action_mask": self.flags().astype(np.int8)}

    def flags(self) -> np.ndarray:
        return np.concatenate([self.allowed, [True, False]]) if self.multi else self.allowed.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._draw()

    def step(self, action):
        choice, second = (int(action[0]), int(action[1])) if self.multi else (int(action), 0)
        self.t += 1
        if not self.allowed[choice] or second != 0:
            if self.strict:
                raise RuntimeError(f"forbidden action {action} taken (allowed: {np.flatnonzero(self.allowed)})")
            obs, info = self._draw()
            return obs, -1.0, True, False, info
        reward = 1.0 if choice == self.target else 0.0
        obs, info = self._draw()
        return obs, reward, False, self.t >= self.length, info


class MaskedChoiceWithMethod(MaskedChoice):
    """MaskedChoice with SB3-contrib's `action_masks()` method too (which policylab prefers)."""

    def action_masks(self) -> np.ndarray:
        return self.flags()
