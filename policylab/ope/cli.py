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
    p.add_argument("--fqe-batch-size", type=int, default=256, help="transitions per FQE gradient step (default 256)")
    p.add_argument("--fqe-lr", type=float, default=1e-3, help="learning rate of FQE's critic (default 0.001)")
    p.add_argument(
        "--fqe-hidden", default="256,256", help="hidden layer sizes of FQE's critic, comma-separated (default 256,256)"
    )
    p.add_argument("--fqe-tau", type=float, default=0.02, help="Polyak rate of FQE's target critic (default 0.02)")
    p.add_argument(
        "--fqe-action-samples",
        type=int,
        default=4,
        help="Box actions: draws of the policy per state in FQE's targets and values (default 4)",
    )
    p.add_argument(
        "--fqe-reward-scale",
        type=float,
        default=1.0,
        help="rewards' scale in FQE's regression, undone in its values (default 1)",
    )
    p.add_argument("--fqe-threads", type=int, default=1, help="torch threads of FQE (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of FQE and the bootstrap (default 0)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(func=run_ope_command)


def run_ope_command(args: argparse.Namespace) -> int:
    from policylab.config import check_seed
    from policylab.errors import ConfigError
    from policylab.ope.evaluate import evaluate_policy, select_policies, write_json
    from policylab.ope.fqe import FQEConfig

    check_seed(args.seed)
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ConfigError(
            f"--bootstrap {args.bootstrap}: the intervals need at least 2 bootstrap resamples",
            "pass e.g. --bootstrap 1000 (the default), or --bootstrap 0 for the estimates without intervals",
        )
    fqe = FQEConfig(
        steps=args.fqe_steps,
        batch_size=args.fqe_batch_size,
        lr=args.fqe_lr,
        hidden_sizes=_parse_hidden(args.fqe_hidden),
        tau=args.fqe_tau,
        action_samples=args.fqe_action_samples,
        reward_scale=args.fqe_reward_scale,
        seed=args.seed,
        threads=args.fqe_threads,
    )
    fqe.validate()  # before anything is read
    options = {
        "gamma": args.gamma,
        "bootstrap": args.bootstrap,
        "alpha": args.alpha,
        "clip": args.clip,
        "epsilon": args.epsilon,
        "sigma": args.sigma,
        "fqe": fqe,
        "seed": args.seed,
    }
    if args.mode == "select":
        true = None if args.true is None else _true_values(args.true)
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


def _parse_hidden(text: str) -> tuple[int, ...]:
    from policylab.errors import ConfigError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--fqe-hidden {text!r} is not a comma-separated list of layer sizes", "write e.g. --fqe-hidden 256,256"
        ) from None


def _true_values(text: str) -> str | dict[str, float]:
    """`--true`: online[:N] as given (select_policies checks it), or the {run directory: value} JSON file it names."""
    from policylab.errors import ConfigError

    if text.startswith("online"):
        return text
    fix = 'write a JSON object of run directory -> value, e.g. {"runs/iql-s1": 0.5}, or pass --true online[:N]'
    try:
        values = json.loads(Path(text).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --true {text}: {exc}", fix) from None
    if not isinstance(values, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()
    ):
        raise ConfigError(f"--true {text} is not a JSON object of run directory -> number", fix)
    return values
