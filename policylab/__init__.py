"""policylab: learn policies from any kind of experience.

import policylab as pl
run = pl.train("ppo", env="CartPole-v1", steps=100_000, seed=1)
policy = pl.load(run.dir)
action = policy.act(obs, deterministic=True)
"""

from policylab.collect import collect, collect_from_buffer
from policylab.data.dataset import Dataset, load_dataset
from policylab.errors import PolicylabError
from policylab.policy import Policy, evaluate, load
from policylab.train import IterationInfo, Run, train

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "IterationInfo",
    "Policy",
    "PolicylabError",
    "Run",
    "__version__",
    "collect",
    "collect_from_buffer",
    "evaluate",
    "load",
    "load_dataset",
    "train",
]
