"""Networks: stacked MLPs, action heads, actor-critics."""

from policylab.nets.actor_critic import ActorCritic
from policylab.nets.critics import (
    CategoricalActor,
    ContinuousCritic,
    DeterministicActor,
    DiscreteBCActor,
    GaussianActor,
    QNetwork,
    TanhGaussianActor,
)
from policylab.nets.heads import CategoricalHead, GaussianHead, MultiCategoricalHead, make_head
from policylab.nets.mlp import StackedMLP

__all__ = [
    "ActorCritic",
    "CategoricalActor",
    "CategoricalHead",
    "ContinuousCritic",
    "DeterministicActor",
    "DiscreteBCActor",
    "GaussianActor",
    "GaussianHead",
    "MultiCategoricalHead",
    "QNetwork",
    "StackedMLP",
    "TanhGaussianActor",
    "make_head",
]
