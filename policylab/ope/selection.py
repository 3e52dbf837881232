"""Choosing which policy to deploy from OPE estimates, and how good that choice is: the risk-return view of
off-policy evaluation (Kiyohara et al. 2023, SCOPE-RL), plus the usual accuracy metrics.

With the estimates V_hat of K candidate policies and, when known, their true values V (from online
evaluations), for the top-k candidates by V_hat:

    best@k, worst@k, mean@k   max / min / mean of V over the top-k
    std@k                     standard deviation of V over the top-k (ddof 0)
    SharpeRatio@k             (best@k - V_behaviour) / std@k: the return of deploying the top-k over the
                              behaviour policy per unit of the risk taken (nan for k = 1 or equal values)
    regret@k                  max V - best@k
    nMSE                      mean (V_hat - V)^2 / (max V - min V)^2 (scale-free; nan if all V are equal)
    rank correlation          Spearman's rho between V_hat and V

Without true values only the ranking by V_hat (and by its lower confidence bound, the pessimistic choice) is
given. The metrics are pure functions of arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policylab.errors import ConfigError


def top_k(estimates: npt.ArrayLike, k: int) -> np.ndarray:
    """Indices of the k largest estimates, best first (ties: the earlier candidate first)."""
    values = np.asarray(estimates, dtype=np.float64)
    if not 1 <= k <= len(values):
        raise ConfigError(f"top-k={k} with {len(values)} candidates", f"choose k between 1 and {len(values)}")
    return np.argsort(-values, kind="stable")[:k]


def sharpe_ratio_at_k(estimates: npt.ArrayLike, true: npt.ArrayLike, k: int, behavior_value: float) -> float:
    chosen = np.asarray(true, dtype=np.float64)[top_k(estimates, k)]
    std = float(chosen.std())
    return float((chosen.max() - behavior_value) / std) if std > 0 else float("nan")


def regret_at_k(estimates: npt.ArrayLike, true: npt.ArrayLike, k: int) -> float:
    values = np.asarray(true, dtype=np.float64)
    return float(values.max() - values[top_k(estimates, k)].max())


def nmse(estimates: npt.ArrayLike, true: npt.ArrayLike) -> float:
    values, guesses = np.asarray(true, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    span = float(values.max() - values.min())
    return float(((guesses - values) ** 2).mean() / span**2) if span > 0 else float("nan")


def rank_correlation(estimates: npt.ArrayLike, true: npt.ArrayLike) -> float:
    from scipy.stats import spearmanr  # scipy.stats takes 0.4 s to import: only when asked

    return float(spearmanr(np.asarray(estimates, np.float64), np.asarray(true, np.float64)).statistic)


@dataclass
class Selection:
    """The ranking of candidates by one estimator, with the metrics of the top-k."""

    names: list[str]
    estimates: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    k: int
    estimator: str
    true: np.ndarray | None = None
    behavior_value: float | None = None

    @property
    def ranking(self) -> list[int]:
        return top_k(self.estimates, len(self.names)).tolist()

    @property
    def pessimistic_choice(self) -> int:
        """The candidate with the highest lower confidence bound."""
        return int(top_k(self.ci_low, 1)[0])

    def metrics(self) -> dict[str, float]:
        """The top-k metrics that true values allow (empty without them)."""
        if self.true is None:
            return {}
        chosen = self.true[top_k(self.estimates, self.k)]
        out = {
            f"best@{self.k}": float(chosen.max()),
            f"worst@{self.k}": float(chosen.min()),
            f"mean@{self.k}": float(chosen.mean()),
            f"std@{self.k}": float(chosen.std()),
            f"regret@{self.k}": regret_at_k(self.estimates, self.true, self.k),
            "nmse": nmse(self.estimates, self.true),
            "rank_correlation": rank_correlation(self.estimates, self.true) if len(self.true) > 1 else float("nan"),
        }
        if self.behavior_value is not None:
            out[f"sharpe_ratio@{self.k}"] = sharpe_ratio_at_k(self.estimates, self.true, self.k, self.behavior_value)
        return out

    def format(self) -> str:
        lines = [f"ranking by {self.estimator} (top {self.k} marked *):"]
        header = f"   {'policy':<40}{'estimate':>11}{'CI low':>11}{'CI high':>11}"
        lines.append(header + (f"{'true':>11}" if self.true is not None else ""))
        chosen = set(top_k(self.estimates, self.k).tolist())
        for i in self.ranking:
            mark = "*" if i in chosen else " "
            row = f" {mark} {self.names[i]:<40}{self.estimates[i]:11.3f}{self.ci_low[i]:11.3f}{self.ci_high[i]:11.3f}"
            lines.append(row + (f"{self.true[i]:11.3f}" if self.true is not None else ""))
        lines.append(f"pessimistic choice (highest CI low): {self.names[self.pessimistic_choice]}")
        lines.extend(f"{name}: {value:.4g}" for name, value in self.metrics().items())
        return "\n".join(lines)
