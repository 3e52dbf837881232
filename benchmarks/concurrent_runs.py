"""Runs side by side, as users start seeds: does the default thread setting hold up when the cores are shared?

Run from the repository root:

    .venv/bin/python benchmarks/concurrent_runs.py --reps 3
    .venv/bin/python benchmarks/concurrent_runs.py --reps 3 --algo dqn --env CartPole-v1 --steps 20k

Each measurement launches `policylab train ALGO --env ENV --steps STEPS --seed S --no-progress` (the command
line a user types) with one thread setting: the default (`threads=auto`), `--set threads=1` or
`--set threads=2` (the off-policy default before `auto`). Two modes:

* together: `--runs` processes (default: the usable cores) launched at once, seeds 1..N; the time is the
  wall clock from the launch to the exit of the last one;
* alone: one process (seed 1).

The settings alternate within each repetition (together: default, 1, 2; alone: default, 2) so that drift
hits all of them. Reported, median [min-max] over repetitions:

* together, default / threads=1: the target is <= 1.1 (N default runs on N cores cost no more than N
  single-thread runs);
* together, threads=2 / threads=1: what the old default cost;
* alone, default / threads=2: the target is about 1.0 (one run alone keeps the old default's speed);
* the thread counts the default runs used (train.csv's `threads` column, averaged over their rows).

Output: a table and JSON in benchmarks/results/concurrent_runs-<date>.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    HelpFormatter,
    fmt_summary,
    positive_int,
    print_table,
    provenance,
    ratio,
    summarize,
    write_results,
)

POLICYLAB = str(Path(sys.executable).with_name("policylab"))


def launch(args: argparse.Namespace, threads: str | None, seeds: list[int], runs_dir: Path) -> dict[str, Any]:
    """Start one process per seed at once; wait for all. Returns the wall clock and the threads used."""
    procs = []
    start = time.perf_counter()
    for seed in seeds:
        cmd = [POLICYLAB, "train", args.algo, "--env", args.env, "--steps", args.steps, "--seed", str(seed)]
        cmd += ["--no-progress", "--runs-dir", str(runs_dir), "--name", f"{threads or 'default'}-s{seed}"]
        cmd += [] if threads is None else ["--set", f"threads={threads}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    walls = []
    for proc in procs:
        out = proc.communicate()[0].decode(errors="replace")
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"a run failed (exit {proc.returncode}):\n{out[-3000:]}")
    used = []
    for seed in seeds:
        with (runs_dir / f"{threads or 'default'}-s{seed}" / "train.csv").open() as f:
            used += [float(row["threads"]) for row in csv.DictReader(f)]
    for seed in seeds:
        subprocess.run(["rm", "-rf", str(runs_dir / f"{threads or 'default'}-s{seed}")], check=True)
    return {"wall_s": max(walls), "walls_s": walls, "threads_mean": statistics.fmean(used)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--algo", default="sac", help="policylab train ALGO")
    parser.add_argument("--env", default="Pendulum-v1", help="its --env")
    parser.add_argument("--steps", default="3k", help="its --steps")
    parser.add_argument("--reps", type=positive_int, default=3, help="repetitions of the five measurements")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--runs", type=positive_int, default=cores, help="processes launched together (default: cores)")
    args = parser.parse_args()
    seeds = list(range(1, args.runs + 1))
    reps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="policylab-concurrent-") as tmp:
        for rep in range(args.reps):
            row = {
                "together_default": launch(args, None, seeds, Path(tmp)),
                "together_1": launch(args, "1", seeds, Path(tmp)),
                "together_2": launch(args, "2", seeds, Path(tmp)),
                "alone_default": launch(args, None, [1], Path(tmp)),
                "alone_2": launch(args, "2", [1], Path(tmp)),
            }
            reps.append(row)
            print(f"rep {rep + 1}: " + ", ".join(f"{k} {v['wall_s']:.1f}s" for k, v in row.items()), flush=True)

    def ratios(a: str, b: str) -> dict[str, Any]:
        return summarize([ratio(r[a]["wall_s"], r[b]["wall_s"]) for r in reps])

    summary = {
        "together default / threads=1": ratios("together_default", "together_1"),
        "together threads=2 / threads=1": ratios("together_2", "together_1"),
        "alone default / threads=2": ratios("alone_default", "alone_2"),
        "threads used by default runs, together": summarize([r["together_default"]["threads_mean"] for r in reps]),
        "threads used by default runs, alone": summarize([r["alone_default"]["threads_mean"] for r in reps]),
    }
    print(f"\n{args.runs} x `policylab train {args.algo} --env {args.env} --steps {args.steps}`, {args.reps} reps")
    print_table(["median [min-max] over repetitions", ""], [[k, fmt_summary(v)] for k, v in summary.items()])
    payload = {**provenance(["torch", "gymnasium"]), "args": vars(args), "reps": reps, "summary": summary}
    print(f"\nresults: {write_results('concurrent_runs', payload)}")


if __name__ == "__main__":
    main()
