"""Data: the Batch schema and experience storage."""

from policylab.data.batch import Batch
from policylab.data.replay import ReplayBuffer
from policylab.data.rollout import RolloutBuffer

__all__ = ["Batch", "ReplayBuffer", "RolloutBuffer"]
