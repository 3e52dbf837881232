"""Off-policy evaluation of a trained policy on an offline dataset: the estimators of `estimators.py` fed with
the dataset's episodes, the policy's log-probs of the logged actions, the behaviour log-probs (recorded, or
estimated by behaviour cloning with a caveat) and, for dm / fqe / dr / wdr, a critic fitted by FQE.

    from policylab.ope import evaluate_policy
    report = evaluate_policy("datasets/hopper-medium", "runs/iql-Hopper-v5-s1", ["fqe", "pdis", "wdr"])
    print(report.format())
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policylab.data.dataset import Dataset, check_compatible, load_dataset
from policylab.errors import ConfigError, DatasetError, suggest
from policylab.ope.bootstrap import OPEResult, estimate
from policylab.ope.estimators import ESTIMATORS, NEEDS_CRITIC, Trajectories, pad_episodes
from policylab.ope.fqe import FQEConfig, fit_fqe
from policylab.ope.policies import TargetPolicy
from policylab.ope.selection import Selection
from policylab.policy import Policy, load

ALIASES = {"fqe": "dm"}
"""`fqe` is the direct method on the FQE critic (what `dm` uses here): the two names give one estimate."""
DEFAULT_ESTIMATORS = ("fqe", "pdis", "wpdis", "dr", "wdr")
NEAR_ZERO_ESS = 1.0
"""Kish's ESS is 0 when every episode's weight is 0 and at least 1 otherwise: below this, IS means nothing."""


@dataclass
class OPEReport:
    """Estimates of one policy's discounted value on one dataset."""

    results: dict[str, OPEResult]
    gamma: float
    gamma_source: str
    policy: str
    policy_distribution: str
    dataset: str
    behavior: str
    behavior_value: float
    """The dataset's own mean discounted return (the behaviour policy's on-policy value)."""
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"policy {self.policy}: {self.policy_distribution}",
            f"dataset {self.dataset}; behaviour log-probs {self.behavior}",
            f"value = discounted return with gamma {self.gamma} ({self.gamma_source}); "
            f"the dataset's own (behaviour) value: {self.behavior_value:.3f}",
            f"{'estimator':<10}{'value':>12}{'std err':>11}{'CI low':>12}{'CI high':>12}{'ESS':>10}",
        ]
        for name, r in self.results.items():
            ess = "" if name in ("dm", "fqe") else f"{r.ess:10.1f}"
            spread = "".join(_cell(x, w) for x, w in ((r.std_error, 11), (r.ci_low, 12), (r.ci_high, 12)))
            lines.append(f"{name:<10}{r.value:12.3f}{spread}{ess:>10}")
        first = next(iter(self.results.values()), None)
        if first is not None and first.bootstrap == 0:
            lines.append("(no intervals: bootstrap 0 resamples; --bootstrap 1000 gives them)")
        else:
            alpha = first.alpha if first is not None else 0.05
            lines.append(f"(CI: {100 * (1 - alpha):.0f}% percentile bootstrap over episodes)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = {
            name: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
            for name, r in self.results.items()
        }  # no intervals (bootstrap 0): null, not JSON's non-standard NaN
        return out


def _cell(value: float, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{width}.3f}"


