"""Point estimates with percentile-bootstrap intervals over episodes, and the ESS diagnostic.

All estimators of one ``estimate`` call see the same resamples (common random numbers), drawn as [B, n]
index matrices in chunks and turned into per-episode draw counts, so a resample's estimate is a matrix
product: the self-normalized estimators re-normalize inside every resample (their ratio is recomputed),
which is where this differs from SCOPE-RL's bootstrap, which resamples trajectory values normalized once
on the whole data set (``scope_rl/utils.py``, ``estimate_confidence_interval_by_bootstrap``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import overload

import numpy as np
import numpy.typing as npt

from policylab.errors import ConfigError
from policylab.ope.estimators import (
    NORMALIZER_EPS,
    Contributions,
    FloatArray,
    Trajectories,
    get_estimator,
    log_weights,
)

CHUNK_ELEMENTS = 1 << 24
"""Resamples are drawn this many episode indices at a time (a 64 MB float32 count matrix): each chunk reads the
episodes' columns once, so larger chunks cost less memory traffic per resample."""


@dataclass(frozen=True)
class OPEResult:
    """One estimator's estimate of the discounted value sum_t gamma^t r_t of the evaluation policy.

    ``std_error`` is the standard deviation of the bootstrap estimates, ``ci_low`` / ``ci_high`` their
    alpha/2 and 1 - alpha/2 percentiles (all NaN when ``bootstrap == 0``). ``ess`` is Kish's effective sample
    size of the (clipped) trajectory weights, (sum w)^2 / sum w^2: n when pi == mu, near 1 when one episode
    carries the whole IS estimate.
    """

    estimator: str
    value: float
    std_error: float
    ci_low: float
    ci_high: float
    n_episodes: int
    ess: float
    gamma: float
    alpha: float
    bootstrap: int
    clip: float | None


def kish_ess(log_weights: npt.ArrayLike) -> float:
    """(sum w)^2 / sum w^2 of w = exp(log_weights), computed after scaling by max(w) so it cannot overflow."""
    logs = np.asarray(log_weights, dtype=np.float64)
    top = logs.max()
    if top == -np.inf:
        return 0.0
    w = np.exp(logs - top)
    return float(w.sum() ** 2 / (w**2).sum())


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> Iterator[npt.NDArray[np.float32]]:
    """[b, n] matrices of how often each of n episodes is drawn in each resample, b <= CHUNK_ELEMENTS // n
    (float32: the counts are small integers, exact in it). Each resample's draws are made and counted on their
    own (the same numbers as drawing the chunk at once): n draws and a count vector of n entries stay in cache,
    where b * n would not (at n = 1e6, 7.9 ms per resample against 9.5 alone, `benchmarks/small_ops.py`, and
    more inside a whole bootstrap, whose other arrays compete for the cache: `benchmarks/ope.py`)."""
    chunk = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        counts = np.empty((b, n), np.float32)
        for row in range(b):
            counts[row] = np.bincount(rng.integers(0, n, size=n), minlength=n)
        yield counts


def bootstrap_estimates(
    contributions: Sequence[Contributions], n_resamples: int, seed: int | None = 0
) -> npt.NDArray[np.float64]:
    """[len(contributions), n_resamples] estimates on the same resamples of episodes."""
    n = len(contributions[0].plain)
    rng = np.random.default_rng(seed)
    # every estimator's per-episode columns side by side: one product with each chunk of counts serves them all;
    # in float32 (a resample's estimate needs far less precision than the point estimate, which stays float64),
    # each column centred on its mean first so that the float32 sums lose nothing to a large offset
    widths = [1 + 2 * c.num.shape[1] for c in contributions]
    edges = np.cumsum([0, *widths])
    columns = np.empty((n, int(edges[-1])), np.float32)
    for c, lo in zip(contributions, edges[:-1]):
        columns[:, lo] = c.plain
        columns[:, lo + 1 : lo + 1 + c.num.shape[1]] = c.num
        columns[:, lo + 1 + c.num.shape[1] : lo + 1 + 2 * c.num.shape[1]] = c.den
    centre = columns.mean(axis=0, dtype=np.float64)
    columns -= centre.astype(np.float32)
    chunks = []
    for counts in resample_counts(n, n_resamples, rng):
        means = (counts @ columns).astype(np.float64) / counts.sum(axis=1, keepdims=True) + centre  # [b, columns]
        chunks.append(np.stack([_estimate_of(means[:, lo:hi]) for lo, hi in zip(edges[:-1], edges[1:])]))
    return np.concatenate(chunks, axis=1)


def _estimate_of(means: FloatArray) -> FloatArray:
    """An estimate per resample from the resampled means of its columns [plain, num_1..K, den_1..K]."""
    k = (means.shape[1] - 1) // 2
    ratio = means[:, 1 : 1 + k] / (means[:, 1 + k :] + NORMALIZER_EPS)
    return means[:, 0] + ratio.sum(axis=1)


@overload
def estimate(
    names: str,
    data: Trajectories,
    *,
    gamma: float,
    clip: float | None = None,
    bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int | None = 0,
) -> OPEResult: ...


@overload
def estimate(
    names: list[str] | tuple[str, ...],
    data: Trajectories,
    *,
    gamma: float,
    clip: float | None = None,
    bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int | None = 0,
) -> dict[str, OPEResult]: ...


def estimate(
    names: str | Sequence[str],
    data: Trajectories,
    *,
    gamma: float,
    clip: float | None = None,
    bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int | None = 0,
) -> OPEResult | dict[str, OPEResult]:
    """Estimate the evaluation policy's value with one estimator (a name: one result) or several (a list of
    names: a dict name -> result, in the order given).

    ``gamma`` is the discount of the value being estimated (required: say which value you mean).
    ``bootstrap`` resamples of the episodes give the standard error and the (1 - alpha) percentile interval;
    0 skips them. ``seed`` fixes the resamples.
    """
    single = isinstance(names, str)
    wanted = list(dict.fromkeys([names] if isinstance(names, str) else names))
    if not wanted:
        raise ConfigError("no estimator named", "pass a name such as 'pdis' or a list such as ['wis', 'wdr']")
    _check_options(bootstrap, alpha)
    contributions = [get_estimator(name)(data, gamma=gamma, clip=clip) for name in wanted]
    values = [c.value() for c in contributions]
    if bootstrap:
        draws = bootstrap_estimates(contributions, bootstrap, seed)
        errors = draws.std(axis=1, ddof=1)
        lows, highs = np.quantile(draws, [alpha / 2, 1 - alpha / 2], axis=1)
    else:
        errors = lows = highs = np.full(len(wanted), np.nan)
    ess = kish_ess(log_weights(data, clip)[:, -1])
    results = {
        name: OPEResult(
            estimator=name,
            value=values[i],
            std_error=float(errors[i]),
            ci_low=float(lows[i]),
            ci_high=float(highs[i]),
            n_episodes=data.n_episodes,
            ess=ess,
            gamma=float(gamma),
            alpha=float(alpha),
            bootstrap=int(bootstrap),
            clip=clip,
        )
        for i, name in enumerate(wanted)
    }
    return results[wanted[0]] if single else results


def _check_options(bootstrap: int, alpha: float) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0 or bootstrap == 1:
        raise ConfigError(
            f"bootstrap must be 0 (no interval) or at least 2 resamples, got {bootstrap!r}", "e.g. bootstrap=1000"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (0.0 < alpha < 1.0):
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}", "alpha=0.05 gives a 95% interval")


__all__ = ["CHUNK_ELEMENTS", "OPEResult", "bootstrap_estimates", "estimate", "kish_ess", "resample_counts"]
