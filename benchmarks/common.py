"""Shared helpers for policylab's benchmarks (protocol: benchmarks/README.md).

Not run on its own: benchmark scripts (e.g. `benchmarks/ppo_cartpole.py`) do `from common import ...`
(a script's own folder is first on `sys.path`). It provides:

* `provenance()`: date, exact command, machine (CPU model from /proc/cpuinfo, cores), git commit
  and package versions, the header of every results file;
* `run_worker()` / `run_alternating()`: each run in a fresh Python subprocess, its whole-process
  wall clock timed by the parent from launch to exit, sides alternating per seed;
* `ThresholdTracker`: time-to-threshold, training time and steps/s, fed by a training callback;
* `summarize()` / `paired()` / `pair_report()`: per-seed ratios, median and min-max over seeds;
  a missing value (None: e.g. a run that never reached the threshold) is counted apart;
* `write_results()`: JSON into `benchmarks/results/<name>-<YYYY-MM-DD>.json`, never overwriting;
* `HelpFormatter`, `positive_int`, `fail()`, `worker_failed()`, `require_precision()`: the scripts' command
  lines and their errors (a user's mistake ends in its `error:` / `fix:` lines and exit status 2, no traceback).

Only the standard library is imported, so a worker that imports this module pays ~nothing for it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from policylab import IterationInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# On Linux time.perf_counter() reads CLOCK_MONOTONIC, one clock for all processes, so a parent's
# launch time and a child's first perf_counter() can be subtracted (interpreter start-up).
SHARED_CLOCK = sys.platform.startswith("linux")


# --- provenance ----------------------------------------------------------------------------------


def cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as key -> value (Linux; else empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    return cpu_fields().get("model name") or platform.processor() or platform.machine()


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # the ones that pick a kernel


def cpu_kind() -> dict[str, Any]:
    """Vendor, family and model numbers and the instruction sets that choose kernels (Linux; else empty): the
    model name alone says "AMD EPYC" for Zen 3, Zen 4 and Zen 5 alike."""
    fields = cpu_fields()
    if not fields:
        return {}
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id"),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def machine_info() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": cpu_model(),
        "cpu_kind": cpu_kind(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in names}


def _git(args: Sequence[str], where: Path) -> str | None:
    """`git *args` in `where`: its output, or None outside git (or without git)."""
    try:
        proc = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if proc.returncode else proc.stdout


def git_state(where: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of the checkout at `where` (default: the scripts') and whether it has uncommitted changes
    (None outside git)."""
    head, status = _git(["rev-parse", "HEAD"], where), _git(["status", "--porcelain"], where)
    if head is None or status is None:
        return {"commit": None, "dirty": None}
    return {"commit": head.strip(), "dirty": bool(status.strip())}


def policylab_source() -> dict[str, Any]:
    """Where this process imports policylab from (an editable install or PYTHONPATH can point at another checkout
    than the scripts'): its directory and whether it is in the scripts' checkout; where it is in another git
    checkout, that one's commit and state too (`git` of the results is the scripts' checkout)."""
    spec = util.find_spec("policylab")  # the package's location, without importing it
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    if not places:
        return {"path": None}
    path = Path(places[0]).resolve()
    top = _git(["rev-parse", "--show-toplevel"], path)
    here = _git(["rev-parse", "--show-toplevel"], REPO_ROOT)
    same = top is not None and here is not None and Path(top.strip()).resolve() == Path(here.strip()).resolve()
    info: dict[str, Any] = {"path": str(path), "in_scripts_checkout": same}
    if not same:
        info["git"] = git_state(path) if top is not None else None  # None: not a git checkout
    return info


def provenance(packages: Sequence[str]) -> dict[str, Any]:
    """Date, exact command, machine, git state (of the scripts' checkout, and where the imported policylab is
    another checkout, of that one) and package versions: the header of every results file."""
    now = _dt.datetime.now().astimezone()
    command = shlex.join([sys.executable, *sys.argv])  # the exact command, as it was run
    return {
        "date": now.date().isoformat(),
        "datetime": now.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "git": git_state(),
        "policylab_source": policylab_source(),
        "versions": package_versions(packages),
    }


