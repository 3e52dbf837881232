"""PRDC: policy regularization with dataset constraint (Ran et al. 2023, arXiv:2306.06569). TD3+BC whose
behaviour-cloning target is not the batch's own action but, for each state, the action of the dataset point
nearest to (beta s, mu(s)): the policy is pulled towards the closest action the data shows in a similar state,
a milder constraint than imitating the action taken at exactly that state.

once, before training: a k-d tree over the dataset's points (beta s_i, a_i)     (normalized s, a in [-1, 1])
for each gradient step on a dataset batch (s, a, r, s', done, d = gamma^n), TD3's step (td3.py) with the actor loss
    -lambda mean Q_1(s, mu(s)) + mean (mu(s) - a_nn)^2,  lambda = bc_alpha / mean |Q_1(s, mu(s))| (held constant)
    a_nn = a_j,  j = argmin_i |(beta s, mu(s)) - (beta s_i, a_i)|_2                   (no gradient through j)

Defaults are the paper's and its authors' code's (alpha 2.5, beta 2, one neighbour; TD3+BC's lr 3e-4, [256, 256],
policy_delay 2, target noise 0.2 clipped at 0.5, observations normalized with the dataset's statistics). Their
code searches in env action units; here actions are in [-1, 1] (the same for the D4RL tasks, whose bounds are 1).

Nearest neighbours: scipy's cKDTree, built once (about 1 s for 1M points of 23 dims on this machine). A query of 256
keys took 90-280 ms on 1M random-walk points of 14-23 dims (2 cores), about 10x less than an exact chunked
torch search (2.2-2.5 s); on the small test datasets (4k points) about 1 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.algos.offpolicy import OfflineConfig
from policylab.algos.td3 import TD3, TD3Config
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.offline import td3_bc_lambda


@dataclass
class PRDCConfig(OfflineConfig, TD3Config):
    """PRDC with its paper's and code's values (see the module docstring)."""

    lr: float = 3e-4
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    bc_alpha: float = 2.5
    """alpha: the Q term's scale, alpha / mean |Q| (as TD3+BC's)."""
    dc_beta: float = 2.0
    """beta: the weight of the state in the nearest-neighbour distance, |(beta s, a) - (beta s_i, a_i)|."""

    def validate(self) -> None:
        super().validate()
        if not (0 < self.bc_alpha < math.inf and 0 < self.dc_beta < math.inf):  # dc_beta scales the k-d tree's keys
            raise ConfigError(
                f"bc_alpha={self.bc_alpha} and dc_beta={self.dc_beta} must be finite and > 0",
                "set bc_alpha to e.g. 2.5 and dc_beta to 2",
            )


class NearestActions:
    """The dataset's points (beta s_i, a_i) in a k-d tree, built once: `__call__(s, a)` gives, per row, the
    action a_j of the point nearest (L2) to (beta s, a)."""

    def __init__(self, obs: Tensor, actions: Tensor, beta: float) -> None:
        from scipy.spatial import cKDTree  # scipy takes about a second to import: only PRDC needs it

        self.beta = beta
        self.actions = actions
        self.tree = cKDTree(self._keys(obs, actions))

    def _keys(self, obs: Tensor, actions: Tensor) -> np.ndarray:
        return torch.cat([self.beta * obs.flatten(1), actions.flatten(1)], -1).detach().cpu().double().numpy()

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        # a diverged actor's NaN actions are looked up as zeros: the NaN loss then stops the run as a divergence
        # (the loop's check, naming the last good checkpoint), not as scipy's error about non-finite queries
        _, index = self.tree.query(np.nan_to_num(self._keys(obs, actions), nan=0.0, posinf=0.0, neginf=0.0))
        return self.actions.index_select(0, torch.as_tensor(index, device=self.actions.device))


class PRDC(TD3):
    name = "prdc"
    config_cls = PRDCConfig
    cfg: PRDCConfig

    def __init__(self, cfg: PRDCConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = False  # the hand-derived TD3 step has no BC term
        self.nearest: NearestActions | None = None

    def attach_dataset(self, obs: Tensor, actions: Tensor) -> None:
        """The whole dataset's (normalized) observations and actions; the loop calls this once."""
        device = self.cfg.device
        self.nearest = NearestActions(obs.to(device), actions.to(device).flatten(1), self.cfg.dc_beta)

    def actor_loss(self, batch: Batch) -> Tensor:
        if self.nearest is None:
            raise ConfigError(
                "PRDC has no dataset to search: its actor loss needs the dataset's points",
                "train it with a dataset (pl.train('prdc', dataset=...)), or call attach_dataset(obs, actions)",
            )
        pi = self.net(batch.obs)
        q_pi = self.critic(batch.obs, pi, members=1)
        target = self.nearest(batch.obs, pi)
        return -td3_bc_lambda(q_pi, self.cfg.bc_alpha) * q_pi.mean() + (pi - target).pow(2).mean()
