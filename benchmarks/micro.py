"""Micro-benchmarks behind the "where the time goes" numbers in benchmarks/README.md.

    .venv/bin/python benchmarks/micro.py [--threads 1]

Prints medians over 5 repetitions of:
- the PPO CartPole preset's rollout (us per vector step of 8 envs) and update (us per gradient step),
  with the analytic-gradient step and with autograd (`analytic_grads=false`);
- one gradient step of the 64x64 actor-critic at batch 256, analytic vs autograd;
- the raw env: random actions through the same vectorized CartPole;
- the import cost of torch.optim's first optimizer (it imports torch._dynamo), in a fresh process;
- replay buffer add (1 env) and sample(256) from a 1M-transition buffer;
- `--only matmul`: float32 products of the shapes the off-policy updates use, through MKL (torch's
  default CPU kernel) and through oneDNN (what `policylab.nets.matmul` uses where its probe passes),
  in GFLOP/s, with the relative error of each against float64, the CPU's AVX-512 / bfloat16 / AMX flags
  and which kernel policylab sends each shape to;
- SAC's gradient step on HalfCheetah-v5 shapes (obs 17, act 6, 256x256 nets, 2 critics, batch 256),
  analytic and autograd, in updates/s and achieved GFLOP/s against a plain 256x256x256 matmul on each
  kernel, and the products of one update with the kernel each took (`--only sac` runs just this part);
- `--only breakdown`: where one update of the SAC Pendulum and DQN CartPole loops goes (the update and
  the share of it in matrix products, replay sampling, exploring, env steps, replay writes), measured
  inside the running loop;
- `--only denormal`: the DQN CartPole rl-zoo preset's loop with float32 denormals flushed to zero (what the training
  loops do, `policylab/runtime.py`) and without, in fresh processes, alternating, with the share of Adam's
  first moments that are denormal at the end;
- `--only threads`: per-update time (env steps included) of SAC, TD3 (Pendulum-v1) and the DQN CartPole rl-zoo
  preset at 1 and 2 torch threads;
- `--only thread-invariance`: whether SAC, TD3 and DQN runs end with the same parameters at 1 and 2 threads
  (what `threads=auto` may change during a run), at default sizes and with 32-unit layers;
- `--only compile`: the autograd SAC update with torch.compile'd networks against eager, and the compile time;
- `--only masks`: what action masks cost where they once were slow: torch's `exp` of the log-probabilities of
  [256, 80] logits with 60 of 80 masked (-1e9) against none masked, and `softmax` of the masked ones (what the
  heads use); the one-hot encoding of one Discrete(500) observation (Taxi's) by the encoder's per-observation
  path and by its batch path.
- `--only replay`: one env's `ReplayBuffer.add` on its one-env path and on the general path, and `sample(256)`;
- `--only renorm`: CrossQ's batch renormalization on a [2, 512, 256] input (twin critics' hidden layer on [s; s']):
  torch's `var_mean` (a Welford pass, what sb3-contrib's BatchRenorm computes with `var`) against the mean and the
  centred sum of squares policylab uses; one forward and backward of policylab's renormalization (a hand-written
  backward) and of sb3-contrib's BatchRenorm1d applied per member (where sb3-contrib is installed); and one
  CrossQ update with rl-zoo's Pendulum-v1 sizes, the hand-derived step (what runs) and the autograd one in
  alternating blocks, with the share of the hand-derived step its products take under torch's profiler.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from common import HelpFormatter, positive_int


def timed(fn: Callable[[], object], n: int, warmup: int = 20) -> float:
    """Median over 5 repetitions of the mean seconds per call of `fn`, over `n` calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n)
    return statistics.median(runs)


def ppo_phases(analytic: bool) -> tuple[float, float]:
    """(us per rollout step, us per gradient step) of the CartPole preset."""
    from policylab.algos import get_algo
    from policylab.train import OnPolicyLoop, resolve_config

    spec = get_algo("ppo")
    cfg, _ = resolve_config(spec, "CartPole-v1", 100_000, 1, None, {"eval_every": 0, "analytic_grads": analytic})
    loop = OnPolicyLoop(spec, cfg)
    rollouts = [loop.collect() for _ in range(3)]
    collect = timed(loop.collect, 20, warmup=0) / cfg.n_steps
    update = timed(lambda: loop.algo.update(rollouts[0], 0.1), 10, warmup=2) / cfg.epochs
    loop.close()
    return collect * 1e6, update * 1e6


