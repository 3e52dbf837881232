"""policylab's offline algorithms vs d3rlpy's, side by side on one dataset, identical hyperparameters.

    .venv/bin/python benchmarks/offline.py --setup                          # once: d3rlpy's own venv
    .venv/bin/python benchmarks/offline.py --seeds 2 --steps 2000           # bc, td3_bc, iql, cql on Hopper-v5 data
    .venv/bin/python benchmarks/offline.py --algo iql --dataset benchmarks/data/hopper-medium --steps 100000
    .venv/bin/python benchmarks/offline.py --precisions --algo iql --dataset ...  # ours fp32 against ours bf16

d3rlpy 2.8.1 pins gymnasium 1.0.0, which cannot sit next to policylab's gymnasium and minari, so it lives
in `benchmarks/.venv-d3rlpy` (made by `--setup`: torch 2.13.0 first, so that no CUDA wheels come, then
d3rlpy 2.8.1 and gymnasium[mujoco] 1.0.0). Each run is a fresh subprocess, the two sides alternating per
seed, both at 1 torch thread. Both read the same dataset: policylab through `load_dataset`, d3rlpy from the
Minari HDF5 file with h5py into an `MDPDataset` (terminals and timeouts as stored).

Hyperparameters are d3rlpy's defaults on both sides ([256, 256] ReLU networks, Adam, no observation or
reward scaling): BC deterministic, lr 1e-3, batch 100; TD3+BC actor and critic lr 3e-4, batch 256, alpha
2.5, actor every 2 steps, target smoothing 0.2 clipped at 0.5, tau 0.005; IQL lr 3e-4, batch 256, expectile
0.7, inverse temperature 3, weights clipped at 100, two critics, a Gaussian actor with a state-independent
log-std in [-5, 2] (d3rlpy: `NormalPolicy` without squashing); CQL on SAC with critic lr 3e-4, actor and
temperature lr 1e-4, 10 action samples per proposal, conservative weight 5 with a tuned multiplier (target
gap 10), no entropy term in the TD target (d3rlpy's `soft_q_backup=False`); BCQ with lr 1e-3 for the critics, the
perturbation network and the VAE, batch 100, 100 candidates, phi 0.05, lambda 0.75, a [256, 256] VAE with latent
2 dim(A) and KL weight 0.5; PLAS with critic lr 1e-3, actor and VAE lr 1e-4, batch 100, the VAE alone for the first
250 steps (d3rlpy's warmup_steps; its default is 500k); BEAR with critic and VAE lr 3e-4, actor and temperature lr
1e-4, multiplier lr 1e-3, batch 256, eps 0.05, the laplacian kernel with sigma 20, 4 MMD draws, 10 target draws,
100 acting draws, the MMD-only actor warm-up for the first 250 steps (d3rlpy's default is 40k); CRR with lr
3e-4, batch 100, one critic, exp weights with beta 1 clipped at 20, a mean baseline over 4 policy draws, hard
target copies every 100 steps; discrete BCQ (on a Discrete dataset, e.g. `policylab collect --env CartPole-v1
--policy random --episodes 1000 --out benchmarks/data/cartpole-random`) with lr 6.25e-5, batch 32, threshold 0.3,
imitation beta 0.5, hard target copies every 8,000 steps, and separate Q and classifier MLPs (d3rlpy's
`share_encoder=False`, as the authors' networks). The Decision Transformer takes the settings of d3rlpy's own DT
reproduction script on both sides (d3rlpy's defaults would put a [256, 256] MLP encoder
under the observation tokens): windows of 20 steps, 3 blocks of 1 head, width 128 (the observation embedding one
linear layer), ReLU, dropout 0.1 everywhere, AdamW lr 1e-4 with weight decay 1e-4 on every parameter, a linear
warm-up over 10k steps, gradients clipped at 0.25, batch 64, observations standardized with the dataset's
statistics, returns to go x 0.001; both sides ask for the dataset's best episode return when they act.

Measured per run: gradient steps/s over the training loop after its first `--log-every` steps (warm-up
excluded on both sides), and the deterministic evaluation return of the final policy over 10 episodes in
the dataset's env (the same seeds on both sides), with its normalized score from the dataset's references.

Without `--dataset`, the Hopper-v5 dataset is made once in `benchmarks/data/` by `policylab collect`: a
random policy (the speed does not depend on the data; the scores of a random dataset say little). Any other
dataset must exist: `benchmarks/make_datasets.py` makes the hopper-medium ones, `policylab collect` any other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ONE_THREAD,
    REPO_ROOT,
    HelpFormatter,
    dataset_summary,
    fail,
    fmt,
    make_peer_venv,
    pair_report,
    positive_int,
    provenance,
    require_precision,
    run_worker,
    worker_record,
    write_results,
)

D3RLPY_VENV = REPO_ROOT / "benchmarks" / ".venv-d3rlpy"
D3RLPY_PY = D3RLPY_VENV / "bin" / "python"
DEFAULT_DATA = REPO_ROOT / "benchmarks" / "data" / "hopper-random"
ALGOS = ("bc", "td3_bc", "iql", "cql", "dt", "bcq", "bear", "plas", "crr", "bcq_discrete")
DISCRETE = ("bcq_discrete",)
"""Algorithms for Discrete actions: they need a `--dataset` of a Discrete env (e.g. benchmarks/data/cartpole-random)."""
EVAL_EPISODES = 10
PRECISION_SIDES = ("fp32", "bf16")

# policylab's overrides that match d3rlpy's defaults (see the module docstring)
OURS = {
    "bc": {"lr": 1e-3, "batch_size": 100, "normalize_obs": False},
    "td3_bc": {"lr": 3e-4, "batch_size": 256, "normalize_obs": False, "hidden_sizes": [256, 256]},
    "iql": {"lr": 3e-4, "batch_size": 256, "normalize_obs": False},
    "cql": {
        "lr": 3e-4,
        "actor_lr": 1e-4,
        "batch_size": 256,
        "cql_alpha": 5.0,
        "lagrange": True,
        "target_gap": 10.0,
        "backup_entropy": False,
        "normalize_obs": False,
    },
    "bcq": {
        "lr": 1e-3,
        "actor_lr": 1e-3,
        "vae_lr": 1e-3,
        "batch_size": 100,
        "hidden_sizes": [256, 256],
        "vae_hidden_sizes": [256, 256],
        "candidates": 100,
        "normalize_obs": False,
    },
    "bear": {  # the MMD-only actor warm-up for the first 250 steps on both sides, untimed
        "lr": 3e-4,
        "actor_lr": 1e-4,
        "vae_lr": 3e-4,
        "batch_size": 256,
        "hidden_sizes": [256, 256],
        "vae_hidden_sizes": [256, 256],
        "candidates": 100,
        "warmup_steps": 250,
        "normalize_obs": False,
    },
    "plas": {  # the VAE alone for the first 250 steps on both sides (d3rlpy's warmup_steps), untimed
        "lr": 1e-3,
        "actor_lr": 1e-4,
        "vae_lr": 1e-4,
        "batch_size": 100,
        "hidden_sizes": [256, 256],
        "vae_hidden_sizes": [256, 256],
        "vae_steps": 250,
        "normalize_obs": False,
    },
    "crr": {"lr": 3e-4, "batch_size": 100, "normalize_obs": False},
    "bcq_discrete": {
        "lr": 6.25e-5,
        "batch_size": 32,
        "threshold": 0.3,
        "imitation_beta": 0.5,
        "target_update_interval": 8000,
        "normalize_obs": False,
    },
    "dt": {  # d3rlpy's own DT reproduction settings (and CORL's), set on both sides: see _d3rlpy_algo
        "lr": 1e-4,
        "batch_size": 64,
        "context_length": 20,
        "embed_dim": 128,
        "n_layers": 3,
        "n_heads": 1,
        "dropout": 0.1,
        "activation": "relu",
        "weight_decay": 1e-4,
        "warmup_steps": 10_000,
        "max_grad_norm": 0.25,
        "reward_scale": 0.001,
        "normalize_obs": True,
    },
}


def setup() -> None:
    """Create benchmarks/.venv-d3rlpy with d3rlpy 2.8.1 (and its gymnasium 1.0.0) next to torch 2.13.0."""
    make_peer_venv(D3RLPY_VENV, "d3rlpy==2.8.1", "gymnasium[mujoco]==1.0.0")


def ensure_dataset(path: Path, episodes: int) -> Path:
    """`path`, a dataset; the default one (DEFAULT_DATA, random Hopper-v5) is made on first use, any other missing
    path is an error (a mistyped path must not become a random dataset under a real-looking name)."""
    if path.exists():
        return path
    if path.resolve() != DEFAULT_DATA.resolve():
        fail(
            f"error: no dataset at {path}\n  fix: make it with `.venv/bin/python benchmarks/make_datasets.py --env "
            "Hopper-v5` (benchmarks/data/hopper-medium, -medium-replay, -random) or `policylab collect --env ENV "
            f"--policy POLICY --out {path}`; without --dataset, a random Hopper-v5 dataset is made in {DEFAULT_DATA}"
        )
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.collect import collect

    collect("Hopper-v5", "random", episodes, seed=0, out=path)
    return path


# --- workers ---------------------------------------------------------------------------------------------------


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl
    from policylab.data.dataset import load_dataset

    torch.set_num_threads(1)
    marks: list[tuple[int, float]] = []

    def callback(info: Any) -> None:
        marks.append((info.step, time.perf_counter()))

    overrides = {
        **OURS[a.algo],
        "threads": 1,
        "precision": a.precision,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": a.log_every,
        "eval_episodes": EVAL_EPISODES,
    }
    with tempfile.TemporaryDirectory() as runs:
        run = pl.train(
            a.algo,
            dataset=a.dataset,
            steps=a.steps,
            seed=a.seed,
            overrides=overrides,
            preset="none",
            runs_dir=runs,
            callback=callback,
            verbose=False,
        )
        policy = pl.load(run.dir)
    result = pl.evaluate(policy, EVAL_EPISODES, seed=10_000 + a.seed)
    data = load_dataset(a.dataset, validate=False)
    return _record(a, marks, result["return_mean"], data.normalized_score(result["return_mean"]), "policylab")


def worker_d3rlpy(a: argparse.Namespace) -> dict[str, Any]:
    import d3rlpy
    import gymnasium as gym
    import numpy as np
    import torch

    torch.set_num_threads(1)
    d3rlpy.seed(a.seed)
    dataset, meta = _d3rlpy_dataset(a.dataset)
    algo = _d3rlpy_algo(a.algo)
    algo.build_with_dataset(dataset)
    marks: list[tuple[int, float]] = []

    def callback(_algo: Any, _epoch: int, total_step: int) -> None:
        if total_step % a.log_every == 0:
            marks.append((total_step, time.perf_counter()))

    algo.fit(
        dataset,
        n_steps=a.steps,
        n_steps_per_epoch=a.steps,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        save_interval=a.steps + 1,
        callback=callback,
    )
    env = gym.make(meta["env_id"])
    returns = []
    actor = algo.as_stateful_wrapper(target_return=meta["best_return"]) if a.algo == "dt" else None
    for episode in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=10_000 + a.seed + episode)
        done, total, reward = False, 0.0, 0.0
        if actor is not None:
            actor.reset()
        while not done:
            x = np.asarray(obs, np.float32)
            action = algo.predict(x[None])[0] if actor is None else actor.predict(x, reward)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    ret = float(np.mean(returns))
    low, high = meta.get("ref_min_score"), meta.get("ref_max_score")
    score = None if low is None or high is None or high == low else 100.0 * (ret - low) / (high - low)
    return _record(a, marks, ret, score, "d3rlpy")


def _d3rlpy_algo(name: str) -> Any:
    import d3rlpy

    device = "cpu:0"
    if name == "bc":
        return d3rlpy.algos.BCConfig().create(device=device)
    if name == "td3_bc":
        return d3rlpy.algos.TD3PlusBCConfig().create(device=device)
    if name == "cql":
        return d3rlpy.algos.CQLConfig().create(device=device)
    if name == "bcq":
        return d3rlpy.algos.BCQConfig().create(device=device)
    if name == "bear":
        return d3rlpy.algos.BEARConfig(warmup_steps=250).create(device=device)
    if name == "plas":
        return d3rlpy.algos.PLASConfig(warmup_steps=250).create(device=device)
    if name == "crr":
        return d3rlpy.algos.CRRConfig().create(device=device)
    if name == "bcq_discrete":  # the authors' MLP networks, not shared (d3rlpy shares them by default)
        return d3rlpy.algos.DiscreteBCQConfig(share_encoder=False).create(device=device)
    if name == "dt":
        optim = d3rlpy.optimizers.AdamWFactory(
            weight_decay=1e-4,
            clip_grad_norm=0.25,
            lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=10_000),
        )
        return d3rlpy.algos.DecisionTransformerConfig(
            batch_size=64,
            learning_rate=1e-4,
            context_size=20,
            max_timestep=1000,
            num_heads=1,
            num_layers=3,
            attn_dropout=0.1,
            resid_dropout=0.1,
            embed_dropout=0.1,
            activation_type="relu",
            encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[128], exclude_last_activation=True),
            optim_factory=optim,
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
            reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001),
        ).create(device=device)
    return d3rlpy.algos.IQLConfig().create(device=device)


def _d3rlpy_dataset(path: str) -> tuple[Any, dict[str, Any]]:
    """The Minari dataset as a d3rlpy MDPDataset (each episode's final observation is dropped: d3rlpy keeps
    T observations per episode and bootstraps nothing after a terminal, as D4RL's loaders do)."""
    import d3rlpy
    import h5py
    import numpy as np

    data_dir = Path(path) / "data"
    meta = json.loads((data_dir / "metadata.json").read_text())
    ours = meta.get("policylab", {})
    parts: dict[str, list[Any]] = {k: [] for k in ("obs", "actions", "rewards", "terminals", "timeouts")}
    with h5py.File(data_dir / "main_data.hdf5", "r") as f:
        for i in range(int(meta["total_episodes"])):
            group = f[f"episode_{i}"]
            parts["obs"].append(group["observations"][()][:-1])
            parts["actions"].append(group["actions"][()])
            parts["rewards"].append(group["rewards"][()])
            parts["terminals"].append(group["terminations"][()])
            parts["timeouts"].append(group["truncations"][()])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    discrete = np.issubdtype(arrays["actions"].dtype, np.integer)
    dataset = d3rlpy.dataset.MDPDataset(
        observations=arrays["obs"].astype(np.float32),
        actions=arrays["actions"].astype(np.int64 if discrete else np.float32),
        rewards=arrays["rewards"].astype(np.float32),
        terminals=arrays["terminals"].astype(np.float32),
        timeouts=arrays["timeouts"].astype(np.float32),
    )
    ends = np.flatnonzero(np.logical_or(arrays["terminals"], arrays["timeouts"]))
    best = max(float(r.sum()) for r in np.split(arrays["rewards"], ends[:-1] + 1))
    refs = {"ref_min_score": meta.get("ref_min_score", ours.get("ref_min_score")), "best_return": best}
    refs["ref_max_score"] = meta.get("ref_max_score", ours.get("ref_max_score"))
    return dataset, {"env_id": ours.get("env_id") or json.loads(meta["env_spec"])["id"], **refs}


def _record(a: argparse.Namespace, marks: list[tuple[int, float]], ret: float, score: Any, side: str) -> dict:
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return {
        "side": side,
        "seed": a.seed,
        "algo": a.algo,
        "steps_per_s": (s1 - s0) / (t1 - t0) if t1 > t0 else None,
        "return": ret,
        "score": None if score is None else float(score),
    }


# --- the parent ------------------------------------------------------------------------------------------------


def run_side(side: str, a: argparse.Namespace, algo: str, seed: int) -> dict[str, Any]:
    """One run in a fresh process; `side` is d3rlpy, policylab (at `--precision`), or fp32 / bf16 (policylab at
    that precision, for `--precisions`)."""
    worker, precision = ("policylab", side) if side in PRECISION_SIDES else (side, a.precision)
    python = None if worker == "policylab" else str(D3RLPY_PY)
    args = ["--worker", worker, "--algo", algo, "--seed", str(seed), "--steps", str(a.steps)]
    args += ["--log-every", str(a.log_every), "--dataset", str(a.dataset), "--precision", precision]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_worker(Path(__file__).resolve(), args, Path(tmp) / "out.json", python=python, env=ONE_THREAD)
    return {**worker_record(res, f"{side} {algo} seed {seed}"), "side": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create the d3rlpy venv and exit")
    parser.add_argument("--algo", action="append", choices=ALGOS, help="repeatable; default all")
    parser.add_argument("--seeds", type=positive_int, default=2, help="seeds per side")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=positive_int, default=2000, help="gradient steps per run")
    parser.add_argument(
        "--log-every", type=positive_int, default=500, help="steps per log interval (the first one is not timed)"
    )
    parser.add_argument(
        "--dataset",
        default=str(DEFAULT_DATA),
        help="a dataset directory (default: a random Hopper-v5 dataset, made in benchmarks/data/ on first use)",
    )
    parser.add_argument(
        "--episodes",
        type=positive_int,
        default=1000,
        help="episodes of the random Hopper-v5 dataset made without --dataset",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="policylab's products (d3rlpy's stay float32)"
    )
    parser.add_argument(
        "--precisions",
        action="store_true",
        help="policylab in float32 against policylab in bf16, no d3rlpy: the bf16 option's score parity",
    )
    parser.add_argument("--worker", choices=("policylab", "d3rlpy"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        a.algo = a.algo[0]
        record = worker_ours(a) if a.worker == "policylab" else worker_d3rlpy(a)
        Path(a.out).write_text(json.dumps(record))
        return
    if a.setup:
        setup()
        return
    # the speed is timed from the first log mark (step --log-every) to the last: policylab marks every --log-every
    # steps and at the end, d3rlpy only at multiples of --log-every
    need, until = (a.log_every + 1, "the end") if a.precisions else (2 * a.log_every, "the last multiple of it")
    if a.steps < need:
        parser.error(
            f"--steps {a.steps} leaves nothing to time: the speed is measured from step --log-every ({a.log_every}) "
            f"to {until}; give --steps {need} or more, or a smaller --log-every"
        )
    sides = PRECISION_SIDES if a.precisions else ("policylab", "d3rlpy")
    require_precision(*(PRECISION_SIDES if a.precisions else [a.precision]))
    if not a.precisions and not D3RLPY_PY.exists():
        raise SystemExit("d3rlpy's venv is missing: run `.venv/bin/python benchmarks/offline.py --setup` first")
    a.dataset = ensure_dataset(Path(a.dataset), a.episodes)
    results: dict[str, Any] = {"provenance": provenance(["torch", "policylab", "minari"]), "cases": {},
                               "dataset": dataset_summary(a.dataset)}  # fmt: skip
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    for algo in a.algo or [name for name in ALGOS if name not in DISCRETE]:
        runs = []
        for seed in seeds:
            for side in sides:
                rec = run_side(side, a, algo, seed)
                print(
                    f"  {algo} {side} seed {seed}: {fmt(rec['steps_per_s'], '.1f')} steps/s, return {rec['return']:.1f}"
                )
                runs.append(rec)
        print(f"\n{algo}: {a.steps:,} gradient steps on {a.dataset}, 1 thread, alternating runs")
        names = sides if a.precisions else ("ours", "d3rlpy")
        per_run = {
            "steps_per_s": (
                f"gradient steps/s after the first log interval; ratio > 1: {names[0]} faster",
                ".1f",
                True,
            ),
            "return": ("final return, deterministic, 10 episodes", ".1f", True),
            "score": ("normalized score", ".1f", False),
        }
        summary = pair_report(runs, seeds, per_run, {}, *sides, names)
        results["cases"][algo] = {
            "runs": runs,
            "summary": summary,
            "steps": a.steps,
            "dataset": str(a.dataset),
            "precision": "fp32 / bf16" if a.precisions else a.precision,
        }
    print(f"results: {write_results('offline', results)}")


if __name__ == "__main__":
    main()
