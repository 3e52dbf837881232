"""Expressive policies (issue 17). `--acting`: the acting speed (actions/s) of each behaviour-cloning head on
Navigation2D-v0's spaces (2-D observations and actions; the default networks: [256, 256] for the Gaussian and
deterministic heads, a [256, 256, 256] SiLU denoiser for the generative ones), untrained (speed does not depend
on the weights), at batch 1 (one env) and 64 (64 envs stepped together), each call what `pl.load(run).act(obs)`
runs: observation to env action through `env_action` under inference mode.

    .venv/bin/python benchmarks/expressive.py --acting              # results/expressive-acting-<date>.json
    .venv/bin/python benchmarks/expressive.py --acting --seconds 0.05 --repeats 1 --no-save   # a smoke run

Heads: gaussian, deterministic, diffusion DDIM-K (K = 5 and 20 of T = 20), flow Euler-K (K = 5, 10),
consistency (1 step). The other parts of the issue's benchmark (DPPO, IDQL) belong to later work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from common import provenance, write_results

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acting", action="store_true", help="actions/s of each head at batch 1 and 64")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per cell (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-save", action="store_true", help="print only (a smoke run: no results file)")
    args = parser.parse_args(argv)
    if not args.acting:
        parser.error("choose a benchmark: --acting")
    payload = {"provenance": provenance(["torch", "numpy", "gymnasium"]), "acting": acting(args)}
    if not args.no_save:
        print(f"results: {write_results('expressive-acting', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
