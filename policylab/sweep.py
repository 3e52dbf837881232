"""Sweeps over seeds and config grids as Ray tasks: `policylab sweep` and `pl.sweep`.

A sweep is a directory: `sweep.yaml` (what was asked), `runs/` with one ordinary run directory per (config, seed),
`runs.csv` (each run's status, final return and error, rewritten as runs end) and, at the end, `report/` (the
multi-seed report of `policylab report`, one group per grid point). Each run is one Ray task that calls
`pl.train` with `threads` torch threads and asks Ray for as many CPUs, so runs side by side never oversubscribe
the cores. Runs write their directories themselves: the sweep directory must be on storage every Ray node sees
(the local disk for a local Ray; a shared file system such as NFS on a cluster). Nothing but a small status dict
travels back through Ray's object store.

Each task starts by looking at its run directory: a finished run (eval.json) is skipped, an interrupted one
(a checkpoint) resumes from its checkpoint, anything else starts afresh. So `--resume` (and a task that Ray
retries after its node died) continues where the run stopped. Ctrl-C writes a stop file that every run checks
twice a second: each started run saves a checkpoint and returns, runs not yet started return at once; a second
Ctrl-C cancels the tasks without waiting.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policylab.checkpoint import atomic_write_text
from policylab.cluster import import_ray, start_ray
from policylab.config import apply_values, check_seed, field_types
from policylab.errors import ConfigError, PolicylabError, suggest
from policylab.logging import SUMMARY_JSON, TRAIN_CSV

SWEEP_YAML = "sweep.yaml"
RUNS_CSV = "runs.csv"
STOP_FILE = ".stop"
ERROR_TXT = "error.txt"
RUNS = "runs"
REPORT = "report"
STOP_CHECK_S = 0.5
"""How often a run looks for the stop file (a stat of one file)."""
WAIT_S = 0.2
"""The driver's longest wait for a run to end: how late it may notice a Ctrl-C."""
DEFAULT_RETRIES = 3
"""Times Ray reruns a task whose worker or node died (the rerun resumes from the run's checkpoint)."""


# --- what a sweep is ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name under runs/, its seed and its grid point."""

    name: str
    seed: int
    params: dict[str, str]


@dataclass
class SweepSpec:
    """What a sweep runs: every grid point (cartesian product of `grid`, times each of `points`) x every seed."""

    algo: str
    env: str | None
    steps: int | None
    seeds: list[int]
    grid: dict[str, list[str]] = field(default_factory=dict)
    points: list[dict[str, str]] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    preset: str = "auto"
    dataset: str | None = None
    threads: int = 1

    def grid_points(self) -> list[dict[str, str]]:
        keys = list(self.grid)
        combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]
        return [{**point, **combo} for point in (self.points or [{}]) for combo in combos]

    def name(self) -> str:
        """<algo>-<env>, safe as a directory name: the env its runs train in (--env, else --set env=..., else the
        algorithm's default env, as for `policylab train`), or the dataset's name for a dataset and no env."""
        source = self.env or self.overrides.get("env") or (Path(self.dataset).name if self.dataset else None)
        if source is None:
            from policylab.algos import get_algo

            source = str(get_algo(self.algo).config_cls().env)
        return f"{self.algo}-{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}"

    def runs(self) -> list[RunSpec]:
        out = []
        for params in self.grid_points():
            tag = "".join(f"-{k}={re.sub(r'[^A-Za-z0-9_.+-]', '_', v)}" for k, v in params.items())
            out += [RunSpec(f"{self.name()}{tag}-s{seed}", seed, params) for seed in self.seeds]
        return out

    def grid_keys(self) -> list[str]:
        return list(dict.fromkeys([*(k for p in self.points for k in p), *self.grid]))


def _items(text: str, given: str, example: str) -> list[str]:
    """The comma-separated items of `text`, stripped; an empty one (`a,,b`, a trailing comma) is an error naming
    the flag as `given` (e.g. "--seeds '1,,2'")."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigError(f"{given} has an empty item (two commas in a row, or one at an end)", example)
    return items


def parse_seeds(text: str) -> list[int]:
    """'1-10' -> 1..10; '1,3,5'; '1-3,7'. Seeds are whole numbers >= 0 (`check_seed`), each given once."""
    example = "write e.g. --seeds 1-10 or 1,2,5 (whole numbers >= 0)"
    if not text.strip():
        raise ConfigError("--seeds '' gives no seeds", example)
    seeds: list[int] = []
    for part in _items(text, f"--seeds {text!r}", example):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ConfigError(
                f"--seeds {text!r}: seeds are whole numbers >= 0 (or ranges FIRST-LAST of them), and {part!r} is not",
                example,
            )
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ConfigError(f"--seeds {text!r}: the range {part!r} is empty", f"write it upwards: {last}-{first}")
        seeds += range(first, last + 1)
    _check_distinct_seeds(seeds, f"--seeds {text!r}")
    return seeds


def _check_distinct_seeds(seeds: Sequence[int], given: str) -> None:
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        listed = ", ".join(map(str, repeated))
        raise ConfigError(f"{given} gives seed{'s' if len(repeated) > 1 else ''} {listed} twice", "give each seed once")


def seed_list(seeds: str | int | Sequence[int] | None) -> list[int]:
    """`pl.sweep`'s seeds: a --seeds string, one seed, or a list of them (None: seed 1)."""
    if seeds is None:
        return [1]
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    out: list[Any] = list(seeds) if isinstance(seeds, Sequence) else [seeds]  # check_seed: each an int >= 0
    for seed in out:
        check_seed(seed)
    if not out:
        raise ConfigError("seeds=[] gives no seeds", "give at least one, e.g. seeds='1-5' or seeds=[1, 2]")
    _check_distinct_seeds(out, f"seeds={out}")
    return out


