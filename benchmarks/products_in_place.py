"""Where one gradient step's time goes: each matrix product timed in place, inside the real update.

    .venv/bin/python benchmarks/products_in_place.py                  # SAC Pendulum-v1 (online update) and IQL
    .venv/bin/python benchmarks/products_in_place.py --algo td3_bc --no-flush
    .venv/bin/python benchmarks/products_in_place.py --algo sac --algo sb3-sac   # ours and SB3's SAC step
    .venv/bin/python benchmarks/products_in_place.py --algo td3 --algo sb3-td3   # ours and SB3's TD3 step
    .venv/bin/python benchmarks/products_in_place.py --algo bcq --d3rlpy-settings   # offline.py's settings

`nets/matmul.bmm` / `baddbmm` (every product of `StackedMLP`) are wrapped with a timer, then 200 updates run
on 1 thread after 50 of warm-up, with the process settings of the training loops (`runtime.configure`:
denormals flushed; `--no-flush` leaves them). SAC and TD3 update with the settings of offpolicy.py's
`sac-pendulum` / `td3-pendulum` cases on a replay buffer of 2,000 random Pendulum-v1 transitions; the offline
algorithms on `benchmarks/data/hopper-random` (`benchmarks/offline.py` makes it). Prints ms per update, ms in
products, and each product shape's time and GFLOP/s. `sb3-sac` / `sb3-td3`: SB3's update with the same case's
settings, its time and its products' share under torch's profiler.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import HelpFormatter, positive_int

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from policylab import runtime  # noqa: E402
from policylab.algos import ALGORITHMS, get_algo  # noqa: E402
from policylab.data import ReplayBuffer  # noqa: E402
from policylab.nets import matmul  # noqa: E402
from policylab.train import OffPolicyLoop, resolve_config  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "hopper-random"


class ProductTimer:
    """Wraps matmul.bmm / baddbmm: seconds and multiply-adds per (op, shapes, layout)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.macs: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._inside = False
        self._bmm, self._baddbmm = matmul.bmm, matmul.baddbmm
        matmul.bmm = lambda a, b, out=None: self._timed("bmm", a, b, lambda: self._bmm(a, b, out=out))
        matmul.baddbmm = lambda bias, a, b, beta=1.0, alpha=1.0: self._timed(
            "baddbmm", a, b, lambda: self._baddbmm(bias, a, b, beta=beta, alpha=alpha)
        )

    def _timed(self, op: str, a: torch.Tensor, b: torch.Tensor, call: Any) -> torch.Tensor:
        if self._inside:  # baddbmm's own call of bmm: counted once, as baddbmm
            return call()  # type: ignore[no-any-return]
        self._inside = True
        try:
            return self._time(op, a, b, call)
        finally:
            self._inside = False

    def _time(self, op: str, a: torch.Tensor, b: torch.Tensor, call: Any) -> torch.Tensor:
        layout = ("aT" if not a.is_contiguous() else "a") + (" bT" if not b.is_contiguous() else " b")
        key = f"{op} {tuple(a.shape)}x{tuple(b.shape)} {layout}"
        start = time.perf_counter()
        out = call()
        self.seconds[key] += time.perf_counter() - start
        self.macs[key] += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        self.calls[key] += 1
        return out

    def reset(self) -> None:
        self.seconds.clear()
        self.macs.clear()
        self.calls.clear()


ONLINE_CASES = {"sac": "sac-pendulum", "td3": "td3-pendulum"}
"""Online algorithms timed here -> the offpolicy.py case whose settings they run with."""


def online_step(name: str) -> Any:
    from offpolicy import CASES

    spec = get_algo(name)
    case = CASES[ONLINE_CASES[name]]
    overrides = {**case.ours, "threads": 1}
    cfg, _ = resolve_config(spec, case.env, 1000, 0, overrides=overrides, preset="none")
    algo = spec.algo_cls(cfg, *_pendulum_spaces())
    buffer = ReplayBuffer(10_000, 1, (3,), (1,))
    rng = np.random.default_rng(0)
    for _ in range(2000):
        obs = rng.normal(size=(1, 3)).astype(np.float32)
        act = rng.uniform(-1, 1, (1, 1)).astype(np.float32)
        buffer.add(obs, act, rng.normal(size=1).astype(np.float32), obs, np.zeros(1, bool), np.zeros(1, bool))
    generator = torch.Generator().manual_seed(0)
    return lambda i: algo.update(buffer.sample(256, generator), i)


def _pendulum_spaces() -> tuple[Any, Any]:
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    return env.observation_space, env.action_space