def evaluate_policy(
    dataset: str | Path | Dataset,
    policy: str | Path | Policy,
    estimators: str | list[str] | tuple[str, ...] = DEFAULT_ESTIMATORS,
    *,
    gamma: float | None = None,
    bootstrap: int = 1000,
    alpha: float = 0.05,
    clip: float | None = None,
    epsilon: float = 0.0,
    sigma: float | None = None,
    fqe: FQEConfig | None = None,
    seed: int = 0,
) -> OPEReport:
    """Estimate `policy`'s value on `dataset` with each estimator (names: dm/fqe, is, pdis, wis, wpdis, dr, wdr).
    `gamma`: the discount of the value (None: the policy's run's own gamma). `epsilon` / `sigma`: see
    policies.TargetPolicy (an epsilon-greedy or Gaussian version of a greedy / deterministic policy)."""
    names = _check_names(estimators)
    if fqe is not None:
        fqe.validate()  # before the dataset loads and behaviour cloning runs, not when FQE starts
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    loaded = policy if isinstance(policy, Policy) else load(policy)
    gamma, gamma_source = _gamma(gamma, policy)
    _check_fits(data, loaded)
    needs_ratios = any(ALIASES.get(n, n) != "dm" for n in names)
    target = TargetPolicy(loaded, epsilon, sigma)
    step_obs = data.observations[data.obs_index()]
    notes: list[str] = []
    behavior_logp, behavior = _behavior_log_probs(data, needs_ratios, seed, notes)
    target_logp = target.log_prob(step_obs, data.actions) if needs_ratios else np.zeros(data.num_steps)
    q = v = None
    if any(ALIASES.get(n, n) in NEEDS_CRITIC for n in names):
        fqe = fqe or FQEConfig(seed=seed)
        q, v = fit_fqe(data, target, gamma, fqe).values(step_obs, data.actions)
        notes.append(_fqe_note(fqe))
    columns = [data.rewards, behavior_logp, target_logp] + ([q, v] if q is not None and v is not None else [])
    padded = pad_episodes(np.asarray(data.episode_lengths, np.int64), *columns)
    trajectories = Trajectories(
        padded[0],
        padded[1],
        padded[2],
        padded[-1],
        q_values=padded[3] if q is not None else None,
        v_values=padded[4] if q is not None else None,
    )
    raw = estimate(list(dict.fromkeys(ALIASES.get(n, n) for n in names)), trajectories, gamma=gamma, clip=clip,
                   bootstrap=bootstrap, alpha=alpha, seed=seed)  # fmt: skip
    results = {n: raw[ALIASES.get(n, n)] for n in names}
    if needs_ratios:
        _weight_notes(trajectories, clip, target, notes)
    return OPEReport(
        results=results,
        gamma=gamma,
        gamma_source=gamma_source,
        policy=str(policy) if not isinstance(policy, Policy) else (loaded.algo or "a policy"),
        policy_distribution=target.describe(),
        dataset=data.name,
        behavior=behavior,
        behavior_value=float(_discounted_returns(trajectories, gamma).mean()),
        notes=notes,
    )


def _check_fits(data: Dataset, policy: Policy) -> None:
    """check_compatible, with a fix that OPE can act on (it has no --env: the env is the dataset's)."""
    try:
        check_compatible(data, policy.observation_space, policy.action_space, "the policy")
    except DatasetError as exc:
        where = f" ({data.env_id})" if data.env_id else ""
        raise DatasetError(
            exc.problem,
            f"evaluate a policy trained in the env the dataset was collected in{where}, or a dataset collected in "
            f"the policy's env{f' ({policy.env_id})' if policy.env_id else ''}",
        ) from None