def gradient_step(analytic: bool) -> float:
    import gymnasium as gym

    from policylab.algos.onpolicy import ActorCriticLoss, OnPolicyConfig, make_learner
    from policylab.data import Batch
    from policylab.nets import ActorCritic
    from policylab.optim import Adam

    net = ActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    learner = make_learner(net, OnPolicyConfig(analytic_grads=analytic), lambda p: Adam(p, lr=1e-3, eps=1e-5))
    b = 256
    batch = Batch(
        obs=torch.randn(b, 4),
        actions=torch.randint(0, 2, (b,)),
        logp=torch.full((b,), -0.69),
        values=torch.randn(b),
        advantages=torch.randn(b),
        returns=torch.randn(b),
    )
    loss = ActorCriticLoss()
    return timed(lambda: learner.step(batch, loss, with_metrics=False), 200) * 1e6


def raw_env() -> float:
    from policylab.envs import make_vec_env

    env = make_vec_env("CartPole-v1", 8)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    return 8 / timed(lambda: env.step(rng.integers(0, 2, 8)), 5000)


def optim_import_seconds() -> float:
    code = (
        "import torch, time; p = [torch.nn.Parameter(torch.zeros(1))]; t = time.perf_counter(); "
        "torch.optim.Adam(p); print(time.perf_counter() - t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def replay() -> tuple[float, float, float]:
    """(us per add of one env's transition on its one-env path, the same on the general path, us per
    sample(256)), on a 1M-transition buffer of HalfCheetah-sized transitions."""
    from policylab.data import ReplayBuffer

    o, a = np.zeros((1, 17), np.float32), np.zeros((1, 6), np.float32)
    r, f = np.ones(1, np.float32), np.zeros(1, bool)
    adds = []
    for single in (True, False):
        buf = ReplayBuffer(1_000_000, 1, (17,), (6,))
        buf.single = single  # False: the path every other buffer takes
        adds.append(timed(lambda buf=buf: buf.add(o, a, r, o, f, f, o), 20_000) * 1e6)
    g = torch.Generator().manual_seed(0)
    return adds[0], adds[1], timed(lambda: buf.sample(256, g), 1000) * 1e6


def replay_costs() -> None:
    """`--only replay` (see the docstring)."""
    single, general, sample = replay()
    print(f"replay buffer, 1M transitions: add {single:.1f} us (1 env; the general path: {general:.1f} us), "
          f"sample(256) {sample:.0f} us")  # fmt: skip


def mlp_macs(dims: list[int]) -> int:
    """Multiply-adds of one forward pass of an MLP with these layer widths, per sample."""
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def sac_update_flops(obs: int, act: int, hidden: list[int], critics: int, batch: int) -> int:
    """FLOPs (2 x multiply-adds) of one SAC gradient step as `fused_sac_update` computes it."""
    actor, critic = [obs, *hidden, 2 * act], [obs + act, *hidden, 1]
    actor_all, critic_all = mlp_macs(actor), mlp_macs(critic)
    critic_after_first = mlp_macs(critic[1:])  # input gradients stop at the first layer's input
    macs = 2 * batch * actor_all  # actor forward on [s; s']
    macs += 3 * critics * batch * critic_all  # target critic, critic, critic at pi(s)
    macs += critics * batch * (critic_all + critic_after_first)  # critic backward: weights + inputs
    macs += critics * batch * critic_all  # backward to the action through the critic (input gradients only)
    macs += batch * (actor_all + mlp_macs(actor[1:]))  # actor backward
    return 2 * macs


MATMUL_SHAPES = [  # (members, rows, inner, columns)
    (1, 256, 256, 256),  # the plain reference product
    (2, 256, 256, 256),  # SAC's twin critics, hidden layer
    (1, 512, 256, 256),  # SAC's actor on [s; s']
    (2, 256, 400, 300),  # TD3's critics, hidden layer
    (1, 256, 400, 300),  # TD3's actor, hidden layer
    (1, 64, 256, 256),  # DQN at batch 64
    (2, 256, 4, 256),  # a first layer (Pendulum critics): stays on MKL
    (1, 64, 64, 64),  # a small product (2^18 multiply-adds): stays on MKL
    (2, 7936, 256, 256),  # CQL's critics on B (1 + 3M) proposal rows, hidden layer
]


def matmul_gflops(members: int, rows: int, inner: int, columns: int) -> tuple[float, float, list[float]]:
    """(MKL GFLOP/s, oneDNN GFLOP/s, relative errors against float64 of MKL, oneDNN and bfloat16 inputs)
    of one float32 bmm."""
    from policylab.nets import matmul

    g = torch.Generator().manual_seed(0)
    a = 1.0 + 1e-3 * torch.randn(members, rows, inner, generator=g)
    b = torch.randn(members, inner, columns, generator=g)
    reference = torch.bmm(a.double(), b.double())
    flops = 2 * members * rows * inner * columns
    mkl = flops / timed(lambda: torch.bmm(a, b), 200) / 1e9
    onednn = flops / timed(lambda: matmul._onednn_call(torch.bmm, a, b), 200) / 1e9
    results = (torch.bmm(a, b), matmul._onednn_call(torch.bmm, a, b), torch.bmm(a.bfloat16(), b.bfloat16()))
    return mkl, onednn, [matmul._relative_error(x, reference) for x in results]


def bf16_gflops(members: int, rows: int, inner: int, columns: int) -> float | None:
    """GFLOP/s of one product as `precision=bf16` runs it here (casts included), None where bf16 is refused."""
    from policylab.nets import matmul

    if not matmul.bf16_native():
        return None
    a, b = torch.randn(members, rows, inner), torch.randn(members, inner, columns)
    matmul.set_precision("bf16")
    try:
        return 2 * members * rows * inner * columns / timed(lambda: matmul.bmm(a, b), 200) / 1e9
    finally:
        matmul.set_precision("fp32")


def cpu_flags() -> str:
    """The CPU features that decide the kernels: AVX-512, bfloat16 instructions, AMX (Linux)."""
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split("flags", 1)[1].split("\n", 1)[0].split()) if info.is_file() else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def kernel_used(members: int, rows: int, inner: int, columns: int) -> str:
    """Which kernel policylab's `nets.matmul` sends a float32 product of this shape to, here."""
    from policylab.nets import matmul

    routed = matmul.worth_routing(torch.empty(members, rows, inner), torch.empty(members, inner, columns))
    return "oneDNN" if routed else "MKL"