def offline_step(name: str, dataset: Path, peer_settings: bool, autograd: bool = False) -> Any:
    spec = get_algo(name)
    overrides = {"threads": 1, "normalize_obs": False, "eval_every": 0, "analytic_grads": not autograd}
    if peer_settings:  # the settings offline.py gives both sides
        from offline import OURS

        overrides = {**OURS.get(name, {}), **overrides}
    cfg, _ = resolve_config(spec, steps=100_000, seed=0, overrides=overrides, dataset=str(dataset), preset="none")
    loop = OffPolicyLoop(spec, cfg)
    source, algo = loop.offline_source, loop.algo
    start = getattr(cfg, "vae_pretraining_steps", 0)  # SPOT's and PLAS's steps after their VAE's own
    return lambda i: algo.update(source.sample(cfg.batch_size, algo.generator), start + i)


def sb3_products(name: str, updates: int) -> None:
    """SB3's update with the settings of `name`'s offpolicy.py case (Pendulum-v1, batch 256, 1 thread): ms per
    update untimed, then the products' share under torch's profiler (their autograd backward is C++, out of
    reach of a Python timer). Needs the bench extra (`make .venv/.installed-bench`)."""
    import gymnasium as gym
    import stable_baselines3
    from offpolicy import CASES
    from torch.profiler import ProfilerActivity, profile

    case = CASES[ONLINE_CASES[name]]
    kwargs = {k: v for k, v in case.sb3_kwargs.items() if k != "buffer_size"} | {"buffer_size": 10_000}
    model = getattr(stable_baselines3, case.sb3)(
        "MlpPolicy", gym.make(case.env), learning_starts=case.learning_starts, seed=0, device="cpu", **kwargs
    )
    model.learn(2000)
    model.train(gradient_steps=50, batch_size=256)
    start = time.perf_counter()
    model.train(gradient_steps=updates, batch_size=256)
    per_update = (time.perf_counter() - start) / updates * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train(gradient_steps=updates, batch_size=256)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(
        f"\nsb3-{name}: {per_update:.2f} ms per update; under the profiler {total / updates / 1e3:.2f} ms, of which "
        f"{products / updates / 1e3:.2f} ms in products ({100 * products / total:.0f}%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    offline = [name for name, spec in ALGORITHMS.items() if "online" not in spec.regimes]
    known = [*ONLINE_CASES, *(f"sb3-{name}" for name in ONLINE_CASES), *offline]
    parser.add_argument(
        "--algo",
        action="append",
        choices=known,
        metavar="ALGO",
        help="sac or td3 (Pendulum, online), sb3-sac / sb3-td3 (SB3's update, same settings) or an offline "
        f"algorithm ({', '.join(offline)}); repeatable (default: sac and iql)",
    )
    parser.add_argument("--no-flush", action="store_true", help="leave denormals as they are")
    parser.add_argument("--dataset", type=Path, default=DATA, help="the offline algorithms' dataset")
    parser.add_argument(
        "--d3rlpy-settings", action="store_true", help="the offline algorithms with offline.py's settings (d3rlpy's)"
    )
    parser.add_argument(
        "--autograd", action="store_true", help="the offline algorithms' autograd steps (analytic_grads=false)"
    )
    parser.add_argument("--updates", type=positive_int, default=200, help="timed updates (after 50 of warm-up)")
    a = parser.parse_args()
    if any(name in offline for name in a.algo or ["iql"]) and not a.dataset.exists():
        parser.error(f"no dataset at {a.dataset}: the default one (benchmarks/offline.py makes it on first use) is "
                     "made by `.venv/bin/policylab collect --env Hopper-v5 --policy random --episodes 1000 --out "
                     "benchmarks/data/hopper-random`; or pass --dataset PATH")  # fmt: skip
    runtime.configure(1, 0, 1)
    if a.no_flush:
        torch.set_flush_denormal(False)
    timer = ProductTimer()
    for name in a.algo or ["sac", "iql"]:
        if name.startswith("sb3-"):
            sb3_products(name.removeprefix("sb3-"), a.updates)
            continue
        step = (
            online_step(name) if name in ONLINE_CASES else offline_step(name, a.dataset, a.d3rlpy_settings, a.autograd)
        )
        for i in range(50):
            step(i)
        timer.reset()
        start = time.perf_counter()
        for i in range(a.updates):
            step(i)
        per_update = (time.perf_counter() - start) / a.updates * 1e3
        in_products = sum(timer.seconds.values()) / a.updates * 1e3
        flops = 2 * sum(timer.macs.values()) / a.updates
        print(
            f"\n{name}: {per_update:.2f} ms per update, {in_products:.2f} ms in products "
            f"({100 * in_products / per_update:.0f}%, {flops / 1e6:.0f} MFLOP, {flops / in_products / 1e6:.1f} GFLOP/s)"
        )
        for key, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
            ms = seconds / a.updates * 1e3
            gflops = 2 * timer.macs[key] / seconds / 1e9
            print(f"  {ms:7.3f} ms  x{timer.calls[key] / a.updates:.0f}  {gflops:6.1f} GFLOP/s  {key}")


if __name__ == "__main__":
    main()
