"""Networks: stacked MLPs, action heads, actor-critics."""

from policylab.nets.actor_critic import ActorCritic
from policylab.nets.heads import CategoricalHead, GaussianHead, MultiCategoricalHead, make_head
from policylab.nets.mlp import StackedMLP

__all__ = ["ActorCritic", "CategoricalHead", "GaussianHead", "MultiCategoricalHead", "StackedMLP", "make_head"]