def parse_grid(pairs: Sequence[str]) -> dict[str, list[str]]:
    """['lr=1e-4,3e-4', 'tau=0.005'] -> {'lr': ['1e-4', '3e-4'], 'tau': ['0.005']}."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, values = (part.strip() for part in pair.partition("="))
        if not sep or not key or not values:
            raise ConfigError(f"--grid {pair!r} is not key=value1,value2,...", "write e.g. --grid lr=1e-4,3e-4")
        if key in grid:
            raise ConfigError(
                f"--grid {pair!r} repeats the key {key!r} (already --grid {key}={','.join(grid[key])})",
                f"give each key once, with all its values: --grid {key}={','.join([*grid[key], values])}",
            )
        grid[key] = _items(values, f"--grid {pair!r}", "write e.g. --grid lr=1e-4,3e-4")
    return grid


def parse_point(text: str) -> dict[str, str]:
    """'lr=1e-4,tau=0.005' -> {'lr': '1e-4', 'tau': '0.005'}: one explicit grid point."""
    example = "write e.g. --point lr=1e-4,tau=0.005"
    if not text.strip():
        raise ConfigError("an empty --point", example)
    point: dict[str, str] = {}
    for pair in _items(text, f"--point {text!r}", example):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--point {text!r} is not key=value,key=value", example)
        if key in point:
            raise ConfigError(f"--point {text!r} sets {key!r} twice", f"give {key} one value per --point")
        point[key] = value
    return point


def check_spec(spec: SweepSpec) -> None:
    """Every grid point resolves to a valid config, and each run has a directory of its own: unknown keys, bad
    values, a key given by two flags, a repeated value or point and a missing dataset fail here, before Ray
    starts, each as one error naming the flag it came from."""
    from policylab.algos import get_algo

    algo = get_algo(spec.algo)
    if not spec.seeds:
        raise ConfigError("the sweep has no seeds", "give at least one: --seeds 1-3")
    for seed in spec.seeds:  # every seed, not only the first one resolve_config sees below
        check_seed(seed)
    _check_distinct_seeds(spec.seeds, f"seeds={spec.seeds}")
    fields = field_types(algo.config_cls)
    for key in spec.grid_keys():
        if key not in fields:
            raise ConfigError(
                f"--grid/--point key {key!r} is not a config field of {algo.name}.{suggest(key, fields)}",
                f"valid keys for {algo.config_cls.__name__}: {', '.join(sorted(fields))}",
            )
    for key, flag in (("seed", "--seeds"), ("threads", "--threads")):
        if key in spec.grid_keys() or key in spec.overrides:
            raise ConfigError(f"{key!r} in --grid/--point/--set: the sweep sets it", f"use {flag}")
    if spec.threads < 1:
        raise ConfigError(f"threads={spec.threads}", "each run needs at least 1 thread: --threads 1")
    empty = [key for key, values in spec.grid.items() if not values]
    if empty:
        raise ConfigError(f"the grid axis {empty[0]!r} has no values", f"give it at least one: --grid {empty[0]}=V1,V2")
    _check_keys_given_once(spec)
    _check_values_given_once(spec, algo.config_cls())
    for dataset in (spec.dataset, spec.overrides.get("dataset")):
        if dataset is not None:
            from policylab.data.dataset import dataset_observation_space

            dataset_observation_space(dataset)  # finds the dataset as load_dataset does (metadata only): or fails
    for params in spec.grid_points():
        try:
            cfg = _resolve(spec, params)
        except PolicylabError as exc:
            raise _blame(spec, params, exc) from None
        if cfg.rollout_workers:  # their actors would wait for CPUs the sweep's own tasks hold
            raise ConfigError(
                f"rollout_workers={cfg.rollout_workers} inside a sweep: a sweep's runs step their envs in their own "
                "task, and rollout workers would wait for the CPUs the other runs hold",
                "drop rollout_workers from the sweep (its runs already run side by side), or use --threads",
            )
    runs: dict[str, RunSpec] = {}
    for run in spec.runs():  # distinct values whose names differ only in characters a directory name drops
        if run.name in runs:
            raise ConfigError(
                f"the grid points {_point_text(runs[run.name].params)} and {_point_text(run.params)} would share "
                f"the run directory {run.name}",
                "give values that differ in letters, digits or . _ + -",
            )
        runs[run.name] = run


def _resolve(spec: SweepSpec, params: dict[str, str]) -> Any:
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    overrides = run_overrides(spec, params)
    cfg, _ = resolve_config(
        get_algo(spec.algo), spec.env, spec.steps, spec.seeds[0], None, overrides, spec.preset, spec.dataset
    )
    return cfg


def _blame(spec: SweepSpec, params: dict[str, str], exc: PolicylabError) -> PolicylabError:
    """The error of a grid point that does not resolve, naming the flag of the value it is about (a value that
    passes the type check and fails a range check, e.g. --grid lr=-1), when the sweep's base config resolves."""
    if not params:
        return exc
    try:
        _resolve(spec, {})
    except PolicylabError:
        return exc  # not the grid point's doing (--set, --steps, --env ...): the error names its own source
    named = [key for key in params if re.search(rf"(?<![\w.]){re.escape(key)}\b", exc.problem)]
    if named:
        where = ", ".join(f"{key}={params[key]} in {'--grid' if key in spec.grid else '--point'}" for key in named)
        return ConfigError(f"{exc.problem} (from {where})", exc.fix)
    return ConfigError(f"the grid point {_point_text(params)} (from --grid/--point): {exc.problem}", exc.fix)


