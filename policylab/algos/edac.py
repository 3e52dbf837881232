"""SAC-N and EDAC (An et al. 2021, arXiv:2110.01548): offline SAC made pessimistic by a large Q-ensemble. The
minimum over N critics is low where they disagree, which is away from the dataset's actions; EDAC adds a term
that makes the members' action gradients point in different directions, so that a smaller N suffices.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n), in the EDAC paper's order:
    a~, log pi(a~|s) = pi(s)                                               (reparameterized)
    alpha step on -log_alpha (log pi(a~|s) + target_entropy)               (Temperature)
    actor step on mean(alpha log pi(a~|s) - min_k Q_k(s, a~))              (N critics, frozen; alpha after its step)
    y = r + d (1 - done) (min_k Q'_k(s', a') - alpha log pi(a'|s')),  a' ~ pi(s')   (objectives.sac_target)
    critic step on sum_k mean (Q_k(s, a) - y)^2 + eta ES(s, a)      (EDAC; SAC-N: eta = 0; no 1/2, as CORL)
        ES = mean_B 1/(N-1) sum_{i != j} cos(grad_a Q_i(s, a), grad_a Q_j(s, a))
                                                      (objectives.offline.ensemble_gradient_similarity)
    Q' <- (1 - tau) Q' + tau Q
The N critics are one StackedMLP. For ES, each member gets its own copy of the actions: one forward gives Q_k(s, a)
for the TD loss too, and one autograd.grad call of sum_k Q_k gives every grad_a Q_k (create_graph: ES is then
differentiated w.r.t. the critics' weights). With one action dimension every cosine is +-1 and ES has no gradient
(almost everywhere): EDAC is SAC-N there (e.g. on Pendulum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.offpolicy import OfflineConfig, box_bounds, obs_dim
from policylab.algos.sac import SAC, SACConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, StackedMLP, TanhGaussianActor
from policylab.objectives.offline import ensemble_gradient_similarity
from policylab.objectives.q_targets import sac_target

LOG_STD_BOUNDS = (-5.0, 2.0)
"""The actor's log-std clip of the EDAC paper (and CORL), not SAC's (-20, 2)."""


def edac_init(body: StackedMLP, output_bound: float) -> None:
    """The EDAC paper's initialization, which CORL uses for SAC-N, EDAC and ReBRAC: PyTorch's default weights,
    hidden biases 0.1, output weights and biases U(-b, b) (b = 1e-3 for actors, 3e-3 for critics)."""
    with torch.no_grad():
        for bias in list(body.biases)[:-1]:
            bias.fill_(0.1)
        body.weights[-1].uniform_(-output_bound, output_bound)
        body.biases[-1].uniform_(-output_bound, output_bound)


@dataclass
class SACNConfig(OfflineConfig, SACConfig):
    """SAC-N with CORL's defaults (TrainConfig of algorithms/offline/sac_n.py): N = 10 critics, three hidden layers
    of 256, lr 3e-4 (actor, critics and temperature), batch 256, tau 5e-3, gamma 0.99, automatic temperature
    from alpha = 1, observations not normalized; the actor's log-std clipped to [-5, 2] and the EDAC paper's
    init, as CORL. CORL trains 3M gradient steps; its D4RL configs use N = 10 (halfcheetah), 20 (walker2d) and
    200 to 500 (hopper)."""

    n_critics: int = 10
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    normalize_obs: bool = False
    eta: float = 0.0
    """Weight of EDAC's ensemble-gradient-similarity term in the critic loss (0: SAC-N)."""

    def validate(self) -> None:
        super().validate()
        if self.eta < 0:
            raise ConfigError(f"eta={self.eta} must be >= 0", "set eta to e.g. 1 (EDAC) or 0 (SAC-N)")
        if self.eta > 0 and self.n_critics < 2:
            raise ConfigError(
                f"EDAC's gradient-similarity term needs two critics or more, not n_critics={self.n_critics}",
                "set n_critics to e.g. 10",
            )


