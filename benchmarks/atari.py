"""policylab against stable-baselines3 on Atari (Pong), the same rl-zoo hyperparameters and preprocessing.

Run from the repository root (needs the atari extra, which `make test` installs, and SB3: `make bench`):

    .venv/bin/python benchmarks/atari.py --seeds 3                 # both cases
    .venv/bin/python benchmarks/atari.py --case dqn-pong --seeds 1
    .venv/bin/python benchmarks/atari.py --layout --batch 256   # the Nature-CNN step: layouts, feature-layer kernel
    .venv/bin/python benchmarks/atari.py --acting     # forwards without gradients: float32 against bf16 by batch
    .venv/bin/python benchmarks/atari.py --seeds 3 --precision bf16   # policylab's opt-in bfloat16 encoder

Cases (policylab: its `atari` preset for the algorithm, which is rl-zoo's `atari` entry; SB3: the same values,
`make_atari_env` (AtariWrapper) and `VecFrameStack(4)`, CnnPolicy), on PongNoFrameskip-v4, 1 torch thread:

* `ppo-pong`: PPO, 8 envs, 128-step rollouts, 4 epochs of 256-sample minibatches, lr 2.5e-4 and clip range 0.1,
  16,384 steps (16 updates). rl-zoo decays both linearly over its 10M steps: SB3 does so here (0.16% over the
  run), policylab holds them (annealed over 16k steps they would halve).
* `dqn-pong`: DQN with a 10k replay buffer (policylab: each frame stored once; SB3: optimize_memory_usage, as
  rl-zoo's entry), learning_starts 1,000 instead of 100k so that the run times updates, 6,000 steps.

Per run: the training loop's wall clock (from the first env step to the end of the last update; policylab's
final evaluation and checkpoint are outside it), env steps/s over it, and the replay buffer's bytes per transition
(DQN). Output: tables and JSON in benchmarks/results/atari-<date>.json. Speed only: these budgets are far too
short for returns to mean anything.

Returns, float32 against bfloat16 (policylab only), come from `precision_returns.py --case ppo-breakout`, which
runs `RETURN_CASES` through this script's `--return-case` worker: Breakout learns within a CPU budget where Pong
does not.
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    curve_record,
    pair_report,
    positive_int,
    provenance,
    require_precision,
    run_alternating,
    write_results,
)

ENV = "PongNoFrameskip-v4"
ZOO_STEPS = 10_000_000  # the linear schedules decay over rl-zoo's budget on both sides
CASES: dict[str, dict[str, Any]] = {
    "ppo-pong": {"algo": "ppo", "steps": 16_384, "ours": {}},
    "dqn-pong": {"algo": "dqn", "steps": 6_000, "ours": {"learning_starts": 1000, "log_every": 500}},
}
# precision_returns.py's cases: policylab's own preset (rl-zoo's atari entry, its schedules annealed over the
# run; its evaluations play whole games with sampled actions, as rl-zoo's), 10 evaluation games at the end.
RETURN_CASES: dict[str, dict[str, Any]] = {
    "ppo-breakout": {"algo": "ppo", "env": "BreakoutNoFrameskip-v4", "steps": 150_000, "ours": {"eval_episodes": 10}},
}


def worker_returns(case: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """One policylab run of a RETURN_CASES case: its final evaluation's mean return and, with --curve-every,
    its evaluations during training."""
    import torch

    import policylab as pl

    torch.set_num_threads(1)
    steps = a.steps or case["steps"]
    curve: list[list[float]] = []

    def callback(info: Any) -> None:
        if info.eval_return is not None and info.step < steps:
            curve.append([info.step, info.eval_return])

    overrides = {**case["ours"], "threads": 1, "checkpoint_every": 0, "precision": a.precision,
                 "eval_every": a.curve_every or 0}  # fmt: skip
    run = pl.train(case["algo"], env=case["env"], steps=steps, seed=a.seed, overrides=overrides, progress=False,
                   verbose=False, runs_dir=Path(a.out).parent / "runs-returns", callback=callback)  # fmt: skip
    final = run.final_eval["return_mean"]  # type: ignore[index]  # the run was not interrupted
    return {"eval_return_mean": final, **curve_record(curve, steps, final)}


def worker_ours(case: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl

    torch.set_num_threads(1)
    marks: list[float] = []

    def callback(info: Any) -> None:
        marks.append(info.elapsed)

    overrides = {**case["ours"], "threads": 1, "eval_episodes": 1, "checkpoint_every": 0, "precision": a.precision}
    if case["algo"] == "ppo":  # decay over rl-zoo's budget, as SB3's schedules below: progress = step / 10M
        overrides = {**overrides, "anneal_lr": False, "anneal_clip": False}
    run = pl.train(case["algo"], env=ENV, steps=case["steps"], seed=a.seed, overrides=overrides, progress=False,
                   verbose=False, runs_dir=Path(a.out).parent / "runs-ours", callback=callback)  # fmt: skip
    record = {"loop_s": marks[-1], "steps": run.steps, "steps_per_s": run.steps / marks[-1]}
    if case["algo"] == "dqn":
        from policylab.data.replay import StackedFrameReplay

        record["replay_bytes_per_transition"] = StackedFrameReplay(
            1000, 1, (4, 84, 84), (), torch.long, obs_dtype=torch.uint8
        ).bytes_per_transition
    return record


def worker_sb3(case: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    import ale_py
    import gymnasium as gym
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    torch.set_num_threads(1)
    gym.register_envs(ale_py)
    times: dict[str, float] = {}

    class Clock(BaseCallback):
        def _on_training_start(self) -> None:
            times["start"] = time.perf_counter()

        def _on_step(self) -> bool:
            return True

        def _on_training_end(self) -> None:
            times["end"] = time.perf_counter()

    def linear(start: float) -> Any:
        done = case["steps"] / ZOO_STEPS
        return lambda remaining: start * (1.0 - done * (1.0 - remaining))  # the same decay over 10M steps

    if case["algo"] == "ppo":
        env = VecFrameStack(make_atari_env(ENV, n_envs=8, seed=a.seed), 4)
        model = sb3.PPO("CnnPolicy", env, n_steps=128, n_epochs=4, batch_size=256, learning_rate=linear(2.5e-4),
                        clip_range=linear(0.1), vf_coef=0.5, ent_coef=0.01, seed=a.seed, device="cpu")  # fmt: skip
    else:
        env = VecFrameStack(make_atari_env(ENV, n_envs=1, seed=a.seed), 4)
        model = sb3.DQN("CnnPolicy", env, buffer_size=10_000, learning_rate=1e-4, batch_size=32, learning_starts=1000,
                        target_update_interval=1000, train_freq=4, gradient_steps=1, exploration_fraction=0.1,
                        exploration_final_eps=0.01, optimize_memory_usage=True,
                        replay_buffer_kwargs={"handle_timeout_termination": False}, seed=a.seed,
                        device="cpu")  # fmt: skip
    model.learn(case["steps"], callback=Clock())
    loop = times["end"] - times["start"]
    record = {"loop_s": loop, "steps": model.num_timesteps, "steps_per_s": model.num_timesteps / loop}
    if case["algo"] == "dqn":
        buf = model.replay_buffer
        arrays = [buf.observations, buf.actions, buf.rewards, buf.dones, buf.timeouts]
        record["replay_bytes_per_transition"] = sum(x.nbytes for x in arrays) / buf.buffer_size
    return record


METRICS = {
    "loop_s": ("training loop wall clock (s); ratio <1: ours faster", ".1f", True),
    "steps_per_s": ("env steps/s in the loop; ratio >1: ours faster", ",.0f", True),
}
MEMORY = {"replay_bytes_per_transition": ("replay bytes per transition", ",.0f", True)}


def time_layouts(batch: int = 32, repeats: int = 12) -> None:
    """A Nature-CNN forward and backward on `batch` Atari stacks, 1 thread: the input contiguous (NCHW) or in the
    channels-last memory layout (what the encoder uses), the feature layer on nn.Linear's kernel (MKL; SB3's) or
    on `matmul.linear`'s (the encoder's). The variants take turns; medians over `repeats` turns, and the median
    of the paired differences between the two feature-layer kernels."""
    import statistics

    import torch
    import torch.nn.functional as F

    from policylab.nets.cnn import ImageLayout, NatureCNN
    from policylab.nets.matmul import bf16_native

    torch.set_num_threads(1)
    net, head = NatureCNN(ImageLayout(4, 84, 84, False)), torch.nn.Linear(512, 6)
    frames = torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8)
    fc, calls = net.fc[0], max(2, 320 // batch)

    def step(name: str) -> None:
        x = frames.float().div_(255.0)
        if name != "nchw":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "channels_last_bf16"):
            h = net.convs(x)
            h = fc(h) if name in ("channels_last", "channels_last_bf16") else F.linear(h, fc.weight, fc.bias)
            features = torch.relu(h)
        head(features.float()).sum().backward()

    names = ["nchw", "channels_last_mkl_fc", "channels_last"] + (["channels_last_bf16"] if bf16_native() else [])
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in results:
            step(name)
            start = time.perf_counter()
            for _ in range(calls):
                step(name)
            results[name].append((time.perf_counter() - start) / calls * 1000)
    print(f"Nature-CNN forward and backward on {batch} stacks, 1 thread:")
    for name, values in results.items():
        print(f"{name:21s} {statistics.median(values):.2f} ms per step (median of {repeats})")
    paired = [a - b for a, b in zip(results["channels_last"], results["channels_last_mkl_fc"])]
    print(f"feature layer routed minus on MKL: {statistics.median(paired):+.2f} ms (median of {repeats} pairs)")


def time_acting(repeats: int = 200) -> None:
    """A Nature-CNN forward without gradients (acting, a target network) on 1-32 stacks, 1 thread: float32 against
    bfloat16 autocast (`precision=bf16`'s encoder), median of `repeats` calls, the two taking turns. Below
    `nets.cnn.BF16_MIN_ACTING_FRAMES` stacks the encoder acts in float32 under precision=bf16."""
    import statistics

    import torch

    from policylab.nets.cnn import ImageLayout, NatureCNN

    torch.set_num_threads(1)
    net, head = NatureCNN(ImageLayout(4, 84, 84, False)), torch.nn.Linear(512, 6)
    print("Nature-CNN forward without gradients, 1 thread: float32 / bfloat16 autocast, median us per call")
    for batch in (1, 2, 4, 8, 32):
        frames = torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8)
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.no_grad():
            for _ in range(repeats):
                for bf16 in times:
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        head(net.encode(frames).float())
                    times[bf16].append((time.perf_counter() - start) * 1e6)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"{batch:3d} stacks  {fp32:8.0f} / {bf16:8.0f}  (bf16 {fp32 / bf16:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--case", action="append", choices=list(CASES), help="a case to run (repeatable; default both)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N per side")
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--layout", action="store_true", help="time the CNN step in both memory layouts, then stop")
    p.add_argument("--acting", action="store_true", help="time acting forwards, float32 against bf16, then stop")
    p.add_argument(
        "--batch", type=positive_int, default=32, help="--layout's stacks per step (DQN's batch; PPO's is 256)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="policylab's precision (bf16: the encoder under autocast; opt-in, AMX or AVX512-BF16)",
    )
    p.add_argument("--return-case", choices=list(RETURN_CASES), help=argparse.SUPPRESS)  # precision_returns.py's
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--curve-every", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.layout:
        time_layouts(a.batch)
        return
    if a.acting:
        time_acting()
        return
    if a.return_case:
        record = worker_returns(RETURN_CASES[a.return_case], a)
        Path(a.out).write_text(json.dumps({"side": "ours", "seed": a.seed, **record}))
        return
    if a.worker:
        case = CASES[a.case[0]]
        record = worker_ours(case, a) if a.worker == "ours" else worker_sb3(case, a)
        Path(a.out).write_text(json.dumps({"side": a.worker, "seed": a.seed, **record}))
        return
    require_precision(a.precision)  # before any run: bf16 needs AMX or AVX512-BF16
    header = provenance(["policylab", "torch", "stable-baselines3", "gymnasium", "ale-py", "numpy"])
    seeds, summaries, all_runs = list(range(1, a.seeds + 1)), {}, []
    for name in a.case or list(CASES):
        print(f"\n== {name}: {CASES[name]['algo']} {ENV}, {CASES[name]['steps']:,} steps", flush=True)
        runs = run_alternating(
            __file__,
            ["ours", "sb3"],
            seeds,
            ["--case", name, "--precision", a.precision],
            lambda r: print(f"  {r['side']} seed {r['seed']}: {r['loop_s']:.1f} s", flush=True),
        )
        metrics = {**METRICS, **(MEMORY if CASES[name]["algo"] == "dqn" else {})}
        summaries[name] = pair_report(runs, seeds, metrics, {}, "ours", "sb3", ("policylab", "SB3"))
        all_runs += [{**r, "case": name} for r in runs]
    payload = {**header, "precision": a.precision, "cases": CASES, "summary": summaries, "runs": all_runs}
    path = write_results("atari", payload)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
