"""Hybrid SAC (RLPD-style: each batch half from a dataset, half from online replay) against plain SAC on the
same seeds: the env steps each needs to reach a return bar, and the evaluation curves.

    .venv/bin/python benchmarks/make_datasets.py --env Hopper-v5            # once: benchmarks/data/hopper-medium
    .venv/bin/python benchmarks/hybrid.py --env Hopper-v5 --dataset benchmarks/data/hopper-medium \\
        --steps 50000 --bar 1000 --seeds 2

Both sides run policylab's SAC with its Hopper-v5 preset (rl-zoo's values) and the same overrides; the hybrid
side adds `--dataset D --set offline_ratio=0.5` (and learning starts once the batch size is reached, since the
dataset fills half of every batch from the first step). A side that never reaches the bar counts as
"not reached within --steps". What is compared is env steps, not wall-clock time (the hybrid side's batches
cost the same). Results go to benchmarks/results/hybrid-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO_ROOT, HelpFormatter, dataset_summary, eval_curve, positive_int, provenance, write_results

sys.path.insert(0, str(REPO_ROOT))


def run_side(args: argparse.Namespace, seed: int, dataset: str | None) -> dict[str, Any]:
    import policylab as pl

    overrides: dict[str, Any] = {"eval_every": args.eval_every, "eval_episodes": args.eval_episodes}
    if dataset is not None:
        overrides.update(offline_ratio=args.offline_ratio, learning_starts=256)
    with tempfile.TemporaryDirectory() as runs:
        run = pl.train(
            "sac",
            env=args.env,
            dataset=dataset,
            steps=args.steps,
            seed=seed,
            overrides=overrides,
            runs_dir=runs,
            verbose=False,
        )
        curve = eval_curve(run.dir)
    reached = next((step for step, ret in curve if ret >= args.bar), None)
    return {"seed": seed, "dataset": dataset, "curve": curve, "steps_to_bar": reached}


def summarize(runs: list[dict[str, Any]], bar: float) -> None:
    """Per side: steps to the bar per seed, and the mean over seeds of the evaluation return at each step."""
    import statistics

    for side in ("hybrid", "plain"):
        mine = [r for r in runs if (r["dataset"] is not None) == (side == "hybrid")]
        reached = ", ".join("-" if r["steps_to_bar"] is None else f"{r['steps_to_bar']:,}" for r in mine)
        steps = [step for step, _ in mine[0]["curve"]]
        means = [statistics.mean(dict(r["curve"])[step] for r in mine) for step in steps]
        curve = " ".join(f"{step // 1000}k:{m:.0f}" for step, m in zip(steps, means, strict=True))
        area = statistics.mean(means)
        print(f"{side}: steps to {bar:g} per seed: {reached}; mean return over seeds at {curve}; mean {area:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--env", default="Hopper-v5", help="the env both sides train in")
    parser.add_argument(
        "--dataset",
        default=str(REPO_ROOT / "benchmarks" / "data" / "hopper-medium"),
        help="the hybrid side's dataset (default: benchmarks/data/hopper-medium, made by make_datasets.py)",
    )
    parser.add_argument("--steps", type=positive_int, default=50_000, help="env steps per run")
    parser.add_argument("--bar", type=float, default=1000.0, help="the return to reach")
    parser.add_argument("--seeds", type=positive_int, default=2, help="seeds 1..N per side")
    parser.add_argument("--offline-ratio", type=float, default=0.5, help="the hybrid side's share of dataset samples")
    parser.add_argument("--eval-every", type=positive_int, default=5_000, help="env steps between evaluations")
    parser.add_argument("--eval-episodes", type=positive_int, default=5, help="episodes per evaluation")
    parser.add_argument("--summarize", help="print the summary of an earlier results file and exit")
    args = parser.parse_args()
    if args.summarize:
        import json

        data = json.loads(open(args.summarize).read())
        summarize(data["runs"], data["settings"]["bar"])
        return
    if not Path(args.dataset).exists():
        parser.error(
            f"no dataset at {args.dataset}: make it with `.venv/bin/python benchmarks/make_datasets.py --env "
            "Hopper-v5` (benchmarks/data/hopper-medium; --env HalfCheetah-v5: halfcheetah-medium), or pass --dataset"
        )

    runs = []
    for seed in range(1, args.seeds + 1):
        for dataset in (args.dataset, None):
            result = run_side(args, seed, dataset)
            runs.append(result)
            side = "hybrid" if dataset else "plain"
            print(f"seed {seed} {side}: steps to {args.bar:g}: {result['steps_to_bar']}, curve {result['curve']}")
    summarize(runs, args.bar)
    path = write_results(
        "hybrid",
        {
            "benchmark": "hybrid SAC vs plain SAC: env steps to a return bar",
            "settings": vars(args),
            "dataset": dataset_summary(args.dataset),
            "runs": runs,
            "provenance": provenance(["torch", "gymnasium", "mujoco"]),
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
