"""Sweep throughput on this machine: `pl.sweep` on a local Ray with 1 and 2 workers, against the same runs
launched one after another (`policylab train` processes, as a shell loop would), and against Ray Tune running
the same `pl.train` calls.

    .venv/bin/python benchmarks/scale.py --reps 3            # needs the bench extra (ray[tune])

The runs: `--runs` PPO CartPole-v1 runs (a 2-point lr grid x seeds), `--steps` env steps each, 1 thread each,
no periodic evaluation. Each repetition times, in this order: the launches one after another, our sweep with
1 worker, with 2 workers, and Ray Tune with 2 concurrent trials (1 CPU each). Every wall clock includes what a
user waits for (Ray's start and stop for the sweeps and Tune; each process's start for the launches).

Reported, median [min-max] over repetitions:
* runs/hour of each way, and sweep with 2 workers / sweep with 1 (target >= 1.9);
* overhead per run: (wall x concurrency - the runs' own training time) / runs, where a run's training time is
  its eval.json `wall_clock_s` (the same measure for every way): what each way adds to a run (target: ours
  below Ray Tune's);
* Ray's start + stop (one `ray.init` / `ray.shutdown` pair, timed alone).

Rollout workers (`--part workers`): PPO on Hopper-v5 (its preset) with `--envs` envs and `--n-steps` steps per
env per rollout, 1 thread. For each setting (in-process, 1 Ray worker, 2 Ray workers, and 1 inline worker), a
loop is built and `--rollouts` rollouts are timed after one warm-up: the collection (env steps/s of
`loop.collect()`) and the whole iteration (collection + PPO update). Reported: medians over rollouts and
repetitions, 2 workers / 1 worker in collection steps/s (target >= 1.7), and the per-rollout cost of going
through Ray: 1 Ray worker's collection time - 1 inline worker's (the weights' broadcast, the call, the slice's
arrays coming back).

Results go to benchmarks/results/scale-<date>.json (sweeps) and scale_workers-<date>.json (workers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO_ROOT, HelpFormatter, fmt, positive_int, print_table, provenance, write_results

sys.path.insert(0, str(REPO_ROOT))

LRS = ("0.001", "0.0003")
WAYS = ("launches", "sweep-1", "sweep-2", "tune-2")
CONCURRENCY = {"launches": 1, "sweep-1": 1, "sweep-2": 2, "tune-2": 2}


def grid(runs: int) -> list[tuple[str, int]]:
    """(lr, seed) pairs: the 2-point lr grid x runs / 2 seeds."""
    return [(lr, seed) for lr in LRS for seed in range(1, runs // 2 + 1)]


def overrides(lr: str) -> dict[str, Any]:
    return {"lr": lr, "threads": 1, "eval_every": 0, "eval_episodes": 5}


def training_seconds(root: Path) -> list[float]:
    return [json.loads(p.read_text())["wall_clock_s"] for p in sorted(root.rglob("eval.json"))]


def launches(args: argparse.Namespace, root: Path) -> float:
    cli = str(REPO_ROOT / ".venv" / "bin" / "policylab")
    start = time.perf_counter()
    for lr, seed in grid(args.runs):
        command = [cli, "train", "ppo", "--env", "CartPole-v1", "--steps", str(args.steps), "--seed", str(seed)]
        command += [f"--set={k}={v}" for k, v in overrides(lr).items()]
        command += ["--name", f"lr{lr}-s{seed}", "--runs-dir", str(root), "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def sweep(args: argparse.Namespace, root: Path, workers: int) -> float:
    import policylab as pl

    seeds = f"1-{args.runs // 2}"
    fixed = {k: v for k, v in overrides(LRS[0]).items() if k not in ("lr", "threads")}
    start = time.perf_counter()
    out = pl.sweep(
        "ppo", env="CartPole-v1", steps=args.steps, seeds=seeds, grid={"lr": LRS}, overrides=fixed, workers=workers,
        sweeps_dir=root, report=False, verbose=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert not out.failed and len(out.results) == args.runs
    return seconds


def tune_trainable(config: dict[str, Any]) -> dict[str, float]:
    import policylab as pl

    run = pl.train(
        "ppo", env="CartPole-v1", steps=config["steps"], seed=config["seed"], overrides=overrides(config["lr"]),
        name=f"lr{config['lr']}-s{config['seed']}", runs_dir=config["root"], verbose=False,
    )  # fmt: skip
    return {"return": float((run.final_eval or {}).get("return_mean", 0.0))}


def tune(args: argparse.Namespace, root: Path) -> float:
    import logging

    import ray
    from ray import tune as ray_tune

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    space = {
        "lr": ray_tune.grid_search(list(LRS)),
        "seed": ray_tune.grid_search(list(range(1, args.runs // 2 + 1))),
        "steps": args.steps,
        "root": str(root / "runs"),
    }
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(tune_trainable, {"cpu": 1}),
        param_space=space,
        tune_config=ray_tune.TuneConfig(max_concurrent_trials=2),
        run_config=ray_tune.RunConfig(storage_path=str(root / "tune"), verbose=0),
    )
    results = tuner.fit()
    ray.shutdown()
    seconds = time.perf_counter() - start
    assert not results.errors and len(results) == args.runs
    return seconds


def ray_start_stop() -> float:
    import logging

    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.shutdown()
    return time.perf_counter() - start


def measure(args: argparse.Namespace, way: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if way == "launches":
            wall = launches(args, root)
        elif way == "tune-2":
            wall = tune(args, root)
        else:
            wall = sweep(args, root, CONCURRENCY[way])
        trained = training_seconds(root)
    assert len(trained) == args.runs, f"{way}: {len(trained)} runs finished"
    overhead = (wall * CONCURRENCY[way] - sum(trained)) / args.runs
    return {"way": way, "wall_s": wall, "runs_per_hour": 3600 * args.runs / wall, "overhead_per_run_s": overhead,
            "training_s": trained}  # fmt: skip


WORKER_SETTINGS = {"in-process": (0, "ray"), "ray-1": (1, "ray"), "ray-2": (2, "ray"), "inline-1": (1, "inline")}


def time_rollouts(args: argparse.Namespace, workers: int, backend: str) -> dict[str, list[float]]:
    """Seconds of each timed rollout's collection and whole iteration (collect + update)."""
    from policylab.algos import get_algo
    from policylab.train import OnPolicyLoop, resolve_config

    spec = get_algo("ppo")
    overrides = {"num_envs": args.envs, "n_steps": args.n_steps, "threads": 1, "rollout_workers": workers,
                 "rollout_backend": backend}  # fmt: skip
    cfg, _ = resolve_config(spec, "Hopper-v5", 10**9, 1, None, overrides, "auto")
    loop = OnPolicyLoop(spec, cfg)
    out: dict[str, list[float]] = {"collect_s": [], "iteration_s": [], "inside_workers_s": []}
    inside: list[float] = []
    if loop.workers is not None:  # the workers' own collection times, to split the call's cost from the work
        collect = loop.workers.collect

        def timed(*a: Any, **k: Any) -> list[dict[str, Any]]:
            parts = collect(*a, **k)
            inside.append(max(part["seconds"] for part in parts))
            return parts

        loop.workers.collect = timed  # type: ignore[method-assign]
    try:
        for i in range(args.rollouts + 1):
            start = time.perf_counter()
            batch = loop.collect()
            collected = time.perf_counter()
            loop.algo.update(batch, progress=0.0)
            if i:  # the first is a warm-up (worker start, first calls)
                out["collect_s"].append(collected - start)
                out["iteration_s"].append(time.perf_counter() - start)
                if inside:
                    out["inside_workers_s"].append(inside[-1])
    finally:
        loop.close()
    return out