def _point_text(params: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in params.items())


def _check_keys_given_once(spec: SweepSpec) -> None:
    """A key belongs to one flag: --grid, --point or --set (a second one would silently win over the first)."""
    for key in spec.grid_keys():
        flags = [
            flag
            for flag, given in (
                ("--grid", key in spec.grid),
                ("--point", any(key in point for point in spec.points)),
                ("--set", key in spec.overrides),
            )
            if given
        ]
        if len(flags) > 1:
            raise ConfigError(
                f"{key!r} is given by both {' and '.join(flags)}",
                f"give {key} in one of them: its values as --grid {key}=V1,V2, in each --point, or one value for "
                "every run as --set",
            )


def _check_values_given_once(spec: SweepSpec, defaults: Any) -> None:
    """Each value checked alone against its field's type (so that a bad one is named with its flag), and no value
    of a --grid axis nor any --point given twice: both copies would run in one run directory."""

    def value(key: str, text: str, source: str) -> Any:
        return getattr(apply_values(defaults, {key: text}, source), key)

    for key, options in spec.grid.items():
        coerced = [value(key, text, "--grid") for text in options]
        first = [coerced.index(v) for v in coerced]  # where each value is given first
        repeat = next((i for i, j in enumerate(first) if j != i), None)
        if repeat is not None:
            twin, text = options[first[repeat]], options[repeat]
            same = f"the value {text} twice" if twin == text else f"{twin} and {text}, the same value"
            kept = ",".join(t for i, t in enumerate(options) if first[i] == i)
            raise ConfigError(
                f"--grid {key}={','.join(options)} gives {same}", f"give each value once: --grid {key}={kept}"
            )
    points: list[tuple[dict[str, Any], dict[str, str]]] = []
    for point in spec.points:
        coerced_point = {key: value(key, text, "--point") for key, text in point.items()}
        twin_point = next((p for c, p in points if c == coerced_point), None)
        if twin_point is not None:
            given = f"--point {_point_text(point)}"
            if twin_point == point:
                raise ConfigError(f"{given} is given twice", "give each point once")
            raise ConfigError(f"--point {_point_text(twin_point)} and {given} are the same grid point", "drop one")
        points.append((coerced_point, point))


def run_overrides(spec: SweepSpec, params: dict[str, str]) -> dict[str, Any]:
    return {**spec.overrides, **params, "threads": spec.threads}


# --- one run, inside a Ray worker --------------------------------------------------------------------------------


