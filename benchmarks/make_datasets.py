"""The self-made MuJoCo datasets of the offline benchmarks, D4RL-style: "medium" from a partly trained SAC
policy, "medium-replay" from that run's replay buffer, "random" from a uniform policy.

    .venv/bin/python benchmarks/make_datasets.py --env Hopper-v5 --sac-steps 150000
    .venv/bin/python benchmarks/make_datasets.py --env HalfCheetah-v5 --sac-steps 150000

writes benchmarks/data/{hopper,halfcheetah}-{medium,medium-replay,random} (Minari datasets, gitignored) and
keeps the SAC run in benchmarks/data/runs/. Existing medium datasets are an error before anything runs, unless
`--overwrite` (an existing random dataset is kept). The steps, in commands a user can type:

    policylab train sac --env Hopper-v5 --steps 150k --seed 0 --set save_buffer=true --runs-dir benchmarks/data/runs
    policylab collect --env Hopper-v5 --policy benchmarks/data/runs/<run> --episodes 200 --out .../hopper-medium
    policylab collect --from-buffer benchmarks/data/runs/<run> --out .../hopper-medium-replay
    policylab collect --env Hopper-v5 --policy random --episodes 200 --out .../hopper-random

How they differ from D4RL's: D4RL's "medium" policy was a SAC stopped at about a third of an expert's return
with 1M transitions sampled from it; here the SAC run is as long as `--sac-steps` (its return is printed and
stored in the dataset's metadata), the medium dataset has `--episodes` episodes sampled from the policy's own
(stochastic) distribution, and the envs are Gymnasium's v5, not D4RL's v2. The normalized scores use D4RL's
reference returns (random and expert, below) so that they read on D4RL's scale; CORL's published scores
are context only, never a comparison of equals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPO_ROOT, HelpFormatter, positive_int

sys.path.insert(0, str(REPO_ROOT))

D4RL_REFERENCES = {
    "Hopper-v5": (-20.272305, 3234.3),
    "HalfCheetah-v5": (-280.178953, 12135.0),
    "Walker2d-v5": (1.629008, 4592.3),
}
"""(random, expert) returns of D4RL's normalization (d4rl/infos.py, REF_MIN_SCORE / REF_MAX_SCORE, v2 envs)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--env", default="Hopper-v5", choices=sorted(D4RL_REFERENCES), help="the MuJoCo env")
    parser.add_argument("--sac-steps", type=positive_int, default=150_000, help="env steps of the SAC run")
    parser.add_argument("--episodes", type=positive_int, default=200, help="episodes of the medium and random datasets")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SAC run (and, +1 / +2, of the collection)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "data"), help="where the datasets go")
    parser.add_argument("--overwrite", action="store_true", help="replace existing medium and medium-replay datasets")
    args = parser.parse_args()
    out = Path(args.out)
    prefix = args.env.split("-")[0].lower()
    existing = [str(p) for p in (out / f"{prefix}-medium", out / f"{prefix}-medium-replay") if p.exists()]
    if existing and not args.overwrite:  # before the SAC run, not after it
        parser.error(f"{' and '.join(existing)} exist already: pass --overwrite to replace them, or another --out")

    import policylab as pl
    from policylab.collect import collect, collect_from_buffer

    ref_min, ref_max = D4RL_REFERENCES[args.env]
    runs = out / "runs"
    run = pl.train(
        "sac",
        env=args.env,
        steps=args.sac_steps,
        seed=args.seed,
        overrides={"save_buffer": True, "buffer_size": args.sac_steps, "eval_every": 10_000},
        runs_dir=runs,
        name=f"sac-{args.env}-medium",
    )
    print(f"SAC {args.sac_steps:,} steps: final return {run.final_eval['return_mean']:.1f} ({run.dir})")
    refs = {"ref_min_score": ref_min, "ref_max_score": ref_max}
    medium = collect(args.env, run.dir, args.episodes, seed=args.seed + 1, out=out / f"{prefix}-medium",
                     overwrite=args.overwrite, **refs)  # fmt: skip
    replay = collect_from_buffer(run.dir, out / f"{prefix}-medium-replay", overwrite=args.overwrite, **refs)
    made = [medium, replay]
    if not (out / f"{prefix}-random").exists():  # offline.py's speed runs made it already for Hopper
        made.append(
            collect(args.env, "random", args.episodes, seed=args.seed + 2, out=out / f"{prefix}-random", **refs)
        )
    for data in made:
        returns = data.episode_returns()
        score = data.normalized_score(returns.mean())
        print(
            f"{data.path}: {data.num_episodes} episodes, {data.num_steps:,} steps, return {returns.mean():.1f}, "
            f"normalized {score:.1f}"
        )


if __name__ == "__main__":
    main()
