"""Offline datasets: one in-memory layout, read from and written to Minari dataset directories.

In memory a `Dataset` holds whole arrays, episodes back to back. Step arrays
(actions, rewards, terminations, truncations, behaviour log-probs) have N rows;
`observations` has N + E rows, because each episode of T steps keeps its T + 1
observations (the initial one .. the final one), exactly as Minari stores them.
`obs_index()` maps a step to the row of its observation; the next observation
is the row after it.

On disk a dataset is a Minari dataset directory::

    PATH/data/main_data.hdf5   one group per episode: observations [T+1], actions, rewards,
                               terminations, truncations [T], infos/behavior_log_prob [T+1]
    PATH/data/metadata.json    Minari's metadata (spaces, env_spec, ref scores, ...) plus a
                               "policylab" key: env_id, env_kwargs, spaces, metadata, format

`write_dataset` makes it with Minari's own `create_dataset_from_buffers`, so
`minari.MinariDataset(PATH / "data")` opens what policylab writes, and
`load_dataset` reads any HDF5 Minari dataset (plus D4RL's flat HDF5 files).
The behaviour log-probability of each action is stored in the per-step infos
as `behavior_log_prob`, aligned with the observations like all Minari infos:
entry t is log pi_b(a_t | s_t), the final entry is NaN.

Minari names datasets `[namespace/]name-v<N>`. The directory name is the id
(`name-v0` is used when the directory name has no version), and a bare id given
to `load_dataset` is looked up under `$MINARI_DATASETS_PATH` (default
`~/.minari/datasets`); a name without a version means the highest local one.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from policylab.data.replay import discounted_returns_to_go
from policylab.errors import DatasetError, suggest
from policylab.logging import fixed

FORMAT_VERSION = 1
LOG_PROB_INFO = "behavior_log_prob"  # per-step infos key of the behaviour policy's log-probability
_DATA_DIR = "data"
_MAIN_FILE = "main_data.hdf5"
_METADATA_FILE = "metadata.json"
_FLAT_SUFFIXES = (".hdf5", ".h5")
_ACTION_TOLERANCE = 1e-5
_DATASET_ID_RE = re.compile(r"^(?:(?P<namespace>[-\w][-\w/]*[-\w])/)?(?P<name>[-\w]+?)(?:-v(?P<version>\d+))?$")
_UNREADABLE = (OSError, KeyError, ValueError, TypeError, RuntimeError)


class ReferenceWarning(UserWarning):
    """A reference return left out of a dataset (the CLI prints it as `warning: ...`)."""


def d4rl_score(returns: float | np.ndarray, ref_min: float | None, ref_max: float | None) -> float | np.ndarray | None:
    """D4RL's score: 100 * (R - ref_min) / (ref_max - ref_min); None without both refs, the expert's above."""
    if ref_min is None or ref_max is None or not ref_max > ref_min:
        return None
    if isinstance(returns, np.ndarray):
        return 100.0 * (returns.astype(np.float64) - ref_min) / (ref_max - ref_min)
    return 100.0 * (float(returns) - ref_min) / (ref_max - ref_min)


@dataclass(eq=False)
class Dataset:
    """Episodes of experience as whole arrays (see the module docstring for the layout)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    episode_lengths: np.ndarray
    observation_space: gym.Space
    action_space: gym.Space
    env_id: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    behavior_log_probs: np.ndarray | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    checksum: str | None = None

    def __post_init__(self) -> None:
        for name in ("observations", "actions", "rewards", "terminations", "truncations", "episode_lengths"):
            setattr(self, name, np.asarray(getattr(self, name)))
        if self.behavior_log_probs is not None:
            self.behavior_log_probs = np.asarray(self.behavior_log_probs)
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def num_steps(self) -> int:
        return int(len(self.rewards))

    @property
    def num_episodes(self) -> int:
        return int(len(self.episode_lengths))

    @property
    def name(self) -> str:
        """How messages refer to this dataset: its path, else its collection's name."""
        if self.path is not None:
            return str(self.path)
        return str(self.metadata.get("name", "the dataset"))

    def episode_starts(self) -> np.ndarray:
        """Index of each episode's first step in the step arrays."""
        lengths = np.asarray(self.episode_lengths, dtype=np.int64)
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)[:-1]]) if len(lengths) else lengths

    def obs_index(self) -> np.ndarray:
        """Row of each step's observation in `observations`; the next observation is the row after it."""
        lengths = np.asarray(self.episode_lengths, dtype=np.int64)
        episode_of_step = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        return np.arange(int(lengths.sum()), dtype=np.int64) + episode_of_step

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode (float64)."""
        if self.num_episodes == 0:
            return np.zeros(0, np.float64)
        return np.add.reduceat(np.asarray(self.rewards, dtype=np.float64), self.episode_starts())

    def returns_to_go(self, gamma: float) -> np.ndarray:
        """Each step's discounted return to the end of its episode (float32): the Monte-Carlo value of the
        behaviour policy (it stops at truncations, so it underestimates there)."""
        return discounted_returns_to_go(self.rewards, self.episode_lengths, gamma)

    def normalized_score(self, returns: float | np.ndarray) -> float | np.ndarray | None:
        """D4RL's score of `returns` with this dataset's references (`d4rl_score`)."""
        return d4rl_score(returns, self.ref_min_score, self.ref_max_score)

    def __repr__(self) -> str:
        """One line (the arrays are left out: `print(pl.collect(...))` shows what was collected, not every step)."""
        returns = self.episode_returns()
        stats = f", return {fixed(float(returns.mean()))} +/- {fixed(float(returns.std()))}" if len(returns) else ""
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"Dataset(env={self.env_id!r}, episodes={self.num_episodes}, steps={self.num_steps}{stats}, "
            f"observation_space={self.observation_space}, action_space={self.action_space}{where})"
        )

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: sizes, returns, lengths, spaces, env, refs and provenance."""
        returns = self.episode_returns()
        lengths = np.asarray(self.episode_lengths, dtype=np.int64)
        out: dict[str, Any] = {"episodes": self.num_episodes, "steps": self.num_steps}
        out.update(_stats("return", returns))
        normalized = self.normalized_score(returns)
        if isinstance(normalized, np.ndarray):
            out.update(_stats("normalized_return", normalized))
        if len(lengths):
            out.update(length_mean=float(lengths.mean()), length_min=int(lengths.min()), length_max=int(lengths.max()))
        out.update(
            observation_space=str(self.observation_space),
            action_space=str(self.action_space),
            env_id=self.env_id,
            env_kwargs=_jsonable(self.env_kwargs),
            ref_min_score=self.ref_min_score,
            ref_max_score=self.ref_max_score,
            has_behavior_log_probs=self.behavior_log_probs is not None,
            path=None if self.path is None else str(self.path),
            size_bytes=_size_on_disk(self.path) if self.path is not None else None,
            checksum=self.checksum,
            metadata=_jsonable(self.metadata),
        )
        return out


