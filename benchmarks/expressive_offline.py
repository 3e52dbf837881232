"""Offline RL with generative actors against its Gaussian and full-chain baselines: IDQL vs IQL, EDP vs
Diffusion-QL (and consistency_ac), on the Hopper-v5 datasets of benchmarks/make_datasets.py.

    .venv/bin/python benchmarks/expressive_offline.py --steps 20000 --seeds 2
    .venv/bin/python benchmarks/expressive_offline.py --algos idql iql --datasets benchmarks/data/hopper-medium
    .venv/bin/python benchmarks/expressive.py --offline ...         (the same, wired in by the lead)

Measured per run (each in-process, one torch thread, the same seed for every algorithm): gradient steps/s over
the training loop after its first `--log-every` steps (warm-up excluded), and the final policy's evaluation return
over `--eval-episodes` episodes with its normalized score from the dataset's references. Hyperparameters are each
algorithm's defaults (policylab's, the papers' where they apply: algos/idql.py, algos/diffusion_ql.py) unless
`--set key=value` overrides them for all. Without the hopper datasets (benchmarks/make_datasets.py makes them), a
random Hopper-v5 dataset is made as benchmarks/offline.py does: enough for speed, not for scores.

For scores at longer budgets: `--eval-every N` records each run's own evaluations as a normalized score curve,
`--jobs 2` runs two runs side by side (then no speed is recorded), and `--summarize RESULTS` prints the table of
median [min-max] scores over seeds at each evaluation of an earlier results file:

    .venv/bin/python benchmarks/expressive_offline.py --algos iql idql --datasets benchmarks/data/hopper-medium \\
        --steps 100000 --eval-every 20000 --seeds 3 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from common import (
    REPO_ROOT,
    HelpFormatter,
    dataset_summary,
    eval_curve,
    fmt,
    fmt_summary,
    positive_int,
    print_table,
    provenance,
    summarize,
    write_results,
)
from offline import DEFAULT_DATA, ensure_dataset

DATA = REPO_ROOT / "benchmarks" / "data"
DEFAULT_DATASETS = ("hopper-medium", "hopper-medium-replay")
PAIRS = {"idql": "iql", "edp": "diffusion_ql"}
"""Each expressive algorithm and the baseline it is read against."""


def run_one(algo: str, dataset: Path, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import torch

    import policylab as pl
    from policylab.algos import get_algo
    from policylab.data.dataset import load_dataset

    torch.set_num_threads(1)
    known = {f.name for f in dataclasses.fields(get_algo(algo).config_cls)}
    marks: list[tuple[int, float]] = []
    overrides = {
        "threads": 1,
        "eval_every": a.eval_every,
        "checkpoint_every": 0,
        "log_every": a.log_every,
        "eval_episodes": a.eval_episodes,
        **{k: v for k, v in a.overrides.items() if k in known},  # e.g. head options only where a head is
    }
    with tempfile.TemporaryDirectory() as runs:
        run = pl.train(algo, dataset=str(dataset), steps=a.steps, seed=seed, overrides=overrides, preset="none",
                       runs_dir=runs, callback=lambda info: marks.append((info.step, time.perf_counter())) or True,
                       verbose=False)  # fmt: skip
        policy = pl.load(run.dir)
        curve = eval_curve(run.dir) if a.eval_every else []
    result = pl.evaluate(policy, a.eval_episodes, seed=10_000 + seed)
    data = load_dataset(dataset, validate=False)
    score = data.normalized_score(result["return_mean"])
    timed = marks[1:] if len(marks) > 1 else marks
    steps_per_s = None
    if a.jobs == 1 and len(timed) > 1 and timed[-1][1] > timed[0][1]:
        steps_per_s = (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])
    record = {
        "algo": algo,
        "dataset": dataset.name,
        "seed": seed,
        "steps": a.steps,
        "return_mean": result["return_mean"],
        "score": None if score is None else float(score),
        "grad_steps_per_s": steps_per_s,
        "score_curve": [[step, _maybe_float(data.normalized_score(ret))] for step, ret in curve],
    }
    print(f"{dataset.name:24s} {algo:15s} seed {seed}: score {fmt(record['score'], '6.1f')}  "
          f"{fmt(steps_per_s, '7.1f')} grad steps/s", flush=True)  # fmt: skip
    return record


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--algos", nargs="+", default=["idql", "iql", "edp", "diffusion_ql"], help="policylab algorithms")
    p.add_argument("--datasets", nargs="+", default=None, help="dataset paths (default: the hopper datasets)")
    p.add_argument("--steps", type=positive_int, default=20_000, help="gradient steps per run")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per algorithm and dataset")
    p.add_argument("--log-every", type=positive_int, default=1_000, help="steps per log interval (the first not timed)")
    p.add_argument("--eval-episodes", type=positive_int, default=10, help="episodes of the final evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="the runs' own periodic evaluations (a score curve)")
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="runs in parallel processes (then scores only: no speed)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every run whose config has the key",
    )
    p.add_argument("--no-save", action="store_true", help="print only; write no results file")
    p.add_argument("--summarize", metavar="RESULTS", help="print the score table of an earlier results file and exit")
    a = p.parse_args(argv)
    bad = [s for s in a.set if "=" not in s]
    if bad:
        p.error(f"--set {bad[0]!r} is not of the form KEY=VALUE")
    a.overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.summarize:
        return a
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.algos import ALGORITHMS

    unknown = [algo for algo in a.algos if algo not in ALGORITHMS]
    if unknown:
        p.error(f"--algos: unknown {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    missing = [d for d in a.datasets or [] if not Path(d).exists()]
    if missing:
        p.error(
            f"--datasets: no dataset at {', '.join(missing)}: make the hopper ones with `.venv/bin/python "
            "benchmarks/make_datasets.py --env Hopper-v5`, others with `policylab collect ... --out PATH`"
        )
    return a


def score_table(records: list[dict[str, Any]]) -> None:
    """Per dataset and algorithm: the median [min-max] over seeds of the normalized score at each of the runs'
    own evaluations, and of the final policy's separate evaluation."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["algo"]), []).append(r)
    steps = sorted({step for r in records for step, _ in r.get("score_curve", [])})
    print_table(
        ["dataset", "algo", "seeds", *(f"{step:,}" for step in steps), "final"],
        [
            [dataset, algo, str(len(rows))]
            + [fmt_summary(summarize([_score_at(r, step) for r in rows]), ".1f") for step in steps]
            + [fmt_summary(summarize([r["score"] for r in rows]), ".1f")]
            for (dataset, algo), rows in groups.items()
        ],
    )


