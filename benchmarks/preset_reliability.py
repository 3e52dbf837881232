"""How reliable is a tuned preset? Seeds out of N whose final evaluation reaches the env's threshold.

Run from the repository root:

    .venv/bin/python benchmarks/preset_reliability.py --algo dqn --env CartPole-v1 --seeds 20
    .venv/bin/python benchmarks/preset_reliability.py --algo dqn --env CartPole-v1 --preset rl-zoo --seeds 20
    .venv/bin/python benchmarks/preset_reliability.py --algo dqn --env CartPole-v1 --set double_q=true --tag dq
    .venv/bin/python benchmarks/preset_reliability.py --all --seeds 5 --max-steps 100k   # every affordable preset
    .venv/bin/python benchmarks/preset_reliability.py --algo dqn --env CartPole-v1 --seeds 3 --versus rl-zoo  # speed
    .venv/bin/python benchmarks/preset_reliability.py --table benchmarks/results/preset_reliability-*.json
    .venv/bin/python benchmarks/preset_reliability.py --algo a2c --env HalfCheetah-v5 --seeds 3 --peer sb3

Each run is `policylab.train(algo, env, seed=s, preset=...)` with the preset's own budget, in a fresh
subprocess with `threads=1`, `--jobs` of them at a time (default 2, one per core here). What a user sees is
what is recorded: the run's own final evaluation (`eval.json`: 10 deterministic episodes, the mean), the
best periodic evaluation (`eval.csv`) and whether the final one reaches the threshold. The threshold is the
env's Gymnasium `reward_threshold` where it has one, else the value in `THRESHOLDS` below (stated in the
output). Wall clocks are recorded but, with runs side by side, they are not speed measurements.

With `--versus PRESET`, the variant and that preset run one at a time, alternating per seed, and the ratio
of their training wall clocks (`pl.train` from call to return, final evaluation included) is reported:
JSON in benchmarks/results/preset_timing-<date>.json.

With `--peer sb3` (PPO and A2C), the same preset's values run in Stable-Baselines3 instead (`sb3_onpolicy`
translates them; a value SB3 has no equivalent for is an error), evaluated as policylab's runs are: every
`eval_every` env steps and at the end, deterministic episodes of a separate env whose observations go through the
training run's frozen VecNormalize statistics. Those results carry `"peer": "sb3"` and stay out of `--table`.

Output: a table per (algo, env, variant) and JSON in benchmarks/results/preset_reliability-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    HelpFormatter,
    eval_curve,
    fail,
    positive_int,
    print_table,
    provenance,
    worker_failed,
    write_results,
)

THRESHOLDS = {"Pendulum-v1": -200.0, "Walker2d-v5": 3000.0, "BitFlipping-v0": -8.5, "Navigation2D-v0": 2.0}
"""Thresholds for envs whose Gymnasium spec has none (Pendulum: SB3's rl-zoo benchmark reports about -150
to -170 for tuned runs; -200 is the usual 'solved' bar. BitFlipping-v0 with 15 bits: a failed episode
returns -15, a success about -6.5 (the bits to flip, less one), so -8.5 is about 8 episodes of 10 at
their goal. Navigation2D-v0: the goal in nearly every episode, the expert's 2.6 and the bar of
tests/test_expressive_rl.py)."""


def threshold(env_id: str) -> float | None:
    import gymnasium as gym

    import policylab.envs  # noqa: F401  (registers BitFlipping-v0)

    spec_value = gym.spec(env_id).reward_threshold
    return float(spec_value) if spec_value is not None else THRESHOLDS.get(env_id)


def worker(args: argparse.Namespace) -> None:
    """One run in this process: train, then report the final and best evaluations as JSON."""
    import policylab as pl
    from policylab.config import parse_set_args

    overrides = {"threads": 1, **parse_set_args(args.set)}
    t0 = time.perf_counter()
    run = pl.train(
        args.algo,
        env=args.env,
        seed=args.seed,
        steps=args.steps,
        overrides=overrides,
        preset=args.preset,
        runs_dir=args.runs_dir,
        verbose=False,
    )
    wall = time.perf_counter() - t0
    curve = eval_curve(run.dir)
    best_step, best_return = max(curve, key=lambda point: point[1])
    record = {
        "seed": args.seed,
        "steps": run.steps,
        "final_return": run.final_eval["return_mean"] if run.final_eval else None,
        "best_return": best_return,
        "best_step": best_step,
        "eval_curve": [list(point) for point in curve],
        "train_wall_s": wall,
    }
    Path(args.out).write_text(json.dumps(record))


SB3_SAME_NAME = ("n_steps", "batch_size", "gamma", "gae_lambda", "ent_coef", "vf_coef", "max_grad_norm",
                 "normalize_advantage", "use_sde", "sde_sample_freq", "target_kl")  # fmt: skip
SB3_RENAMED = {"epochs": "n_epochs", "clip_eps": "clip_range"}
SB3_HANDLED = {"num_envs", "lr", "anneal_lr", "hidden_sizes", "activation", "ortho_init", "log_std_init",
               "normalize_obs", "normalize_reward", "clip_obs", "optimizer", "rms_alpha", "optim_eps"}  # fmt: skip
SB3_IGNORED = {"env", "steps", "seed", "eval_every", "eval_episodes", "eval_deterministic", "checkpoint_every",
               "threads", "device", "tensorboard", "log_every", "keep_checkpoints", "runs_dir"}  # fmt: skip
"""Run settings with no bearing on the algorithm; every other field must equal policylab's default or be translated."""


