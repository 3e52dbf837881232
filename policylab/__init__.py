"""policylab: learn policies from any kind of experience.

import policylab as pl
run = pl.train("ppo", env="CartPole-v1", steps=100_000, seed=1)
policy = pl.load(run.dir)
action = policy.act(obs, deterministic=True)
pl.ope.estimate(...), pl.certify(run_dir, ...), pl.report(run_dirs, out)   # evaluation
pl.sweep("sac", env="Pendulum-v1", seeds="1-5", grid={"lr": [1e-4, 3e-4]})    # on Ray
"""

from policylab import ope  # pl.ope.estimate, pl.ope.evaluate_policy, ...
from policylab.certify import certify
from policylab.collect import collect, collect_from_buffer
from policylab.data.dataset import Dataset, load_dataset
from policylab.errors import PolicylabError
from policylab.policy import Policy, evaluate, load
from policylab.report import report  # the function: pl.report(runs, out)
from policylab.sweep import SweepResult, sweep
from policylab.train import IterationInfo, Run, train

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "IterationInfo",
    "Policy",
    "PolicylabError",
    "Run",
    "SweepResult",
    "__version__",
    "certify",
    "collect",
    "collect_from_buffer",
    "evaluate",
    "load",
    "load_dataset",
    "ope",
    "report",
    "sweep",
    "train",
]
