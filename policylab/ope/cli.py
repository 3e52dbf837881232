"""`policylab ope`: estimate a policy's value on a dataset, or rank several (`policylab ope select`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_ope_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ope", help="off-policy evaluation of policies on an offline dataset")
    p.add_argument("mode", nargs="?", choices=("select",), help="select: rank --policies by one estimator")
    p.add_argument("--dataset", required=True, help="dataset directory, D4RL-style .hdf5 file or Minari id")
    p.add_argument("--policy", help="a run directory (its final policy)")
    p.add_argument("--policies", nargs="+", default=[], help="select: candidate run directories")
    p.add_argument(
        "--estimators",
        default="fqe,pdis,wpdis,dr,wdr",
        help="comma-separated: dm/fqe, is, pdis, wis, wpdis, dr, wdr (default: fqe,pdis,wpdis,dr,wdr)",
    )
    p.add_argument("--estimator", default="wdr", help="select: the estimator that ranks (default wdr)")
    p.add_argument("--top-k", type=int, default=3, help="select: k of the top-k metrics (default 3)")
    p.add_argument(
        "--true",
        help="select: true values for regret, SharpeRatio@k ...: a JSON file {run directory: value}, or online[:N] "
        "(each policy run N episodes, default 100, in the dataset's env)",
    )
    p.add_argument("--gamma", type=float, help="discount of the value (default: the run's gamma)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the intervals (at least 2; 0: no intervals, not with select)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the intervals (default 0.05)")
    p.add_argument("--clip", type=float, help="cap on each per-step importance ratio")
    p.add_argument("--epsilon", type=float, default=0.0, help="Discrete: mix the policy with uniform (epsilon-greedy)")
    p.add_argument("--sigma", type=float, help="deterministic Box policies: Gaussian std in half-ranges")
    p.add_argument("--fqe-steps", type=int, default=5_000, help="gradient steps of fitted Q evaluation (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of FQE and the bootstrap (default 0)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(func=run_ope_command)


def run_ope_command(args: argparse.Namespace) -> int:
    from policylab.errors import ConfigError
    from policylab.ope.evaluate import evaluate_policy, select_policies, write_json
    from policylab.ope.fqe import FQEConfig

    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ConfigError(
            f"--bootstrap {args.bootstrap}: the intervals need at least 2 bootstrap resamples",
            "pass e.g. --bootstrap 1000 (the default), or --bootstrap 0 for the estimates without intervals",
        )
    options = {
        "gamma": args.gamma,
        "bootstrap": args.bootstrap,
        "alpha": args.alpha,
        "clip": args.clip,
        "epsilon": args.epsilon,
        "sigma": args.sigma,
        "fqe": FQEConfig(steps=args.fqe_steps, seed=args.seed),
        "seed": args.seed,
    }
    if args.mode == "select":
        true = (
            args.true
            if args.true is None or args.true.startswith("online")
            else json.loads(Path(args.true).read_text())
        )
        selection, reports = select_policies(
            args.dataset, args.policies, estimator=args.estimator, top_k=args.top_k, true_values=true, **options
        )
        print(selection.format())
        if args.json:
            payload = {
                "ranking": [selection.names[i] for i in selection.ranking],
                "metrics": selection.metrics(),
                "reports": {k: r.to_json() for k, r in reports.items()},
            }
            print(f"wrote {write_json(payload, args.json)}")
        return 0
    if args.policy is None:
        raise ConfigError("no policy to evaluate", "pass --policy RUN_DIR (or `ope select --policies ...`)")
    report = evaluate_policy(args.dataset, args.policy, args.estimators.split(","), **options)
    print(report.format())
    if args.json:
        print(f"wrote {write_json(report.to_json(), args.json)}")
    return 0