def format_info(info: dict[str, Any]) -> str:
    """Dataset.info() as readable lines (what `policylab dataset info` prints)."""
    lines = [
        f"dataset: {info['path']}",
        f"env: {info['env_id'] or 'unknown'}" + (f" {info['env_kwargs']}" if info["env_kwargs"] else ""),
        f"episodes: {info['episodes']}, steps: {info['steps']} "
        f"(length mean {info['length_mean']:.1f}, min {info['length_min']}, max {info['length_max']})",
        f"return: {fixed(info['return_mean'], 2)} +/- {fixed(info['return_std'], 2)} "
        f"(min {fixed(info['return_min'], 2)}, max {fixed(info['return_max'], 2)})",
    ]
    if "normalized_return_mean" in info:
        lines.append(
            f"normalized return: {fixed(info['normalized_return_mean'])} +/- {fixed(info['normalized_return_std'])} "
            f"(refs: random {info['ref_min_score']:.2f}, expert {info['ref_max_score']:.2f})"
        )
    lines += [
        f"observation space: {info['observation_space']}",
        f"action space: {info['action_space']}",
        f"behaviour log-probs: {'yes' if info['has_behavior_log_probs'] else 'no'}",
    ]
    if info["size_bytes"] is not None:
        lines.append(f"size: {info['size_bytes'] / 1e6:.2f} MB, sha256 {info['checksum']}")
    lines += [f"{key}: {value}" for key, value in info["metadata"].items()]
    return "\n".join(lines)


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_std": float(values.std()),
        f"{prefix}_min": float(values.min()),
        f"{prefix}_max": float(values.max()),
    }


