"""Off-policy evaluation: estimate a policy's value from episodes logged by another policy.

    from policylab.ope import Trajectories, estimate, pad_episodes

    rewards, behavior_lp, target_lp, mask = pad_episodes(dataset.episode_lengths, r, mu_lp, pi_lp)
    data = Trajectories(rewards, behavior_lp, target_lp, mask)
    results = estimate(["pdis", "wpdis"], data, gamma=0.99)   # name -> OPEResult (value, std_error, CI, ESS)

See ``policylab.ope.estimators`` for the estimators, their conventions and the action spaces they suit.
"""

from policylab.ope.bootstrap import OPEResult, bootstrap_estimates, estimate, kish_ess
from policylab.ope.estimators import (
    ESTIMATORS,
    NEEDS_CRITIC,
    Contributions,
    Trajectories,
    dm,
    dr,
    get_estimator,
    is_,
    log_ratios,
    log_weights,
    pad_episodes,
    pdis,
    step_weights,
    wdr,
    wis,
    wpdis,
)
from policylab.ope.evaluate import OPEReport, evaluate_policy, select_policies
from policylab.ope.fqe import FittedQ, FQEConfig, fit_fqe
from policylab.ope.policies import TargetPolicy, target_policy
from policylab.ope.selection import Selection, nmse, rank_correlation, regret_at_k, sharpe_ratio_at_k, top_k

__all__ = [
    "ESTIMATORS",
    "FQEConfig",
    "FittedQ",
    "OPEReport",
    "Selection",
    "TargetPolicy",
    "evaluate_policy",
    "fit_fqe",
    "nmse",
    "rank_correlation",
    "regret_at_k",
    "select_policies",
    "sharpe_ratio_at_k",
    "target_policy",
    "top_k",
    "NEEDS_CRITIC",
    "Contributions",
    "OPEResult",
    "Trajectories",
    "bootstrap_estimates",
    "dm",
    "dr",
    "estimate",
    "get_estimator",
    "is_",
    "kish_ess",
    "log_ratios",
    "log_weights",
    "pad_episodes",
    "pdis",
    "step_weights",
    "wdr",
    "wis",
    "wpdis",
]
