"""Environments: vectorized envs, episode statistics, normalization."""

from policylab.envs.bitflip import register as _register_bitflip
from policylab.envs.navigation import register as _register_navigation
from policylab.envs.normalize import ObsNormalizer, RewardScaler, RunningMeanStd
from policylab.envs.stats import EpisodeTracker
from policylab.envs.vec import StepResult, VecEnv, make_single_env, make_vec_env, resolve_env_id

_register_bitflip()
_register_navigation()

__all__ = [
    "EpisodeTracker",
    "ObsNormalizer",
    "RewardScaler",
    "RunningMeanStd",
    "StepResult",
    "VecEnv",
    "make_single_env",
    "make_vec_env",
    "resolve_env_id",
]
