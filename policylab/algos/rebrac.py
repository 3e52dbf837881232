"""ReBRAC: revisited behaviour-regularized actor-critic (Tarasov et al. 2023, arXiv:2305.09836). TD3+BC with a
behaviour-cloning penalty in the critic's target too, LayerNorm critics, deeper networks and large batches.

for each gradient step on a dataset batch (s, a, r, s', a'_data, done, d = gamma^n), a'_data the dataset's next
action (ReplayBuffer's `next_actions`):
    a' = clip(mu'(s') + clip(N(0, target_noise), -c, c), -1, 1)                 (TD3's target smoothing)
    y = r + d (1 - done) (min_k Q'_k(s', a') - critic_bc_coef sum_a (a' - a'_data)^2)  (objectives.offline)
    critic step on sum_k mean (Q_k(s, a) - y)^2                                  (LayerNorm critics)
    every policy_delay steps:
        actor step on mean [actor_bc_coef sum_a (mu(s) - a)^2 - lambda min_k Q_k(s, mu(s))]
            lambda = 1 / mean |min_k Q_k(s, mu(s))|, held constant (normalize_q)  (objectives.offline)
        mu' <- (1 - tau) mu' + tau mu;  Q' <- (1 - tau) Q' + tau Q

It is TD3 (td3.py) with the target and the actor loss replaced; the rest (acting, online exploration for
offline-to-online runs, checkpoints) is TD3's. At a truncated episode's last step a'_data is a stale value (see
ReplayBuffer's `with_next_actions`); CORL's D4RL loader drops those transitions instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
from torch import Tensor

from policylab.algos.edac import edac_init
from policylab.algos.offpolicy import OfflineConfig
from policylab.algos.td3 import TD3, TD3Config
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.offline import rebrac_actor_loss, rebrac_target
from policylab.optim import set_lr


@dataclass
class ReBRACConfig(OfflineConfig, TD3Config):
    """ReBRAC with CORL's defaults (`Config` of algorithms/offline/rebrac.py): lr 1e-3 (actor and critics), three
    hidden layers of 256, batch 1024, LayerNorm in the critics (not the actor), policy_delay 2, target noise 0.2
    clipped at 0.5, tau 5e-3, gamma 0.99, normalize_q, observations not normalized (CORL's normalize_states
    false), actor_bc_coef = critic_bc_coef = 1.0 (CORL's placeholders: every CORL dataset config sets its own,
    which the dataset presets apply, `presets.DATASET_PRESETS`); CORL trains 1M gradient steps. Networks are
    initialized as CORL does (the EDAC paper's init). One difference: policylab's LayerNorm comes before each
    hidden activation, CORL's after."""

    lr: float = 1e-3
    actor_lr: float | None = None
    """The actor's learning rate (None: `lr`, which is the critics'); CORL's AntMaze configs use 3e-4 with
    critics at 5e-5."""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    batch_size: int = 1024
    critic_layer_norm: bool = True
    actor_bc_coef: float = 1.0
    """Weight of sum_a (mu(s) - a)^2 in the actor loss (the paper's beta_1)."""
    critic_bc_coef: float = 1.0
    """Weight of sum_a (a' - a'_data)^2 subtracted from the next state's value in the target (beta_2)."""
    normalize_q: bool = True
    """Divide the actor's Q term by mean |Q| (held constant), as TD3+BC does."""
    normalize_obs: bool = False

    def validate(self) -> None:
        super().validate()
        if self.actor_bc_coef < 0 or self.critic_bc_coef < 0:
            raise ConfigError(
                f"actor_bc_coef={self.actor_bc_coef} and critic_bc_coef={self.critic_bc_coef} must be >= 0",
                "set them to e.g. 0.01 (CORL's hopper-medium values)",
            )
        if self.bc_alpha:
            raise ConfigError("bc_alpha is TD3+BC's weight; ReBRAC's are actor_bc_coef and critic_bc_coef", "drop it")
        if self.actor_lr is not None and self.actor_lr <= 0:
            raise ConfigError(f"actor_lr={self.actor_lr} must be > 0", "set actor_lr to e.g. 3e-4 (or drop it)")


class ReBRAC(TD3):
    name = "rebrac"
    config_cls = ReBRACConfig
    cfg: ReBRACConfig
    needs_next_actions = True
    """The loop's replay buffers put the dataset's next actions in every batch."""

    def __init__(self, cfg: ReBRACConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = False  # the hand-derived TD3 step has no BC terms (and no LayerNorm)
        edac_init(self.net.body, 1e-3)
        edac_init(self.critic.body, 3e-3)
        self.actor_target.update(1.0)
        self.critic_target.update(1.0)
        if cfg.actor_lr is not None:
            set_lr(self.actor_opt.optimizer, cfg.actor_lr)

    def td_target(self, batch: Batch) -> Tensor:
        next_actions = self.smoothed_next_actions(batch)
        next_q = self.critic_target(batch.next_obs, next_actions)
        return rebrac_target(
            batch.rewards,
            batch.discounts,
            batch.terminated,
            next_q,
            next_actions,
            batch.next_actions,
            self.cfg.critic_bc_coef,
        )

    def actor_loss(self, batch: Batch) -> Tensor:
        pi = self.net(batch.obs)
        q_pi = self.critic(batch.obs, pi)
        return rebrac_actor_loss(pi, batch.actions, q_pi, self.cfg.actor_bc_coef, self.cfg.normalize_q)
