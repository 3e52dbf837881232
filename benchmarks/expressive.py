"""Expressive policies (issue 17).

`--acting`: the acting speed (actions/s) of each behaviour-cloning head on Navigation2D-v0's spaces (2-D
observations and actions; the default networks: [256, 256] for the Gaussian and deterministic heads, a
[256, 256, 256] SiLU denoiser for the generative ones), untrained (speed does not depend on the weights), at batch
1 (one env) and 64 (64 envs stepped together), each call what `pl.load(run).act(obs)` runs: observation to env
action through `env_action` under inference mode.

    .venv/bin/python benchmarks/expressive.py --acting              # results/expressive-acting-<date>.json
    .venv/bin/python benchmarks/expressive.py --acting --seconds 0.05 --repeats 1 --no-save   # a smoke run

Heads: gaussian, deterministic, diffusion DDIM-K (K = 5 and 20 of T = 20), flow Euler-K (K = 5, 10),
consistency (1 step).

`--finetune`: fine-tuning from behaviour cloning, two ways, on the same dataset, env-step budget and evaluation
schedule, seeds alternating (dppo, ppo, ppo, dppo, ...):

    dppo  `policylab train bc --dataset D --set head=diffusion` for B gradient steps, then
          `policylab train dppo --set pretrained=<bc run>` (the BC run's observation statistics kept frozen)
    ppo   `policylab train ppo --dataset D --set bc_steps=B` (B steps of -log pi(a_D | s_D) on its own Gaussian
          actor-critic before the first rollout, then plain PPO: no imitation term)

Tasks: `navigation` (Navigation2D-v0, the two-route task: 200 expert episodes from `navigation_dataset`, made
in benchmarks/data/navigation on first use; DPPO's Navigation2D-v0 preset; PPO with the same rollouts) and
`hopper` (Hopper-v5 from benchmarks/data/hopper-medium, made by `benchmarks/make_datasets.py --env Hopper-v5`:
a medium SAC policy's 200 episodes; PPO's rl-zoo Hopper-v5 preset; DPPO with its defaults on 8 x 256-step
rollouts). Every `--eval-every` env steps both runs checkpoint, and this script evaluates each checkpoint
(step 0: the cloned policy) the same way: `--eval-episodes` deterministic episodes on env seeds 10000 + i,
recording the return and, where the env reports `info["is_success"]`, the success rate. Wall clock: pretraining
(the BC run's training time; PPO's cloning, eval.json `pretraining.seconds`) and fine-tuning (the run's
`wall_clock_s`, less PPO's cloning), each including the checkpoint writes and one final one-episode evaluation
of the run itself, not this script's evaluations. Medians (and min-max) over seeds.

    .venv/bin/python benchmarks/expressive.py --finetune --seeds 3      # results/expressive-finetune-<date>.json
    .venv/bin/python benchmarks/expressive.py --finetune --tasks navigation --seeds 1 --steps 1024 \\
        --eval-every 512 --bc-steps 50 --eval-episodes 2 --no-save     # a smoke run (not a result)

`--fpo`: FPO (a flow policy trained from scratch by PPO-clip on flow-matching loss ratios) against PPO's Gaussian
on Gymnasium MuJoCo tasks, the same env-step budget: InvertedPendulum-v5 (100k steps) and Hopper-v5 (200k), PPO
with its rl-zoo preset, FPO with its own preset (policylab/presets.py: on Hopper-v5 PPO's rollout and update
schedule with a flow head). The runs' own evaluations (every 10,240 steps, 10 deterministic episodes) give the
return curve and the late-run mean (the evaluations of the last 40% of the run); wall clock from eval.json.
Seeds alternate (ppo, fpo, fpo, ppo, ...).

    .venv/bin/python benchmarks/expressive.py --fpo --seeds 3       # results/expressive-fpo-<date>.json
    .venv/bin/python benchmarks/expressive.py --fpo --fpo-envs InvertedPendulum-v5 --seeds 3    # one env

`--offline`: IDQL vs IQL and EDP vs Diffusion-QL on the hopper datasets (benchmarks/expressive_offline.py; the
remaining arguments go to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from common import (
    REPO_ROOT,
    HelpFormatter,
    dataset_summary,
    eval_curve,
    late_mean,
    positive_int,
    provenance,
    write_results,
)

from policylab.algos.bc import BC, BCConfig

HEADS: list[tuple[str, dict[str, Any]]] = [
    ("gaussian", {"head": "gaussian"}),
    ("deterministic", {"head": "deterministic"}),
    ("diffusion DDIM-5", {"head": "diffusion", "sample_steps": 5}),
    ("diffusion DDIM-20", {"head": "diffusion", "sample_steps": 20}),
    ("flow Euler-5", {"head": "flow", "sample_steps": 5}),
    ("flow Euler-10", {"head": "flow", "sample_steps": 10}),
    ("consistency 1-step", {"head": "consistency"}),
]
BATCHES = (1, 64)


def policy_net(options: dict[str, Any]) -> torch.nn.Module:
    cfg = BCConfig(dataset="unused", **options)
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    obs_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    return BC.build_policy(cfg, obs_space, space).eval()


def actions_per_second(net: torch.nn.Module, batch: int, seconds: float, repeats: int) -> list[float]:
    """Actions/s of `repeats` timed windows of about `seconds` each (after a warm-up call)."""
    obs = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 2)).astype(np.float32))
    generator = torch.Generator().manual_seed(0)
    rates = []
    with torch.inference_mode():
        net.env_action(obs, True, generator)
        for _ in range(repeats):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                net.env_action(obs, True, generator).numpy()
                calls += 1
            rates.append(calls * batch / (time.perf_counter() - start))
    return rates


def acting(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    rows = []
    for label, options in HEADS:
        net = policy_net(options)
        for batch in BATCHES:
            rates = actions_per_second(net, batch, args.seconds, args.repeats)
            rows.append({"head": label, "batch": batch, "actions_per_s": statistics.median(rates), "runs": rates})
            print(f"{label:<22} batch {batch:>3}: {statistics.median(rates):>12,.0f} actions/s")
    return {"threads": args.threads, "seconds": args.seconds, "rows": rows}


# --- fine-tuning from behaviour cloning ---------------------------------------------------------------------------

DATA = REPO_ROOT / "benchmarks" / "data"
NAV_ROLLOUT = {"num_envs": 16, "n_steps": 32, "batch_size": 256, "epochs": 10}
"""DPPO's Navigation2D-v0 preset's rollouts (policylab/presets.py), which PPO's side gets too."""