def project_workers(steps: int, collect: float, iteration: float, call: float, slowdown: float) -> None:
    """Projected whole-iteration steps/s with W workers on separate cores: collect x slowdown / W + call + update."""
    update = iteration - collect
    for workers in (2, 4, 8, 16):
        seconds = collect * slowdown / workers + call + update
        print(f"projected, {workers} workers on their own cores: {steps / seconds:,.0f} steps/s")
    print(f"bound (the update alone): {steps / update:,.0f} steps/s; in-process now {steps / iteration:,.0f}")


def workers_part(args: argparse.Namespace) -> None:
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    steps = args.envs * args.n_steps
    rows = []
    for rep in range(args.reps):
        for name, (workers, backend) in WORKER_SETTINGS.items():
            times = time_rollouts(args, workers, backend)
            rows.append({"rep": rep, "setting": name, **times})
            collect = statistics.median(times["collect_s"])
            print(f"rep {rep} {name}: collection {steps / collect:,.0f} env steps/s, whole iteration "
                  f"{steps / statistics.median(times['iteration_s']):,.0f} steps/s", flush=True)  # fmt: skip
    ray.shutdown()
    scaling, overhead = summarize_workers(rows, steps)
    path = write_results(
        "scale_workers",
        {
            "benchmark": "rollout workers: PPO Hopper-v5 collection and iteration speed, in-process / Ray / inline",
            "settings": vars(args),
            "rows": rows,
            "collection_scaling_2_over_1": scaling,
            "ray_cost_per_rollout_s": overhead,
            "provenance": provenance(["torch", "gymnasium", "mujoco", "ray"]),
        },
    )
    print(f"results: {path}")


