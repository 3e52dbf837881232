"""Certified robustness by policy smoothing: a lower bound on the expected return under observation attacks.

Kumar, Levine & Feizi, "Policy Smoothing for Provably Robust Reinforcement Learning" (ICLR 2022).

Smoothed policy: at every step the agent adds noise N(0, sigma^2 I) to the observation the env gives it, then
acts with the trained policy (deterministically by default). Threat model: an adaptive adversary adds delta_t
to each observation before the agent's noise, choosing it from everything seen so far, with a total l2 budget
over the episode, sqrt(sum_t ||delta_t||^2) <= eps. eps and sigma are in the env's raw observation units (the
policy's observation normalization, if any, is part of the policy).

The paper's adaptive Neyman-Pearson lemma: for any event of the episode (here {R >= v}) of probability p without
attack, its probability under any such adversary is at least Phi(Phi^-1(p) - eps / sigma).

Expected return (the CDF form of Kumar et al. 2020, "Certifying Confidence via Randomized Smoothing", which the
policy-smoothing paper uses for its expected-reward certificates). With returns R >= r_min,
E[R] = r_min + integral over v > r_min of P(R >= v) dv. From n sampled returns with distinct values
v_1 < ... < v_m and empirical tails p_j = #{R_i >= v_j} / n, the two-sided DKW band (Massart's constant)
kappa = sqrt(ln(2 / alpha) / (2 n)) holds for every v at once with probability >= 1 - alpha, so
P(R >= v) >= max(p_j - kappa, 0) for v in (v_{j-1}, v_j]. Applying the lemma threshold by threshold, v_0 = r_min:

    E_adv[R] >= r_min + sum_j (v_j - v_{j-1}) * Phi(Phi^-1(max(p_j - kappa, 0)) - eps / sigma)

At eps = 0 this is the DKW lower confidence bound of the smoothed policy's mean return (never above the sample
mean). The same band gives the upper end of the interval,
r_min + sum_j (v_j - v_{j-1}) min(p_j + kappa, 1) + (r_max - v_m) kappa.
This is the construction of the certificate script for Freeway that accompanies the paper's code (empirical
1 - CDF at each sorted distinct return, lowered by sqrt(ln(2 / alpha) / (2 n)), clipped at 0, mapped through
Phi(Phi^-1(.) - eps / sigma), integrated from 0). For Cartpole, whose returns are the integers 0..200, that code
bounds P(R > i) for each i by Clopper-Pearson with a Bonferroni correction over the 200 thresholds instead:

The Clopper-Pearson variant (`thresholds=`, `--bound clopper-pearson --thresholds ...`). A grid of thresholds
r_min = t_0 < t_1 < ... < t_K, fixed before sampling (it must not depend on the returns), and k_i = #{R >= t_i}.
Each P(R >= t_i) gets the one-sided Clopper-Pearson lower bound at level alpha / K (Bonferroni: all K hold
together with probability >= 1 - alpha), the alpha / K quantile of Beta(k_i, n - k_i + 1) (0 when k_i = 0). Since
P(R >= v) >= P(R >= t_i) for v in (t_{i-1}, t_i],

    E_adv[R] >= r_min + sum_i (t_i - t_{i-1}) * Phi(Phi^-1(CP_low_i) - eps / sigma)

Returns above t_K count only up to t_K, so the grid should reach the highest return the env can produce (for
integer returns, the integers r_min + 1 .. r_max make the sum exact). Where most episodes end at the top return,
as a good CartPole policy's do, this bound is much tighter than DKW's: the tail bound at k = n is
(alpha / K)^(1 / n), about 1 - 9e-4 for n = 10^4, K = 500, where DKW gives 1 - 0.0136, and Phi^-1 is steep
near 1. The interval's upper end uses the Clopper-Pearson upper bounds of the same tails at the same level
(P(R >= v) <= P(R >= t_{i-1}) on that span, and r_max - t_K more at P(R >= t_K)); each end of that interval
holds with probability >= 1 - alpha.

The lower limit r_min must be a return the env cannot go below (the paper integrates from 0: non-negative
rewards). It is not taken from the samples: an attack can push returns below the smallest one seen.

The empirical attack (for comparison, not part of the certificate): at every step a perturbation of l2 norm
exactly eps / sqrt(T), T the env's episode-length cap, so any episode spends at most eps; its direction comes from
a few projected gradient steps (random start on the sphere) that lower the log-probability (Discrete: the
cross-entropy of logits or Q-values) of the action the policy takes on the clean observation, or (deterministic
continuous actors) push the action away from the clean one. The adversary does not see the agent's noise.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr, ndtri
from torch import Tensor

from policylab.envs import make_single_env
from policylab.errors import EnvError, PolicylabError
from policylab.nets.actor_critic import ActorCritic
from policylab.nets.critics import (
    CategoricalActor,
    DeterministicActor,
    DiscreteBCActor,
    GaussianActor,
    QNetwork,
    TanhGaussianActor,
)
from policylab.nets.population import SearchPolicy
from policylab.policy import Policy, evaluate, load

DEFAULT_EPS_POINTS = 11
"""The default eps grid: this many points from 0 to 4 sigma (beyond that the bound is close to r_min)."""


# --- the certificate: a pure function of the sampled returns ---------------------------------------------------


@dataclass(frozen=True)
class ReturnBound:
    """The certified lower bound per eps, and the smoothed policy's mean return with its interval."""

    eps: np.ndarray
    bound: np.ndarray
    mean: float
    ci: tuple[float, float]
    """The interval of the mean at level 1 - alpha; its low end is `bound` at eps = 0."""
    band: float | None
    """kappa, the half-width of the DKW band on the return distribution (None for the Clopper-Pearson variant)."""
    method: Literal["dkw", "clopper-pearson"] = "dkw"