@dataclass
class Task:
    env: str
    dataset: Path
    steps: int
    eval_every: int
    bc_steps: int
    eval_episodes: int
    bc: dict[str, Any]
    """BC's settings (head=diffusion): its head fields are DPPO's, so the run loads as `pretrained`."""
    dppo: dict[str, Any] = field(default_factory=dict)
    """On top of DPPO's preset for the env (if any)."""
    ppo: dict[str, Any] = field(default_factory=dict)
    """On top of PPO's preset for the env (if any)."""


DIFFUSION = {"head": "diffusion", "sample_steps": 5, "ddim_eta": 1.0}
"""The chain DPPO fine-tunes (its defaults: DDIM-5 with eta 1), which BC's evaluation (step 0) samples too."""

TASKS = {
    "navigation": Task(
        env="Navigation2D-v0",
        dataset=DATA / "navigation",
        steps=20_480,
        eval_every=2048,
        bc_steps=5000,
        eval_episodes=50,
        bc={**DIFFUSION, "lr": 1e-3},
        ppo={**NAV_ROLLOUT, "lr": 3e-4, "normalize_obs": True, "log_std_init": -1.6, "bc_lr": 1e-3},
    ),
    "hopper": Task(
        env="Hopper-v5",
        dataset=DATA / "hopper-medium",
        steps=102_400,
        eval_every=10_240,
        bc_steps=20_000,
        eval_episodes=10,
        bc={**DIFFUSION, "lr": 1e-3},
        dppo={"num_envs": 8, "n_steps": 256, "batch_size": 256, "clip_eps": 0.1, "clip_eps_base": 0.01},
        ppo={"bc_lr": 1e-3},
    ),
}


def ensure_dataset(name: str, task: Task) -> None:
    if task.dataset.exists():
        return
    if name == "navigation":
        from policylab.envs.navigation import navigation_dataset

        navigation_dataset(task.dataset, episodes=200, seed=0)
        return
    raise SystemExit(
        f"{task.dataset} does not exist: make it with `.venv/bin/python benchmarks/make_datasets.py --env Hopper-v5` "
        "(or pass --hopper-dataset PATH)"
    )