def summarize_workers(rows: list[dict[str, Any]], steps: int) -> tuple[float, float]:
    """The table of the workers part and its projections; returns (2 / 1 workers in collection, Ray's cost)."""

    def median_of(setting: str, key: str) -> float:
        return statistics.median(v for r in rows if r["setting"] == setting for v in r[key])

    table = [
        [name, f"{steps / median_of(name, 'collect_s'):,.0f}", f"{steps / median_of(name, 'iteration_s'):,.0f}"]
        for name in WORKER_SETTINGS
    ]
    print_table(["setting", "collection steps/s", "whole iteration steps/s"], table)
    scaling = median_of("ray-1", "collect_s") / median_of("ray-2", "collect_s")
    overhead = median_of("ray-1", "collect_s") - median_of("inline-1", "collect_s")
    call = median_of("ray-1", "collect_s") - median_of("ray-1", "inside_workers_s")
    slowdown = median_of("ray-1", "inside_workers_s") / median_of("inline-1", "collect_s")
    project_workers(steps, median_of("in-process", "collect_s"), median_of("in-process", "iteration_s"), call, slowdown)
    print(f"collection, 2 workers / 1 worker: {scaling:.2f}x (target >= 1.7)")
    print(f"Ray's cost per rollout (1 Ray worker - 1 inline worker): {1000 * overhead:.1f} ms, of which the call "
          f"around the worker's collection (broadcast, transfer, learner's merge): {1000 * call:.1f} ms")  # fmt: skip
    return scaling, overhead