@dataclass(frozen=True)
class TailBounds:
    """Bounds on P(R >= v) that hold together, piecewise constant on spans of v above r_min."""

    widths: np.ndarray
    """The spans' lengths, the first starting at r_min."""
    low: np.ndarray
    """A lower bound of P(R >= v) for every v in each span."""
    high: np.ndarray
    """An upper bound of P(R >= v) for every v in each span."""
    high_above: float
    """An upper bound of P(R >= v) above the last span (up to r_max)."""


def dkw_band(n: int, alpha: float) -> float:
    """sqrt(ln(2 / alpha) / (2 n)): sup_v |P_n(R >= v) - P(R >= v)| <= this with probability >= 1 - alpha."""
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


def min_samples(alpha: float) -> int:
    """The fewest episodes whose DKW band is narrower than 1 (with fewer the bound is r_min whatever happens)."""
    return math.floor(math.log(2.0 / alpha) / 2.0) + 1


def default_eps_grid(sigma: float) -> np.ndarray:
    return np.round(np.linspace(0.0, 4.0 * sigma, DEFAULT_EPS_POINTS), 10)


def check_settings(sigma: float, alpha: float, samples: int, eps: Sequence[float] | np.ndarray | None = None) -> None:
    """Raise a PolicylabError naming the fix for a bad sigma, alpha, sample count or eps grid."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise PolicylabError(
            f"sigma={sigma}: the smoothing noise must have a positive standard deviation",
            "pass sigma > 0 (--sigma 0.2), in the env's observation units",
        )
    if not (0.0 < alpha < 1.0):
        raise PolicylabError(
            f"alpha={alpha}: the failure probability must lie strictly between 0 and 1",
            "pass e.g. alpha=0.05 (--alpha 0.05) for 95% confidence",
        )
    if samples < 1:
        raise PolicylabError(
            f"samples={samples}: the certificate is computed from sampled smoothed episodes, and none would be sampled",
            f"sample at least {min_samples(alpha)} episodes (thousands give a useful bound: --samples 10000)",
        )
    if samples < min_samples(alpha):
        raise PolicylabError(
            f"samples={samples}: too few episodes for confidence {1 - alpha:g}: the DKW band "
            f"({dkw_band(samples, alpha):.2f}) covers every probability, so nothing can be certified",
            f"sample at least {min_samples(alpha)} episodes (thousands give a useful bound: --samples 10000)",
        )
    if eps is not None:
        grid = np.asarray(eps, dtype=np.float64)
        shown = ",".join(f"{float(e):g}" for e in np.ravel(grid))
        if grid.ndim != 1 or grid.size == 0:
            raise PolicylabError(
                f"eps=[{shown}]: the attack budgets must be a non-empty list of numbers >= 0",
                "pass e.g. --eps 0,0.1,0.2,0.4",
            )
        bad = [f"{float(e):g}" for e in grid if not (math.isfinite(e) and e >= 0)]
        if bad:
            raise PolicylabError(
                f"eps={shown}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not an attack budget (the total "
                "l2 size of an attack must be a finite number >= 0)",
                "pass e.g. --eps 0,0.1,0.2,0.4",
            )


def check_options(
    attack: bool = True,
    attack_episodes: int = 100,
    attack_steps: int = 5,
    num_envs: int = 128,
    r_min: float = 0.0,
    r_max: float | None = None,
    *,
    cli: bool = False,
) -> None:
    """Raise a PolicylabError for a bad attack budget, env count or return range; its message and fix name the
    command's flags (`cli`) or `certify`'s keywords, as the user wrote them."""

    def name(key: str, value: object) -> str:
        return f"--{key.replace('_', '-')} {value}" if cli else f"{key}={value}"

    def whole(value: object, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    check_return_range(r_min, r_max, cli=cli)
    if attack and not whole(attack_episodes, 1):
        skip = "--no-attack" if cli else "attack=False"
        raise PolicylabError(
            f"{name('attack_episodes', attack_episodes)}: the attack needs at least 1 episode per eps",
            f"pass {name('attack_episodes', 1)} or more (default 100), or {skip} to skip the attack",
        )
    if attack and not whole(attack_steps, 0):
        raise PolicylabError(
            f"{name('attack_steps', attack_steps)}: the attack takes a whole number >= 0 of gradient steps per "
            "observation",
            f"pass {name('attack_steps', 5)} (the default; 0 leaves each perturbation in a random direction)",
        )
    if not whole(num_envs, 1):
        raise PolicylabError(
            f"{name('num_envs', num_envs)}: the episodes need at least one env to run in",
            f"pass {name('num_envs', 1)} or more (default 128)",
        )


def check_return_range(r_min: float, r_max: float | None = None, *, cli: bool = False) -> None:
    """r_min must be a finite return, and r_max (if given) a finite one not below it."""
    if not math.isfinite(r_min):
        flag = f"--r-min {r_min:g}" if cli else f"r_min={r_min}"
        raise PolicylabError(
            f"{flag}: the certificate's lower limit must be a finite return",
            "pass the lowest return the env can produce " + ("(--r-min, default 0)" if cli else "(r_min, default 0)"),
        )
    if r_max is not None and not (math.isfinite(r_max) and r_max >= r_min):
        flag = f"--r-max {r_max:g}" if cli else f"r_max={r_max}"
        raise PolicylabError(
            f"{flag}: the highest return the env can produce must be a finite number >= r_min ({r_min:g})",
            "pass the highest possible return, or leave "
            + ("--r-max out" if cli else "r_max=None")
            + " (the interval's upper end then uses the largest sampled return)",
        )


def check_thresholds(thresholds: Sequence[float] | np.ndarray, r_min: float) -> np.ndarray:
    """The Clopper-Pearson variant's threshold grid as an array, or a PolicylabError naming the fix."""
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise PolicylabError(
            f"thresholds={list(np.ravel(grid))[:8]}: the return thresholds must be a non-empty increasing list",
            "pass e.g. --thresholds 1:500 (the integers 1 to 500) or --thresholds 50,100,200",
        )
    if grid[0] <= r_min:
        raise PolicylabError(
            f"the first threshold ({grid[0]:g}) is not above r_min={r_min:g}: P(R >= r_min) is 1 already",
            f"start the thresholds above r_min (e.g. --thresholds {math.floor(r_min) + 1:g}:500)",
        )
    return grid


