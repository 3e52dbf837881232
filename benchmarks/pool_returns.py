"""Pool the returns of several `offpolicy.py` results files and compare the two sides' means.

A final return after a fixed budget can be bimodal (DQN CartPole: a policy at 500, or one that has just
collapsed), so its median over a few seeds says little. This script pools seeds across runs (a seed in
two files must have the same value on a side: the runs are deterministic, so a mismatch means different
code and is an error) and reports, per side and per return measure:

* n, mean, standard error, median, and the share of seeds at or above `--threshold`;
* the ratio of the means ours/sb3 with a 95% percentile bootstrap interval (seeds resampled per side);
* a two-sided permutation p-value for the difference of the means (side labels shuffled);
* with `--curve-every` runs: the mean learning curves, their difference and its size in standard errors at
  every evaluation, the final one included.

Both sides' seeds are independent random streams (two libraries), so nothing is paired by seed. `--versus`
compares two variants of policylab instead (e.g. a different step budget, through offpolicy.py's worker),
paired by seed: the final return of the `ours` runs in those files against the `ours` runs above.

    .venv/bin/python benchmarks/pool_returns.py benchmarks/results/offpolicy-A.json \\
        benchmarks/results/offpolicy-B.json --case dqn-cartpole
    .venv/bin/python benchmarks/pool_returns.py benchmarks/results/offpolicy-B.json \\
        --versus benchmarks/results/offpolicy-variant.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import HelpFormatter, fail, positive_int

MEASURES = {
    "eval_return_mean": "final return (10 deterministic episodes after training)",
    "late_return_mean": "late-run return (mean of the evaluations over the last 40% of the run)",
}
SIDES = ("ours", "sb3")
THRESHOLDS = {"dqn-cartpole": 475.0, "qrdqn-cartpole": 475.0}
"""A return counted as solved, per offpolicy.py case: CartPole-v1's reward_threshold (the other cases have none)."""


def pooled_values(paths: Sequence[Path], case: str, key: str) -> dict[str, dict[int, Any]]:
    """{side: {seed: value}} over every file; the same seed twice with different values is an error."""
    pooled: dict[str, dict[int, Any]] = {side: {} for side in SIDES}
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            value = run.get(key)
            if run.get("case") != case or value is None:
                continue
            seen = pooled[run["side"]].get(run["seed"])
            if seen is not None and seen != value:
                raise SystemExit(
                    f"{path}: {run['side']} seed {run['seed']} has {key}={value}, another file has {seen}; "
                    "the runs come from different code: pool only results of the same arithmetic"
                )
            pooled[run["side"]][run["seed"]] = value
    return pooled


