"""Are policylab's SAC, TD3, DDPG, TQC and CrossQ updates SB3's (sb3-contrib's)? Checked apart from the random
streams.

`offpolicy.py` compares the libraries by wall clock at about equal return; this script checks that they run the
same update. The same initial networks (SB3's actor, twin critics and their targets, copied into policylab's),
the same replay batches (real Pendulum-v1 transitions) and the same Gaussian draws go into policylab's update and
SB3's own `train()`: SAC's and TQC's reparameterized actions (policylab's update takes its noise as an argument;
SB3's `Normal.rsample` is replaced by one that reads the same draws, the observations' then the next
observations', the order SB3's `train()` samples them in), TD3's target-smoothing noise (policylab's
`target_policy_smoothing` and SB3's `Tensor.normal_` both read the same draws). After 1 to 512 gradient steps:
how far apart are the twin critics' Q-values (TQC: every quantile) and the actor's output (SAC and TQC: its mean
and log std, and the entropy temperature) on a probe set? The scale to compare with: how far each float32 run is
from SB3's `train()` with every network, optimizer and draw in float64, since float32 rounding differs between
any two implementations and Adam amplifies it. Both of policylab's paths are checked: the hand-derived update it
runs (`fused_offpolicy`) and the autograd one.

CrossQ: the batch renormalizations' scales, shifts and running statistics are copied too, and the draws go in
sb3-contrib's order (the next observations' every step, the observations' on actor steps). The 512 steps stay
inside the renormalization's warmup (100k training passes), where both normalize by the batch's mean and unbiased
variance; after it the two corrections differ by where eps enters (policylab/nets/renorm.py).

    .venv/bin/python benchmarks/actor_critic_equivalence.py                       # offpolicy.py's sac-pendulum case
    .venv/bin/python benchmarks/actor_critic_equivalence.py --sb3-epsilon 0       # SB3 with the exact log-probability
    .venv/bin/python benchmarks/actor_critic_equivalence.py --case td3-pendulum   # TD3 (SB3's [400, 300] networks)
    .venv/bin/python benchmarks/actor_critic_equivalence.py --case tqc-pendulum   # TQC against sb3-contrib's
    .venv/bin/python benchmarks/actor_critic_equivalence.py --case ddpg-pendulum  # DDPG (TD3's case, its tricks off)
    .venv/bin/python benchmarks/actor_critic_equivalence.py --case crossq-pendulum  # CrossQ against sb3-contrib's

One SAC (and TQC) convention differs by design: SB3's squashed-Gaussian log-probability subtracts
log(1 - tanh(u)^2 + 1e-6), policylab's the exact log(1 - tanh(u)^2) in its stable form 2 (log 2 - u -
softplus(-2u)); `--sb3-epsilon 0` gives SB3 the exact one. Where SB3 cannot run without its epsilon (CrossQ: its
actor's actions saturate within a few steps and log(0) turns its parameters to NaN), `--ours-epsilon 1e-6` gives
policylab's autograd update SB3's form instead (the hand-derived path has its own and is then skipped):

    .venv/bin/python benchmarks/actor_critic_equivalence.py --case crossq-pendulum --ours-epsilon 1e-6

Output: a table per seed and JSON in benchmarks/results/<sac, td3, ddpg, tqc or crossq>_equivalence-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
from collections.abc import Iterator
from typing import Any

import stable_baselines3.common.policies as sb3_policies
import torch
from common import HelpFormatter, positive_int, print_table, provenance, write_results
from offpolicy import CASES
from sb3_equivalence import linears, relative_gap
from stable_baselines3.common.logger import configure
from stable_baselines3.common.type_aliases import ReplayBufferSamples

import policylab.algos.fused_offpolicy as pl_fused
import policylab.algos.td3 as pl_td3
import policylab.nets.critics as pl_critics
from policylab.algos import get_algo
from policylab.algos.fused_offpolicy import fused_sac_update
from policylab.data import Batch
from policylab.train import OffPolicyLoop, resolve_config

CASE = CASES["sac-pendulum"]  # --case picks another
CHECKPOINTS = (1, 8, 32, 128, 512)
FILL_STEPS = 2000
PROBES = 1000


def ddpg_case() -> Any:
    """offpolicy.py's td3-pendulum case as DDPG: one critic, no policy delay, no target smoothing (SB3's DDPG is its
    TD3 with those removed: its target noise is clipped to 0)."""
    td3 = CASES["td3-pendulum"]
    ours = {**td3.ours, "policy_delay": 1, "target_noise": 0.0, "n_critics": 1}
    removed = ("policy_delay", "target_policy_noise", "target_noise_clip")
    sb3_kwargs = {k: v for k, v in td3.sb3_kwargs.items() if k not in removed}
    sb3_kwargs["policy_kwargs"] = {"net_arch": [400, 300]}
    return dataclasses.replace(td3, algo="ddpg", sb3="DDPG", ours=ours, sb3_kwargs=sb3_kwargs)


def ours_loop(seed: int, analytic: bool) -> OffPolicyLoop:
    """A loop whose buffer holds FILL_STEPS random-action transitions, no update made."""
    overrides = {**CASE.ours, "learning_starts": FILL_STEPS, "num_envs": 1, "eval_every": 0, "threads": 1}
    overrides.update(checkpoint_every=0, device="cpu", analytic_grads=analytic)
    cfg, _ = resolve_config(get_algo(CASE.algo), CASE.env, FILL_STEPS, seed, overrides=overrides, preset="none")
    loop = OffPolicyLoop(get_algo(CASE.algo), cfg)
    while loop.step < cfg.steps:
        loop.iterate()
    return loop


def sb3_model(seed: int, epsilon: float) -> Any:
    """SB3's model (SAC: with `epsilon` in its squashed log-probability's log(1 - tanh(u)^2 + epsilon), its own
    1e-6)."""
    module = importlib.import_module(CASE.sb3_module)
    model = getattr(module, CASE.sb3)(
        "MlpPolicy", CASE.env, learning_starts=0, seed=seed, device="cpu", **CASE.sb3_kwargs
    )
    model.set_logger(configure(None, []))
    if _gaussian():
        model.actor.action_dist.epsilon = epsilon
    return model


def _gaussian() -> bool:
    """SAC, TQC and CrossQ: a tanh-Gaussian actor and an entropy temperature (TD3: a deterministic actor)."""
    return CASE.algo in ("sac", "tqc", "crossq")


def _renorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """sb3-contrib's BatchRenorm1d layers of a network, in order."""
    return [m for m in module.modules() if type(m).__name__ == "BatchRenorm1d"]


