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
from typing import Any

from common import REPO_ROOT, dataset_summary, eval_curve, provenance, write_results

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--dataset", default=str(REPO_ROOT / "benchmarks" / "data" / "hopper-medium"))
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--bar", type=float, default=1000.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--offline-ratio", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--summarize", help="print the summary of an earlier results file and exit")
    args = parser.parse_args()
    if args.summarize:
        import json

        data = json.loads(open(args.summarize).read())
        summarize(data["runs"], data["settings"]["bar"])
        return

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
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
