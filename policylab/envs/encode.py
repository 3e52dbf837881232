"""Discrete, MultiDiscrete, MultiBinary, Tuple and Dict observations as one float32 vector.

Every env policylab makes (`make_single_env`, hence `make_vec_env`) whose observations are not a Box is wrapped
in `OneHotObservation`, so every algorithm, fast path and buffer sees a Box: Discrete(n) becomes a one-hot of
length n, MultiDiscrete(nvec) the concatenated one-hots of its entries, MultiBinary its 0/1 entries as floats, and
a Tuple or a Dict the concatenation of its parts' encodings (Box parts flattened as they are; a Dict's parts in the
space's key order). A Dict of vectors encoded this way and read by the MLP is the multi-input encoder for
vectors (each key flattened, concatenated, one MLP: what SB3's CombinedExtractor does for vector keys).
`ObservationEncoder.slices` says where each part sits in the vector (hindsight relabelling rewrites the goal
parts there). A trained `Policy` takes either the env's own observations (an int, a tuple, a dict ...) or the
encoded vectors, and encodes the former itself.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from policylab.errors import EnvError

LEAVES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


def is_image_space(space: gym.Space) -> bool:
    """uint8 frames (a Box of 2 or more dims): kept uint8 from the env to the network's encoder (nets/cnn.py)."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) >= 2


def storage_dtype(space: gym.Space) -> np.dtype:
    """How observations are stored between the env and the networks: uint8 frames as they are, all else float32."""
    return np.dtype(np.uint8) if is_image_space(space) else np.dtype(np.float32)


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a storage dtype (uint8 or float32)."""
    import torch

    return torch.uint8 if dtype == np.uint8 else torch.float32


def needs_encoding(space: gym.Space) -> bool:
    """Whether `space` is one that `ObservationEncoder` turns into a Box (a Box stays as it is)."""
    if isinstance(space, (gym.spaces.Tuple, gym.spaces.Dict)):
        parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces
        return len(parts) > 0 and all(isinstance(s, LEAVES) for s in parts)  # one level
    return isinstance(space, LEAVES[1:])


def _part_size(part: gym.Space) -> int:
    if isinstance(part, (gym.spaces.Box, gym.spaces.MultiBinary)):
        return int(np.prod(part.shape))
    if isinstance(part, gym.spaces.MultiDiscrete):
        return int(np.sum(part.nvec))
    assert isinstance(part, gym.spaces.Discrete)
    return int(part.n)


class ObservationEncoder:
    """The encoding of one observation space: `one(obs)` for a single observation, `batch(obs)` for B of them
    (Discrete: an int array [B]; MultiDiscrete: [B, k]; Tuple: a tuple of such batches, or a list of tuples;
    Dict: a dict of such batches, or a list of dicts)."""

    def __init__(self, space: gym.Space) -> None:
        if not needs_encoding(space):
            raise EnvError(
                f"observation space {space} cannot be encoded as a vector",
                "use Box, Discrete, MultiDiscrete or MultiBinary observations, or a Tuple or Dict of them (one level)",
            )
        self.space = space
        self.keys: list[Any] = (
            list(space.spaces) if isinstance(space, gym.spaces.Dict)
            else list(range(len(space.spaces))) if isinstance(space, gym.spaces.Tuple)
            else [None]
        )  # fmt: skip
        self.parts: list[gym.Space] = [space] if self.keys == [None] else [space[k] for k in self.keys]  # type: ignore[index]
        self.sizes = [_part_size(part) for part in self.parts]
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.slices = {k: slice(o, o + s) for k, o, s in zip(self.keys, self.offsets, self.sizes)}
        """Where each part (a Dict's key, a Tuple's index; None for a lone space) sits in the encoded vector."""
        lows = [_bounds(part)[0] for part in self.parts]
        highs = [_bounds(part)[1] for part in self.parts]
        images = [
            (self.slices[k], tuple(int(d) for d in part.shape or ()))
            for k, part in zip(self.keys, self.parts)
            if is_image_space(part)
        ]
        self.box: gym.spaces.Box = EncodedBox(np.concatenate(lows), np.concatenate(highs), images)

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    @property
    def composite(self) -> bool:
        return isinstance(self.space, (gym.spaces.Tuple, gym.spaces.Dict))

    def is_encoded(self, obs: Any) -> bool:
        """Floats of the encoded shape (one vector or a batch) are encoded already; the env's own are not."""
        if isinstance(obs, (tuple, list, dict)) and self.composite:
            return False
        x = np.asarray(obs)
        return x.dtype.kind == "f" and x.ndim in (1, 2) and x.shape[-1] == self.dim

    def is_single(self, obs: Any) -> bool:
        """Whether a raw (not encoded) observation is one observation rather than a batch."""
        if self.composite:
            if isinstance(obs, list):
                return False
            try:
                values = [obs[k] for k in self.keys]
            except (KeyError, IndexError, TypeError):
                return False
            return all(np.ndim(v) == len(p.shape or ()) for v, p in zip(values, self.parts))
        return np.ndim(obs) == len(self.space.shape or ())

    def one(self, obs: Any) -> np.ndarray:
        if isinstance(self.space, gym.spaces.Discrete):  # every env step of FrozenLake, Taxi ...: Python ints
            n, index = int(self.space.n), int(obs) - int(self.space.start)
            if not 0 <= index < n:
                _check_range(np.array([index]), n, self.space)
            out = np.zeros(n, np.float32)
            out[index] = 1.0
            return out
        if self.composite:
            return self.batch({k: np.asarray(obs[k])[None] for k in self.keys})[0]
        return self.batch(np.asarray(obs)[None])[0]

    def batch(self, obs: Any) -> np.ndarray:
        if not self.composite:
            columns = [obs]
        elif isinstance(obs, list):  # a list of tuples / dicts
            columns = [np.stack([np.asarray(o[k]) for o in obs]) for k in self.keys]
        else:
            columns = [obs[k] for k in self.keys]
        n = len(np.asarray(columns[0]))
        out = np.zeros((n, self.dim), np.float32)
        rows = np.arange(n)
        for part, column, offset, size in zip(self.parts, columns, self.offsets, self.sizes, strict=True):
            values = np.asarray(column)
            if isinstance(part, (gym.spaces.Box, gym.spaces.MultiBinary)):
                out[:, offset : offset + size] = values.reshape(n, size)
            elif isinstance(part, gym.spaces.Discrete):
                index = values.astype(np.int64) - int(part.start)
                _check_range(index, part.n, part)
                out[rows, offset + index] = 1.0
            else:
                assert isinstance(part, gym.spaces.MultiDiscrete)
                starts = np.cumsum([0, *part.nvec[:-1]])
                index = values.reshape(n, -1).astype(np.int64) - part.start
                _check_range(index, part.nvec, part)
                out[rows[:, None], offset + starts + index] = 1.0
        return out