class StopFile:
    """A pl.train callback that stops the run (with a checkpoint) once `path` exists; it looks twice a second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next = 0.0

    def __call__(self, _info: Any) -> bool | None:
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + STOP_CHECK_S
        return False if self.path.exists() else None


def execute_run(job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or skip) one run of a sweep and return its status; never raises for the run's own errors."""
    from policylab.checkpoint import find_checkpoint
    from policylab.errors import CheckpointError
    from policylab.train import train

    sweep_dir, run = Path(job["sweep_dir"]), RunSpec(**job["run"])
    run_dir = sweep_dir / RUNS / run.name
    stop = StopFile(sweep_dir / STOP_FILE)
    result: dict[str, Any] = {"name": run.name, "status": "done", "error": None}
    if (run_dir / SUMMARY_JSON).exists():
        return {**result, "skipped": True}
    if stop.path.exists():
        return {**result, "status": "not started"}
    started = time.perf_counter()
    try:
        try:
            find_checkpoint(run_dir)
            resumable = True
        except CheckpointError:
            resumable = False
        if resumable:
            out = train(job["algo"], resume=run_dir, steps=job["steps"], callback=stop, verbose=False)
        else:
            if run_dir.exists():  # started, but stopped before its first checkpoint: nothing to keep
                import shutil

                shutil.rmtree(run_dir)
            out = train(
                job["algo"],
                env=job["env"],
                steps=job["steps"],
                seed=run.seed,
                dataset=job["dataset"],
                overrides=job["overrides"] | run.params,
                preset=job["preset"],
                name=run.name,
                runs_dir=sweep_dir / RUNS,
                callback=stop,
                verbose=False,
            )
    except Exception as exc:  # a failed run is reported, and the others go on
        trace = traceback.format_exc()
        if run_dir.is_dir():  # the whole traceback beside the run's logs (runs.csv has its last line)
            atomic_write_text(run_dir / ERROR_TXT, trace)
        return {**result, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": trace}
    result["seconds"] = time.perf_counter() - started
    if out.interrupted:
        return {**result, "status": "stopped", "resumed": resumable}
    return {**result, "final_return": (out.final_eval or {}).get("return_mean"), "resumed": resumable}


# --- the driver -------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Where the sweep is and how each run ended (status: done, stopped, not started, failed)."""

    dir: Path
    runs: list[RunSpec]
    results: dict[str, dict[str, Any]]
    report: Path | None = None
    interrupted: bool = False

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r["status"] == "failed"]

    def run_dir(self, name: str) -> Path:
        return self.dir / RUNS / name


def check_capacity(workers: int, threads: int, resumed: bool = False) -> None:
    total = int(import_ray().cluster_resources().get("CPU", 0))
    if workers * threads > total:
        raise PolicylabError(
            f"{workers} workers x {threads} threads need {workers * threads} CPUs; the Ray cluster has {total}",
            capacity_fix(workers, threads, total, resumed),
        )


def capacity_fix(workers: int, threads: int, cpus: int, resumed: bool = False) -> str:
    """The fix for `workers` x `threads` above `cpus`: fewer workers where one run fits, else fewer threads
    (a resumed sweep keeps its --threads: only --workers and --address may change)."""
    if threads <= cpus:
        return f"pass --workers {cpus // threads}" + ("" if resumed else " (or fewer --threads)")
    if resumed:
        return f"its runs take --threads {threads}: resume it on a Ray cluster with that many CPUs per node (--address)"
    if workers == 1 or cpus < 2:
        return f"pass --threads {max(cpus, 1)}" + (" --workers 1" if workers > 1 else "")
    if cpus // workers >= 1:
        return f"pass --threads {cpus // workers} (or --workers 1 --threads {cpus})"
    return f"pass --workers {cpus} --threads 1 (or --workers 1 --threads {cpus})"


