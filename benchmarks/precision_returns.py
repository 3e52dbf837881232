"""policylab's float32 against its opt-in precision=bf16 on the same runs: wall clock and final return, per
seed, for the cases of `offpolicy.py` (policylab's side only: SB3's ratio is in `offpolicy.py --precision`).
Needs a CPU with native bfloat16 (AMX or AVX512-BF16).

    .venv/bin/python benchmarks/precision_returns.py --case td3-pendulum --seeds 2
    .venv/bin/python benchmarks/precision_returns.py --case sac-pendulum --seeds 3 --first-seed 3
    .venv/bin/python benchmarks/precision_returns.py --case sac-halfcheetah --steps 50000 --seeds 8 --jobs 2
    .venv/bin/python benchmarks/precision_returns.py --case ppo-breakout --seeds 3 --jobs 2 --curve-every 50000

The Atari case (`ppo-breakout`, from `atari.py`'s RETURN_CASES) runs through atari.py's worker, the others
through offpolicy.py's.

`--summarize FILE` prints the summary (paired differences with a bootstrap interval) of an earlier results file.
`--jobs 2` runs a seed's float32 and bf16 runs at the same time (one thread each), for returns only: its wall
clocks are not speed figures (the two runs share the machine's caches and memory).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from atari import RETURN_CASES
from common import (
    ONE_THREAD,
    HelpFormatter,
    positive_int,
    provenance,
    require_precision,
    run_worker,
    worker_record,
    write_results,
)
from offpolicy import CASES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--case", action="append", choices=[*CASES, *RETURN_CASES], help="repeatable (default td3-pendulum)"
    )
    parser.add_argument("--seeds", type=positive_int, default=2, help="seeds per case")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=positive_int, help="env steps per run, overriding each case's")
    parser.add_argument("--curve-every", type=int, help="evaluate every N steps too: the late-run mean return")
    parser.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="2: a seed's two runs at once")
    parser.add_argument("--summarize", metavar="FILE", help="only print the summary of an earlier results file")
    a = parser.parse_args()
    if a.summarize:
        summarize(json.loads(Path(a.summarize).read_text())["runs"])
        return
    require_precision("bf16")  # before the float32 runs: bf16 needs AMX or AVX512-BF16
    cases = a.case or ["td3-pendulum"]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:

        def one(case: str, seed: int, precision: str) -> dict[str, Any]:
            atari = case in RETURN_CASES
            script = Path(__file__).parent / ("atari.py" if atari else "offpolicy.py")
            args = ["--return-case", case] if atari else ["--worker", "ours", "--case", case]
            args += ["--seed", str(seed), "--precision", precision]
            args += ["--steps", str(a.steps)] if a.steps is not None else []
            args += ["--curve-every", str(a.curve_every)] if a.curve_every else []
            res = run_worker(script, args, Path(tmp) / f"ours-{precision}.json", env=ONE_THREAD)
            record = worker_record(res, f"{case} {precision} seed {seed}")
            row = {"case": case, "seed": seed, "precision": precision, "wall_s": res.wall_s, "steps": a.steps,
                   "return": record.get("eval_return_mean"), "jobs": a.jobs,
                   "late_return": record.get("late_return_mean"), "curve": record.get("curve")}  # fmt: skip
            print(json.dumps(row), flush=True)
            return row

        for case in cases:
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                # alternating, as everywhere (or both at once with --jobs 2)
                runs += pool.map(one, (case, case), (seed, seed), ("fp32", "bf16"))
    summarize(runs)
    payload = {"provenance": provenance(["torch", "policylab"]), "runs": runs, "argv": sys.argv[1:]}
    print(f"results: {write_results('precision_returns', payload)}")


def summarize(runs: list[dict[str, Any]]) -> None:
    """Per case: each precision's returns by seed, then the paired differences bf16 - float32 (same seed):
    their mean, a 95% bootstrap interval of that mean (10,000 resamples of the seeds, fixed RNG) and how many
    seeds bf16 ends lower on; for the final return and, where the runs evaluated during training, the late-run
    mean return."""
    for case in dict.fromkeys(r["case"] for r in runs):
        by = {(r["seed"], r["precision"]): r for r in runs if r["case"] == case}
        seeds = sorted({seed for seed, _ in by if (seed, "fp32") in by and (seed, "bf16") in by})
        for precision in ("fp32", "bf16"):
            wall = statistics.median(by[s, precision]["wall_s"] for s in seeds)
            returns = ", ".join(f"{by[s, precision]['return']:.1f}" for s in seeds)
            print(f"{case:<16}{precision:<6} wall {wall:7.1f} s   returns by seed {seeds}: {returns}")
        for key in ("return", "late_return"):
            if any(by[s, p].get(key) is None for s in seeds for p in ("fp32", "bf16")):
                continue
            diffs = [by[s, "bf16"][key] - by[s, "fp32"][key] for s in seeds]
            base = statistics.mean(by[s, "fp32"][key] for s in seeds)
            low, high = _bootstrap_mean_interval(diffs)
            lower = sum(d < 0 for d in diffs)
            print(f"{'':<22}{key}: bf16 - fp32 mean {statistics.mean(diffs):+.1f} (95% interval {low:+.1f} to "
                  f"{high:+.1f}; fp32 mean {base:.1f}); bf16 lower on {lower} of {len(diffs)} seeds")  # fmt: skip


def _bootstrap_mean_interval(values: list[float], resamples: int = 10_000) -> tuple[float, float]:
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


if __name__ == "__main__":
    main()
