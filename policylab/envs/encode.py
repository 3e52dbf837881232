"""Discrete, MultiDiscrete and Tuple observations as one float32 vector (one-hots and flattened Box parts).

Every env policylab makes (`make_single_env`, hence `make_vec_env`) whose observations are not a Box is wrapped
in `OneHotObservation`, so every algorithm, fast path and buffer sees a Box: Discrete(n) becomes a one-hot of
length n, MultiDiscrete(nvec) the concatenated one-hots of its entries, and a Tuple the concatenation of its
parts' encodings (Box parts flattened as they are). A trained `Policy` takes either the env's own observations
(an int, a tuple ...) or the encoded vectors, and encodes the former itself.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from policylab.errors import EnvError

ENCODABLE = (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.Tuple)


def needs_encoding(space: gym.Space) -> bool:
    """Whether `space` is one that `ObservationEncoder` turns into a Box (a Box stays as it is)."""
    if isinstance(space, gym.spaces.Tuple):
        return all(isinstance(s, (gym.spaces.Box, *ENCODABLE)) and not isinstance(s, gym.spaces.Tuple) for s in space)
    return isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete))


class ObservationEncoder:
    """The encoding of one observation space: `one(obs)` for a single observation, `batch(obs)` for B of them
    (Discrete: an int array [B]; MultiDiscrete: [B, k]; Tuple: a tuple of such batches, or a list of tuples)."""

    def __init__(self, space: gym.Space) -> None:
        if not needs_encoding(space):
            raise EnvError(
                f"observation space {space} cannot be encoded as a vector",
                "use Box, Discrete, MultiDiscrete observations or a Tuple of them (Dict: FlattenObservation)",
            )
        self.space = space
        self.parts = list(space) if isinstance(space, gym.spaces.Tuple) else [space]
        lows: list[np.ndarray] = []
        highs: list[np.ndarray] = []
        for part in self.parts:
            if isinstance(part, gym.spaces.Box):
                lows.append(part.low.astype(np.float32).ravel())
                highs.append(part.high.astype(np.float32).ravel())
            else:
                assert isinstance(part, (gym.spaces.MultiDiscrete, gym.spaces.Discrete))
                size = int(np.sum(part.nvec)) if isinstance(part, gym.spaces.MultiDiscrete) else int(part.n)
                lows.append(np.zeros(size, np.float32))
                highs.append(np.ones(size, np.float32))
        self.sizes = [len(low) for low in lows]
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.box = gym.spaces.Box(np.concatenate(lows), np.concatenate(highs), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def is_encoded(self, obs: Any) -> bool:
        """Floats of the encoded shape (one vector or a batch) are encoded already; the env's own are not."""
        if isinstance(obs, (tuple, list)) and isinstance(self.space, gym.spaces.Tuple):
            return False
        x = np.asarray(obs)
        return x.dtype.kind == "f" and x.ndim in (1, 2) and x.shape[-1] == self.dim

    def is_single(self, obs: Any) -> bool:
        """Whether a raw (not encoded) observation is one observation rather than a batch."""
        if isinstance(self.space, gym.spaces.Tuple):
            if isinstance(obs, tuple) and len(obs) == len(self.parts):
                return all(np.ndim(o) == (len(p.shape) if p.shape else 0) for o, p in zip(obs, self.parts))
            return False
        return np.ndim(obs) == (0 if isinstance(self.space, gym.spaces.Discrete) else 1)

    def one(self, obs: Any) -> np.ndarray:
        if isinstance(self.space, gym.spaces.Tuple):
            return self.batch(tuple(np.asarray(p)[None] for p in obs))[0]
        return self.batch(np.asarray(obs)[None])[0]

    def batch(self, obs: Any) -> np.ndarray:
        if isinstance(self.space, gym.spaces.Tuple):
            if isinstance(obs, list):  # a list of tuples
                obs = tuple(np.stack([o[i] for o in obs]) for i in range(len(self.parts)))
            columns = list(obs)
        else:
            columns = [obs]
        n = len(np.asarray(columns[0]))
        out = np.zeros((n, self.dim), np.float32)
        rows = np.arange(n)
        for part, column, offset, size in zip(self.parts, columns, self.offsets, self.sizes, strict=True):
            values = np.asarray(column)
            if isinstance(part, gym.spaces.Box):
                out[:, offset : offset + size] = values.reshape(n, size)
            elif isinstance(part, gym.spaces.Discrete):
                out[rows, offset + values.astype(np.int64) - int(part.start)] = 1.0
            else:
                assert isinstance(part, gym.spaces.MultiDiscrete)
                starts = np.cumsum([0, *part.nvec[:-1]])
                index = offset + starts + values.reshape(n, -1).astype(np.int64) - part.start
                out[rows[:, None], index] = 1.0
        return out


class OneHotObservation(gym.ObservationWrapper):
    """The env with its observations encoded by `ObservationEncoder` (a float32 Box)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.encoder = ObservationEncoder(env.observation_space)
        self.observation_space = self.encoder.box

    def observation(self, observation: Any) -> np.ndarray:
        return self.encoder.one(observation)


def raw_observation_space(env: gym.Env) -> gym.Space:
    """The env's own observation space, before policylab's encoding (the same space if it was a Box)."""
    return env.encoder.space if isinstance(env, OneHotObservation) else env.observation_space