def _check_names(estimators: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(estimators, str):  # "pdis" or "fqe,pdis" as the CLI's --estimators takes it
        estimators = estimators.split(",")
    names = [n.strip() for n in estimators if n.strip()]
    if not names:
        raise ConfigError("no estimator given", "e.g. --estimators fqe,pdis,wdr")
    known = [*ESTIMATORS, *ALIASES]
    for name in names:
        if ALIASES.get(name, name) not in ESTIMATORS:
            raise ConfigError(
                f"unknown OPE estimator {name!r}.{suggest(name, known)}",
                f"choose from: {', '.join(known)} (fqe is dm on the FQE critic), e.g. --estimators fqe,pdis,wdr",
            )
    return names


def _gamma(gamma: float | None, policy: Any) -> tuple[float, str]:
    if gamma is not None:
        return float(gamma), "given"
    config = Path(policy) / "config.yaml" if isinstance(policy, str | Path) else None
    if config is not None and config.is_file():
        import yaml

        value = (yaml.safe_load(config.read_text()) or {}).get("gamma")
        if value is not None:
            return float(value), f"the run's, from {config}"
    raise ConfigError(
        "no discount for the value: the policy's run has no gamma in its config.yaml",
        "pass gamma (e.g. --gamma 0.99, or 1.0 for the undiscounted return)",
    )


def _behavior_log_probs(dataset: Dataset, needed: bool, seed: int, notes: list[str]) -> tuple[np.ndarray, str]:
    if not needed:
        return np.zeros(dataset.num_steps), "not needed (critic-based estimators only)"
    if dataset.behavior_log_probs is not None:
        return np.asarray(dataset.behavior_log_probs, np.float64), "recorded in the dataset"
    from policylab.ope.behavior import estimate_behavior_log_probs

    notes.append(
        "the dataset has no behaviour log-probs: they were estimated by behaviour cloning on the dataset itself, "
        "so the importance-sampling estimates inherit that model's error (collect datasets with policylab "
        "collect to record them)"
    )
    return estimate_behavior_log_probs(dataset, seed=seed), "estimated by behaviour cloning (see the note)"


def _fqe_note(cfg: FQEConfig) -> str:
    return (
        f"dm / fqe and the critic of dr / wdr: fitted Q evaluation, {cfg.steps} steps of batch {cfg.batch_size}, "
        f"hidden {list(cfg.hidden_sizes)}"
    )


def _weight_notes(data: Trajectories, clip: float | None, target: TargetPolicy, notes: list[str]) -> None:
    from policylab.ope.bootstrap import kish_ess
    from policylab.ope.estimators import log_weights

    ess = kish_ess(log_weights(data, clip)[:, -1])
    if ess >= 0.05 * data.n_episodes:
        return
    head = f"the trajectory weights' effective sample size is {ess:.1f} of {data.n_episodes} episodes"
    if target.deterministic:
        notes.append(
            f"{head}: the policy ({type(target.net).__name__}) is greedy at epsilon 0, a deterministic policy that "
            "gives probability 0 to every logged action but its own, so (almost) no episode keeps any weight and "
            "the importance-sampling estimates (is, pdis, wis, wpdis, and the corrections of dr / wdr) mean little; "
            "pass epsilon (e.g. --epsilon 0.1) to evaluate its epsilon-greedy version, or rely on the model-based "
            "fqe / dm estimate"
        )
    elif ess < NEAR_ZERO_ESS:
        notes.append(
            f"{head}: no episode keeps any weight (the policy gives probability 0 to some logged action in every "
            "episode), so the importance-sampling estimates (is, pdis, wis, wpdis, and the corrections of dr / wdr) "
            "mean nothing; rely on the model-based fqe / dm estimate, or use data whose behaviour covers the policy"
        )
    else:
        notes.append(
            f"{head}: IS / WIS rest on a few episodes (per-decision and weighted estimators, clip, or a closer "
            "behaviour policy help)"
        )


def _discounted_returns(data: Trajectories, gamma: float) -> np.ndarray:
    return data.rewards @ (gamma ** np.arange(data.horizon))


def write_json(payload: dict[str, Any], path: str | Path) -> Path:
    """`payload` as JSON (an OPE report's `to_json()`, a selection), written beside and renamed into place."""
    from policylab.checkpoint import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2, default=float))
    return path


