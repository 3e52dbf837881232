"""PQN (Gallici et al. 2024, "Simplifying Deep Temporal Difference Learning", arXiv:2407.04811): Q-learning from
parallel envs without a replay buffer or a target network, LayerNorm keeping the TD updates stable.

for each iteration:
    collect n_steps x num_envs transitions epsilon-greedily, storing max_a Q(s_t, a)   (the on-policy loop;
                                                            nets/epsilon_greedy.py)
    G_t = r_t + gamma ((1 - lambda) max_a Q(s_{t+1}, a) + lambda G_{t+1})     (Q(lambda) returns: GAE's recursion
                                                            on those values, so `gae_lambda` is lambda; bootstrapped
                                                            at time limits and where the rollout ends)
    epochs x minibatches of (Q(s_t, a_t) - G_t)^2, RAdam, the global gradient norm clipped
    epsilon <- linear from eps_start to eps_final over exploration_fraction of the run (once per rollout)

Defaults follow CleanRL's pqn.py (4 envs of 128 steps, 4 epochs of 4 minibatches, lr 2.5e-4 annealed, lambda 0.65,
epsilon 1 -> 0.05 over half the run, gradient norm 10, [120, 84] ReLU layers with LayerNorm, orthogonal weights
of gain sqrt(2)). CleanRL lowers epsilon every vector step; here it changes between rollouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.dqn import epsilon
from policylab.algos.offpolicy import discrete_actions, obs_dim
from policylab.algos.onpolicy import OnPolicyConfig, annealed, rollout_advantages
from policylab.config import check_unit_interval, positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.epsilon_greedy import EpsilonGreedyQNetwork
from policylab.optim import ParameterBuffer, RAdam, set_lr


@dataclass
class PQNConfig(OnPolicyConfig):
    """PQN. Defaults follow CleanRL's pqn.py."""

    num_envs: int = 4
    n_steps: int = 128
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gae_lambda: float = 0.65
    """Q(lambda)'s lambda."""
    max_grad_norm: float | None = 10.0
    hidden_sizes: list[int] = field(default_factory=lambda: [120, 84])
    activation: str = "relu"
    layer_norm: bool = True
    """LayerNorm before each hidden activation: what lets PQN drop the target network."""
    batch_size: int = 128
    """Minibatch size; a rollout of n_steps * num_envs is split into minibatches of this size."""
    epochs: int = 4
    exploration_fraction: float = 0.5
    eps_start: float = 1.0
    eps_final: float = 0.05

    def validate(self) -> None:
        super().validate()
        positive(self, "epochs")
        rollout = self.n_steps * self.num_envs
        if not 0 < self.batch_size <= rollout:
            raise ConfigError(
                f"batch_size={self.batch_size} must be in 1..n_steps*num_envs={rollout}",
                f"set batch_size to a divisor of {rollout}, e.g. {min(rollout, 128)}",
            )
        if not 0.0 <= self.exploration_fraction <= 1.0:
            raise ConfigError(
                f"exploration_fraction={self.exploration_fraction} is outside [0, 1]",
                "set exploration_fraction to e.g. 0.5",
            )
        check_unit_interval(self, "eps_start", "eps_final")
        rejected = [key for key in ("dataset", "recurrent", "shared_net", "use_sde") if getattr(self, key, None)]
        if rejected:
            raise ConfigError(
                f"pqn does not take {', '.join(rejected)}: it learns a Q-network from its own epsilon-greedy "
                "rollouts, with no policy head, imitation term or memory",
                f"drop {', '.join(rejected)}, or use ppo for them (dqn learns from a dataset)",
            )


class PQN:
    name = "pqn"
    config_cls = PQNConfig

    def __init__(self, cfg: PQNConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.params = ParameterBuffer(self.net.parameters())
        self.optimizer = RAdam([self.params.flat], lr=cfg.lr)
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.imitation = None
        """Part of the on-policy interface; PQN has no imitation term (its config rejects a dataset)."""

    @staticmethod
    def build_policy(cfg: PQNConfig, obs_space: gym.Space, act_space: gym.Space) -> EpsilonGreedyQNetwork:
        net = EpsilonGreedyQNetwork(
            obs_dim(obs_space), discrete_actions(act_space, "pqn", cfg), cfg.hidden_sizes, cfg.activation,
            cfg.layer_norm, epsilon(cfg, 0.0), cfg.eps_final,
        )  # fmt: skip
        if cfg.ortho_init:
            net.body.orthogonal_init([math.sqrt(2)])
        return net

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        """Epochs of minibatch regressions onto the rollout's Q(lambda) returns; then the next rollout's epsilon."""
        cfg = self.cfg
        set_lr(self.optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        _, returns = rollout_advantages(rollout, "gae", cfg)
        obs, actions, targets = rollout.obs.flatten(0, 1), rollout.actions.flatten(0, 1), returns.flatten()
        n = len(targets)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=self.generator, device=targets.device)
            for start in range(0, n, cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                loss, q_taken, grad_norm = self.step(obs[rows], actions[rows], targets[rows])
        self.net.epsilon.fill_(epsilon(cfg, progress))
        return {
            "td_loss": loss.detach(),
            "q_values": q_taken.detach().mean(),
            "grad_norm": grad_norm,
            "epsilon": self.net.epsilon.clone(),
        }

    def step(self, obs: Tensor, actions: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One RAdam step on mean (Q(s, a) - G)^2; returns (the loss, Q(s, a), the gradient norm before clipping)."""
        self.params.zero_grad()
        q_taken = self.net.values_of(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)
        loss = torch.nn.functional.mse_loss(q_taken, targets)
        loss.backward()
        if self.cfg.max_grad_norm is None:
            grad_norm = torch.linalg.vector_norm(self.params.grad)
        else:
            grad_norm = self.params.clip_grad_norm_(self.cfg.max_grad_norm)
        self.optimizer.step()
        return loss, q_taken, grad_norm