@dataclass
class EDACConfig(SACNConfig):
    """EDAC with CORL's defaults (TrainConfig of algorithms/offline/edac.py): SAC-N's, with eta = 1 and N = 10.
    CORL's D4RL configs change eta to 5 for halfcheetah- and walker2d-medium-expert and N to 50 for hopper."""

    eta: float = 1.0


class SACN(SAC):
    name = "sac_n"
    config_cls = SACNConfig
    cfg: SACNConfig

    def __init__(self, cfg: SACNConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = False
        edac_init(self.net.body, 1e-3)
        edac_init(self.critic.body, 3e-3)
        self.critic_target.update(1.0)

    @staticmethod
    def build_policy(cfg: SACConfig, obs_space: gym.Space, act_space: gym.Space) -> TanhGaussianActor:
        low, high = box_bounds(act_space, "sac_n/edac", cfg)
        return TanhGaussianActor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation, LOG_STD_BOUNDS)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        metrics = self.actor_step(batch.obs) if index % cfg.actor_delay == 0 else {}
        alpha = self.temperature.log_alpha.detach().exp()
        with torch.no_grad():
            next_actions, next_logp = self.net.sample(batch.next_obs, self.generator)
            next_q = self.critic_target(batch.next_obs, next_actions)
            target = sac_target(batch.rewards, batch.discounts, batch.terminated, next_q, next_logp, alpha)
        q, similarity = self.critic_values(batch.obs, batch.actions)
        td = q - target
        weights = batch.get("weights")
        td_loss = (td * td if weights is None else weights * td * td).mean(-1).sum()
        self.critic_opt.step(td_loss if similarity is None else td_loss + cfg.eta * similarity)
        if index % cfg.target_update_interval == 0:
            self.critic_target.update(cfg.tau)
        metrics.update(critic_loss=td_loss.detach(), q=q.detach().mean(), alpha=alpha[0])
        if similarity is not None:
            metrics["gradient_similarity"] = similarity.detach()
        if cfg.prioritized:
            metrics["td_error"] = td.detach().abs().mean(0)
        return metrics

    def actor_step(self, obs: Tensor) -> dict[str, Tensor]:
        """The temperature's step, then the actor's with the new temperature (the EDAC paper's order)."""
        actions, logp = self.net.sample(obs, self.generator)
        self.temperature.update(logp + self.temperature.target_entropy)
        alpha = self.temperature.log_alpha.detach().exp()
        self.critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
        q_pi = self.critic(obs, actions)
        self.critic.requires_grad_(True)
        actor_loss = (alpha * logp - q_pi.min(0).values).mean()
        self.actor_opt.step(actor_loss)
        return {
            "actor_loss": actor_loss.detach(),
            "entropy": -logp.detach().mean(),
            "q_std": q_pi.detach().std(0).mean(),
        }

    def critic_values(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor | None]:
        """Q_k(s, a) [K, B] and, with eta > 0, ES of the members' action gradients (None for SAC-N)."""
        if self.cfg.eta == 0:
            return self.critic(obs, actions), None
        q, action_grads = member_action_gradients(self.critic, obs, actions, create_graph=True)
        return q, ensemble_gradient_similarity(action_grads)


def member_action_gradients(
    critic: ContinuousCritic, obs: Tensor, actions: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """Q_k(s, a) [K, B] and grad_a Q_k(s, a) [K, B, A] of every member, from one forward and one autograd call:
    each member gets its own copy of the actions, so the gradient of sum_k Q_k w.r.t. copy k is member k's."""
    k = critic.body.members
    per_member = actions.detach().flatten(1).expand(k, -1, -1).clone().requires_grad_(True)
    q = critic.body(torch.cat([obs.flatten(1).expand(k, -1, -1), per_member], -1))[..., 0]
    (action_grads,) = torch.autograd.grad(q.sum(), per_member, create_graph=create_graph)
    return q, action_grads
