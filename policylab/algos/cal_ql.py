"""Cal-QL: calibrated conservative Q-learning (Nakamoto et al. 2023, arXiv:2303.05479), for offline pre-training
followed by online fine-tuning. CQL (cql.py) learns values far below the policy's true value; when fine-tuning
starts, the first online data "unlearns" that conservatism and the policy dips. Cal-QL keeps CQL's penalty but
stops it from pushing Q below the value of the dataset's (reference) policy, estimated by the Monte-Carlo
discounted return-to-go V_mu(s) of each stored transition (ReplayBuffer's `mc_returns`).

For each gradient step on a batch (s, a, r, s', done, d = gamma^n, V_mu(s)), CQL's step (see cql.py) with
    Q_k(s, a_j) -> max(Q_k(s, a_j), V_mu(s)) for the policy's samples a_j ~ pi(.|s), pi(.|s')   (not the uniform
    ones)                                                                 (objectives.offline.calibrated_values)
inside the penalty's logsumexp. Logged: `below_bound`, the share of the policy's sampled values below V_mu(s)
(before the max; CORL's bound rate).

Returns-to-go: a dataset's are computed when it is loaded; online episodes' when they end (until then a
transition has no bound, -inf). Nothing is added after an episode's last step, so at a truncation the bound
is the sum of the rewards seen (as CORL and the authors' code do: too high near the end of a truncated episode
whose rewards are negative, as Pendulum's); CORL's sparse-reward option (an episode
that never reached the goal gets r_min / (1 - gamma) everywhere, for AntMaze) is not implemented. CORL turns
the calibration off online and gives online transitions a return of 0; here it stays on, with the online
episodes' own returns (the authors' code computes those too). CORL's 50/50 mixing of dataset and online
batches is `offline_ratio=0.5` with `online_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.cql import CQL, CQLConfig
from policylab.data import Batch
from policylab.objectives.offline import calibrated_values


@dataclass
class CalQLConfig(CQLConfig):
    """Cal-QL with CORL's values for the dense-reward (Adroit) tasks, configs/finetune/cal_ql/*/cloned_v1.yaml:
    cql_alpha 1, 10 samples per proposal, actor lr 1e-4, critic lr 3e-4, no entropy term in the TD target,
    batch 256, gamma 0.99, tau 5e-3 (their AntMaze configs: cql_alpha 5 with the Lagrangian form, gap 0.8).
    CORL also takes the maximum over 10 target actions in the TD target and clips the penalty at -200; neither
    is done here."""

    cql_alpha: float = 1.0
    backup_entropy: bool = False


class CalQL(CQL):
    name = "cal_ql"
    config_cls = CalQLConfig
    cfg: CalQLConfig
    needs_mc_returns = True
    """The loop's replay buffers put each transition's discounted return-to-go in every batch."""

    def __init__(self, cfg: CalQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self._below_bound: Tensor | None = None

    def penalized_values(self, q_sampled: Tensor, batch: Batch) -> Tensor:
        uniform, policy = q_sampled.split([self.cfg.n_action_samples, 2 * self.cfg.n_action_samples], -1)
        bound = batch.mc_returns
        self._below_bound = (policy.detach() < bound.view(1, -1, 1)).float().mean()
        return torch.cat([uniform, calibrated_values(policy, bound)], -1)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        metrics = super().update(batch, index)
        assert self._below_bound is not None
        metrics["below_bound"] = self._below_bound
        return metrics