def _score_at(record: dict[str, Any], step: int) -> float | None:
    return next((score for at, score in record.get("score_curve", []) if at == step), None)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.summarize:
        score_table(json.loads(Path(a.summarize).read_text())["runs"])
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    if a.datasets:
        datasets = [Path(d) for d in a.datasets]
    else:
        datasets = [DATA / name for name in DEFAULT_DATASETS if (DATA / name).exists()]
        if not datasets:
            print(f"no hopper datasets in {DATA} (benchmarks/make_datasets.py makes them): a random one for speed")
            datasets = [ensure_dataset(DEFAULT_DATA, 50)]
    jobs = [(algo, dataset, seed) for dataset in datasets for seed in range(a.seeds) for algo in a.algos]
    if a.jobs == 1:
        records = [run_one(algo, dataset, seed, a) for algo, dataset, seed in jobs]
    else:  # score-only runs side by side; each process keeps one torch thread
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            records = list(pool.map(run_one, *zip(*jobs, strict=True), [a] * len(jobs)))
    summary = {}
    for dataset in datasets:
        for algo in a.algos:
            rows = [r for r in records if r["dataset"] == dataset.name and r["algo"] == algo]
            scores = [r["score"] for r in rows if r["score"] is not None]
            rates = [r["grad_steps_per_s"] for r in rows if r["grad_steps_per_s"] is not None]
            summary[f"{dataset.name}/{algo}"] = {
                "score_mean": sum(scores) / len(scores) if scores else None,
                "score": summarize(scores),
                "grad_steps_per_s_mean": sum(rates) / len(rates) if rates else None,
                "baseline": PAIRS.get(algo),
            }
    score_table(records)
    for key, s in summary.items():
        base = s["baseline"]
        other = summary.get(f"{key.split('/')[0]}/{base}") if base else None
        if other and s["grad_steps_per_s_mean"] and other["grad_steps_per_s_mean"]:
            s["speed_vs_baseline"] = s["grad_steps_per_s_mean"] / other["grad_steps_per_s_mean"]
    if not a.no_save:
        payload = {
            "benchmark": "expressive_offline",
            "args": {k: v for k, v in vars(a).items() if k != "overrides"} | {"overrides": a.overrides},
            "datasets": {d.name: dataset_summary(d) for d in datasets},
            "runs": records,
            "summary": summary,
            "provenance": provenance(["torch", "gymnasium", "mujoco"]),
        }
        print(f"results: {write_results('expressive-offline', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