def matmul_kernels() -> None:
    from policylab.nets import matmul

    print(f"CPU: {cpu_flags()}")
    print(
        f"the probe: oneDNN float32 products exact here {matmul._onednn_exact()}, a CPU where oneDNN is the "
        f"faster kernel (AMD with AVX-512) {matmul._onednn_faster()}: large products go to "
        f"{'oneDNN' if matmul.use_onednn() else 'MKL'}"
    )
    if matmul.bf16_native():
        route = (
            "oneDNN's setting (it rounds to bfloat16 here)" if matmul.bf16_by_setting() else "inputs cast to bfloat16"
        )
        print(f"precision=bf16 products here: {route}")
    for shape in MATMUL_SHAPES:
        mkl, onednn, errors = matmul_gflops(*shape)
        bf16 = bf16_gflops(*shape)
        print(
            f"bmm {'x'.join(map(str, shape))}: MKL {mkl:.0f} GFLOP/s, oneDNN {onednn:.0f} GFLOP/s "
            f"({onednn / mkl:.2f}x), policylab uses {kernel_used(*shape)}"
            + ("" if bf16 is None else f", precision=bf16 {bf16:.0f} GFLOP/s")
            + f"; relative error vs float64: MKL {errors[0]:.1e}, oneDNN {errors[1]:.1e}, "
            + f"bfloat16 inputs {errors[2]:.1e}"
        )