def _check_range(index: np.ndarray, n: Any, part: Any) -> None:
    """Each discrete observation (less its space's start) in [0, n): out of range it would set another entry's bit
    (negative ones wrap around) or fail with a bare IndexError."""
    if index.size == 1 and np.ndim(n) == 0:  # one Discrete observation (every env step): Python ints are cheapest
        if 0 <= int(index[0]) < n:
            return
    elif len(index) == 1 and index.size <= 64:  # one MultiDiscrete observation: the same, entry by entry
        if all(0 <= v < m for v, m in zip(index[0].tolist(), np.ravel(n).tolist(), strict=True)):
            return
    elif index.size == 0 or (index.min() >= 0 and (index < n).all()):
        return
    bad = (index + part.start)[(index < 0) | (index >= n)].ravel()[0]
    if isinstance(part, gym.spaces.Discrete):
        valid = f"{int(part.start)} to {int(part.start) + int(n) - 1}"
    else:
        valid = f"each entry from its start {part.start.tolist()} to start + nvec - 1 {(part.start + n - 1).tolist()}"
    raise EnvError(
        f"observation {bad} is outside the observation space {part} (valid: {valid})",
        f"pass observations of the env's space {part}",
    )


def _bounds(part: gym.Space) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(part, gym.spaces.Box):
        return part.low.astype(np.float32).ravel(), part.high.astype(np.float32).ravel()
    size = _part_size(part)
    return np.zeros(size, np.float32), np.ones(size, np.float32)


class EncodedBox(gym.spaces.Box):
    """The float32 Box of encoded observations; `images` lists the (slice, frame shape) of each image part (frames
    of a Dict or Tuple, flattened as floats 0-255), for the networks' multi-input encoder (nets/cnn.py)."""

    def __init__(self, low: np.ndarray, high: np.ndarray, images: list[tuple[slice, tuple[int, ...]]]) -> None:
        super().__init__(low, high, dtype=np.float32)
        self.images = images


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