# --- command lines and errors --------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description as written (its command lines kept) and each option's default, where it has
    one (not None or False) and its help text does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        shown = default is not None and default is not False and default != [] and default is not argparse.SUPPRESS
        if not (action.option_strings and shown) or "default" in text.lower():
            return action.help
        return f"{text} (default: %(default)s)"


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (seeds, steps, threads, repetitions ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def fail(message: str) -> NoReturn:
    """Stop on a user's error: `message` (its `error:` and `fix:` lines) on stderr, exit status 2 (as argparse and
    policylab's CLI), no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


_ERROR_LINE = re.compile(r"^(?:\S+: )?error: (.*)")  # policylab's CLI ("error: ..."), argparse ("prog: error: ...")
_POLICYLAB_EXCEPTION = re.compile(r"^policylab(?:\.\w+)+: (.*)")  # a traceback's last line: policylab.errors.X: ...


def user_error(output: str) -> str | None:
    """What a failed process said about a user's mistake, without its traceback: the message of a policylab error
    (every exception policylab raises is a PolicylabError: the problem and its `fix:` line) that ended it, or else
    its last `error:` line (and the indented lines after it); None for any other failure (a bug, whose traceback is
    what helps)."""
    lines = output.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        # the last traceback's exception line: its first unindented line (its frames are indented)
        at = next((i for i in range(starts[-1] + 1, len(lines)) if lines[i][:1] not in (" ", "\t")), len(lines))
        found = _POLICYLAB_EXCEPTION.match(lines[at]) if at < len(lines) else None
        return "\n".join([f"error: {found.group(1)}", *lines[at + 1 :]]) if found else None
    for i in range(len(lines) - 1, -1, -1):
        found = _ERROR_LINE.match(lines[i])
        if found:
            rest = [line for line in lines[i + 1 :] if line.startswith((" ", "\t"))]
            return "\n".join(["error: " + found.group(1), *rest])
    return None


def worker_failed(what: str, returncode: int, output: str) -> NoReturn:
    """Stop after a failed worker process: on a user's error (`user_error`), its `error:` / `fix:` lines and exit
    status 2; on anything else, the end of the worker's output (its traceback)."""
    said = user_error(output)
    if said is not None:
        fail(f"{what} failed (exit {returncode}):\n{said}")
    raise SystemExit(f"{what} failed (exit {returncode}):\n{output}")


def require_precision(*precisions: str) -> None:
    """Before any run: stop with policylab's error (exit status 2) unless this CPU can run each of `precisions`
    (`policylab.nets.matmul.check_precision`, what a run's `precision` setting checks: bf16 needs native bfloat16
    products, AMX or AVX512-BF16). Imports torch only for bf16."""
    if all(p == "fp32" for p in precisions):
        return
    from policylab.errors import PolicylabError
    from policylab.nets.matmul import check_precision

    for precision in precisions:
        try:
            check_precision(precision)
        except PolicylabError as exc:
            fail(f"error: {exc}")


# --- running one measured subprocess -------------------------------------------------------------


@dataclass
class WorkerResult:
    args: list[str]
    returncode: int
    wall_s: float  # whole-process wall clock, from just before launch to exit, timed by the parent
    launched_at: float  # the parent's time.perf_counter() just before launch
    record: dict[str, Any] | None  # the JSON the worker wrote to its --out file (None if it failed)
    stderr_tail: str


def run_worker(
    script: str | Path,
    args: Sequence[str],
    out: Path,
    timeout: float | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> WorkerResult:
    """Run `python script *args --out out` in a fresh interpreter, from the repository root; `python`: another
    interpreter (a peer's own venv), `env`: variables set on top of this process's environment."""
    cmd = [python or sys.executable, str(script), *args, "--out", str(out)]
    out.unlink(missing_ok=True)
    launched = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )
    wall = time.perf_counter() - launched
    record = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None
    if record is not None and SHARED_CLOCK and isinstance(record.get("t0_abs"), float):
        record["startup_s"] = record["t0_abs"] - launched  # interpreter start-up before the worker's first line
        if isinstance(record.get("worker_end_s"), float):  # interpreter exit after the worker's last line
            record["exit_s"] = wall - record["startup_s"] - record["worker_end_s"]
    tail = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
    return WorkerResult(list(args), proc.returncode, wall, launched, record, tail)


def make_peer_venv(venv: Path, *packages: str) -> None:
    """A peer's own virtual environment (its pins clash with ours): torch 2.13.0 first (the CPU wheel, so that
    the peer's torch requirement installs nothing more), then `packages`. Nothing happens if it exists."""
    python = venv / "bin" / "python"
    if python.exists():
        print(f"{venv} exists")
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *packages], check=True)
    print(f"made {venv}")


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