def sb3_onpolicy(algo: str, cfg: Any) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(SB3 class, its keyword arguments, VecNormalize keyword arguments or None) of a resolved PPO or A2C config."""
    import dataclasses

    import torch
    from common import linear_schedule
    from stable_baselines3 import A2C, PPO

    from policylab.algos import get_algo

    default = get_algo(algo).config_cls(env=cfg.env)
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    unknown = changed - set(SB3_SAME_NAME) - set(SB3_RENAMED) - SB3_HANDLED - SB3_IGNORED
    if unknown:
        raise SystemExit(f"--peer sb3: no SB3 equivalent for {sorted(unknown)} of the {algo} preset")
    names = [n for n in SB3_SAME_NAME if hasattr(cfg, n) and (n != "batch_size" or algo == "ppo")]
    kwargs: dict[str, Any] = {n: getattr(cfg, n) for n in names}
    kwargs.update({sb3: getattr(cfg, ours) for ours, sb3 in SB3_RENAMED.items() if hasattr(cfg, ours)})
    kwargs["learning_rate"] = linear_schedule(cfg.lr) if cfg.anneal_lr else cfg.lr
    activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[cfg.activation]
    policy_kwargs: dict[str, Any] = {"net_arch": list(cfg.hidden_sizes), "activation_fn": activation,
                                     "ortho_init": cfg.ortho_init, "log_std_init": cfg.log_std_init}  # fmt: skip
    if algo == "a2c":
        kwargs["use_rms_prop"] = cfg.optimizer == "rmsprop"
        kwargs["rms_prop_eps"] = cfg.optim_eps
        if cfg.rms_alpha != 0.99:
            raise SystemExit("--peer sb3: SB3's A2C fixes RMSprop's alpha at 0.99")
    kwargs["policy_kwargs"] = policy_kwargs
    normalize = None
    if cfg.normalize_obs or cfg.normalize_reward:
        normalize = {"norm_obs": cfg.normalize_obs, "norm_reward": cfg.normalize_reward, "gamma": cfg.gamma,
                     "clip_obs": cfg.clip_obs}  # fmt: skip
    return {"ppo": PPO, "a2c": A2C}[algo], kwargs, normalize


def sb3_worker(args: argparse.Namespace) -> None:
    """One SB3 run of the preset's values: periodic and final deterministic evaluations, as policylab's run makes."""
    import torch
    from common import gym_eval
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from policylab.algos import get_algo
    from policylab.config import parse_set_args
    from policylab.train import resolve_config

    torch.set_num_threads(1)
    steps = None if args.steps is None else int(float(args.steps))
    cfg, _ = resolve_config(
        get_algo(args.algo), args.env, steps, args.seed, overrides=parse_set_args(args.set), preset=args.preset
    )
    cls, kwargs, normalize = sb3_onpolicy(args.algo, cfg)
    env: Any = make_vec_env(args.env, n_envs=cfg.num_envs, seed=args.seed)
    if normalize is not None:
        env = VecNormalize(env, **normalize)
    model = cls("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **kwargs)
    curve: list[list[float]] = []

    def evaluate(episodes: int, first_seed: int) -> float:
        obs_norm = env.normalize_obs if isinstance(env, VecNormalize) else (lambda obs: obs)
        result = gym_eval(args.env, lambda obs: model.predict(obs_norm(obs[None]), deterministic=True)[0][0],
                          first_seed, episodes)  # fmt: skip
        return float(result["eval_return_mean"])

    class Evaluations(BaseCallback):  # type: ignore[misc]
        def _on_step(self) -> bool:
            due = cfg.eval_every and self.num_timesteps // cfg.eval_every > len(curve)
            if due:
                curve.append([self.num_timesteps, evaluate(cfg.eval_episodes, 10_000 * args.seed + len(curve))])
            return True

    t0 = time.perf_counter()
    model.learn(cfg.steps, callback=Evaluations())
    final = evaluate(10, 10_000 * args.seed + 9_999)
    curve.append([model.num_timesteps, final])
    best_step, best_return = max(curve, key=lambda point: point[1])
    record = {"seed": args.seed, "steps": model.num_timesteps, "final_return": final, "best_return": best_return,
              "best_step": best_step, "eval_curve": curve, "train_wall_s": time.perf_counter() - t0}  # fmt: skip
    Path(args.out).write_text(json.dumps(record))


def run_one(base: list[str], seed: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"seed{seed}.json"
    cmd = [sys.executable, __file__, "--worker", *base, "--seed", str(seed), "--runs-dir", str(tmp), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        worker_failed(f"seed {seed}", proc.returncode, (proc.stdout + proc.stderr)[-3000:])
    return json.loads(out.read_text())


def check_variant(algo: str, env: str, preset: str, sets: list[str], steps: str | None) -> None:
    """Before any run: the algorithm, env, preset, --set values and --steps resolve to a config (policylab's own
    check, as each run makes it), or an exit with policylab's error and fix (status 2)."""
    from policylab.algos import get_algo
    from policylab.config import parse_set_args
    from policylab.errors import PolicylabError
    from policylab.train import resolve_config

    try:
        resolve_config(get_algo(algo), env, steps, 1, overrides=parse_set_args(sets), preset=preset)
    except PolicylabError as exc:
        fail(f"error: {algo} {env} preset={preset}: {exc}")