def copy_renorms(theirs: list[torch.nn.Module], body: Any, member: int) -> None:
    """sb3-contrib's BatchRenorm1d layers (one before each linear layer) into member `member` of a StackedMLP."""
    assert len(theirs) == len(body.renorms), (len(theirs), len(body.renorms))
    for layer, ours in zip(theirs, body.renorms, strict=True):
        pairs = ((ours.scale, layer.scale), (ours.shift, layer.bias))
        pairs += ((ours.running_mean, layer.ra_mean), (ours.running_var, layer.ra_var))
        for dst, src in pairs:
            dst[member].view(-1).copy_(src)
        ours._steps = int(layer.steps)
        ours.steps.fill_(ours._steps)


def copy_into_ours(model: Any, loop: OffPolicyLoop) -> None:
    """SB3's actor (SAC: latent MLP, then mu and log_std heads, where policylab's last layer is [mean, log_std];
    TD3: one MLP), critics qf0 / qf1 and the targets into policylab's stacked networks ([in, out], member k)."""
    algo = loop.algo
    sac = _gaussian()
    actor = [*linears(model.actor.latent_pi), None] if sac else linears(model.actor.mu)
    heads = (model.actor.mu, model.actor.log_std) if sac else ()
    with torch.no_grad():
        for i, linear in enumerate(actor):
            if linear is None:
                algo.net.body.weight(i)[0].copy_(torch.cat([h.weight for h in heads]).T)
                algo.net.body.biases[i][0].view(-1).copy_(torch.cat([h.bias for h in heads]))
            else:
                algo.net.body.weight(i)[0].copy_(linear.weight.T)
                algo.net.body.biases[i][0].view(-1).copy_(linear.bias)
        for k, q in enumerate(model.critic.q_networks):
            for i, linear in enumerate(linears(q)):
                algo.critic.body.weight(i)[k].copy_(linear.weight.T)
                algo.critic.body.biases[i][k].view(-1).copy_(linear.bias)
            if CASE.algo == "crossq":
                copy_renorms(_renorms(q), algo.critic.body, k)
        if CASE.algo == "crossq":
            copy_renorms(_renorms(model.actor.latent_pi), algo.net.body, 0)
            return  # no target networks
    algo.critic_target.update(1.0)
    model.critic_target.load_state_dict(model.critic.state_dict())
    if not sac:
        algo.actor_target.update(1.0)
        model.actor_target.load_state_dict(model.actor.state_dict())