def products_of(update: Callable[[], object]) -> dict[str, int]:
    """{'members x rows x inner x columns -> kernel': calls} of the products `nets.matmul` makes in one call."""
    from policylab.nets import matmul

    seen: dict[str, int] = {}
    original = matmul.worth_routing

    def recording(a: torch.Tensor, b: torch.Tensor) -> bool:
        use = original(a, b)
        shape = (a.shape[0] if a.dim() == 3 else 1, a.shape[-2], a.shape[-1], b.shape[-1])
        key = f"{'x'.join(map(str, shape))} -> {'oneDNN' if use else 'MKL'}"
        seen[key] = seen.get(key, 0) + 1
        return use

    matmul.worth_routing = recording  # type: ignore[assignment]
    try:
        update()
    finally:
        matmul.worth_routing = original  # type: ignore[assignment]
    return seen


def sac_update() -> None:
    from policylab.algos import get_algo
    from policylab.nets import matmul
    from policylab.train import OffPolicyLoop, resolve_config

    spec = get_algo("sac")
    mkl_peak, onednn_peak, _ = matmul_gflops(1, 256, 256, 256)
    peak = onednn_peak if matmul.use_onednn() else mkl_peak
    print(f"plain matmul 256x256x256: MKL {mkl_peak:.1f} GFLOP/s, oneDNN {onednn_peak:.1f} GFLOP/s")
    for analytic in (True, False):
        overrides = {"learning_starts": 1000, "log_every": 1000, "analytic_grads": analytic}
        overrides["threads"] = torch.get_num_threads()
        cfg, _ = resolve_config(spec, "HalfCheetah-v5", 100_000, 0, overrides=overrides, preset="none")
        loop = OffPolicyLoop(spec, cfg)
        loop.iterate()
        batches = [loop.buffer.sample(256, loop.algo.generator) for _ in range(8)]
        counter = iter(range(10**9))

        def one_update(algo=loop.algo, batches=batches, counter=counter) -> None:
            algo.update(batches[next(counter) % 8], 0)

        seconds = timed(one_update, 100, warmup=10)
        if analytic:
            products = products_of(one_update)
            print(
                "products of one update (members x rows x inner x columns -> kernel: calls): "
                + ", ".join(f"{k}: {v}" for k, v in products.items())
            )
        flops = sac_update_flops(17, 6, cfg.hidden_sizes, cfg.n_critics, 256)
        name = "analytic" if analytic else "autograd"
        gflops = flops / seconds / 1e9
        print(
            f"SAC update, HalfCheetah shapes ({name}): {seconds * 1e3:.2f} ms = {1 / seconds:.0f} updates/s, "
            f"{flops / 1e6:.0f} MFLOP -> {gflops:.1f} GFLOP/s ({gflops / peak:.0%} of the plain matmul on the "
            f"kernel it uses, {gflops / mkl_peak:.0%} of MKL's)"
        )
        loop.close()


def offpolicy_loop(algo: str, env: str, overrides: dict, preset: str = "none"):  # type: ignore[no-untyped-def]
    from policylab.algos import get_algo
    from policylab.train import OffPolicyLoop, resolve_config

    spec = get_algo(algo)
    cfg, _ = resolve_config(spec, env, 1_000_000, 0, overrides=overrides, preset=preset)
    loop = OffPolicyLoop(spec, cfg)
    while loop.updates == 0:
        loop.iterate()
    return loop