def evaluate_with_success(run_or_checkpoint: Path, episodes: int) -> dict[str, Any]:
    """`episodes` deterministic episodes, one env each (seeds 10000 + i), stepped together: the mean return, and
    the success rate where the env's final info has `is_success`."""
    import policylab as pl

    policy = pl.load(run_or_checkpoint)
    envs = [gym.make(policy.env_id, **(policy.env_kwargs or {})) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=10_000 + i)[0] for i, env in enumerate(envs)])
    policy.reset()
    returns, running = np.zeros(episodes), np.ones(episodes, bool)
    successes: list[bool | None] = [None] * episodes
    while running.any():
        actions = np.asarray(policy.act(obs, True))
        for i in np.flatnonzero(running):
            obs[i], reward, terminated, truncated, info = envs[i].step(actions[i])
            returns[i] += reward
            if terminated or truncated:
                running[i] = False
                successes[i] = bool(info["is_success"]) if "is_success" in info else None
    for env in envs:
        env.close()
    known = [s for s in successes if s is not None]
    return {
        "return_mean": float(returns.mean()),
        "success_rate": float(np.mean(known)) if len(known) == episodes else None,
    }


def _train_seconds(run_dir: Path) -> float:
    """A run's wall clock (eval.json): its training, checkpoint writes and final one-episode evaluation."""
    return float(json.loads((run_dir / "eval.json").read_text())["wall_clock_s"])