def clopper_pearson(successes: np.ndarray, n: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds of binomial proportions from `successes` out of n: (low, high), each
    holding with probability >= 1 - level (the level and 1 - level quantiles of the Beta distributions)."""
    from scipy.stats import beta

    k = np.asarray(successes, dtype=np.float64)
    low = np.where(k > 0, beta.ppf(level, np.maximum(k, 1.0), n - k + 1.0), 0.0)
    high = np.where(k < n, beta.ppf(1.0 - level, k + 1.0, np.maximum(n - k, 1.0)), 1.0)
    return low, high


def dkw_tails(sorted_returns: np.ndarray, alpha: float, r_min: float) -> TailBounds:
    """Spans between the distinct sampled returns, the empirical tail -+ the DKW band on each."""
    n = sorted_returns.size
    kappa = dkw_band(n, alpha)
    values, first = np.unique(sorted_returns, return_index=True)
    tail = (n - first) / n  # empirical P(R >= v_j), the same for every v in (v_{j-1}, v_j]
    return TailBounds(
        widths=np.diff(values, prepend=r_min),
        low=np.clip(tail - kappa, 0.0, 1.0),
        high=np.minimum(tail + kappa, 1.0),
        high_above=min(kappa, 1.0),
    )


def clopper_pearson_tails(sorted_returns: np.ndarray, alpha: float, r_min: float, thresholds: np.ndarray) -> TailBounds:
    """Spans between the thresholds, each tail P(R >= t_i) bounded by Clopper-Pearson at level alpha / K."""
    n = sorted_returns.size
    at_least = n - np.searchsorted(sorted_returns, thresholds, side="left")  # #{R >= t_i}
    low, high = clopper_pearson(at_least, n, alpha / thresholds.size)
    return TailBounds(
        widths=np.diff(thresholds, prepend=r_min),
        low=low,
        high=np.concatenate(([1.0], high[:-1])),  # P(R >= v) <= P(R >= t_{i-1}) on (t_{i-1}, t_i]
        high_above=float(high[-1]),
    )


def certified_return_bound(
    returns: Sequence[float] | np.ndarray,
    eps: Sequence[float] | np.ndarray,
    sigma: float,
    alpha: float = 0.05,
    r_min: float = 0.0,
    r_max: float | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> ReturnBound:
    """Lower bounds on the smoothed policy's expected return against every adaptive l2 attack of total budget eps,
    holding together (all eps) with probability >= 1 - alpha over the sampled `returns` (see the module docstring).

    `r_min`: the lowest return the env can produce (0 for non-negative rewards, as in the paper); a sampled return
    below it is an error. `r_max`: the highest possible return, used only for the interval's upper end (default:
    the largest sampled return, so that end is then an estimate, not a guarantee). `thresholds`: a return grid
    fixed before sampling selects the Clopper-Pearson variant; None (default) the DKW one.
    """
    x = np.sort(np.asarray(returns, dtype=np.float64).ravel())
    check_settings(sigma, alpha, x.size, eps)
    check_return_range(r_min, r_max)
    if not np.all(np.isfinite(x)):
        raise PolicylabError("some sampled returns are NaN or infinite", "check the env's rewards")
    if x[0] < r_min:
        raise PolicylabError(
            f"a sampled return ({x[0]:g}) is below r_min={r_min:g}, the lower limit of the certificate",
            "pass r_min (--r-min) as the lowest return the env can produce (e.g. -max_steps * max penalty)",
        )
    top = x[-1] if r_max is None else float(r_max)
    if top < x[-1]:
        raise PolicylabError(f"a sampled return ({x[-1]:g}) is above r_max={top:g}", "pass a larger r_max, or none")
    if thresholds is None:
        tails = dkw_tails(x, alpha, r_min)
    else:
        tails = clopper_pearson_tails(x, alpha, r_min, check_thresholds(thresholds, r_min))
    grid = np.asarray(eps, dtype=np.float64)
    certified = ndtr(ndtri(tails.low)[None, :] - grid[:, None] / sigma)  # ndtri(0) = -inf -> 0
    bound = r_min + (tails.widths[None, :] * certified).sum(axis=1)
    last = r_min + float(tails.widths.sum())
    high = r_min + float((tails.widths * tails.high).sum()) + max(top - last, 0.0) * tails.high_above
    low = r_min + float((tails.widths * tails.low).sum())
    if thresholds is None:
        return ReturnBound(grid, bound, float(x.mean()), (low, high), dkw_band(x.size, alpha))
    return ReturnBound(grid, bound, float(x.mean()), (low, high), None, "clopper-pearson")


# --- the smoothed policy and the attack ------------------------------------------------------------------------


def check_observations(policy: Policy) -> None:
    space = policy.observation_space if policy.encoder is None else policy.encoder.space
    if not isinstance(space, gym.spaces.Box):
        raise EnvError(
            f"the policy's observation space is {space}, but smoothing adds Gaussian noise to continuous "
            "observations (an l2 budget on one-hot codes certifies nothing about the env)",
            "certify a policy of an env with Box observations",
        )


class L2Attack:
    """Per-step observation perturbations of l2 norm exactly `radius` that move the policy off its clean action.

    Projected gradient ascent on the sphere of that radius (random start, `steps` steps) on a loss that grows as
    the policy's action at obs + delta departs from its action at obs, differentiating through the policy's
    observation normalization and network.
    """

    def __init__(self, policy: Policy, radius: float, steps: int = 5, seed: int = 0) -> None:
        if radius < 0 or steps < 0:
            raise PolicylabError(
                f"an attack of radius {radius} with {steps} steps", "pass a radius >= 0 and steps >= 0"
            )
        self.policy = policy
        self.radius = float(radius)
        self.steps = steps
        self._generator = torch.Generator().manual_seed(seed)
        self.last_delta: np.ndarray | None = None
        _attack_functions(policy.net)  # an unsupported network fails here, before any rollout

    def _features(self, obs: Tensor) -> Tensor:
        normalizer = self.policy.obs_normalizer
        return obs if normalizer is None else normalizer.tensor(obs)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """obs [B, *obs_shape] -> delta of the same shape, every row of l2 norm `radius` (float64)."""
        net = self.policy.net
        device = next(net.parameters()).device
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
        if self.radius == 0.0:
            self.last_delta = np.zeros(x.shape)
            return self.last_delta
        clean_action, loss_fn = _attack_functions(net)
        dims = tuple(range(1, x.dim()))
        with torch.no_grad():
            clean = clean_action(net, self._features(x))
        delta = self._to_sphere(torch.randn(x.shape, generator=self._generator).to(device), dims)
        with torch.enable_grad():  # also when called under no_grad
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = loss_fn(net, self._features(x + delta), clean).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * len(dims)))
                delta = self._to_sphere(delta.detach() + self.radius * grad / norm, dims)
        d = delta.double().cpu().numpy()
        scale = self.radius / np.sqrt((d * d).sum(axis=dims, keepdims=True))
        self.last_delta = d * scale
        return self.last_delta

    def _to_sphere(self, delta: Tensor, dims: tuple[int, ...]) -> Tensor:
        return delta * (self.radius / delta.square().sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12))


CleanAction = Callable[[Any, Tensor], Tensor]
AttackLoss = Callable[[Any, Tensor, Tensor], Tensor]


def _attack_functions(net: Any) -> tuple[CleanAction, AttackLoss]:
    """(the action the network takes on clean features, a per-row loss that grows as it moves off that action)."""
    if isinstance(net, ActorCritic):  # every head: log-prob of the clean mode (Gaussian: a weighted distance)
        return lambda m, f: m.deterministic(f), lambda m, f, a: -m.evaluate(f, a)[0]
    if isinstance(net, QNetwork):  # Q-values as logits: lower the clean action's softmax share
        return lambda m, f: m(f)[0].argmax(-1), lambda m, f, a: F.cross_entropy(m(f)[0], a, reduction="none")
    if isinstance(net, DiscreteBCActor):
        return lambda m, f: m(f).argmax(-1), lambda m, f, a: F.cross_entropy(m(f), a, reduction="none")
    if isinstance(net, CategoricalActor):
        return lambda m, f: m(f)[1].argmax(-1), lambda m, f, a: -m(f)[1].gather(-1, a[:, None])[:, 0]
    if isinstance(net, SearchPolicy):  # ARS: the argmax of its outputs, or its action in env units
        if net.discrete:
            return lambda m, f: m(f).argmax(-1), lambda m, f, a: F.cross_entropy(m(f), a, reduction="none")
        return lambda m, f: m.env_action(f), lambda m, f, a: (m.env_action(f) - a).square().sum(-1)
    if isinstance(net, (DeterministicActor, TanhGaussianActor, GaussianActor)):  # forward: the [-1, 1] action
        return lambda m, f: m(f), lambda m, f, a: (m(f) - a).square().sum(-1)
    raise PolicylabError(
        f"the attack cannot differentiate through a {type(net).__name__} policy network",
        "certify without the attack (--no-attack / attack=False)",
    )


class SmoothedPolicy(Policy):
    """`policy` acting on observations plus seeded N(0, sigma^2) noise (after an optional attack's perturbation)."""

    def __init__(self, policy: Policy, sigma: float, seed: int = 0, attack: L2Attack | None = None) -> None:
        super().__init__(
            policy.net,
            policy.observation_space,
            policy.action_space,
            policy.obs_normalizer,
            policy.env_id,
            policy.env_kwargs,
            policy.algo,
            seed,
            action_masks=policy.action_masks,
        )
        self.sigma = sigma
        self.attack = attack
        self._rng = np.random.default_rng(seed)

    def act(self, obs: Any, deterministic: bool = True, action_mask: Any = None) -> Any:
        x = np.asarray(obs, dtype=np.float32)
        single = x.shape == tuple(self.observation_space.shape)
        batch = x[None] if single else x
        if self.attack is not None:
            batch = (batch + self.attack(batch)).astype(np.float32)
        noisy = batch + self.sigma * self._rng.standard_normal(batch.shape, dtype=np.float32)
        return super().act(noisy[0] if single else noisy, deterministic, action_mask)

    __call__ = act


def smoothed_returns(
    policy: Policy,
    sigma: float,
    episodes: int,
    seed: int = 0,
    num_envs: int = 128,
    deterministic: bool = True,
    attack: L2Attack | None = None,
) -> np.ndarray:
    """The returns of `episodes` episodes of the smoothed policy (optionally attacked) in the policy's env."""
    check_observations(policy)
    smoothed = SmoothedPolicy(policy, sigma, seed, attack)
    with _one_torch_thread():
        result = evaluate(smoothed, episodes, seed, deterministic=deterministic, max_envs=num_envs)
    return np.asarray(result["returns"], dtype=np.float64)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Acting on small batches is latency-bound: a second thread only waits (and stalls on a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def episode_horizon(policy: Policy, horizon: int | None = None) -> int:
    """T, the most steps an episode of the policy's env can last (its time limit), or `horizon` if given."""
    if horizon is not None:
        if horizon < 1:
            raise PolicylabError(f"horizon={horizon}", "pass the env's episode-length cap, at least 1")
        return int(horizon)
    env_id, kwargs = policy.env_id, dict(policy.env_kwargs)
    steps = kwargs.get("max_episode_steps")
    if steps is None and env_id is not None:
        if ":" in env_id:
            env = make_single_env(env_id, kwargs)
            steps = env.spec.max_episode_steps if env.spec is not None else None
            env.close()
        elif env_id in gym.registry:
            steps = gym.spec(env_id).max_episode_steps
    if not steps:
        raise PolicylabError(
            f"cannot tell the episode-length cap of {env_id!r}, which the attack needs to spread its budget",
            "pass horizon=T (--horizon T), the most steps an episode can last",
        )
    return int(steps)


def attack_returns(
    policy: Policy,
    sigma: float,
    eps: Sequence[float] | np.ndarray,
    horizon: int,
    episodes: int = 100,
    seed: int = 0,
    steps: int = 5,
    num_envs: int = 128,
    deterministic: bool = True,
) -> np.ndarray:
    """Returns [len(eps), episodes] of the smoothed policy under the gradient attack of total budget eps (each eps
    with the same env and noise seeds, so the differences are the attack's)."""
    rows = []
    for e in np.asarray(eps, dtype=np.float64):
        attack = L2Attack(policy, e / math.sqrt(horizon), steps, seed)
        rows.append(smoothed_returns(policy, sigma, episodes, seed, num_envs, deterministic, attack))
    return np.stack(rows)


# --- the public entry point ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    env_id: str
    eps: list[float]
    bound: list[float]
    """Certified lower bound on the smoothed policy's expected return at each eps (together, w.p. >= 1 - alpha)."""
    attack_return: list[float] | None
    """Mean return of the smoothed policy under the gradient attack at each eps (None: attack=False)."""
    attack_sem: list[float] | None
    smoothed_mean: float
    smoothed_ci: tuple[float, float]
    sigma: float
    alpha: float
    samples: int
    r_min: float
    band: float | None
    """The DKW band's half-width (None for the Clopper-Pearson variant)."""
    horizon: int | None
    attack_episodes: int
    returns: list[float]
    """The sampled returns of the smoothed policy without attack (the certificate is a function of these)."""
    method: Literal["dkw", "clopper-pearson"] = "dkw"
    thresholds: list[float] | None = None
    """The Clopper-Pearson variant's return thresholds (None for DKW)."""
    r_max: float | None = None
    """The highest return the env can produce, as given (None: the interval's upper end used the largest sampled
    return, so it is an estimate, not a guarantee)."""
    plot: Path | None = None
    numbers: tuple[Path, Path] | None = None
    """The JSON and CSV files written beside the plot."""


def certify(
    run_dir: str | Path,
    sigma: float = 0.2,
    samples: int | str = 10_000,
    alpha: float = 0.05,
    eps: Sequence[float] | None = None,
    out: str | Path | None = None,
    attack: bool = True,
    seed: int = 0,
    *,
    r_min: float = 0.0,
    r_max: float | None = None,
    attack_episodes: int = 100,
    attack_steps: int = 5,
    horizon: int | None = None,
    num_envs: int = 128,
    deterministic: bool = True,
    which: Literal["final", "best"] = "final",
    thresholds: Sequence[float] | None = None,
) -> Certificate:
    """Certify a run's policy, smoothed with noise `sigma`, against l2 observation attacks of total budget eps.

    Samples `samples` smoothed episodes, bounds the expected return at each eps (sorted; default: 11 points from 0
    to 4 sigma) with confidence 1 - alpha, runs the gradient attack for `attack_episodes` episodes per eps, and,
    with `out` (a .png path), writes the plot and its numbers (`out` with .json and .csv) atomically. `r_min`: the
    lowest return the env can produce (the integral's lower limit; 0 for non-negative rewards). `horizon`: the
    episode-length cap T, if the env has no registered time limit (the attack spends eps / sqrt(T) per step).
    `thresholds`: a grid of returns, chosen before sampling, for the Clopper-Pearson variant (default: DKW).
    `r_max`: the highest return the env can produce, for the upper end of the no-attack interval (default: the
    largest sampled return). `attack_steps`: gradient steps of the attack per observation. `num_envs`: parallel envs
    of the sampled and the attacked episodes. `deterministic=False` samples the policy's actions (on the noisy
    observations) instead of taking its deterministic action.
    """
    if isinstance(samples, str):  # "10k", as --samples takes it
        from policylab.config import parse_count

        try:
            samples = parse_count(samples)
        except ValueError as exc:
            raise PolicylabError(str(exc), "pass e.g. samples=10000 or samples='10k'") from None
    grid = default_eps_grid(sigma) if eps is None else np.asarray(eps, dtype=np.float64)
    check_settings(sigma, alpha, samples, grid)
    if thresholds is not None:
        check_thresholds(thresholds, r_min)
    grid = np.unique(grid)  # sorted, for the table and the plot
    check_options(attack, attack_episodes, attack_steps, num_envs, r_min, r_max)
    out_path = None if out is None else _check_out(Path(out))
    policy = load(run_dir, which=which)
    check_observations(policy)
    env_id = policy.env_id or "?"
    t = episode_horizon(policy, horizon) if attack else None
    if attack:
        L2Attack(policy, 0.0)  # an unsupported network fails now, not after the sampling
    returns = smoothed_returns(policy, sigma, samples, seed, num_envs, deterministic)
    result = certified_return_bound(returns, grid, sigma, alpha, r_min, r_max, thresholds)
    attacked = None
    if attack and t is not None:
        attacked = attack_returns(
            policy, sigma, grid, t, attack_episodes, seed + 1, attack_steps, num_envs, deterministic
        )
    cert = Certificate(
        env_id=env_id,
        eps=grid.tolist(),
        bound=result.bound.tolist(),
        attack_return=None if attacked is None else attacked.mean(axis=1).tolist(),
        attack_sem=None if attacked is None else (attacked.std(axis=1) / math.sqrt(attacked.shape[1])).tolist(),
        smoothed_mean=result.mean,
        smoothed_ci=result.ci,
        sigma=sigma,
        alpha=alpha,
        samples=int(returns.size),
        r_min=r_min,
        band=result.band,
        horizon=t,
        attack_episodes=attack_episodes if attack else 0,
        returns=returns.tolist(),
        method=result.method,
        thresholds=None if thresholds is None else [float(t) for t in thresholds],
        r_max=r_max,
    )
    if out_path is None:
        return cert
    plot = plot_certificate(cert, out_path)
    return replace(cert, plot=plot, numbers=write_numbers(cert, out_path))


def _check_out(out: Path) -> Path:
    if out.suffix.lower() != ".png":
        raise PolicylabError(f"out={str(out)!r} is not a .png path", "pass e.g. --out cert.png")
    if out.is_dir():
        raise PolicylabError(f"out={str(out)!r} is a directory", "pass a file name such as cert.png")
    return out


# --- outputs: plot, JSON and CSV, each written to a temporary file and renamed into place ----------------------


def _write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plot_certificate(cert: Certificate, out: Path) -> Path:
    """Certified bound, attack returns and the clean smoothed return (with its interval) against eps, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    level = f"{100 * (1 - cert.alpha):g}%"
    low, high = cert.smoothed_ci
    ax.axhspan(low, high, color="C2", alpha=0.15, lw=0, label=f"no attack: {level} interval")
    ax.axhline(cert.smoothed_mean, color="C2", ls="--", lw=1.5, label=f"no attack: mean of {cert.samples} episodes")
    how = "DKW" if cert.method == "dkw" else "Clopper-Pearson"
    label = f"certified lower bound ({level} confidence, {how})"
    ax.plot(cert.eps, cert.bound, "o-", color="C0", lw=2, label=label)
    if cert.attack_return is not None:
        ax.errorbar(
            cert.eps,
            cert.attack_return,
            yerr=cert.attack_sem,
            fmt="s-",
            color="C3",
            capsize=3,
            label=f"gradient attack: mean of {cert.attack_episodes} episodes (+- s.e.)",
        )
    ax.set_xlabel("total l2 budget of the attack over an episode (eps, observation units)")
    ax.set_ylabel("return of the smoothed policy")
    ax.set_title(f"policy smoothing on {cert.env_id}: sigma = {cert.sigma:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))


def write_numbers(cert: Certificate, out: Path) -> tuple[Path, Path]:
    """`out` with .json (everything, sampled returns included) and .csv (one row per eps)."""
    data = {k: v for k, v in asdict(cert).items() if k not in ("plot", "numbers")}
    text = json.dumps(data, indent=1) + "\n"
    json_path = _write_atomic(out.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["eps", "certified_return", "attack_return", "attack_sem"])
    blank: list[float | str] = [""] * len(cert.eps)
    attack, sem = (cert.attack_return or blank), (cert.attack_sem or blank)
    writer.writerows(zip(cert.eps, cert.bound, attack, sem))
    csv_path = _write_atomic(out.with_suffix(".csv"), lambda tmp: tmp.write_text(buffer.getvalue()))
    return json_path, csv_path


# --- the `policylab certify` command ---------------------------------------------------------------------------


def add_certify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certify",
        help="certified return of a smoothed policy under l2 observation attacks (policy smoothing)",
    )
    p.add_argument("run", help="run directory (or a checkpoint directory)")
    p.add_argument(
        "--sigma", type=float, default=0.2, help="std of the smoothing noise, observation units (default 0.2)"
    )
    p.add_argument("--samples", default="10000", help="smoothed episodes to sample (default 10000; e.g. 10k)")
    p.add_argument("--alpha", type=float, default=0.05, help="failure probability: confidence 1 - alpha (default 0.05)")
    p.add_argument("--eps", help="attack budgets, comma-separated (default: 11 points from 0 to 4 sigma)")
    p.add_argument(
        "--out",
        default="certificate.png",
        help="the plot (default: certificate.png); its numbers go beside it (.json, .csv)",
    )
    p.add_argument("--no-attack", action="store_true", help="skip the empirical gradient attack")
    p.add_argument("--attack-episodes", type=int, default=100, help="attacked episodes per eps (default 100)")
    p.add_argument("--horizon", type=int, help="the env's episode-length cap, if it has no registered time limit")
    p.add_argument("--r-min", type=float, default=0.0, help="the lowest return the env can produce (default 0)")
    p.add_argument(
        "--r-max",
        type=float,
        help="the highest return the env can produce, for the no-attack interval's upper end "
        "(default: the largest sampled return, an estimate)",
    )
    p.add_argument(
        "--attack-steps",
        type=int,
        default=5,
        help="gradient steps of the attack per observation (default 5; 0: random directions)",
    )
    p.add_argument(
        "--num-envs", type=int, default=128, help="parallel envs of the sampled and attacked episodes (default 128)"
    )
    p.add_argument(
        "--stochastic",
        action="store_true",
        help="sample the policy's actions on the noisy observations (default: its deterministic action)",
    )
    p.add_argument(
        "--bound",
        choices=("dkw", "clopper-pearson"),
        default="dkw",
        help="how the return distribution is bounded: one DKW band (default), or Clopper-Pearson per threshold",
    )
    p.add_argument(
        "--thresholds",
        help="return thresholds of --bound clopper-pearson: START:STOP[:STEP] (STOP included) or a comma list",
    )
    p.add_argument("--best", action="store_true", help="the best evaluated policy (best/), not the final one")
    p.add_argument("--seed", type=int, default=0, help="seed of the smoothing noise and the envs (default 0)")
    p.set_defaults(func=run_certify_command)


def _parse_eps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PolicylabError(f"--eps {text!r} is not a list of numbers", "write e.g. --eps 0,0.1,0.2,0.4") from None


def parse_thresholds(text: str | None, bound: str) -> list[float] | None:
    """`--thresholds` as a list (START:STOP[:STEP], STOP included, or comma-separated), checked against --bound."""
    if bound == "dkw":
        if text is not None:
            raise PolicylabError(
                "--thresholds applies only to the Clopper-Pearson variant", "add --bound clopper-pearson"
            )
        return None
    if text is None:
        raise PolicylabError(
            "--bound clopper-pearson needs a grid of return thresholds, fixed before sampling",
            "pass e.g. --thresholds 1:500 (CartPole-v1's integer returns) or --thresholds 0:3000:10",
        )
    try:
        if ":" not in text:
            return [float(x) for x in text.split(",") if x.strip()]
        start, stop, *rest = (float(x) for x in text.split(":"))
        step = rest[0] if len(rest) == 1 else 1.0
        if len(rest) > 1 or step <= 0 or stop < start:
            raise ValueError
        count = math.floor((stop - start) / step + 1e-9) + 1
        return [start + i * step for i in range(count)]
    except ValueError:
        raise PolicylabError(
            f"--thresholds {text!r} is not START:STOP[:STEP] or a list of numbers",
            "write e.g. --thresholds 1:500, --thresholds 0:3000:10 or --thresholds 50,100,200",
        ) from None


def run_certify_command(args: argparse.Namespace) -> int:
    from policylab.config import parse_count

    try:
        samples = parse_count(args.samples)
    except ValueError as exc:
        raise PolicylabError(str(exc), "write e.g. --samples 10000 or --samples 10k") from None
    attack = not args.no_attack
    check_options(attack, args.attack_episodes, args.attack_steps, args.num_envs, args.r_min, args.r_max, cli=True)
    cert = certify(
        args.run,
        sigma=args.sigma,
        samples=samples,
        alpha=args.alpha,
        eps=_parse_eps(args.eps),
        out=args.out,
        attack=attack,
        seed=args.seed,
        r_min=args.r_min,
        r_max=args.r_max,
        attack_episodes=args.attack_episodes,
        attack_steps=args.attack_steps,
        horizon=args.horizon,
        num_envs=args.num_envs,
        deterministic=not args.stochastic,
        which="best" if args.best else "final",
        thresholds=parse_thresholds(args.thresholds, args.bound),
    )
    print(format_certificate(cert))
    return 0


def format_certificate(cert: Certificate) -> str:
    level = f"{100 * (1 - cert.alpha):g}%"
    low, high = cert.smoothed_ci
    lines = [
        f"{cert.env_id}, sigma {cert.sigma:g}, {cert.samples} smoothed episodes: return {cert.smoothed_mean:.2f} "
        f"({level} interval {low:.2f} .. {high:.2f})",
        f"{'eps':>10}  {'certified':>10}" + (f"  {'attack':>10}" if cert.attack_return is not None else ""),
    ]
    for i, e in enumerate(cert.eps):
        row = f"{e:>10.4g}  {cert.bound[i]:>10.2f}"
        if cert.attack_return is not None:
            row += f"  {cert.attack_return[i]:>10.2f}"
        lines.append(row)
    how = "one DKW band" if cert.thresholds is None else f"Clopper-Pearson at {len(cert.thresholds)} thresholds"
    assumed = f">= {cert.r_min:g}" if cert.r_max is None else f"in [{cert.r_min:g}, {cert.r_max:g}]"
    lines.append(f"certified with confidence {level} ({how}), returns {assumed} assumed")
    if cert.plot is not None and cert.numbers is not None:
        lines.append(f"plot: {cert.plot} (numbers: {cert.numbers[0]}, {cert.numbers[1]})")
    return "\n".join(lines)