def check_sweeps_dir(root: Path) -> None:
    """`root` is a directory new sweep directories can be made in (or can be made itself): checked before Ray
    starts, so that a bad --sweeps-dir is one error, not an OSError once Ray is up."""
    existing = root
    while not os.path.lexists(existing):  # the nearest part that exists: mkdir makes the rest under it
        existing = existing.parent
    fix = "give a directory (made if missing), e.g. --sweeps-dir sweeps"
    if not existing.is_dir():
        what = " (it is not a directory)" if existing == root else f": {existing} is not a directory"
        raise ConfigError(f"--sweeps-dir {root} cannot hold sweeps{what}", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--sweeps-dir {root}: {existing} is not writable", fix)


def new_sweep_dir(root: Path, name: str) -> Path:
    """sweeps/<name>-1, -2, ... (never reuse a sweep's directory)."""
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while (root / f"{name}-{n}").exists():
        n += 1
    path = root / f"{name}-{n}"
    path.mkdir()
    return path


def write_sweep_yaml(path: Path, spec: SweepSpec, workers: int, address: str | None) -> None:
    data = {**asdict(spec), "workers": workers, "address": address}
    atomic_write_text(path / SWEEP_YAML, yaml.safe_dump(data, sort_keys=False))


def sweep_dir_of(resume: str | Path) -> Path:
    """The sweep directory `--resume` names: the directory, or its sweep.yaml."""
    path = Path(resume).expanduser().resolve()
    if path.name == SWEEP_YAML and path.is_file():
        path = path.parent
    if not (path / SWEEP_YAML).is_file():
        what = "does not exist" if not path.exists() else f"is not a sweep directory (no {SWEEP_YAML} in it)"
        raise PolicylabError(
            f"--resume {str(resume)!r} {what}",
            "give the sweep's directory, the one holding sweep.yaml: e.g. --resume sweeps/ppo-CartPole-v1-1",
        )
    return path


_SCALAR = (str, int, float, bool)
_SAVED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "algo": ("an algorithm's name", lambda v: isinstance(v, str)),
    "env": ("an env id or null", lambda v: v is None or isinstance(v, str)),
    "steps": ("a whole number or null", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
    "seeds": (
        "a list of whole numbers",
        lambda v: isinstance(v, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in v),
    ),
    "grid": (
        "a mapping of key: [values]",
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(o, list) and all(isinstance(x, _SCALAR) for x in o) for o in v.values())
        ),
    ),
    "points": (
        "a list of mappings key: value",
        lambda v: (
            isinstance(v, list)
            and all(isinstance(p, dict) and all(isinstance(x, _SCALAR) for x in p.values()) for p in v)
        ),
    ),
    "overrides": (
        "a mapping key: value",
        lambda v: isinstance(v, dict) and all(isinstance(x, _SCALAR) for x in v.values()),
    ),
    "preset": ("a preset name", lambda v: isinstance(v, str)),
    "dataset": ("a path or null", lambda v: v is None or isinstance(v, str)),
    "threads": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "workers": ("a whole number or null", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
    "address": ("a Ray address or null", lambda v: v is None or isinstance(v, str)),
}
_REQUIRED = ("algo", "env", "steps", "seeds")