def measure(
    algo: str, env: str, preset: str, sets: list[str], steps: str | None, seeds: list[int], jobs: int, peer: str = ""
) -> dict:
    base = ["--algo", algo, "--env", env, "--preset", preset, *[f"--set={s}" for s in sets]]
    base += ["--steps", steps] if steps else []
    base += ["--peer", peer] if peer else []
    with tempfile.TemporaryDirectory(prefix="policylab-reliability-") as tmp, ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(lambda s: run_one(base, s, Path(tmp)), seeds))
    bar = threshold(env)
    finals = [r["final_return"] for r in runs]
    reached = None if bar is None else sum(f >= bar for f in finals)
    return {
        "algo": algo,
        "env": env,
        "preset": preset,
        "set": sets,
        "steps": runs[0]["steps"],
        "threshold": bar,
        "seeds": seeds,
        "reached": reached,
        "final_median": statistics.median(finals),
        "final_mean": statistics.fmean(finals),
        "best_median": statistics.median(r["best_return"] for r in runs),
        **({"peer": peer} if peer else {}),
        "runs": runs,
    }


def time_versus(args: argparse.Namespace, seeds: list[int]) -> dict:
    """Wall clock of the variant against `--versus PRESET` (same algo and env; --steps applies to the variant only),
    one run at a time, alternating per seed: the speed side of a preset change."""
    sides = {"variant": (args.preset, args.set, args.steps), "versus": (args.versus, [], None)}
    runs: dict[str, list[dict]] = {"variant": [], "versus": []}
    with tempfile.TemporaryDirectory(prefix="policylab-reliability-") as tmp:
        for seed in seeds:
            for side, (preset, sets, steps) in sides.items():
                base = ["--algo", args.algo, "--env", args.env, "--preset", preset, *[f"--set={x}" for x in sets]]
                base += ["--steps", steps] if steps else []
                runs[side].append(run_one(base, seed, Path(tmp)))
    ratios = [a["train_wall_s"] / b["train_wall_s"] for a, b in zip(runs["variant"], runs["versus"])]
    summary = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    steps = f" --steps {args.steps}" if args.steps else ""
    print(f"\n{args.algo} {args.env}: preset={args.preset} {' '.join(args.set)}{steps} against preset={args.versus}")
    budgets = {side: ", ".join(f"{n:,}" for n in sorted({r["steps"] for r in rs})) for side, rs in runs.items()}
    if budgets["variant"] != budgets["versus"]:
        print(f"note: the budgets differ (variant {budgets['variant']} env steps, versus {budgets['versus']}): the "
              "ratio compares runs of different lengths")  # fmt: skip
    print_table(
        ["seed", "variant s", "versus s", "ratio", "variant final", "versus final"],
        [
            [str(s), f"{a['train_wall_s']:.1f}", f"{b['train_wall_s']:.1f}", f"{r:.3f}"]
            + [f"{a['final_return']:.1f}", f"{b['final_return']:.1f}"]
            for s, a, b, r in zip(seeds, runs["variant"], runs["versus"], ratios)
        ],
    )
    print(f"train wall clock variant/versus: {summary['median']:.3f} [{summary['min']:.3f}-{summary['max']:.3f}]")
    return {
        "algo": args.algo,
        "env": args.env,
        "preset": args.preset,
        "set": args.set,
        "steps": args.steps,
        "versus": args.versus,
        "ratio": summary,
        "runs": runs,
    }


