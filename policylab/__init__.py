"""policylab: learn policies from any kind of experience.

import policylab as pl
run = pl.train("ppo", env="CartPole-v1", steps=100_000, seed=1)
policy = pl.load(run.dir)
action = policy.act(obs, deterministic=True)
"""

from policylab.errors import PolicylabError
from policylab.policy import Policy, evaluate, load
from policylab.train import IterationInfo, Run, train

__version__ = "0.1.0"

__all__ = ["IterationInfo", "Policy", "PolicylabError", "Run", "__version__", "evaluate", "load", "train"]