def finetune_run(method: str, task: Task, seed: int, root: Path, threads: int) -> dict[str, Any]:
    """One side of one seed: pretraining and fine-tuning, then this script's evaluation of every checkpoint."""
    import policylab as pl

    common = {"threads": threads, "eval_every": 0, "eval_episodes": 1, "keep_checkpoints": 0}
    schedule = {"checkpoint_every": task.eval_every}
    where = root / f"{method}-s{seed}"
    if method == "dppo":
        bc = pl.train(
            "bc", dataset=str(task.dataset), steps=task.bc_steps, seed=seed, runs_dir=where, name="bc",
            overrides={**common, **task.bc, "checkpoint_every": 0}, verbose=False, progress=False,
        )  # fmt: skip
        pretrain_s = _train_seconds(bc.dir)
        run = pl.train(
            "dppo", env=task.env, steps=task.steps, seed=seed, runs_dir=where, name="dppo",
            overrides={**common, **schedule, **task.dppo, "pretrained": str(bc.dir)}, verbose=False, progress=False,
        )  # fmt: skip
        finetune_s = _train_seconds(run.dir)
        points = {0: bc.dir}
    else:
        run = pl.train(
            "ppo", env=task.env, dataset=str(task.dataset), steps=task.steps, seed=seed, runs_dir=where, name="ppo",
            overrides={**common, **schedule, **task.ppo, "bc_steps": task.bc_steps}, verbose=False, progress=False,
        )  # fmt: skip
        summary = json.loads((run.dir / "eval.json").read_text())
        pretrain_s = float(summary["pretraining"]["seconds"])
        finetune_s = float(summary["wall_clock_s"]) - pretrain_s
        points = {}
    for ckpt in sorted((run.dir / "checkpoints").glob("step_*")):
        points.setdefault(int(ckpt.name.split("_")[1]), ckpt)
    curve = [{"step": step, **evaluate_with_success(path, task.eval_episodes)} for step, path in sorted(points.items())]
    record = {"method": method, "seed": seed, "pretrain_s": pretrain_s, "finetune_s": finetune_s, "curve": curve}
    first, last = curve[0], curve[-1]
    success = (
        "" if last["success_rate"] is None else f" (success {first['success_rate']:.2f} -> {last['success_rate']:.2f})"
    )
    print(
        f"  {method} seed {seed}: pretraining {pretrain_s:.1f} s, fine-tuning {finetune_s:.1f} s; return "
        f"{first['return_mean']:.2f} at step 0 -> {last['return_mean']:.2f} at {last['step']:,}{success}"
    )
    return record


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def finetune_table(task: str, records: list[dict[str, Any]]) -> list[str]:
    """Markdown: per evaluated step, each method's median return [min-max] (and success rate); then wall clock."""
    methods = ("dppo", "ppo")
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    steps = sorted({p["step"] for r in records for p in r["curve"]})
    success = any(p["success_rate"] is not None for r in records for p in r["curve"])
    head = ["env steps"] + [f"{m} return" for m in methods] + ([f"{m} success" for m in methods] if success else [])
    lines = [f"{task}:", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        cells = [f"{step:,}"]
        for key in ("return_mean", "success_rate") if success else ("return_mean",):
            for m in methods:
                values = [p[key] for r in by_method[m] for p in r["curve"] if p["step"] == step and p[key] is not None]
                cells.append(_median_range(values) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| method | pretraining (s) | fine-tuning (s) |")
    lines.append("|---|---|---|")
    for m in methods:
        if by_method[m]:
            pre = [r["pretrain_s"] for r in by_method[m]]
            fine = [r["finetune_s"] for r in by_method[m]]
            lines.append(f"| {m} | {_median_range(pre)} | {_median_range(fine)} |")
    return lines


def check_schedule(task: Task) -> None:
    """Both sides checkpoint at the same env steps only if `eval_every` and `steps` are whole rollouts of each."""
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    for algo, overrides in (("dppo", {**task.dppo, "pretrained": None}), ("ppo", task.ppo)):
        cfg, _ = resolve_config(get_algo(algo), env=task.env, overrides=overrides)
        rollout = cfg.n_steps * cfg.num_envs
        if task.eval_every % rollout or task.steps % rollout:
            raise SystemExit(
                f"{algo} on {task.env} collects rollouts of {rollout:,} steps: --eval-every {task.eval_every:,} and "
                f"--steps {task.steps:,} must be multiples of it for both sides to be evaluated at the same steps"
            )


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"threads": args.threads, "seeds": args.seeds, "tasks": {}}
    root = Path(tempfile.mkdtemp(prefix="expressive-finetune-"))
    try:
        for name in args.tasks.split(","):
            task = TASKS[name]
            if name == "hopper" and args.hopper_dataset:
                task.dataset = Path(args.hopper_dataset)
            for option in ("steps", "eval_every", "bc_steps", "eval_episodes"):
                if getattr(args, option) is not None:
                    setattr(task, option, getattr(args, option))
            ensure_dataset(name, task)
            check_schedule(task)
            print(f"{name}: {task.env}, dataset {task.dataset}, {task.steps:,} env steps, {task.bc_steps:,} BC steps")
            records = []
            for seed in range(1, args.seeds + 1):
                order = ("dppo", "ppo") if seed % 2 else ("ppo", "dppo")
                records += [finetune_run(m, task, seed, root / name, args.threads) for m in order]
            table = finetune_table(name, records)
            print("\n".join(table))
            settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(task).items()}
            out["tasks"][name] = {"settings": settings, "dataset": dataset_summary(task.dataset), "runs": records,
                                  "table": table}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


FPO_TASKS: dict[str, int] = {"InvertedPendulum-v5": 100_000, "Hopper-v5": 200_000}
"""env -> env steps; both algorithms run with their presets for the env (policylab/presets.py)."""