TRL_VENV = REPO_ROOT / "benchmarks" / ".venv-trl"
TRL_PY = TRL_VENV / "bin" / "python"
"""TRL's own venv (`benchmarks/llm.py --setup`), which the language-model benchmarks run TRL's side in."""
TRL_MAIN_COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"
"""A commit of TRL's repository (2026-07-24, version 1.10.0.dev0) whose experimental trainers the 1.16.0 wheel
no longer has (SSD, BCO, PRM)."""
TRL_MAIN_VENV = REPO_ROOT / "benchmarks" / ".venv-trl-main"
TRL_MAIN_PY = TRL_MAIN_VENV / "bin" / "python"
"""That commit's venv (`benchmarks/llm.py --setup-main`), for the algorithms only it has."""


def trl_worker(script: str | Path, inputs: str, tmp: Path) -> dict[str, Any]:
    """The record of `script --worker trl --inputs INPUTS` run in TRL's venv (1 thread, without our PYTHONPATH: TRL's
    venv must not see ours); an exit showing its stderr if it failed."""
    env = {**ONE_THREAD, "PYTHONPATH": ""}
    res = run_worker(script, ["--worker", "trl", "--inputs", inputs], tmp / "trl.json", python=str(TRL_PY), env=env)
    return worker_record(res, "TRL's worker")


def trl_and_ours(
    doc: str,
    script: Path,
    write_inputs: Callable[[Path], None],
    compute: Callable[[argparse.Namespace, str], Any],
    inputs_name: str = "",
) -> tuple[Any, Any] | None:
    """A script that compares a loss with TRL's on inputs it writes: as TRL's worker (`--worker trl`, run by this
    function in TRL's venv) it writes `compute(a, "trl")` to `--out` and gets None; otherwise it gets (TRL's
    records, `compute(a, "policylab")`), both on the inputs `write_inputs` puts in a temporary directory (the file
    `inputs_name` there, or the directory itself), which `a.inputs` names."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        Path(a.out).write_text(json.dumps(compute(a, a.worker)))
        return None
    require_trl_venv()
    with tempfile.TemporaryDirectory() as tmp:
        a.inputs = str(Path(tmp) / inputs_name) if inputs_name else tmp
        write_inputs(Path(a.inputs))
        return trl_worker(script, a.inputs, Path(tmp)), compute(a, "policylab")


def relative_gap(a: list, b: list) -> float:
    """The largest |a - b| over the largest |b| (two nested lists of numbers of one shape)."""
    import torch

    x, y = torch.tensor(a), torch.tensor(b)
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


def require_trl_venv() -> None:
    if not TRL_PY.exists():
        raise SystemExit("TRL's venv is missing: run `.venv/bin/python benchmarks/llm.py --setup` first")


def start_equivalence_run() -> None:
    """The learner side of a TRL equivalence run: TRL's venv there, one torch thread, the repo importable."""
    require_trl_venv()
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO_ROOT))


def parameter_gap(a_dir: str | Path, b_dir: str | Path) -> dict[str, Any]:
    """Two save_pretrained models' parameters compared: per tensor, max |a - b| / max |b|; the largest of those,
    its tensor's name, and how many tensors were compared."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(a_dir) / "model.safetensors")), load_file(str(Path(b_dir) / "model.safetensors"))
    gaps = {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b if k in a}
    return {"max": max(gaps.values()), "worst": max(gaps, key=lambda k: gaps[k]), "tensors": len(gaps)}


def worker_record(res: WorkerResult, what: str) -> dict[str, Any]:
    """The worker's JSON, or an exit that shows what `what` printed when it failed (`worker_failed`)."""
    if res.record is None:
        worker_failed(what, res.returncode, res.stderr_tail)
    return res.record