def read_sweep_yaml(path: Path) -> tuple[SweepSpec, int | None, str | None]:
    """The settings a sweep was started with (its sweep.yaml), each checked: a file edited or damaged since is one
    error naming it, not a traceback."""
    file = path / SWEEP_YAML
    fix = (
        f"restore {file} as `policylab sweep` wrote it (keys: {', '.join(_SAVED)}), or start a new sweep "
        "(without --resume)"
    )
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}", fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}", fix) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a {type(data).__name__}, not a sweep's settings (a mapping)", fix)
    unknown = [str(key) for key in data if key not in _SAVED]
    missing = [key for key in _REQUIRED if key not in data]
    if unknown or missing:
        parts = [f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else []
        parts += [f"no {', '.join(missing)}"] if missing else []
        raise ConfigError(f"{file} is not a sweep's settings: {'; '.join(parts)}", fix)
    for key, (what, ok) in _SAVED.items():
        if key in data and not ok(data[key]):
            raise ConfigError(f"{file}: {key} is {data[key]!r}, not {what}", fix)
    workers, address = data.pop("workers", None), data.pop("address", None)
    data["grid"] = {str(k): [str(v) for v in values] for k, values in data.get("grid", {}).items()}
    data["points"] = [{str(k): str(v) for k, v in point.items()} for point in data.get("points", [])]
    data["overrides"] = {str(k): str(v) for k, v in data.get("overrides", {}).items()}
    return SweepSpec(**data), workers, address


def write_runs_csv(path: Path, runs: list[RunSpec], results: dict[str, dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = sorted({k for r in runs for k in r.params})
    writer.writerow(["name", "seed", *keys, "status", "final_return", "error"])
    for r in runs:
        res = results.get(r.name, {"status": "pending"})
        ret = res.get("final_return")
        row = [r.name, r.seed, *(r.params.get(k, "") for k in keys), res["status"], "" if ret is None else ret]
        writer.writerow([*row, res.get("error") or ""])
    atomic_write_text(path / RUNS_CSV, buffer.getvalue())


def latest_progress(run_dir: Path) -> tuple[int, float | None, float | None]:
    """(step, steps/s, return) from the last row of a run's train.csv; zeros before it has one."""
    path = run_dir / TRAIN_CSV
    try:
        with path.open("rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            last = f.read().decode(errors="replace").strip().splitlines()[-1].split(",")
    except (OSError, IndexError):
        return 0, None, None
    if len(last) != len(header) or last[0] == "step":
        return 0, None, None
    row = dict(zip(header, last, strict=True))

    def number(key: str) -> float | None:
        try:
            value = float(row.get(key) or "nan")
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    return int(number("step") or 0), number("fps"), number("return_mean")


def describe(result: dict[str, Any]) -> str:
    """'done (return 500.0, resumed)', 'failed (TrainingDiverged: ...)', 'done (finished before)' ..."""
    if result.get("skipped"):
        return f"{result['status']} (finished before)"
    notes = [result["error"]] if result.get("error") else []
    if result.get("final_return") is not None:
        notes.append(f"return {result['final_return']:.1f}")
    if result.get("resumed"):
        notes.append("resumed from its checkpoint")
    return result["status"] + (f" ({', '.join(notes)})" if notes else "")


class _Interrupt:
    """In the driver: the first Ctrl-C writes the stop file (runs checkpoint and return), the second cancels."""

    def __init__(self, stop_path: Path, cancel: Callable[[], None]) -> None:
        self.stop_path, self.cancel, self.count = stop_path, cancel, 0
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            self.cancel()
            raise KeyboardInterrupt
        self.stop_path.touch()
        print("\ninterrupted: each run saves a checkpoint and stops (Ctrl-C again to cancel at once)", flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class StatusTable:
    """The live table of runs (`live`: rich, on a terminal), a line per run as it ends (`lines`: logs, CI), or
    nothing (`silent`)."""

    def __init__(self, sweep_dir: Path, runs: list[RunSpec], mode: str) -> None:
        self.sweep_dir, self.runs, self.mode = sweep_dir, runs, mode
        self._live: Any = None
        if mode == "live":
            from rich.live import Live

            self._live = Live(self.render({}), refresh_per_second=2)
            self._live.start()

    def render(self, results: dict[str, dict[str, Any]]) -> Any:
        from rich.table import Table

        table = Table(title=f"sweep {self.sweep_dir}")
        for column in ("run", "status", "step", "steps/s", "return"):
            table.add_column(column, justify="left" if column in ("run", "status") else "right")
        for run in self.runs:
            step, fps, ret = latest_progress(self.sweep_dir / RUNS / run.name)
            status = describe(results[run.name]) if run.name in results else ("running" if step else "queued")
            cells = (f"{step:,}", "-" if fps is None else f"{fps:,.0f}", "-" if ret is None else f"{ret:.1f}")
            table.add_row(run.name, status, *cells)
        return table

    def update(self, results: dict[str, dict[str, Any]], ended: list[str]) -> None:
        if self._live is not None:
            self._live.update(self.render(results))
            return
        for name in ended if self.mode == "lines" else []:
            print(f"{name}: {describe(results[name])}", flush=True)

    def close(self, results: dict[str, dict[str, Any]]) -> None:
        if self._live is not None:
            self._live.update(self.render(results))
            self._live.stop()


def new_spec(
    algo: str | None,
    env: str | None,
    steps: int | str | None,
    seeds: str | int | Sequence[int] | None,
    grid: Mapping[str, Sequence[Any]] | None,
    points: Sequence[Mapping[str, Any]],
    overrides: dict[str, Any] | None,
    preset: str | None,
    dataset: str | Path | None,
    threads: int | None,
) -> SweepSpec:
    """A new sweep's spec from `pl.sweep`'s arguments (check_spec checks it against the algorithm's config)."""
    if algo is None:
        raise ConfigError("no algorithm given", "write e.g. `policylab sweep sac --env Pendulum-v1 --seeds 1-3`")
    from policylab.algos import get_algo

    spec = get_algo(algo)
    if steps is not None:  # parsed and checked as `policylab train --steps` does
        steps = apply_values(spec.config_cls(), {"steps": steps}, "the arguments").steps
    threads = 1 if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ConfigError(f"threads={threads!r} is not a whole number", "pass e.g. --threads 1")
    for point in points:
        if not isinstance(point, Mapping):
            raise ConfigError(f"the point {point!r} is not a dict of config values", 'e.g. points=[{"lr": 1e-3}]')
    if dataset is not None:  # an existing path as an absolute one (runs may start elsewhere); a Minari id as given
        path = Path(dataset).expanduser()
        dataset = str(path.resolve()) if path.exists() else str(dataset)
    return SweepSpec(
        algo=spec.name,
        env=env,
        steps=None if steps is None else int(steps),
        seeds=seed_list(seeds),
        grid={k: [str(v) for v in values] for k, values in (grid or {}).items()},
        points=[{k: str(v) for k, v in p.items()} for p in points],
        overrides={k: str(v) for k, v in (overrides or {}).items()},
        preset="auto" if preset is None else preset,
        dataset=dataset,
        threads=threads,
    )


def check_resume_args(resume: str | Path, algo: str | None, **given: Any) -> None:
    """`--resume` continues a sweep with the settings in its sweep.yaml: anything that would change them (and be
    ignored) is an error naming it; only --workers and --address may change."""
    flags = [f"the algorithm {algo!r}"] if algo is not None else []
    flag = {"points": "--point", "overrides": "--set", "sweeps_dir": "--sweeps-dir"}
    flags += [
        flag.get(name, f"--{name}")
        for name, value in given.items()
        if value is not None and not (isinstance(value, (dict, list, tuple)) and not value)
    ]
    if flags:
        raise ConfigError(
            f"--resume continues a sweep with its saved settings ({SWEEP_YAML}): {', '.join(flags)} would be ignored",
            f"drop {', '.join(flags)} (on --resume only --workers and --address may change)",
        )


def sweep(
    algo: str | None = None,
    env: str | None = None,
    steps: int | str | None = None,
    seeds: str | int | Sequence[int] | None = None,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    points: Sequence[Mapping[str, Any]] = (),
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    dataset: str | Path | None = None,
    threads: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    sweeps_dir: str | Path | None = None,
    resume: str | Path | None = None,
    report: bool = True,
    progress: bool | None = None,
    verbose: bool = True,
) -> SweepResult:
    """Train `algo` on every grid point x seed as Ray tasks and return where each run ended.

    `pl.sweep("sac", env="Pendulum-v1", steps=20_000, seeds="1-5", grid={"lr": [1e-4, 3e-4]})`. `seeds`: a
    --seeds string, a seed or a list (default seed 1). `points`: explicit grid points (each a dict), combined with
    every point of `grid`. `preset`: as for pl.train (default auto). `threads`: torch threads (and Ray CPUs) per
    run (default 1). `workers`: runs at once (default: as many as the CPUs hold, threads each). `address`: a Ray
    cluster (default RAY_ADDRESS, else a local Ray). `sweeps_dir`: where the sweep's directory goes (default
    ./sweeps). `resume`: a sweep directory (or its sweep.yaml): finished runs are skipped, interrupted ones resume
    from their checkpoints, with the saved settings (only `workers` and `address` may be given). At the end
    `report/` holds the multi-seed report, one group per grid point.
    """
    say = print if verbose else (lambda *a, **k: None)
    if resume is not None:
        check_resume_args(
            resume, algo=algo, env=env, steps=steps, seeds=seeds, grid=grid, points=points, overrides=overrides,
            preset=preset, dataset=dataset, threads=threads, sweeps_dir=sweeps_dir,
        )  # fmt: skip
        sweep_dir = sweep_dir_of(resume)
        spec, saved_workers, saved_address = read_sweep_yaml(sweep_dir)
        workers = saved_workers if workers is None else workers
        address = address or saved_address
        if not os.access(sweep_dir, os.W_OK | os.X_OK):
            raise PolicylabError(f"cannot write to the sweep directory {sweep_dir}", "resume it as its owner")
    else:
        spec = new_spec(algo, env, steps, seeds, grid, points, overrides, preset, dataset, threads)
        root = Path(sweeps_dir if sweeps_dir is not None else "sweeps").expanduser().resolve()
        check_sweeps_dir(root)
    check_spec(spec)
    import_ray()
    runs = spec.runs()
    local_cpus = os.cpu_count() or 1
    if workers is None:
        workers = max(local_cpus // spec.threads, 1)
    if workers < 1:
        raise ConfigError(f"workers={workers}", "run at least one at a time: --workers 1")
    if not (address or os.environ.get("RAY_ADDRESS")) and workers * spec.threads > local_cpus:
        fix = capacity_fix(workers, spec.threads, local_cpus, resumed=resume is not None)
        raise PolicylabError(
            f"{workers} workers x {spec.threads} threads need {workers * spec.threads} CPUs; this machine has "
            f"{local_cpus}",
            fix if resume is not None else f"{fix}, or run on a cluster: --address",
        )
    started_ray = start_ray(address, workers * spec.threads)
    try:
        check_capacity(workers, spec.threads, resumed=resume is not None)
        if resume is None:
            sweep_dir = new_sweep_dir(root, spec.name())
        write_sweep_yaml(sweep_dir, spec, workers, address)
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)
        count = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {min(workers, len(runs))} at a time"
        say(f"sweep {sweep_dir}: {count}, {spec.threads} thread(s) each")
        live = progress if progress is not None else os.isatty(1)
        results = _drive(sweep_dir, spec, runs, workers, "silent" if not verbose else ("live" if live else "lines"))
    finally:
        if started_ray:
            import_ray().shutdown()
    interrupted = (sweep_dir / STOP_FILE).exists()
    (sweep_dir / STOP_FILE).unlink(missing_ok=True)
    out = SweepResult(sweep_dir, runs, results, interrupted=interrupted)
    done = [r for r in runs if results[r.name]["status"] == "done"]
    if report and not interrupted and done:
        out.report = _report(sweep_dir, spec, done, say)
    _summarize(out, say)
    return out


def _drive(
    sweep_dir: Path, spec: SweepSpec, runs: list[RunSpec], workers: int, display: str
) -> dict[str, dict[str, Any]]:
    """Submit at most `workers` tasks at a time, collect their results, keep runs.csv and the table current."""
    ray = import_ray()
    task = ray.remote(execute_run).options(num_cpus=spec.threads, max_retries=DEFAULT_RETRIES)
    base = {
        "sweep_dir": str(sweep_dir),
        "algo": spec.algo,
        "env": spec.env,
        "steps": spec.steps,
        "dataset": spec.dataset,
        "preset": spec.preset,
    }
    queue = list(runs)
    in_flight: dict[Any, RunSpec] = {}
    results: dict[str, dict[str, Any]] = {}
    table = StatusTable(sweep_dir, runs, display)

    def cancel() -> None:
        for ref in in_flight:
            ray.cancel(ref, force=True)

    try:
        with _Interrupt(sweep_dir / STOP_FILE, cancel):
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    run = queue.pop(0)
                    job = {**base, "run": asdict(run), "overrides": run_overrides(spec, {})}
                    in_flight[task.remote(job)] = run
                # a short wait: Python runs the Ctrl-C handler only between waits
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
                ended = []
                for ref in ready:
                    run = in_flight.pop(ref)
                    results[run.name] = _result_of(ray, ref, run)
                    ended.append(run.name)
                if ended:
                    write_runs_csv(sweep_dir, runs, results)
                table.update(results, ended)
    finally:
        table.close(results)
    return results


def _result_of(ray: Any, ref: Any, run: RunSpec) -> dict[str, Any]:
    try:
        return dict(ray.get(ref))
    except Exception as exc:  # the task itself died (worker or node lost beyond the retries, cancelled)
        return {"name": run.name, "status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def _report(sweep_dir: Path, spec: SweepSpec, done: list[RunSpec], say: Callable[..., None]) -> Path | None:
    from policylab.report import report

    try:
        made = report(
            [sweep_dir / RUNS / r.name for r in done],
            sweep_dir / REPORT,
            group_by=("algo", *spec.grid_keys()),
            overwrite=True,
        )
    except PolicylabError as exc:
        say(f"no report: {exc}")
        return None
    return made.index


def _summarize(out: SweepResult, say: Callable[..., None]) -> None:
    counts: dict[str, int] = {}
    for res in out.results.values():
        counts[res["status"]] = counts.get(res["status"], 0) + 1
    say(f"sweep {out.dir}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for name in out.failed:
        say(f"  failed: {name}: {out.results[name]['error']}")
    if out.interrupted:
        say(f"resume with: policylab sweep --resume {out.dir}")
    elif out.report is not None:
        say(f"report: {out.report}")
    say(f"runs: {out.dir / RUNS_CSV}")


# --- the `policylab sweep` command ------------------------------------------------------------------------------


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train over seeds and a config grid as Ray tasks (local Ray by default)")
    p.add_argument("algo", nargs="?", help="algorithm (see `policylab list`)")
    p.add_argument("--env", help="Gymnasium env id, or module:Class / module:function")
    p.add_argument("--steps", help="total env steps of each run, e.g. 100k")
    p.add_argument("--seeds", help="seeds: a range and/or list, e.g. 1-10 or 1,3,5 (default 1)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeatable)")
    p.add_argument(
        "--point", action="append", default=[], metavar="K1=V1,K2=V2", help="an explicit grid point (repeatable)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config value for every run")
    p.add_argument("--preset", help="auto (the default), none, rl-zoo or an env id (as for train)")
    p.add_argument("--dataset", help="an offline dataset, as for train")
    p.add_argument("--threads", type=int, help="torch threads (and Ray CPUs) per run (default 1)")
    p.add_argument("--workers", type=int, help="runs at once (default: as many as the CPUs hold)")
    p.add_argument("--address", help="a Ray cluster (host:port or ray://host:10001; default RAY_ADDRESS, else local)")
    p.add_argument("--sweeps-dir", help="where sweep directories go (default: ./sweeps)")
    p.add_argument(
        "--resume", help="a sweep directory: skip finished runs, resume interrupted ones (its saved settings)"
    )
    p.add_argument("--no-report", action="store_true", help="skip the multi-seed report at the end")
    p.add_argument("--no-progress", action="store_true", help="a line per finished run instead of the live table")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from policylab.config import parse_set_args

    if args.resume is None and args.algo is None:
        raise ConfigError("no algorithm given", "write e.g. `policylab sweep sac --env Pendulum-v1 --seeds 1-3`")
    out = sweep(
        args.algo,
        env=args.env,
        steps=args.steps,
        seeds=args.seeds,
        grid=parse_grid(args.grid),
        points=[parse_point(p) for p in args.point],
        overrides=parse_set_args(args.set),
        preset=args.preset,
        dataset=args.dataset,
        threads=args.threads,
        workers=args.workers,
        address=args.address,
        sweeps_dir=args.sweeps_dir,
        resume=args.resume,
        report=not args.no_report,
        progress=False if args.no_progress else None,
    )
    if out.interrupted:
        return 130
    return 1 if out.failed else 0