def fpo_run(algo: str, env: str, seed: int, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run: its evaluation curve (the run's own evaluations) and wall clock."""
    import policylab as pl

    steps = args.steps or FPO_TASKS[env]
    overrides = {"threads": args.threads, "eval_every": args.eval_every or 10_240, "eval_episodes": 10,
                 "checkpoint_every": 0}  # fmt: skip
    run = pl.train(algo, env=env, steps=steps, seed=seed, runs_dir=root, name=f"{algo}-{env}-s{seed}",
                   overrides=overrides, verbose=False, progress=False)  # fmt: skip
    points = [{"step": step, "return_mean": ret} for step, ret in eval_curve(run.dir)]
    seconds = _train_seconds(run.dir)
    print(f"  {env} {algo} seed {seed}: {seconds:.1f} s, final return {points[-1]['return_mean']:.1f}", flush=True)
    return {"env": env, "algo": algo, "seed": seed, "seconds": seconds, "curve": points}


def fpo_vs_ppo(args: argparse.Namespace) -> dict[str, Any]:
    envs = args.fpo_envs.split(",") if args.fpo_envs else list(FPO_TASKS)
    unknown = sorted(set(envs) - set(FPO_TASKS))
    if unknown:
        raise SystemExit(f"--fpo-envs: {', '.join(unknown)} not among {', '.join(FPO_TASKS)}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for env in envs:
            for seed in range(1, args.seeds + 1):
                order = ("ppo", "fpo") if seed % 2 else ("fpo", "ppo")
                records += [fpo_run(algo, env, seed, Path(tmp), args) for algo in order]
    summary = {}
    for env in envs:
        for algo in ("ppo", "fpo"):
            rows = [r for r in records if r["env"] == env and r["algo"] == algo]
            final = [r["curve"][-1]["return_mean"] for r in rows]
            late = [
                late_mean([(p["step"], p["return_mean"]) for p in r["curve"]], r["curve"][-1]["step"]) for r in rows
            ]
            seconds = [r["seconds"] for r in rows]
            summary[f"{env}/{algo}"] = {"final_return": _median_range(final), "late_return": _median_range(late),
                                        "seconds": _median_range(seconds)}  # fmt: skip
            print(f"{env:20s} {algo}: final return {_median_range(final)}, late-run mean {_median_range(late)}, "
                  f"wall clock {_median_range(seconds)} s")  # fmt: skip
    presets = {algo: {env: _preset_values(algo, env) for env in envs} for algo in ("ppo", "fpo")}
    return {
        "settings": {"presets": presets, "tasks": {env: FPO_TASKS[env] for env in envs}},
        "records": records,
        "summary": summary,
    }


def _preset_values(algo: str, env: str) -> dict[str, Any]:
    from policylab.presets import find_preset

    preset = find_preset(algo, env)
    return preset.values if preset is not None else {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--offline" in argv:
        from expressive_offline import main as offline_main

        return offline_main([arg for arg in argv if arg != "--offline"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(  # handled above, before this parser: here for --help and the usage line
        "--offline",
        action="store_true",
        help="IDQL vs IQL and EDP vs Diffusion-QL: the other arguments go to "
        "benchmarks/expressive_offline.py (see its --help)",
    )
    parser.add_argument("--fpo", action="store_true", help="FPO vs PPO on MuJoCo tasks")
    parser.add_argument("--acting", action="store_true", help="actions/s of each head at batch 1 and 64")
    parser.add_argument("--finetune", action="store_true", help="DPPO vs Gaussian PPO fine-tuning from BC")
    parser.add_argument("--seconds", type=float, default=2.0, help="--acting: length of each timed window")
    parser.add_argument("--repeats", type=positive_int, default=3, help="--acting: timed windows per cell (the median)")
    parser.add_argument("--tasks", default="navigation,hopper", help="--finetune: navigation, hopper or both")
    parser.add_argument("--fpo-envs", help=f"--fpo: a comma-separated subset of {', '.join(FPO_TASKS)} (default all)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="--finetune, --fpo: seeds 1..N per method")
    parser.add_argument("--steps", type=positive_int, help="--finetune, --fpo: env steps (default: per task)")
    parser.add_argument("--eval-every", type=positive_int, help="--finetune, --fpo: env steps between evaluations")
    parser.add_argument("--bc-steps", type=positive_int, help="--finetune: behaviour-cloning gradient steps (per task)")
    parser.add_argument("--eval-episodes", type=positive_int, help="--finetune: episodes per evaluation (per task)")
    parser.add_argument("--hopper-dataset", help="--finetune: the Hopper-v5 dataset (default benchmarks/data/...)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--no-save", action="store_true", help="print only (a smoke run: no results file)")
    args = parser.parse_args(argv)
    if args.acting + args.finetune + args.fpo != 1:
        parser.error("choose one benchmark: --acting, --finetune, --fpo or --offline")
    if args.finetune and any(t not in TASKS for t in args.tasks.split(",")):
        parser.error(f"--tasks: choose from {', '.join(TASKS)}")
    packages = ["torch", "numpy", "gymnasium"] + (["mujoco"] if args.finetune or args.fpo else [])
    payload: dict[str, Any] = {"provenance": provenance(packages)}
    mode = "acting" if args.acting else "finetune" if args.finetune else "fpo"
    payload[mode] = {"acting": acting, "finetune": finetune, "fpo": fpo_vs_ppo}[mode](args)
    if not args.no_save:
        name = f"expressive-{mode}"
        print(f"results: {write_results(name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