def markdown_table(paths: list[str]) -> str:
    """A row per preset of `policylab list` (the default presets) from results files: the runs of each preset
    at its budget with no extra --set (a preset whose values change changes its budget too, as DQN's, QR-DQN's and
    DQN MountainCar's did, or is run again on the earlier seeds, as PPO's and A2C's Pendulum with gSDE were), pooled
    over the files by seed (a later file's run of a seed replaces an earlier one's; the files listed are those
    whose runs remain); presets no file ran: "not run"."""
    from policylab.config import format_count
    from policylab.presets import PRESETS

    runs: dict[tuple[str, str], dict[int, tuple[dict, str]]] = {}  # per preset and seed: the run, its file
    for path in sorted(paths, key=written_order):
        for res in json.loads(Path(path).read_text())["results"]:
            key = (res["algo"], res["env"])
            budget = PRESETS.get(res["algo"], {}).get(res["env"])
            variant = res.get("preset", "auto") != "auto" or res.get("set") or res.get("peer")
            if variant or "reached" not in res or budget is None:
                continue
            if abs(res["steps"] - budget.values.get("steps", 0)) > 0.05 * res["steps"]:  # another budget
                continue  # (on-policy runs end on a whole rollout: 100,096 steps for a 100k budget)
            runs.setdefault(key, {}).update({run["seed"]: (run, Path(path).name) for run in res["runs"]})
    lines = [
        "| algorithm | env | budget | final >= threshold | median final return | median best return | results |",
        "|---|---|---|---|---|---|---|",
    ]
    for algo, table in PRESETS.items():
        for env, preset in sorted(table.items()):
            budget = format_count(int(preset.values.get("steps", 0)))
            if (algo, env) not in runs:
                lines.append(f"| {algo} | {env} | {budget} | not run | | | |")
                continue
            pooled = [run for run, _ in runs[(algo, env)].values()]
            finals = [run["final_return"] for run in pooled]
            bar = threshold(env)
            reached = f"{sum(f >= bar for f in finals)}/{len(pooled)} (>= {bar:g})" if bar is not None else "no bar"
            files = ", ".join(f"`{name}`" for name in sorted({name for _, name in runs[(algo, env)].values()}))
            lines.append(
                f"| {algo} | {env} | {budget} | {reached} | {statistics.median(finals):.1f} | "
                f"{statistics.median(run['best_return'] for run in pooled):.1f} | {files} |"
            )
    return "\n".join(lines)


def written_order(path: str) -> tuple[str, int]:
    """results/<name>-<date>[-<n>].json in the order they were written (a shell glob puts -10 before -9)."""
    match = re.search(r"-(\d{4}-\d\d-\d\d)(?:-(\d+))?\.json$", path)
    return (match.group(1), int(match.group(2) or 1)) if match else ("", 0)