def seconds_per_update(loop, iterations: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds per update (env steps included) of each of `iterations` loop iterations."""
    runs = []
    for _ in range(iterations):
        updates, start = loop.updates, time.perf_counter()
        loop.iterate()
        runs.append((time.perf_counter() - start) / (loop.updates - updates))
    return runs


def offpolicy_threads() -> None:
    cases = [
        ("sac", "Pendulum-v1", {"learning_starts": 256, "log_every": 500}, "none"),
        ("td3", "Pendulum-v1", {"learning_starts": 256, "log_every": 500}, "none"),
        ("dqn", "CartPole-v1", {"log_every": 2560}, "rl-zoo"),
    ]
    for algo, env, overrides, preset in cases:
        times = {}
        for threads in (1, 2):
            loop = offpolicy_loop(algo, env, {**overrides, "threads": threads}, preset)
            times[threads] = statistics.median(seconds_per_update(loop, 3)) * 1e3
            loop.close()
        print(f"{algo} {env}: {times[1]:.2f} ms per update at 1 thread, {times[2]:.2f} ms at 2 (env steps included)")


def thread_invariance() -> None:
    """Whether a run's parameters depend on the thread count (what `threads=auto` may change mid-run): SAC,
    TD3 (Pendulum-v1) and the DQN CartPole preset trained at 1 and at 2 threads, compared exactly."""
    import tempfile

    import policylab as pl
    from policylab.checkpoint import load_checkpoint

    small = {"hidden_sizes": [32, 32], "learning_starts": 64, "batch_size": 32, "log_every": 100}
    cases = [
        ("sac", "Pendulum-v1", 2000, 1, {"learning_starts": 500}, "auto"),
        ("td3", "Pendulum-v1", 2000, 1, {"learning_starts": 500}, "auto"),
        ("dqn", "CartPole-v1", 5000, 1, {"learning_starts": 500}, "auto"),
        ("sac", "Pendulum-v1", 600, 2, small, "none"),  # 32-unit layers (tests/test_offpolicy.py's sizes)
    ]
    for algo, env, steps, seed, extra, preset in cases:
        params = []
        for threads in (1, 2):
            with tempfile.TemporaryDirectory() as runs:
                overrides = {"threads": threads, "eval_every": 0, **extra}
                run = pl.train(algo, env=env, steps=steps, seed=seed, overrides=overrides, preset=preset,
                               runs_dir=runs, verbose=False)  # fmt: skip
                tensors = load_checkpoint(run.dir)[0]
                params.append({k: v for k, v in tensors.items() if not k.startswith(("buffer/", "env/"))})
        diff = max(float((params[0][k].double() - params[1][k].double()).abs().max()) for k in params[0])
        sizes = f", hidden_sizes {extra['hidden_sizes']}" if "hidden_sizes" in extra else ""
        print(f"{algo} {env}{sizes}, {steps} steps: largest difference of the networks' and optimizer's tensors "
              f"between 1 and 2 threads {diff:.1e}")  # fmt: skip


def loop_breakdown() -> None:
    """Where one env step + update of the off-policy loop goes, measured inside the loop (3 iterations)."""
    from policylab.nets import matmul

    cases = [
        ("sac", "Pendulum-v1", {"learning_starts": 256, "log_every": 500, "threads": 1}, "none"),
        ("dqn", "CartPole-v1", {"log_every": 2560, "threads": 1}, "rl-zoo"),
    ]
    for algo, env, overrides, preset in cases:
        loop = offpolicy_loop(algo, env, overrides, preset)
        loop.iterate()
        parts = [
            (loop.algo, "update", "update (all)"),
            (matmul, "bmm", "  of which products (bmm)"),
            (matmul, "baddbmm", "  of which products (baddbmm)"),
            (loop.buffer, "sample", "replay sample"),
            (loop.algo, "explore", "explore"),
            (loop.env, "step", "env step"),
            (loop.buffer, "add", "replay add"),
        ]
        spent = {label: 0.0 for _, _, label in parts}
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]
        for owner, name, label in parts:
            setattr(owner, name, _timed_call(getattr(owner, name), label, spent))
        updates, start = loop.updates, time.perf_counter()
        for _ in range(3):
            loop.iterate()
        total, n = time.perf_counter() - start, loop.updates - updates
        for owner, name, original in originals:
            setattr(owner, name, original)
        print(f"{algo} {env}: {total / n * 1e6:.0f} us per update (env steps included), 1 thread")
        for label, seconds in spent.items():
            print(f"  {label}: {seconds / n * 1e6:.0f} us")
        loop.close()


def denormal_effect() -> None:
    """The DQN CartPole preset's loop in fresh processes with denormals flushed to zero (the default) and
    without (POLICYLAB_FLUSH_DENORMAL=0), alternating, 2 processes each."""
    import json
    import os

    results: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
    for flush in ("0", "1") * 2:
        env = {**os.environ, "POLICYLAB_FLUSH_DENORMAL": flush}
        out = subprocess.run(
            [sys.executable, __file__, "--only", "denormal-worker"], env=env, capture_output=True, text=True, check=True
        ).stdout
        results[flush].append(json.loads(out.strip().splitlines()[-1]))
    for flush in ("0", "1"):
        us = statistics.median(r["us_per_update"] for r in results[flush])
        share = statistics.median(r["denormal_share"] for r in results[flush])
        print(
            f"dqn CartPole-v1, denormals {'flushed' if flush == '1' else 'kept'}: {us:.0f} us per update "
            f"(env steps included), {share:.0%} of Adam's first moments denormal, 1 thread"
        )


def denormal_worker() -> None:
    import json

    loop = offpolicy_loop("dqn", "CartPole-v1", {"log_every": 2560, "threads": 1}, "rl-zoo")
    runs = [seconds * 1e6 for seconds in seconds_per_update(loop, 6)]
    m = loop.algo.q_opt.optimizer.state[loop.algo.q_opt.params.flat]["exp_avg"]
    share = float(((m != 0) & (m.abs() < torch.finfo(m.dtype).tiny)).float().mean())
    print(json.dumps({"us_per_update": statistics.median(runs[1:]), "denormal_share": share}))
    loop.close()


def _timed_call(fn: Callable, label: str, spent: dict[str, float]) -> Callable:
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

    return wrapper


def sac_compile() -> None:
    loop = offpolicy_loop("sac", "HalfCheetah-v5", {"learning_starts": 1000, "analytic_grads": False, "threads": 1})
    algo = loop.algo
    batches = [loop.buffer.sample(256, algo.generator) for _ in range(8)]

    def per_update(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            algo.update(batches[i % 8], i)
        return (time.perf_counter() - start) / n

    per_update(20)
    eager = per_update(100)
    start = time.perf_counter()
    for module in (algo.net, algo.critic, algo.critic_target.module):
        module.body = torch.compile(module.body)
    per_update(3)
    compile_s = time.perf_counter() - start
    per_update(20)
    print(
        f"SAC update (autograd): eager {eager * 1e3:.2f} ms, compiled {per_update(100) * 1e3:.2f} ms "
        f"after {compile_s:.1f} s of compiling"
    )
    loop.close()


def mask_costs() -> None:
    """`--only masks` (see the docstring)."""
    from policylab.envs.encode import ObservationEncoder

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 80, generator=g)
    masked = logits.clone()
    masked[:, 20:] -= 1e9
    for name, x in (("none masked", logits), ("60 of 80 masked", masked)):
        logp = torch.log_softmax(x, -1)
        print(f"exp(log_softmax), [256, 80], {name}: {timed(logp.exp, 500) * 1e6:.1f} us")
    print(f"softmax, [256, 80], 60 of 80 masked: {timed(lambda: torch.softmax(masked, -1), 500) * 1e6:.1f} us")
    encoder = ObservationEncoder(gym.spaces.Discrete(500))
    one = timed(lambda: encoder.one(314), 20_000) * 1e6
    batch = timed(lambda: encoder.batch(np.array([314]))[0], 20_000) * 1e6
    print(f"one-hot of one Discrete(500) observation: one() {one:.1f} us, batch() of one {batch:.1f} us")


def renorm_costs() -> None:
    """`--only renorm` (see the docstring)."""
    from policylab import runtime
    from policylab.algos.crossq import CrossQ, CrossQConfig
    from policylab.data import Batch
    from policylab.nets.renorm import RenormSettings, StackedBatchRenorm

    runtime.keep_freed_memory()  # as the training loops (else each large temporary page-faults)
    runtime.flush_denormals()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, 256, generator=g) + 1.0

    def centred() -> torch.Tensor:
        c = x - x.mean(1, keepdim=True)
        return (c * c).sum(1, keepdim=True)

    print(f"var_mean over 512 rows of [2, 512, 256]: {timed(lambda: torch.var_mean(x, 1), 200) * 1e6:.0f} us")
    print(f"mean + centred sum of squares, the same: {timed(centred, 200) * 1e6:.0f} us")
    ours = StackedBatchRenorm(2, 256, RenormSettings())
    upstream = torch.randn(2, 512, 256, generator=g)
    xg = x.clone().requires_grad_(True)
    ours_pass = timed(lambda: (ours(xg, True) * upstream).sum().backward(), 100)
    print(f"policylab's renorm, forward + backward: {ours_pass * 1e6:.0f} us")
    try:
        from sb3_contrib.common.torch_layers import BatchRenorm1d
    except ImportError:
        print("sb3-contrib is not installed: its BatchRenorm1d is not timed")
    else:
        theirs = [BatchRenorm1d(256) for _ in range(2)]

        def sb3_pass() -> None:
            (torch.stack([layer(xg[k]) for k, layer in enumerate(theirs)]) * upstream).sum().backward()

        print(f"sb3-contrib's BatchRenorm1d per member, forward + backward: {timed(sb3_pass, 100) * 1e6:.0f} us")
    obs_space = gym.spaces.Box(-5.0, 5.0, (3,), np.float32)
    algo = CrossQ(
        CrossQConfig(critic_hidden_sizes=[256, 256], actor_delay=2, threads=1),
        obs_space,
        gym.spaces.Box(-2.0, 2.0, (1,), np.float32),
    )
    n = 256
    batch = Batch(
        obs=torch.randn(n, 3, generator=g),
        actions=torch.rand(n, 1, generator=g) * 2 - 1,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, 3, generator=g),
        terminated=torch.zeros(n, dtype=torch.bool),
        discounts=torch.full((n,), 0.99),
    )
    counter = iter(range(10**9))
    assert algo.fused
    print("one CrossQ update (Pendulum-v1, [256, 256], batch 256, actor every 2nd; 7 alternating blocks of 200):")
    steps = {"hand-derived": algo.update, "autograd": algo.autograd_update}
    blocks: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        for _ in range(20):
            step(batch, next(counter))
    for _ in range(7):  # alternating, so that the machine's drift reaches both alike
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(200):
                step(batch, next(counter))
            blocks[name].append((time.perf_counter() - start) / 200)
    for name, times in blocks.items():
        print(
            f"  {name}: median {statistics.median(times) * 1e3:.2f} ms [{min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}]"
        )
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(100):
            algo.update(batch, next(counter))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in ("aten::bmm", "aten::baddbmm", "aten::mm"))
    print(
        f"  of the hand-derived one, products (torch's profiler, self time, 100 updates): {100 * products / total:.0f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parts = ["matmul", "sac", "breakdown", "denormal", "threads", "thread-invariance", "compile", "masks", "renorm",
             "replay"]  # fmt: skip
    parser.add_argument(
        "--only",
        choices=[*parts, "denormal-worker"],  # denormal-worker: --only denormal's subprocesses, not for people
        metavar="{" + ",".join(parts) + "}",
        help="run one part only",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        parts = {
            "matmul": matmul_kernels,
            "sac": sac_update,
            "breakdown": loop_breakdown,
            "denormal": denormal_effect,
            "denormal-worker": denormal_worker,
            "threads": offpolicy_threads,
            "thread-invariance": thread_invariance,
            "compile": sac_compile,
            "masks": mask_costs,
            "renorm": renorm_costs,
            "replay": replay_costs,
        }
        parts[args.only]()
        return
    for analytic in (True, False):
        collect, update = ppo_phases(analytic)
        name = "analytic" if analytic else "autograd"
        print(f"PPO CartPole preset ({name}): rollout {collect:.0f} us/step, update {update:.0f} us/gradient step")
    print(
        f"one gradient step, batch 256: analytic {gradient_step(True):.0f} us, autograd {gradient_step(False):.0f} us"
    )
    print(f"raw CartPole, 8 envs, random actions: {raw_env():,.0f} env steps/s")
    print(f"first torch.optim optimizer (imports torch._dynamo): {optim_import_seconds():.2f} s")
    replay_costs()
    matmul_kernels()
    sac_update()


if __name__ == "__main__":
    main()