def summarize_sweeps(rows: list[dict[str, Any]], startup: list[float]) -> list[float]:
    """The table of the sweeps part; returns sweep-2 / sweep-1 in runs/hour per repetition."""

    def med(way: str, key: str) -> tuple[float, float, float]:
        values = [r[key] for r in rows if r["way"] == way]
        return statistics.median(values), min(values), max(values)

    pairs = list(zip([r for r in rows if r["way"] == "sweep-1"], [r for r in rows if r["way"] == "sweep-2"]))
    scaling = [b["runs_per_hour"] / a["runs_per_hour"] for a, b in pairs]
    table = []
    for way in WAYS:
        rph, over = med(way, "runs_per_hour"), med(way, "overhead_per_run_s")
        trained = statistics.mean(t for r in rows if r["way"] == way for t in r["training_s"])
        table.append([way, f"{rph[0]:.0f} [{rph[1]:.0f}-{rph[2]:.0f}]", f"{over[0]:.2f} [{over[1]:.2f}-{over[2]:.2f}]",
                      f"{trained:.2f}"])  # fmt: skip
    print_table(["way", "runs/hour", "overhead s/run", "training s/run"], table)
    print(f"sweep 2 workers / 1 worker: {fmt(statistics.median(scaling))} [{fmt(min(scaling))}-{fmt(max(scaling))}]")
    start = statistics.median(startup)
    steady = [(a["wall_s"] - start) / (b["wall_s"] - start) for a, b in pairs]
    print(f"Ray start + stop: {fmt(start)} s; without it (a long sweep), 2 workers / 1 worker: "
          f"{fmt(statistics.median(steady))} [{fmt(min(steady))}-{fmt(max(steady))}]")  # fmt: skip
    alone = statistics.mean(t for r in rows if r["way"] == "sweep-1" for t in r["training_s"])
    side_by_side = statistics.mean(t for r in rows if r["way"] == "sweep-2" for t in r["training_s"])
    per_run = statistics.median(r["overhead_per_run_s"] for r in rows if r["way"] == "sweep-1")
    per_run = max(per_run - start / len(rows[0]["training_s"]), 0.0)  # less Ray's start, spread over the runs
    slowdown = side_by_side / alone
    for cpus in (20, 100):
        rate = cpus * 3600 / (alone * slowdown + per_run)
        print(f"projected, {cpus} CPUs (1 thread per run): {rate:,.0f} runs/hour "
              f"(slowdown {slowdown:.2f}, {per_run:.2f} s per run, Ray's start once)")  # fmt: skip
    return scaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--part", choices=("sweeps", "workers"), default="sweeps", help="what to measure")
    parser.add_argument("--runs", type=int, default=8, help="runs per way (an even number: 2 lrs x runs/2 seeds)")
    parser.add_argument("--steps", type=positive_int, default=30_000, help="env steps per run")
    parser.add_argument("--reps", type=positive_int, default=3, help="repetitions")
    parser.add_argument("--envs", type=positive_int, default=16, help="workers part: envs of the PPO Hopper run")
    parser.add_argument("--n-steps", type=positive_int, default=128, help="workers part: steps per env per rollout")
    parser.add_argument("--rollouts", type=positive_int, default=5, help="workers part: timed rollouts per setting")
    parser.add_argument("--summarize", help="print the tables of an earlier results file (either part) and exit")
    args = parser.parse_args()
    if args.summarize:
        data = json.loads(Path(args.summarize).read_text())
        if "collection_scaling_2_over_1" in data:
            summarize_workers(data["rows"], data["settings"]["envs"] * data["settings"]["n_steps"])
        else:
            summarize_sweeps(data["rows"], data["ray_start_stop_s"])
        return
    if args.part == "workers":
        workers_part(args)
        return
    if args.runs < 2 or args.runs % 2:
        parser.error("--runs must be an even number >= 2")
    rows: list[dict[str, Any]] = []
    startup = []
    for rep in range(args.reps):
        startup.append(ray_start_stop())
        for way in WAYS:
            row = {"rep": rep, **measure(args, way)}
            rows.append(row)
            print(f"rep {rep} {way}: {row['wall_s']:.1f} s, {row['runs_per_hour']:.0f} runs/h, "
                  f"overhead {row['overhead_per_run_s']:.2f} s/run", flush=True)  # fmt: skip

    scaling = summarize_sweeps(rows, startup)
    path = write_results(
        "scale",
        {
            "benchmark": "sweep throughput: pl.sweep 1 and 2 workers vs launches one after another vs Ray Tune",
            "settings": vars(args),
            "rows": rows,
            "scaling_2_over_1": scaling,
            "ray_start_stop_s": startup,
            "provenance": provenance(["torch", "gymnasium", "ray"]),
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
