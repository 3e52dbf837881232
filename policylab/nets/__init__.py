"""Networks: stacked MLPs, action heads, actor-critics."""

from policylab.nets.actor_critic import ActorCritic
from policylab.nets.heads import CategoricalHead, GaussianHead, make_head
from policylab.nets.mlp import StackedMLP

__all__ = ["ActorCritic", "CategoricalHead", "GaussianHead", "StackedMLP", "make_head"]