def _size_on_disk(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _jsonable(value: Any) -> Any:
    """A JSON round trip: numpy scalars and arrays become plain numbers and lists, the rest text."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# ---------------------------------------------------------------------------------------------- validation


def validate_dataset(dataset: Dataset) -> None:
    """Raise a DatasetError naming the first problem found (field, and episode and step where there is one)."""
    _check_lengths(dataset)
    _check_dtypes_and_shapes(dataset)
    _check_finite(dataset)
    _check_episode_ends(dataset)
    _check_action_bounds(dataset)


def _bad(problem: str, fix: str = "re-create the dataset, or fix or drop the data that produced it") -> DatasetError:
    return DatasetError(problem, fix)


def _check_lengths(ds: Dataset) -> None:
    lengths = np.asarray(ds.episode_lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise _bad(f"episode_lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    if len(lengths) == 0:
        raise _bad("the dataset has no episodes", "collect at least one episode")
    short = np.flatnonzero(lengths < 1)
    if len(short):
        raise _bad(f"episode {short[0]}: length {lengths[short[0]]} (every episode needs at least one step)")
    n, e = int(lengths.sum()), len(lengths)
    step_arrays = {
        "actions": ds.actions,
        "rewards": ds.rewards,
        "terminations": ds.terminations,
        "truncations": ds.truncations,
    }
    if ds.behavior_log_probs is not None:
        step_arrays["behavior_log_probs"] = ds.behavior_log_probs
    for name, array in step_arrays.items():
        if np.ndim(array) == 0 or len(array) != n:
            rows = "no" if np.ndim(array) == 0 else len(array)
            raise _bad(f"{name} has {rows} rows but episode_lengths add up to {n} steps")
    for name in ("rewards", "terminations", "truncations", "behavior_log_probs"):
        if name in step_arrays and np.ndim(step_arrays[name]) != 1:
            raise _bad(f"{name} must be 1-D (one value per step), got shape {np.shape(step_arrays[name])}")
    if np.ndim(ds.observations) == 0 or len(ds.observations) != n + e:
        rows = "no" if np.ndim(ds.observations) == 0 else len(ds.observations)
        raise _bad(
            f"observations has {rows} rows; {n} steps in {e} episodes need {n + e} "
            "(each episode keeps its T + 1 observations, the final one included)"
        )


def _check_dtypes_and_shapes(ds: Dataset) -> None:
    for name in ("terminations", "truncations"):
        dtype = getattr(ds, name).dtype
        if dtype != np.bool_:
            raise _bad(f"{name} has dtype {dtype}, expected bool")
    for name in ("observations", "rewards", "behavior_log_probs"):
        array = getattr(ds, name)
        if array is not None and not np.issubdtype(array.dtype, np.floating):
            raise _bad(f"{name} has dtype {array.dtype}, expected a float dtype")
    obs_space, act_space = ds.observation_space, ds.action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise _bad(f"observation space {obs_space} is not a Box", "policylab datasets hold Box observations")
    if tuple(ds.observations.shape[1:]) != tuple(obs_space.shape):
        raise _bad(
            f"observations have shape {tuple(ds.observations.shape[1:])} but the observation space {obs_space} "
            f"has shape {obs_space.shape}"
        )
    if isinstance(act_space, gym.spaces.Box):
        if not np.issubdtype(ds.actions.dtype, np.floating):
            raise _bad(f"actions have dtype {ds.actions.dtype} but the action space {act_space} is continuous")
    elif isinstance(act_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        if not np.issubdtype(ds.actions.dtype, np.integer):
            raise _bad(f"actions have dtype {ds.actions.dtype} but the action space {act_space} is discrete")
    else:
        raise _bad(
            f"action space {act_space} is not supported",
            "policylab datasets hold Box, Discrete or MultiDiscrete actions",
        )
    if tuple(ds.actions.shape[1:]) != tuple(act_space.shape or ()):
        raise _bad(
            f"actions have shape {tuple(ds.actions.shape[1:])} but the action space {act_space} "
            f"has shape {act_space.shape}"
        )


def _locate_step(ds: Dataset, index: int) -> tuple[int, int]:
    starts = ds.episode_starts()
    episode = int(np.searchsorted(starts, index, side="right")) - 1
    return episode, int(index - starts[episode])


def _locate_obs_row(ds: Dataset, row: int) -> tuple[int, int]:
    obs_starts = ds.episode_starts() + np.arange(ds.num_episodes)
    episode = int(np.searchsorted(obs_starts, row, side="right")) - 1
    return episode, int(row - obs_starts[episode])


def _first_nonfinite(array: np.ndarray) -> tuple[int, str] | None:
    bad = ~np.isfinite(array)
    if array.ndim > 1:
        bad = bad.reshape(len(array), -1).any(axis=1)
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    values = np.asarray(array[row], dtype=np.float64).ravel()
    kind = "NaN" if np.isnan(values).any() else "inf"
    return row, kind


def _check_finite(ds: Dataset) -> None:
    found = _first_nonfinite(ds.observations)
    if found is not None:
        episode, t = _locate_obs_row(ds, found[0])
        length = int(ds.episode_lengths[episode])
        raise _bad(f"episode {episode}: observations has {found[1]} at observation {t} (of {length + 1})")
    fields: list[tuple[str, np.ndarray | None]] = [
        ("actions", ds.actions if np.issubdtype(ds.actions.dtype, np.floating) else None),
        ("rewards", ds.rewards),
        ("behavior_log_probs", ds.behavior_log_probs),
    ]
    for name, array in fields:
        if array is None:
            continue
        found = _first_nonfinite(array)
        if found is not None:
            episode, t = _locate_step(ds, found[0])
            raise _bad(f"episode {episode}: {name} has {found[1]} at step {t}")


def _check_episode_ends(ds: Dataset) -> None:
    ends = ds.terminations | ds.truncations
    last = np.zeros(ds.num_steps, dtype=bool)
    last[np.cumsum(ds.episode_lengths) - 1] = True
    early = np.flatnonzero(ends & ~last)
    if len(early):
        episode, t = _locate_step(ds, int(early[0]))
        which = "terminations" if ds.terminations[early[0]] else "truncations"
        raise _bad(
            f"episode {episode}: {which} is set at step {t}, before its last step "
            f"{int(ds.episode_lengths[episode]) - 1} (an episode may end only at its last step)",
            "split episodes where they end: episode_lengths must follow terminations | truncations",
        )
    unfinished = np.flatnonzero(last & ~ends)
    if len(unfinished):
        episode, t = _locate_step(ds, int(unfinished[0]))
        raise _bad(
            f"episode {episode}: its last step {t} is neither terminated nor truncated",
            "mark the last step of a cut-off episode as truncated",
        )


def _check_action_bounds(ds: Dataset) -> None:
    space, actions = ds.action_space, ds.actions
    outside: np.ndarray
    if isinstance(space, gym.spaces.Box):
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        outside = np.asarray((actions < low - _ACTION_TOLERANCE) | (actions > high + _ACTION_TOLERANCE))
    elif isinstance(space, gym.spaces.Discrete):
        outside = np.asarray((actions < space.start) | (actions >= space.start + space.n))
    elif isinstance(space, gym.spaces.MultiDiscrete):
        outside = np.asarray((actions < space.start) | (actions >= space.start + space.nvec))
    else:
        return
    if outside.ndim > 1:
        outside = np.asarray(outside.reshape(len(actions), -1).any(axis=1))
    rows = np.flatnonzero(outside)
    if len(rows):
        episode, t = _locate_step(ds, int(rows[0]))
        raise _bad(
            f"episode {episode}: action {actions[rows[0]].tolist()} at step {t} is outside the action space {space}",
            "store the action the env executed (clipped to the space), or give the dataset the space it was taken in",
        )


# ---------------------------------------------------------------------------------------------- compatibility


INFERRED_SPACES = "inferred_spaces"
"""Metadata key of a dataset whose spaces were guessed from its arrays (a flat D4RL-style file stores none): its
observation Box is unbounded, its action Box spans the actions seen, its Discrete n is the largest action + 1."""


def spaces_inferred(ds: Dataset) -> bool:
    return bool(ds.metadata.get(INFERRED_SPACES))


def _space_difference(a: gym.Space, b: gym.Space, inferred: bool = False) -> str | None:
    """Why two spaces differ for learning purposes (shape, dtype kind, Discrete n, Box bounds), or None. With
    `inferred` (`a` guessed from data): `a` fits `b` when its shape and dtype match and what it spans lies in `b`."""
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, gym.spaces.Box) and isinstance(b, gym.spaces.Box):
        if a.shape != b.shape:
            return f"shape {a.shape} vs {b.shape}"
        if a.dtype.kind != b.dtype.kind:
            return f"dtype {a.dtype} vs {b.dtype}"
        if inferred:
            inside = np.all((a.low >= b.low - 1e-6) | ~np.isfinite(a.low)) and np.all(
                (a.high <= b.high + 1e-6) | ~np.isfinite(a.high)
            )
            return None if inside else "the dataset's values fall outside these bounds"
        if not (np.allclose(a.low, b.low) and np.allclose(a.high, b.high)):
            return "bounds differ"
        return None
    if isinstance(a, gym.spaces.Discrete) and isinstance(b, gym.spaces.Discrete):
        if inferred and a.start == b.start and a.n <= b.n:
            return None
        if a.n != b.n or a.start != b.start:
            return f"n={a.n} start={a.start} vs n={b.n} start={b.start}"
        return None
    if isinstance(a, gym.spaces.MultiDiscrete) and isinstance(b, gym.spaces.MultiDiscrete):
        same = np.array_equal(a.nvec, b.nvec) and np.array_equal(a.start, b.start)
        return None if same else f"nvec {a.nvec.tolist()} vs {b.nvec.tolist()}"
    return None if a == b else "spaces differ"


def check_compatible(dataset: Dataset, observation_space: gym.Space, action_space: gym.Space, what: str) -> None:
    """Raise a DatasetError when the dataset's spaces do not match those of `what` (e.g. "the env CartPole-v1").
    A dataset whose spaces were inferred from its arrays (`spaces_inferred`) fits any spaces of its shapes and
    dtypes that hold its data, and then takes those spaces (their bounds are the env's, not guesses)."""
    inferred = spaces_inferred(dataset)
    for kind, ours, theirs in (
        ("observation", dataset.observation_space, observation_space),
        ("action", dataset.action_space, action_space),
    ):
        why = _space_difference(ours, theirs, inferred)
        if why is not None:
            fix = (
                f"use the env the dataset was collected in: --env {dataset.env_id}"
                if dataset.env_id
                else f"use an env whose {kind} space is {ours}"
            )
            raise DatasetError(
                f"{dataset.name} does not fit {what}: "
                f"the dataset's {kind} space is {ours}, {what} has {theirs} ({why})",
                fix,
            )
    if inferred:
        dataset.observation_space, dataset.action_space = observation_space, action_space
        dataset.metadata = {k: v for k, v in dataset.metadata.items() if k != INFERRED_SPACES}


def concat_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset holding the episodes of all of them, in order (same spaces, env id and env kwargs)."""
    if not datasets:
        raise DatasetError("no datasets to concatenate", "give at least one dataset")
    known = [i for i, d in enumerate(datasets) if not spaces_inferred(d)]
    at = known[0] if known else 0  # the spaces, env id and kwargs the others must fit
    first = datasets[at]
    for i, other in enumerate(datasets):
        if i != at:
            _check_same_source(first, other, _label(first, at), _label(other, i))
    env_id = next((d.env_id for d in [first, *datasets] if d.env_id), None)
    log_probs = [d.behavior_log_probs for d in datasets]
    mins = [d.ref_min_score for d in datasets if d.ref_min_score is not None]
    maxs = [d.ref_max_score for d in datasets if d.ref_max_score is not None]
    return Dataset(
        observations=np.concatenate([d.observations for d in datasets]),
        actions=np.concatenate([d.actions for d in datasets]),
        rewards=np.concatenate([d.rewards for d in datasets]),
        terminations=np.concatenate([d.terminations for d in datasets]),
        truncations=np.concatenate([d.truncations for d in datasets]),
        episode_lengths=np.concatenate([np.asarray(d.episode_lengths, np.int64) for d in datasets]),
        observation_space=first.observation_space,
        action_space=first.action_space,
        env_id=env_id,
        env_kwargs=dict(first.env_kwargs),
        behavior_log_probs=None if any(lp is None for lp in log_probs) else np.concatenate(log_probs),  # type: ignore[arg-type]
        ref_min_score=min(mins) if mins else None,
        ref_max_score=max(maxs) if maxs else None,
        metadata={
            "concat_of": [_label(d, i) for i, d in enumerate(datasets)],
            **({} if known else {INFERRED_SPACES: True}),
        },
    )


def select_episodes(dataset: Dataset, episodes: Sequence[int] | np.ndarray) -> Dataset:
    """The dataset's episodes at these indices, in the dataset's order (a new Dataset; the arrays are copies).
    Provenance (path, checksum, reference returns, env) stays the source's: a run trained on a selection names
    the file it read and the setting that selected from it."""
    keep = np.zeros(dataset.num_episodes, bool)
    keep[np.asarray(episodes, np.int64)] = True
    lengths = np.asarray(dataset.episode_lengths, np.int64)
    steps = np.repeat(keep, lengths)
    rows = np.repeat(keep, lengths + 1)  # each episode's T + 1 observations
    log_probs = dataset.behavior_log_probs
    return replace(
        dataset,
        observations=dataset.observations[rows],
        actions=dataset.actions[steps],
        rewards=dataset.rewards[steps],
        terminations=dataset.terminations[steps],
        truncations=dataset.truncations[steps],
        episode_lengths=lengths[keep],
        behavior_log_probs=None if log_probs is None else log_probs[steps],
        metadata=dict(dataset.metadata),
    )


def best_episodes(dataset: Dataset, fraction: float) -> Dataset:
    """The best `fraction` of the dataset's episodes by undiscounted return: the top max(1, floor(fraction * E)),
    kept in the dataset's order (equal returns: the earlier episode first). What "BC-10%" trains on (CORL's
    any-percent BC; Chen et al. 2021, the Decision Transformer paper's %BC baseline)."""
    if not 0.0 < fraction <= 1.0:
        raise DatasetError(
            f"top fraction {fraction} is outside (0, 1]",
            "give the share of episodes to keep, e.g. 0.1 for the best 10%",
        )
    if fraction == 1.0 or dataset.num_episodes == 0:
        return dataset
    count = max(1, math.floor(fraction * dataset.num_episodes + 1e-9))  # 0.29 * 100 is 28.999...
    order = np.argsort(-dataset.episode_returns(), kind="stable")
    kept = select_episodes(dataset, np.sort(order[:count]))
    kept.metadata.update(best_episodes_of=dataset.name, top_fraction=fraction)
    return kept


def _label(ds: Dataset, index: int) -> str:
    """The dataset's path or name, else its position among those given."""
    return ds.name if ds.path is not None or "name" in ds.metadata else f"dataset {index}"


def _check_same_source(a: Dataset, b: Dataset, a_label: str, b_label: str) -> None:
    """`b` (spaces inferred or not) fits `a` (whose spaces are known unless all are inferred); a dataset without
    an env id (a flat file) takes the others'."""
    what = f"cannot concatenate {a_label} and {b_label}"
    fix = "concatenate only datasets collected in the same env (same id, kwargs and spaces)"
    for kind in ("observation", "action"):
        space_a, space_b = getattr(a, f"{kind}_space"), getattr(b, f"{kind}_space")
        why = _space_difference(space_b, space_a, True) if spaces_inferred(b) else _space_difference(space_a, space_b)
        if why is not None:
            raise DatasetError(f"{what}: their {kind} spaces differ ({space_a} vs {space_b}: {why})", fix)
    if any(d.env_id is None and spaces_inferred(d) for d in (a, b)):
        return  # a flat file names no env: it takes the other's
    if a.env_id != b.env_id:
        raise DatasetError(f"{what}: env_id {a.env_id!r} vs {b.env_id!r}", fix)
    if _jsonable(a.env_kwargs) != _jsonable(b.env_kwargs):
        raise DatasetError(f"{what}: env_kwargs {a.env_kwargs} vs {b.env_kwargs}", fix)


# ---------------------------------------------------------------------------------------------- writing


def minari_dataset_id(path: Path) -> str:
    """The Minari id for a dataset directory: its name when it ends in -v<N>, else <name>-v0."""
    name = re.sub(r"[^-\w]", "_", path.name) or "dataset"
    return name if re.fullmatch(r".+-v\d+", name) else f"{name}-v0"


def write_dataset(dataset: Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `dataset` as a Minari dataset directory at `path`; all or nothing.

    Minari writes under $MINARI_DATASETS_PATH, so this points that variable at a
    temporary directory beside `path` for the duration (not thread-safe) and
    moves the finished dataset into place.
    """
    path = Path(path).absolute()  # minari reads its root from the environment: a relative one was joined twice
    if path.exists() and not overwrite:
        raise DatasetError(
            f"{path} already exists", "pass --overwrite (overwrite=True) to replace it, or choose another --out"
        )
    validate_dataset(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset_id = minari_dataset_id(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _minari_root(tmp):
            _create_minari_dataset(dataset, dataset_id)
        _move_into_place(tmp / dataset_id, path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextmanager
def _minari_root(root: Path) -> Iterator[None]:
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _move_into_place(new: Path, path: Path, tmp: Path) -> None:
    """Rename `new` to `path`; an existing `path` is set aside in `tmp` first and put back if that fails."""
    previous = tmp / ".previous"
    if path.exists():
        os.replace(path, previous)
    try:
        os.replace(new, path)
    except BaseException:
        if previous.exists():
            os.replace(previous, path)
        raise


def _episode_buffers(ds: Dataset) -> list[Any]:
    from minari.data_collector import EpisodeBuffer

    obs = ds.observations.astype(np.float32, copy=False)
    act_dtype = np.float32 if isinstance(ds.action_space, gym.spaces.Box) else np.int64
    actions = ds.actions.astype(act_dtype, copy=False)
    rewards = ds.rewards.astype(np.float32, copy=False)
    buffers = []
    for i, (start, length) in enumerate(zip(ds.episode_starts().tolist(), ds.episode_lengths.tolist())):
        steps, obs_rows = slice(start, start + length), slice(start + i, start + i + length + 1)
        infos = None
        if ds.behavior_log_probs is not None:
            logp = np.full(length + 1, np.nan, dtype=np.float32)
            logp[:length] = ds.behavior_log_probs[steps]
            infos = {LOG_PROB_INFO: logp}
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=obs[obs_rows],
                actions=actions[steps],
                rewards=rewards[steps],
                terminations=ds.terminations[steps],
                truncations=ds.truncations[steps],
                infos=infos,
            )
        )
    return buffers


def _env_spec(ds: Dataset) -> Any:
    """The Gymnasium EnvSpec (with the env kwargs) for a registered id, else None."""
    if ds.env_id is None or ds.env_id not in gym.registry:
        return None
    spec = gym.spec(ds.env_id)
    return replace(spec, kwargs={**spec.kwargs, **ds.env_kwargs}) if ds.env_kwargs else spec


def _create_minari_dataset(ds: Dataset, dataset_id: str) -> None:
    import minari

    meta = ds.metadata
    with warnings.catch_warnings():
        # Minari warns about every unset optional field (eval_env, env_spec for module:Class envs, ...).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"minari(\.|$)")
        created = minari.create_dataset_from_buffers(
            dataset_id,
            _episode_buffers(ds),
            env=_env_spec(ds),
            observation_space=ds.observation_space,
            action_space=ds.action_space,
            algorithm_name=str(meta["algorithm_name"]) if meta.get("algorithm_name") is not None else None,
            author="policylab",
            author_email="policylab@users.noreply.github.com",
            code_permalink="https://github.com/policylab/policylab",
            description=str(meta["description"]) if meta.get("description") is not None else None,
            jpeg_encoding=False,
        )
    extra: dict[str, Any] = {"policylab": _policylab_metadata(ds)}
    if ds.ref_min_score is not None and ds.ref_max_score is not None:
        # Set here rather than through create_dataset_from_buffers, which drops them when there is no
        # registered env and makes the env even when both are given.
        extra.update(ref_min_score=float(ds.ref_min_score), ref_max_score=float(ds.ref_max_score))
    created.storage.update_metadata(extra)


def _policylab_metadata(ds: Dataset) -> dict[str, Any]:
    from policylab.policy import space_to_json

    return {
        "format_version": FORMAT_VERSION,
        "env_id": ds.env_id,
        "env_kwargs": _jsonable(ds.env_kwargs),
        "observation_space": space_to_json(ds.observation_space),
        "action_space": space_to_json(ds.action_space),
        "ref_min_score": ds.ref_min_score,
        "ref_max_score": ds.ref_max_score,
        "metadata": _jsonable(ds.metadata),
    }


# ---------------------------------------------------------------------------------------------- reading


def load_dataset(source: str | Path, *, validate: bool = True) -> Dataset:
    """Read a dataset from a Minari directory (or its data/), a D4RL-style .hdf5 file, or a local Minari id."""
    data_dir = _minari_data_dir(source)
    dataset = _read_minari_dir(data_dir) if data_dir is not None else _read_flat_hdf5(Path(source).expanduser())
    _drop_inverted_references(dataset)
    if validate:
        try:
            validate_dataset(dataset)
        except DatasetError as exc:
            raise DatasetError(f"{dataset.name}: {exc.problem}", exc.fix) from None
    return dataset


def _drop_inverted_references(dataset: Dataset) -> None:
    """Reference returns on disk that do not rise from random to expert (written by another tool, or by hand)
    would turn every normalized score upside down: both are left out, with a warning."""
    low, high = dataset.ref_min_score, dataset.ref_max_score
    if low is None or high is None or high > low:
        return
    dataset.ref_min_score = dataset.ref_max_score = None
    warnings.warn(
        f"{dataset.name} records ref_max_score={high:g}, not above ref_min_score={low:g}, so its scores are not "
        "normalized; set a random policy's return as ref_min_score and an expert's as ref_max_score in its "
        f"{_DATA_DIR}/{_METADATA_FILE} (an .hdf5 file: its attributes) to have them",
        ReferenceWarning,
        stacklevel=3,
    )


def dataset_observation_space(source: str | Path) -> gym.Space | None:
    """The observation space a Minari dataset records, from its metadata alone (the episodes are not read); None
    for a D4RL-style file, whose spaces are inferred from its arrays."""
    data_dir = _minari_data_dir(source)
    if data_dir is None:
        return None
    meta_file = data_dir / _METADATA_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable(meta_file, exc) from None
    return _minari_spaces(meta, meta.get("policylab") or {}, data_dir)[0]


def _minari_data_dir(source: str | Path) -> Path | None:
    """The data/ directory of a Minari dataset (a directory, its data/, or a local id); None for a flat file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _data_dir(path)
    if path.is_file():
        if path.suffix.lower() not in _FLAT_SUFFIXES:
            raise DatasetError(
                f"{path} is not a dataset: expected a Minari dataset directory or a .hdf5/.h5 file",
                "point at the dataset directory (the one holding data/metadata.json)",
            )
        return None
    if isinstance(source, str) and _looks_like_id(source):
        return _find_local_id(source) / _DATA_DIR
    raise DatasetError(
        f"no dataset at {path}: the path does not exist",
        "check the path: a dataset is a directory holding data/metadata.json, or a .hdf5 file",
    )


def _data_dir(path: Path) -> Path:
    if (path / _METADATA_FILE).is_file():
        return path
    if (path / _DATA_DIR / _METADATA_FILE).is_file():
        return path / _DATA_DIR
    raise DatasetError(
        f"{path} is a directory but not a Minari dataset (no {_DATA_DIR}/{_METADATA_FILE} in it)",
        "point at a directory written by `policylab collect` / write_dataset or by Minari",
    )


def _looks_like_id(source: str) -> bool:
    return not source.lower().endswith(_FLAT_SUFFIXES) and _DATASET_ID_RE.fullmatch(source) is not None


def minari_root() -> Path:
    """Where Minari keeps local datasets: $MINARI_DATASETS_PATH, default ~/.minari/datasets."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def _find_local_id(dataset_id: str) -> Path:
    """The directory of a local Minari dataset id; a name without -v<N> means its highest local version."""
    root = minari_root()
    match = _DATASET_ID_RE.fullmatch(dataset_id)
    assert match is not None
    if match["version"] is not None:
        candidate = root / dataset_id
        if (candidate / _DATA_DIR / _METADATA_FILE).is_file():
            return candidate
    else:
        parent = root / match["namespace"] if match["namespace"] else root
        versions = _local_versions(parent, match["name"])
        if versions:
            return parent / f"{match['name']}-v{max(versions)}"
    local = _local_ids(root)
    raise DatasetError(
        f"no dataset {dataset_id!r}: it is neither a file or directory here nor a Minari dataset in {root} "
        f"(policylab does not download datasets).{suggest(dataset_id, local)}",
        f"make one with `policylab collect ... --out {root / minari_dataset_id(Path(dataset_id))}`, "
        f"copy a Minari dataset directory into {root}, or set MINARI_DATASETS_PATH to the folder that holds it",
    )


def _local_versions(parent: Path, name: str) -> list[int]:
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(name)}-v(\d+)")
    return [
        int(m[1])
        for d in parent.iterdir()
        if (m := pattern.fullmatch(d.name)) and (d / _DATA_DIR / _METADATA_FILE).is_file()
    ]


def _local_ids(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [str(p.parent.parent.relative_to(root)) for p in root.glob(f"**/{_DATA_DIR}/{_METADATA_FILE}")]


def _unreadable(path: Path, exc: BaseException) -> DatasetError:
    reason = str(exc) or type(exc).__name__
    return DatasetError(
        f"cannot read {path}: {reason}", "the file is corrupt or incomplete: re-create the dataset or copy it again"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_minari_dir(data_dir: Path) -> Dataset:
    meta_file, main_file = data_dir / _METADATA_FILE, data_dir / _MAIN_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable(meta_file, exc) from None
    if meta.get("data_format", "hdf5") != "hdf5":
        raise DatasetError(
            f"{data_dir.parent} is a Minari dataset in the {meta.get('data_format')!r} format; policylab reads hdf5",
            "convert it to hdf5 with Minari (create_dataset_from_buffers(..., data_format='hdf5'))",
        )
    if not main_file.is_file():
        raise DatasetError(f"cannot read {data_dir.parent}: {main_file} is missing", "copy the whole dataset directory")
    ours = meta.get("policylab") or {}
    obs_space, act_space = _minari_spaces(meta, ours, data_dir)
    if meta.get("jpeg_encoding", True) and _is_image_space(obs_space):
        raise DatasetError(
            f"{data_dir.parent} stores JPEG-encoded image observations, which policylab does not decode",
            "re-create it with jpeg_encoding=False",
        )
    try:
        arrays = _read_episodes(main_file, meta.get("total_episodes"), act_space)
    except _UNREADABLE as exc:
        raise _unreadable(main_file, exc) from None
    env_id, env_kwargs = _minari_env(meta, ours)
    return Dataset(
        observation_space=obs_space,
        action_space=act_space,
        env_id=env_id,
        env_kwargs=env_kwargs,
        ref_min_score=_float_or_none(meta.get("ref_min_score", ours.get("ref_min_score"))),
        ref_max_score=_float_or_none(meta.get("ref_max_score", ours.get("ref_max_score"))),
        metadata=ours["metadata"] if "metadata" in ours else _foreign_metadata(meta),
        path=data_dir.parent,
        checksum=sha256_file(main_file),
        **arrays,
    )


def _minari_spaces(meta: dict[str, Any], ours: dict[str, Any], data_dir: Path) -> tuple[gym.Space, gym.Space]:
    from minari.serialization import deserialize_space

    from policylab.policy import space_from_json

    spaces = []
    for key in ("observation_space", "action_space"):
        try:
            if key in ours:
                spaces.append(space_from_json(ours[key]))
            elif key in meta:
                spaces.append(deserialize_space(meta[key]))
            else:
                raise KeyError(f"no {key} in {_METADATA_FILE}")
        except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
            raise _unreadable(data_dir / _METADATA_FILE, exc) from None
    obs_space, act_space = spaces
    if not isinstance(obs_space, gym.spaces.Box):
        raise DatasetError(
            f"{data_dir.parent} has observation space {obs_space}; policylab datasets hold Box observations",
            "flatten the observations (e.g. gymnasium.wrappers.FlattenObservation) and re-create the dataset",
        )
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        raise DatasetError(
            f"{data_dir.parent} has action space {act_space}; policylab datasets hold Box, Discrete or "
            "MultiDiscrete actions",
            "re-create the dataset with a flat action space",
        )
    return obs_space, act_space


def _is_image_space(space: gym.Space) -> bool:
    from minari.dataset.minari_storage import is_image_space

    return bool(is_image_space(space))


def _read_episodes(main_file: Path, num_episodes: int | None, act_space: gym.Space) -> dict[str, Any]:
    """Each episode's arrays with one read per field, concatenated once (episode_0 .. episode_<E-1>).

    Through h5py's low-level calls: a Minari file holds five or six small datasets per episode, and the high-level
    API's bookkeeping around each of them was a large part of a many-episode dataset's load time."""
    import h5py
    from h5py import h5g

    fields = ("observations", "actions", "rewards", "terminations", "truncations")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in fields}
    log_probs: list[np.ndarray] | None = []
    with h5py.File(main_file, "r") as f:
        if num_episodes is None:
            num_episodes = sum(1 for key in f.keys() if key.startswith("episode_"))
        for i in range(int(num_episodes)):
            group = h5g.open(f.id, f"episode_{i}".encode())
            for key in fields:
                parts[key].append(_read_whole(group, key))
            infos = h5g.open(group, b"infos") if b"infos" in group else None
            if log_probs is not None and infos is not None and LOG_PROB_INFO.encode() in infos:
                log_probs.append(_read_whole(infos, LOG_PROB_INFO)[: len(parts["rewards"][-1])])
            else:
                log_probs = None
    act_dtype = np.float32 if isinstance(act_space, gym.spaces.Box) else np.int64
    dtypes = {
        "observations": np.float32,
        "actions": act_dtype,
        "rewards": np.float32,
        "terminations": np.bool_,
        "truncations": np.bool_,
    }
    out: dict[str, Any] = {}
    for key in fields:
        out[key] = np.concatenate(parts[key]).astype(dtypes[key], copy=False) if parts[key] else _empty(key, act_space)
    out["episode_lengths"] = np.array([len(r) for r in parts["rewards"]], dtype=np.int64)
    out["behavior_log_probs"] = (
        np.concatenate(log_probs).astype(np.float32, copy=False) if log_probs and num_episodes else None
    )
    return out


def _read_whole(group: Any, name: str) -> np.ndarray:
    """The dataset `name` of a low-level h5py group, read whole in its stored dtype."""
    from h5py import h5d, h5s

    dataset = h5d.open(group, name.encode())
    out = np.empty(dataset.shape, dataset.dtype)
    if out.size:
        dataset.read(h5s.ALL, h5s.ALL, out)
    return out


def _empty(key: str, act_space: gym.Space) -> np.ndarray:
    if key in ("terminations", "truncations"):
        return np.zeros(0, np.bool_)
    if key == "actions":
        dtype = np.float32 if isinstance(act_space, gym.spaces.Box) else np.int64
        return np.zeros((0, *(act_space.shape or ())), dtype)
    return np.zeros(0, np.float32)


def _minari_env(meta: dict[str, Any], ours: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Env id and kwargs: policylab's own record, else the id and kwargs of Minari's env_spec."""
    if "env_id" in ours:
        return ours["env_id"], dict(ours.get("env_kwargs") or {})
    spec = meta.get("env_spec")
    if not spec:
        return None, {}
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else dict(spec)
    except (ValueError, TypeError):
        return None, {}
    return parsed.get("id"), dict(parsed.get("kwargs") or {})


def _foreign_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("dataset_id", "algorithm_name", "description", "author", "author_email", "code_permalink")
    out = {key: meta[key] for key in keys if meta.get(key) is not None}
    out["minari_version"] = meta.get("minari_version")
    return out


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _read_flat_hdf5(path: Path) -> Dataset:
    """A D4RL-style file: flat step arrays, episodes split at terminals | timeouts."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("observations", "actions", "rewards", "terminals") if key not in f]
            if missing:
                raise DatasetError(
                    f"{path} is not a D4RL-style dataset: it has no {', '.join(missing)}",
                    "a flat .hdf5 dataset needs observations, actions, rewards, terminals (and timeouts)",
                )
            raw = {key: f[key][()] for key in ("observations", "actions", "rewards", "terminals")}
            raw["timeouts"] = f["timeouts"][()] if "timeouts" in f else np.zeros(len(raw["rewards"]), bool)
            raw["next_observations"] = f["next_observations"][()] if "next_observations" in f else None
            log_key = "infos/action_log_probs"
            raw["log_probs"] = f[log_key][()] if log_key in f else None
            attrs = {key: _attr_value(value) for key, value in f.attrs.items()}
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    arrays = _split_flat(raw, path)
    env_id = next((str(attrs[k]) for k in ("env_id", "env", "env_name") if k in attrs), None)
    env_kwargs = attrs.get("env_kwargs")
    return Dataset(
        **arrays,
        env_id=env_id,
        env_kwargs=json.loads(env_kwargs) if isinstance(env_kwargs, str) else {},
        ref_min_score=_float_or_none(attrs.get("ref_min_score")),
        ref_max_score=_float_or_none(attrs.get("ref_max_score")),
        metadata={"format": "d4rl-hdf5", INFERRED_SPACES: True},
        path=path,
        checksum=sha256_file(path),
    )


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _split_flat(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    rewards = np.asarray(raw["rewards"], dtype=np.float32).reshape(-1)
    n = len(rewards)
    for key in ("observations", "actions", "terminals", "timeouts", "next_observations", "log_probs"):
        if raw[key] is not None and len(raw[key]) != n:
            raise DatasetError(f"{path}: {key} has {len(raw[key])} rows but rewards has {n}", "re-create the file")
    if n == 0:
        raise DatasetError(f"{path} holds no steps", "collect at least one episode")
    terminals = np.asarray(raw["terminals"]).reshape(-1).astype(bool)
    truncations = np.asarray(raw["timeouts"]).reshape(-1).astype(bool)
    if not (terminals[-1] or truncations[-1]):
        truncations[-1] = True  # the trailing unfinished episode is kept, cut off
    ends = np.flatnonzero(terminals | truncations)
    lengths = np.diff(np.concatenate([[-1], ends])).astype(np.int64)
    step_obs = np.asarray(raw["observations"], dtype=np.float32)
    observations = np.empty((n + len(lengths), *step_obs.shape[1:]), dtype=np.float32)
    episode_of_step = np.repeat(np.arange(len(lengths)), lengths)
    observations[np.arange(n) + episode_of_step] = step_obs
    final_source = step_obs if raw["next_observations"] is None else raw["next_observations"]
    observations[ends + np.arange(len(ends)) + 1] = final_source[ends]
    actions, action_space = _flat_actions(np.asarray(raw["actions"]))
    return {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "terminations": terminals,
        "truncations": truncations,
        "episode_lengths": lengths,
        "observation_space": gym.spaces.Box(-np.inf, np.inf, step_obs.shape[1:], np.float32),
        "action_space": action_space,
        "behavior_log_probs": None
        if raw["log_probs"] is None
        else np.asarray(raw["log_probs"], dtype=np.float32).reshape(-1),
    }


def _flat_actions(actions: np.ndarray) -> tuple[np.ndarray, gym.Space]:
    """Integer actions are Discrete(max + 1) (MultiDiscrete when several per step); float actions get a Box
    spanning their per-dimension range."""
    if np.issubdtype(actions.dtype, np.integer) or actions.dtype == np.bool_:
        ints = actions.astype(np.int64)
        if ints.ndim == 2 and ints.shape[1] == 1:
            ints = ints[:, 0]
        if ints.ndim == 1:
            return ints, gym.spaces.Discrete(int(ints.max()) + 1)
        return ints, gym.spaces.MultiDiscrete(ints.max(axis=0) + 1)
    floats = actions.astype(np.float32, copy=False)
    finite = np.where(np.isfinite(floats), floats, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: validation names it
        low, high = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    low, high = np.nan_to_num(low, nan=-np.inf), np.nan_to_num(high, nan=np.inf)
    return floats, gym.spaces.Box(low, high, dtype=np.float32)