def sb3_samples(batch: Batch, dtype: torch.dtype) -> ReplayBufferSamples:
    return ReplayBufferSamples(
        observations=batch.obs.to(dtype),
        actions=batch.actions.to(dtype),
        next_observations=batch.next_obs.to(dtype),
        dones=batch.terminated.to(dtype).unsqueeze(1),
        rewards=batch.rewards.to(dtype).unsqueeze(1),
    )


@contextlib.contextmanager
def shared_draws(draws: list[torch.Tensor]) -> Iterator[None]:
    """`torch.distributions.Normal.rsample` reads `draws` in order (mean + std * draw) instead of drawing."""
    rsample = torch.distributions.Normal.rsample
    feed = iter(draws)

    def from_feed(self: torch.distributions.Normal, sample_shape: Any = None) -> torch.Tensor:
        return self.loc + self.scale * next(feed).to(self.loc.dtype)

    torch.distributions.Normal.rsample = from_feed  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.distributions.Normal.rsample = rsample  # type: ignore[method-assign]


@contextlib.contextmanager
def shared_normal_(draws: list[torch.Tensor]) -> Iterator[None]:
    """`Tensor.normal_(mean, std)` (SB3's TD3 target noise) writes mean + std * the next of `draws`."""
    normal_ = torch.Tensor.normal_
    feed = iter(draws)

    def from_feed(self: torch.Tensor, mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> torch.Tensor:
        return self.copy_(mean + std * next(feed).to(self.dtype))

    torch.Tensor.normal_ = from_feed  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.normal_ = normal_  # type: ignore[method-assign]


@contextlib.contextmanager
def ours_smoothing(draws: list[torch.Tensor]) -> Iterator[None]:
    """policylab's TD3 `target_policy_smoothing` (both update paths) reads `draws` instead of drawing."""
    smoothing = pl_td3.target_policy_smoothing
    feed = iter(draws)

    def from_feed(actions: torch.Tensor, std: float, clip: float, low: Any, high: Any, generator: Any) -> torch.Tensor:
        noise = next(feed).to(actions.dtype) * std
        return torch.clamp(actions + noise.clamp(-clip, clip), low, high)

    pl_td3.target_policy_smoothing = pl_fused.target_policy_smoothing = from_feed  # type: ignore[assignment]
    try:
        yield
    finally:
        pl_td3.target_policy_smoothing = pl_fused.target_policy_smoothing = smoothing  # type: ignore[assignment]


@contextlib.contextmanager
def sb3_in_float64(model: Any) -> Iterator[None]:
    """SB3's networks, entropy coefficient and optimizers in float64; its policies cast Box observations to
    float32, so that cast is lifted for the duration."""
    cast = sb3_policies.preprocess_obs
    lr = CASE.sb3_kwargs["learning_rate"]
    betas = (0.5, 0.999) if CASE.algo == "crossq" else (0.9, 0.999)
    model.policy.double()
    model.actor.optimizer = torch.optim.Adam(model.actor.parameters(), lr=lr, betas=betas)
    model.critic.optimizer = torch.optim.Adam(model.critic.parameters(), lr=lr, betas=betas)
    if _gaussian():
        model.log_ent_coef = model.log_ent_coef.detach().double().requires_grad_(True)
        model.ent_coef_optimizer = torch.optim.Adam([model.log_ent_coef], lr=lr)
    sb3_policies.preprocess_obs = lambda obs, *args, **kwargs: obs
    try:
        yield
    finally:
        sb3_policies.preprocess_obs = cast


def sb3_train(model: Any, batches: list[ReplayBufferSamples], noise: list[torch.Tensor]) -> None:
    """SB3's own SAC.train() over the given batches and draws, in order."""
    feed = iter(batches)
    model.replay_buffer.sample = lambda *args, **kwargs: next(feed)
    n = len(batches[0].observations)
    if not _gaussian():
        with shared_normal_(noise):
            model.train(gradient_steps=len(batches), batch_size=n)
        return
    if CASE.algo == "crossq":  # the next observations' draws every step, the observations' on actor steps
        delay, done = CASE.sb3_kwargs["policy_delay"], model._n_updates
        order = [(draw[n:], draw[:n]) if (done + i + 1) % delay == 0 else (draw[n:],) for i, draw in enumerate(noise)]
        with shared_draws([half for halves in order for half in halves]):
            model.train(gradient_steps=len(batches), batch_size=n)
        return
    with shared_draws([half for draw in noise for half in (draw[:n], draw[n:])]):
        model.train(gradient_steps=len(batches), batch_size=n)


def ours_train(loop: OffPolicyLoop, batches: list[Batch], noise: list[torch.Tensor], start: int) -> None:
    algo = loop.algo
    if not _gaussian():
        with ours_smoothing(noise):
            for i, batch in enumerate(batches):
                algo.update(batch, start + i)
        return
    for i, (batch, draw) in enumerate(zip(batches, noise, strict=True)):
        if CASE.algo == "crossq" and algo.fused:
            pl_fused.fused_crossq_update(algo, batch, start + i, draw)
        elif CASE.algo == "crossq":
            algo.autograd_update(batch, start + i, draw)
        elif CASE.algo == "tqc":
            pl_fused.fused_tqc_update(algo, batch, draw) if algo.fused else algo.autograd_update(batch, draw)
        elif algo.fused:
            fused_sac_update(algo, batch, start + i, draw)
        else:
            algo.autograd_update(batch, start + i, draw)


GAUSSIAN_OUTPUTS, DETERMINISTIC_OUTPUTS = ("q", "mean", "log_std", "alpha"), ("q", "action")


def probe_outputs(loop: OffPolicyLoop | None, model: Any | None, obs: torch.Tensor, actions: torch.Tensor) -> dict:
    """The critics' Q [K, P, 1] (TQC's quantiles [K, P, M]) and the actor's output on the probe set: SAC's and TQC's
    mean and log std [P, A] and alpha, TD3's and DDPG's action [P, A] (in [-1, 1])."""
    with torch.no_grad():
        if loop is not None:
            algo = loop.algo
            q = algo.critic(obs, actions)
            q = q.reshape(q.shape[0], len(obs), -1)
            if not _gaussian():
                return {"q": q, "action": torch.tanh(algo.net.body(obs)[0])}
            mean, log_std = algo.net._mean_log_std(obs)
            return {"q": q, "mean": mean, "log_std": log_std, "alpha": algo.temperature.log_alpha.exp()}
        dtype = next(model.policy.parameters()).dtype
        obs, actions = obs.to(dtype), actions.to(dtype)
        model.policy.set_training_mode(False)  # CrossQ: running statistics (its train() sets its modes itself)
        critics = model.critic(obs, actions)  # SAC, TD3: a tuple of [P, 1]; TQC: [P, K, M]
        q = critics.transpose(0, 1) if CASE.algo == "tqc" else torch.stack(critics)
        if not _gaussian():
            return {"q": q, "action": model.actor(obs)}
        mean, log_std, _ = model.actor.get_action_dist_params(obs)
        return {"q": q, "mean": mean, "log_std": log_std, "alpha": model.log_ent_coef.detach().exp()}


@contextlib.contextmanager
def ours_log_prob(epsilon: float | None) -> Iterator[None]:
    """With `epsilon`, policylab's squashed-Gaussian log-probability is SB3's, log N(u) - sum log(1 - tanh(u)^2 +
    epsilon) (policylab/nets/critics.py's function is replaced for the duration)."""
    exact = pl_critics.tanh_gaussian_log_prob

    def sb3_form(noise: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        logp = (-0.5 * noise * noise - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return logp - torch.log(1 - torch.tanh(u) ** 2 + epsilon).sum(-1)

    if epsilon is not None:
        pl_critics.tanh_gaussian_log_prob = sb3_form
    try:
        yield
    finally:
        pl_critics.tanh_gaussian_log_prob = exact


def compare(seed: int, analytic: bool, epsilon: float) -> list[dict[str, Any]]:
    loop = ours_loop(seed, analytic)
    generator = torch.Generator().manual_seed(seed)
    batch_size = CASE.sb3_kwargs["batch_size"]
    batches = [loop.buffer.sample(batch_size, generator) for _ in range(CHECKPOINTS[-1])]
    rows_per_step = 2 * batch_size if _gaussian() else batch_size  # SAC, TQC: obs rows, then next-obs rows
    noise = [torch.randn(rows_per_step, 1, generator=generator, dtype=torch.float64) for _ in batches]
    probe = loop.buffer.sample(PROBES, generator)
    sb3_32, sb3_64 = sb3_model(seed, epsilon), sb3_model(seed, epsilon)
    sb3_64.policy.load_state_dict(sb3_32.policy.state_dict())
    copy_into_ours(sb3_32, loop)
    rows, done = [], 0
    initial = probe_outputs(None, sb3_32, probe.obs, probe.actions)
    with sb3_in_float64(sb3_64):
        for upto in CHECKPOINTS:
            chunk, draws = batches[done:upto], noise[done:upto]
            ours_train(loop, chunk, [d.float() for d in draws], done)
            sb3_train(sb3_32, [sb3_samples(b, torch.float32) for b in chunk], [d.float() for d in draws])
            sb3_train(sb3_64, [sb3_samples(b, torch.float64) for b in chunk], draws)
            done = upto
            outputs = [probe_outputs(loop, None, probe.obs, probe.actions)]
            outputs += [probe_outputs(None, m, probe.obs, probe.actions) for m in (sb3_32, sb3_64)]
            row: dict[str, Any] = {"gradient_steps": upto}
            for what in GAUSSIAN_OUTPUTS if _gaussian() else DETERMINISTIC_OUTPUTS:
                ours, theirs, exact = (o[what] for o in outputs)
                row[what] = {
                    "moved_from_initial": relative_gap(initial[what], theirs),
                    "ours_vs_sb3": relative_gap(ours, theirs),
                    "ours_vs_float64": relative_gap(ours, exact),
                    "sb3_vs_float64": relative_gap(theirs, exact),
                }
            rows.append(row)
    loop.close()
    return rows


def print_rows(rows: list[dict[str, Any]], path: str) -> None:
    print(f"policylab's {path} update against SB3's {CASE.sb3}.train(): max |d| / mean |value| on {PROBES:,} probes")
    headers = ["steps", "output", "SB3 vs its initial", "ours vs SB3", "ours vs float64", "SB3 vs float64"]
    table = [
        [str(r["gradient_steps"]), what]
        + [f"{r[what][k]:.1e}" for k in ("moved_from_initial", "ours_vs_sb3", "ours_vs_float64", "sb3_vs_float64")]
        for r in rows
        for what in (GAUSSIAN_OUTPUTS if _gaussian() else DETERMINISTIC_OUTPUTS)
    ]
    print_table(headers, table)


def main() -> None:
    global CASE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--case",
        choices=("sac-pendulum", "td3-pendulum", "tqc-pendulum", "ddpg-pendulum", "crossq-pendulum"),
        default="sac-pendulum",
        help="the case (ddpg-pendulum: td3-pendulum's settings as DDPG, against SB3's DDPG)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N (initial networks, batches, env)")
    parser.add_argument(
        "--ours-epsilon",
        type=float,
        default=None,
        help="policylab's log-probability as SB3's log(1 - tanh(u)^2 + epsilon) (autograd path only); default exact",
    )
    parser.add_argument(
        "--sb3-epsilon",
        type=float,
        default=1e-6,
        help="SB3's epsilon in log(1 - tanh(u)^2 + epsilon); 0: the exact log-probability policylab computes",
    )
    args = parser.parse_args()
    CASE = ddpg_case() if args.case == "ddpg-pendulum" else CASES[args.case]
    torch.set_num_threads(1)
    per_seed = []
    for seed in range(1, args.seeds + 1):
        print(f"\n== seed {seed}")
        result: dict[str, Any] = {"seed": seed}
        autograd_only = args.ours_epsilon is not None
        paths = (("autograd", False),) if autograd_only else (("fused", True), ("autograd", False))
        for path, analytic in paths:
            with ours_log_prob(args.ours_epsilon):
                result[path] = compare(seed, analytic, args.sb3_epsilon)
            print_rows(result[path], path)
        per_seed.append(result)
    packages = ["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium"]
    payload = {**provenance(packages), "case": args.case}
    if _gaussian():
        payload["sb3_epsilon"] = args.sb3_epsilon
        payload["ours_epsilon"] = args.ours_epsilon
    payload["seeds"] = per_seed
    print(f"\nresults: {write_results(f'{CASE.algo}_equivalence', payload)}")


if __name__ == "__main__":
    main()