def run_alternating(
    script: str | Path,
    workers: Sequence[str],
    seeds: Sequence[int],
    args: Sequence[str],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """For each seed, each worker in turn (so drift hits every side), each in a fresh subprocess:
    `script --worker W --seed S *args --out F`. Stops at the first failure, showing its output."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="policylab-bench-") as tmp:
        for seed in seeds:
            for worker in workers:
                res = run_worker(script, ["--worker", worker, "--seed", str(seed), *args], Path(tmp) / "out.json")
                if res.record is None:
                    worker_failed(f"worker {worker} seed {seed}", res.returncode, res.stderr_tail)
                rec = {**res.record, "order": len(runs), "process_wall_s": res.wall_s}
                if on_record is not None:
                    on_record(rec)
                runs.append(rec)
    return runs


# --- time-to-threshold ---------------------------------------------------------------------------


def config_mismatches(config: Any, expected: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields of a run's resolved config (a dataclass) that differ from `expected`, each as {got, want}: a
    benchmark worker stops on any, so a renamed or re-defaulted option cannot change what is compared."""
    import dataclasses

    cfg = dataclasses.asdict(config)
    return {k: {"got": cfg.get(k), "want": v} for k, v in expected.items() if cfg.get(k) != v}


class ThresholdTracker:
    """Fed once per iteration (time, env step, running mean return) by a training callback; a few float ops.
    Records when the mean first reaches `threshold`, in seconds since the worker's start `t0`."""

    def __init__(self, threshold: float, t0: float) -> None:
        self.threshold, self.t0 = threshold, t0
        self.train_start = self.train_end = 0.0
        self.steps: int = 0
        self.last_mean: float | None = None
        self.hit_time: float | None = None
        self.hit_step: int | None = None

    def observe(self, now: float, step: int, mean: float | None) -> None:
        self.train_end, self.steps, self.last_mean = now, step, mean
        if self.hit_time is None and mean is not None and mean >= self.threshold:
            self.hit_time, self.hit_step = now, step

    def policylab_callback(self) -> Callable[["IterationInfo"], None]:
        """policylab's iteration callback feeding this tracker: the training start from the first iteration's
        elapsed time, then (time, step, running mean return) after each update."""

        def callback(info: "IterationInfo") -> None:
            now = time.perf_counter()
            if self.steps == 0:
                self.train_start = now - info.elapsed
            self.observe(now, info.step, info.mean_return)

        return callback

    def sb3_callback(self, window: int) -> Any:
        """An SB3 callback that feeds this tracker as policylab's iteration callback does: after each update (at
        the next rollout's start) and at the end, with the mean of the last `window` finished training episodes."""
        from stable_baselines3.common.callbacks import BaseCallback

        track = self

        class Callback(BaseCallback):  # type: ignore[misc]
            def _mean(self) -> float | None:
                last = list(self.model.ep_info_buffer or [])[-window:]
                return sum(e["r"] for e in last) / len(last) if last else None

            def _on_training_start(self) -> None:
                track.train_start = time.perf_counter()

            def _on_rollout_start(self) -> None:  # right after the previous update, where policylab's callback runs
                if self.model.num_timesteps:
                    track.observe(time.perf_counter(), self.model.num_timesteps, self._mean())

            def _on_step(self) -> bool:
                return True

            def _on_training_end(self) -> None:
                track.observe(time.perf_counter(), self.model.num_timesteps, self._mean())

        return Callback()

    def record(self, t_setup: float, t_returned: float) -> dict[str, Any]:
        """`t_setup`: just before the model/env were built; `t_returned`: when train()/learn() returned."""
        train, hit = self.train_end - self.train_start, self.hit_time
        return {
            "time_to_threshold_s": None if hit is None else hit - self.t0,
            "steps_to_threshold": self.hit_step,
            "time_to_threshold_train_s": None if hit is None else hit - self.train_start,
            "setup_s": self.train_start - t_setup,
            "train_start_s": self.train_start - self.t0,
            "train_wall_s": train,
            "post_train_s": t_returned - self.train_end,
            "steps": self.steps,
            "train_steps_per_s": self.steps / train,
            "final_train_return": self.last_mean,
        }


# --- summaries -----------------------------------------------------------------------------------


def gym_eval(env_id: str, act: Callable[[Any], Any], first_seed: int, episodes: int = 20) -> dict[str, Any]:
    """The same plain Gymnasium loop for both sides of a benchmark: `episodes` episodes of `act(obs)`, episode i
    reset with first_seed + i."""
    import gymnasium as gym

    start, env, returns = time.perf_counter(), gym.make(env_id), []
    for i in range(episodes):
        obs, _ = env.reset(seed=first_seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return {"eval_return_mean": sum(returns) / len(returns), "eval_returns": returns,
            "eval_s": time.perf_counter() - start}  # fmt: skip


def threshold_metrics(threshold: str, episodes: int) -> tuple[dict[str, "Metric"], dict[str, "Metric"]]:
    """(per-run metrics, details) of a side-by-side training benchmark with a `ThresholdTracker` and a shared
    evaluation of `episodes` episodes."""
    metrics = {
        "process_wall_s": ("process wall clock, launch to exit (s)", ".2f", True),
        "train_wall_s": ("training (s)", ".2f", True),
        "train_steps_per_s": ("training env steps/s", ",.0f", True),
        "time_to_threshold_s": (f"time-to-{threshold} (s since process start)", ".2f", True),
        "steps_to_threshold": (f"env steps to reach {threshold}", ",.0f", True),
        "final_train_return": ("final return, last 20 train episodes", ".1f", True),
        "eval_return_mean": (f"shared deterministic eval, {episodes} episodes", ".1f", True),
    }
    return metrics, {"setup_s": ("set-up before training (s)", ".3f", False)}


def write_worker_record(a: Any, workers: dict[str, Callable[[Any], dict[str, Any]]]) -> None:
    """A worker subprocess's record (side, seed and what `workers[side](a)` measured) into `a.out`."""
    record = {"side": a.worker, "seed": a.seed, **workers[a.worker](a)}
    Path(a.out).write_text(json.dumps(record))


def show_run(rec: dict[str, Any]) -> None:
    """One line per finished run of `run_alternating`."""
    print(f"  {rec['side']:4s} seed {rec['seed']}: wall {rec['process_wall_s']:.1f} s, train "
          f"{rec['train_wall_s']:.1f} s, eval {rec['eval_return_mean']:.1f}", flush=True)  # fmt: skip


def linear_schedule(start: float) -> Callable[[float], float]:
    """SB3's form of rl-zoo's `lin_<start>`: a function of the remaining progress (1 -> 0)."""
    return lambda progress_remaining: start * progress_remaining


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and min-max over the values present; None values are counted as missing."""
    v = [float(x) for x in values if x is not None]
    return {
        "n": len(v),
        "missing": len(values) - len(v),
        "median": statistics.median(v) if v else None,
        "min": min(v) if v else None,
        "max": max(v) if v else None,
    }


def late_mean(curve: Sequence[Sequence[float]], last_step: float) -> float:
    """The mean return of a run's evaluations (step, return) over the last 40% of its steps: a less noisy measure
    than the final return alone."""
    late = [r for step, r in curve if step >= 0.6 * last_step]
    return sum(late) / len(late)


def curve_record(curve: list[list[float]], steps: int, final_return: float) -> dict[str, Any]:
    """With --curve-every: the evaluations during training and the mean return over the last 40% of the run
    (those evaluations and the final one), a less noisy measure than the final return alone."""
    if not curve:
        return {}
    return {"curve": curve, "late_return_mean": late_mean([*curve, [steps, final_return]], steps)}


def eval_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run directory's eval.csv (the run's periodic evaluations), as strings by column."""
    with open(Path(run_dir) / "eval.csv", newline="") as f:
        return list(csv.DictReader(f))


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mean return) of each of a run's periodic evaluations, in the order they ran."""
    return [(int(float(r["step"])), float(r["return_mean"])) for r in eval_rows(run_dir)]


DATASET_SUMMARY_KEYS = ("episodes", "steps", "return_mean", "return_min", "return_max", "normalized_return_mean",
                        "env_id", "checksum")  # fmt: skip


def dataset_summary(path: Path | str) -> dict[str, Any]:
    """What a results file records of a dataset it used: sizes, returns and checksum. make_datasets.py trains its
    behaviour policy anew on each machine, so two machines' "hopper-medium" can differ (normalized 13 on one, 66
    on another): results are only comparable where these agree."""
    from policylab.data.dataset import load_dataset
    from policylab.errors import PolicylabError

    try:
        info = load_dataset(path, validate=False).info()
    except PolicylabError as exc:  # not a dataset: policylab's error and fix, before any run
        fail(f"error: {exc}")
    where = Path(path).resolve()
    shown = where.relative_to(REPO_ROOT) if where.is_relative_to(REPO_ROOT) else where
    return {"path": str(shown)} | {k: info.get(k) for k in DATASET_SUMMARY_KEYS}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_summary(s: dict[str, Any], spec: str = ".2f") -> str:
    """'1.23 [1.01-1.50]' (just the value for one run) plus '(k missing)' when some runs had no value."""
    text = fmt(s["median"], spec) + (f" [{fmt(s['min'], spec)}-{fmt(s['max'], spec)}]" if s["n"] > 1 else "")
    return text + (f" ({s['missing']} missing)" if s["missing"] else "")


def index_runs(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(side, seed): record} for records that carry 'side' and 'seed'."""
    return {(r["side"], r["seed"]): r for r in runs}


def paired(by: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int], key: str, a: str, b: str) -> dict[str, Any]:
    """Summaries of `key` for sides a and b, and of the per-seed ratio a/b (pairs with a missing side are missing)."""
    va, vb = [by[(a, s)].get(key) for s in seeds], [by[(b, s)].get(key) for s in seeds]
    return {"ratio": summarize([ratio(x, y) for x, y in zip(va, vb)]), a: summarize(va), b: summarize(vb)}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


Metric = tuple[str, str, bool]
"""(label, number format, whether the per-seed ratio a/b is worth printing)."""


def pair_report(
    runs: Sequence[dict[str, Any]],
    seeds: Sequence[int],
    per_run: dict[str, Metric],
    extra: dict[str, Metric],
    a: str,
    b: str,
    names: tuple[str, str],
) -> dict[str, Any]:
    """Print per-seed values of `per_run` with the ratio a/b, then median [min-max] over seeds of
    `per_run` and `extra`; return those summaries (for the JSON)."""
    by = index_runs(runs)
    rows = []
    for s in seeds:
        ra, rb = by[(a, s)], by[(b, s)]
        rows += [
            [str(s), label, fmt(ra.get(k), f), fmt(rb.get(k), f), fmt(ratio(ra.get(k), rb.get(k)))]
            for k, (label, f, _) in per_run.items()
        ]
    print_table(["seed", "per run", *names, f"{names[0]}/{names[1]}"], rows)
    summary = {k: paired(by, seeds, k, a, b) for k in {**per_run, **extra}}
    rows = [
        [
            label,
            fmt_summary(summary[k]["ratio"]) if show_ratio else "",
            fmt_summary(summary[k][a], f),
            fmt_summary(summary[k][b], f),
        ]
        for k, (label, f, show_ratio) in {**per_run, **extra}.items()
    ]
    print(f"\nmedian [min-max] over {len(seeds)} seed(s)")
    print_table(["summary", f"{names[0]}/{names[1]}", *names], rows)
    return summary


# --- results -------------------------------------------------------------------------------------


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>-<YYYY-MM-DD>.json; an existing file is never overwritten (-2, -3 ...)."""
    date, n = _dt.date.today().isoformat(), 2
    path = RESULTS_DIR / f"{name}-{date}.json"
    while path.exists():
        path, n = RESULTS_DIR / f"{name}-{date}-{n}.json", n + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