def describe(values: Sequence[float], threshold: float | None) -> dict[str, float | None]:
    n = len(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {
        "n": n,
        "mean": statistics.fmean(values),
        "se": std / n**0.5,
        "std": std,
        "median": statistics.median(values),
        "at_threshold": None if threshold is None else sum(v >= threshold for v in values) / n,
    }


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], draws: int, rng: random.Random) -> tuple[float, float]:
    """95% percentile interval of mean(a) / mean(b), each side resampled with replacement."""
    ratios = sorted(
        statistics.fmean(rng.choices(a, k=len(a))) / statistics.fmean(rng.choices(b, k=len(b))) for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def permutation_p(a: Sequence[float], b: Sequence[float], draws: int, rng: random.Random) -> float:
    """Two-sided: how often shuffled side labels give a difference of means at least as large as observed."""
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    both, n = [*a, *b], len(a)
    hits = 0
    for _ in range(draws):
        rng.shuffle(both)
        hits += abs(statistics.fmean(both[:n]) - statistics.fmean(both[n:])) >= observed - 1e-12
    return (hits + 1) / (draws + 1)


def compare(pooled: dict[str, dict[int, float]], threshold: float | None, draws: int, seed: int) -> dict[str, Any]:
    ours, sb3 = list(pooled["ours"].values()), list(pooled["sb3"].values())
    rng = random.Random(seed)
    low, high = bootstrap_ratio(ours, sb3, draws, rng)
    return {
        "seeds": {side: sorted(pooled[side]) for side in SIDES},
        "ours": describe(ours, threshold),
        "sb3": describe(sb3, threshold),
        "ratio_of_means": statistics.fmean(ours) / statistics.fmean(sb3),
        "ratio_ci95": [low, high],
        "permutation_p": permutation_p(ours, sb3, draws, rng),
    }


def print_comparison(label: str, result: dict[str, Any], threshold: float | None) -> None:
    print(f"\n{label}")
    for side in SIDES:
        d = result[side]
        solved = "" if threshold is None else f"  >= {threshold:g}: {d['at_threshold']:.0%}"
        print(
            f"  {side:5} n={d['n']:3d}  mean {d['mean']:7.1f} +- {d['se']:5.1f} (s.e.)  median {d['median']:6.1f}"
            + solved
        )
    low, high = result["ratio_ci95"]
    print(
        f"  ours/sb3 mean ratio {result['ratio_of_means']:.3f}  95% bootstrap [{low:.3f}, {high:.3f}]"
        f"  permutation p = {result['permutation_p']:.3f}"
    )


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def print_curves(curves: dict[str, dict[int, Any]], finals: dict[str, dict[int, Any]]) -> None:
    """Mean +- s.e. per evaluation step on each side, the difference ours - sb3 and its size in s.e."""
    print("\nlearning curves: mean +- s.e. over seeds per evaluation; ours - sb3 in standard errors")
    by_step: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    for side in SIDES:
        for curve in curves[side].values():
            for step, value in curve:
                by_step[side].setdefault(str(step), []).append(value)
        by_step[side]["final"] = list(finals[side].values())
    for step in by_step["ours"]:
        (mo, so), (ms, ss) = mean_and_se(by_step["ours"][step]), mean_and_se(by_step["sb3"][step])
        z = (mo - ms) / (so * so + ss * ss) ** 0.5
        sides = f"ours {mo:6.1f} +- {so:4.1f}  sb3 {ms:6.1f} +- {ss:4.1f}"
        print(f"  {step:>6}  {sides}  diff {mo - ms:+6.1f} ({z:+.1f} s.e.)")


def print_versus(base: dict[int, Any], variant: dict[int, Any]) -> None:
    """The final return of a policylab variant against policylab's base runs, paired by seed."""
    seeds = sorted(set(base) & set(variant))
    if len(seeds) < 2:
        raise SystemExit("--versus: fewer than two seeds in common with the results files")
    (mb, sb), (mv, sv) = mean_and_se([base[s] for s in seeds]), mean_and_se([variant[s] for s in seeds])
    md, sd = mean_and_se([variant[s] - base[s] for s in seeds])
    changed = sum(variant[s] != base[s] for s in seeds)
    print(f"\nfinal return, ours: the --versus runs against the runs above, {len(seeds)} seeds paired")
    print(f"  base {mb:6.1f} +- {sb:4.1f}  variant {mv:6.1f} +- {sv:4.1f}  paired difference {md:+.1f} +- {sd:.1f}")
    print(f"  seeds whose final return changed: {changed} of {len(seeds)}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="offpolicy.py results JSON files")
    parser.add_argument("--case", default="dqn-cartpole", help="the offpolicy.py case to pool")
    parser.add_argument(
        "--threshold",
        type=float,
        help="a return counted as solved (default: the case's own: 475 for dqn-cartpole and qrdqn-cartpole, none for "
        "the other cases)",
    )
    parser.add_argument("--draws", type=positive_int, default=20_000, help="bootstrap and permutation draws")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--versus", nargs="+", type=Path, default=[], help="results of a policylab variant")
    args = parser.parse_args(argv)
    fixes = {"results": "pass --case with one of those", "--versus": f"pass --versus files with {args.case} runs"}
    for option, paths in (("results", args.results), ("--versus", args.versus)):
        cases = sorted({run.get("case", "?") for path in paths for run in json.loads(path.read_text())["runs"]})
        if paths and args.case not in cases:
            fail(f"error: no {args.case} runs in the {option} files: they have {', '.join(cases) or 'no runs'}\n"
                 f"  fix: {fixes[option]}")  # fmt: skip
    threshold = args.threshold if args.threshold is not None else THRESHOLDS.get(args.case)
    report: dict[str, Any] = {}
    for key, label in MEASURES.items():
        pooled = pooled_values(args.results, args.case, key)
        if not pooled["ours"] or not pooled["sb3"]:
            continue
        report[key] = compare(pooled, threshold, args.draws, args.seed)
        print_comparison(label, report[key], threshold)
    finals = pooled_values(args.results, args.case, "eval_return_mean")
    curves = pooled_values(args.results, args.case, "curve")
    if curves["ours"] and curves["sb3"]:
        print_curves(curves, {side: {s: finals[side][s] for s in curves[side]} for side in SIDES})
    if args.versus:
        print_versus(finals["ours"], pooled_values(args.versus, args.case, "eval_return_mean")["ours"])
    return report


if __name__ == "__main__":
    main()
