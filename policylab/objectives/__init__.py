"""Objectives: pure functions, tensors in, (loss, metrics) out. Nothing here knows about envs or networks.

The off-policy targets (DQN, TD3, SAC, TQC) are in `policylab.objectives.q_targets`."""

from policylab.objectives.advantages import gae, mc_returns
from policylab.objectives.aggregation import aggregate
from policylab.objectives.policy import entropy_bonus, pg_surrogate, pg_surrogate_grad
from policylab.objectives.registry import ADVANTAGES, AGGREGATIONS
from policylab.objectives.value import value_loss, value_loss_grad

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "aggregate",
    "entropy_bonus",
    "gae",
    "mc_returns",
    "pg_surrogate",
    "pg_surrogate_grad",
    "value_loss",
    "value_loss_grad",
]