def online_value(
    policy: str | Path | Policy,
    dataset: Dataset,
    gamma: float,
    *,
    episodes: int = 100,
    epsilon: float = 0.0,
    sigma: float | None = None,
    seed: int = 0,
) -> float:
    """The Monte-Carlo value (mean discounted return over `episodes`) of the distribution OPE evaluates
    (policies.TargetPolicy: the policy's own, epsilon-greedy, or Gaussian around a deterministic action), run in
    the env the dataset was collected in: the true value that `select_policies` compares estimates with."""
    from policylab.collect import collect

    loaded = policy if isinstance(policy, Policy) else load(policy)
    if dataset.env_id is None:
        raise ConfigError(
            f"{dataset.name} does not record the env it came from", "pass true values (--true FILE) instead"
        )
    target = TargetPolicy(loaded, epsilon, sigma)
    discrete = target.discrete
    greedy = target.greedy or target.deterministic_actor
    act = loaded if greedy else (lambda obs: loaded.act(obs, deterministic=False))
    noise = epsilon if discrete else (sigma or 0.0) if greedy else 0.0
    rollouts = collect(dataset.env_id, act, episodes, noise=noise, seed=seed, env_kwargs=dataset.env_kwargs,
                       ref_min_score=0.0, ref_max_score=1.0)  # fmt: skip
    returns = pad_episodes(np.asarray(rollouts.episode_lengths, np.int64), rollouts.rewards)[0]
    return float((returns @ (gamma ** np.arange(returns.shape[1]))).mean())


def online_episodes(text: str) -> int:
    """The episode count of `true_values` "online" (100) or "online:EPISODES", or a ConfigError naming the fix."""
    head, colon, count = text.partition(":")
    try:
        episodes = int(count) if colon else 100
    except ValueError:
        episodes = 0
    if head != "online" or episodes < 1:
        raise ConfigError(
            f"true values {text!r}: a string means online values, written online or online:EPISODES",
            "pass e.g. online:100 (--true online:100), or a {run directory: value} mapping (--true FILE.json)",
        )
    return episodes


def select_policies(
    dataset: str | Path | Dataset,
    policies: list[str | Path] | list[Policy],
    *,
    names: list[str] | None = None,
    estimator: str = "wdr",
    top_k: int = 3,
    true_values: dict[str, float] | str | None = None,
    **options: Any,
) -> tuple[Selection, dict[str, OPEReport]]:
    """Rank candidate policies (run directories or Policy objects, called by `names`, default their paths) by one
    estimator on one dataset, each evaluated with the same options of `evaluate_policy`; `true_values` (name ->
    value, the same discounted quantity), or "online" / "online:EPISODES" (each candidate run in the dataset's env:
    `online_value`, 100 episodes by default), adds the top-k metrics."""
    if not policies:
        raise ConfigError("no candidate policies", "pass run directories, e.g. --policies runs/iql-* runs/cql-*")
    if options.get("bootstrap") == 0:
        raise ConfigError(
            "selection needs intervals (the pessimistic choice is the highest CI low): bootstrap 0 gives none",
            "pass at least 2 bootstrap resamples, e.g. bootstrap=1000 (--bootstrap 1000, the default)",
        )
    episodes = online_episodes(true_values) if isinstance(true_values, str) else 0  # checked before any work
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    names = names or [str(p) for p in policies]
    if len(set(names)) != len(policies):
        raise ConfigError("candidate names must be distinct, one per policy", "pass names=[...] of the same length")
    reports = {n: evaluate_policy(data, p, [estimator], **options) for n, p in zip(names, policies)}
    results = [report.results[estimator] for report in reports.values()]
    true = None
    if isinstance(true_values, str):
        gamma = next(iter(reports.values())).gamma
        keep = {k: options[k] for k in ("epsilon", "sigma", "seed") if k in options}
        true_values = {n: online_value(p, data, gamma, episodes=episodes, **keep) for n, p in zip(names, policies)}
    if true_values is not None:
        missing = [n for n in names if n not in true_values]
        if missing:
            raise ConfigError(f"no true value for {', '.join(missing)}", "give one for every candidate, or none")
        true = np.array([float(true_values[n]) for n in names])
    selection = Selection(
        names=names,
        estimates=np.array([r.value for r in results]),
        ci_low=np.array([r.ci_low for r in results]),
        ci_high=np.array([r.ci_high for r in results]),
        k=min(top_k, len(names)),
        estimator=estimator,
        true=true,
        behavior_value=next(iter(reports.values())).behavior_value,
    )
    return selection, reports