def affordable_presets(max_steps: int) -> list[tuple[str, str]]:
    from policylab.presets import PRESETS

    return [
        (algo, env)
        for algo, table in PRESETS.items()
        for env, preset in table.items()
        if int(preset.values.get("steps", 0)) <= max_steps
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--algo", help="the algorithm (required unless --all or --table)")
    parser.add_argument("--env", help="the env id (required unless --all or --table)")
    parser.add_argument("--preset", default="auto", help="auto (the env's preset), rl-zoo, none, ...")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)"
    )
    parser.add_argument(
        "--steps",
        help="override the preset's budget; with --versus, the variant's only (the --versus preset runs at its own)",
    )
    parser.add_argument("--seeds", type=positive_int, default=20, help="seeds per variant")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at once (each with threads=1)")
    parser.add_argument("--all", action="store_true", help="every preset whose budget is at most --max-steps")
    parser.add_argument("--max-steps", default="100k", help="with --all: the largest preset budget run")
    parser.add_argument("--exclude", action="append", default=[], metavar="ALGO:ENV", help="with --all: skip these")
    parser.add_argument("--tag", default="", help="a name for this variant in the output")
    parser.add_argument("--peer", choices=["sb3"], help="run the preset's values in this library instead (ppo, a2c)")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print the markdown table of these files")
    parser.add_argument(
        "--versus", help="time the variant against this preset (e.g. rl-zoo), one run at a time, alternating"
    )
    args = parser.parse_args()
    if args.worker:
        sb3_worker(args) if args.peer == "sb3" else worker(args)
        return
    from policylab.config import parse_count
    from policylab.errors import PolicylabError

    if args.table:
        print(markdown_table(args.table))
        return
    if not args.all and not (args.algo and args.env):
        parser.error("give --algo and --env (or --all for every affordable preset, or --table RESULTS)")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.versus:
        if args.all:
            parser.error("--versus times one variant: give --algo and --env, not --all")
        check_variant(args.algo, args.env, args.preset, args.set, args.steps)
        check_variant(args.algo, args.env, args.versus, [], None)
        if args.steps:
            print(f"note: --steps {args.steps} is the variant's budget only; preset={args.versus} runs at its own")
        result = time_versus(args, seeds)
        path = write_results("preset_timing", {**provenance(["torch", "gymnasium"]), "results": [result]})
        print(f"\nresults: {path}")
        return
    try:
        max_steps = parse_count(args.max_steps)
    except (ValueError, PolicylabError) as exc:
        parser.error(f"--max-steps: {exc}")
    cases = affordable_presets(max_steps) if args.all else [(args.algo, args.env)]
    cases = [(algo, env) for algo, env in cases if f"{algo}:{env}" not in args.exclude]
    if not cases:
        fail(f"error: no preset has a budget of at most --max-steps {args.max_steps} (after --exclude): nothing to run")
    for algo, env in cases:
        check_variant(algo, env, args.preset, args.set, args.steps)
    results: list[dict] = []
    path = None
    for algo, env in cases:
        t0 = time.perf_counter()
        res = measure(algo, env, args.preset, args.set, args.steps, seeds, args.jobs, args.peer or "")
        res["tag"], res["elapsed_s"] = args.tag, time.perf_counter() - t0
        results.append(res)
        peer = f" in {args.peer}" if args.peer else ""
        print(f"\n{algo} {env} preset={args.preset} {' '.join(args.set)}{peer} ({res['steps']:,} steps)", flush=True)
        print_table(
            ["seed", "final", "best", "best at"],
            [
                [str(r["seed"]), f"{r['final_return']:.1f}", f"{r['best_return']:.1f}", str(r["best_step"])]
                for r in res["runs"]
            ],
        )
        print(
            f"final >= {res['threshold']}: {res['reached']}/{len(seeds)}; median final {res['final_median']:.1f}, "
            f"mean {res['final_mean']:.1f}; median best {res['best_median']:.1f}",
            flush=True,
        )
        payload = {**provenance(["torch", "gymnasium"]), "results": results}
        if path is None:  # written after every case, so that an interrupted --all keeps what it measured
            path = write_results("preset_reliability", payload)
        else:
            path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
