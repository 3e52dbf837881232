"""What DPPO and FPO share: on-policy PPO-style training of a generative actor (nets/generative_ac.py) with an MLP
critic. The config, the network (optionally initialized from a behaviour-cloned generative policy), Adam with the
actor's and the critic's learning rates, and the epochs of minibatches; each algorithm supplies its policy loss,
which goes through the one surrogate (objectives.pg_surrogate).

for epoch in 1..epochs, for each minibatch of the flattened rollout:
    L = policy_loss(minibatch)                          (DPPO: over the denoising chain; FPO: flow-matching ratio)
        + vf_coef (V(s) - R)^2
    one Adam step (actor lr, critic lr), gradient norms clipped per network
    stop the epochs early once the approximate KL exceeds target_kl
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.algos.generative_heads import GenerativeHeadConfig, generative_head
from policylab.algos.onpolicy import OnPolicyConfig, annealed, mean_metrics, normalize, rollout_advantages
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.cnn import check_vector_observations
from policylab.nets.generative_ac import GenerativeActorCritic, check_bounded_box
from policylab.objectives import value_loss

PolicyLoss = Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]
"""minibatch -> (policy loss, detached metrics with approx_kl)."""


GAUSSIAN_ACTOR_OPTIONS = (
    "use_sde",
    "sde_sample_freq",
    "log_std_init",
    "squash_actions",
    "ent_coef",
    "shared_net",
    "ortho_init",
)
"""OnPolicyConfig fields that only the Gaussian / categorical actor-critic reads: a generative run refuses other
values than their defaults instead of ignoring them."""
GAUSSIAN_DEFAULTS = {f.name: f.default for f in fields(OnPolicyConfig) if f.name in GAUSSIAN_ACTOR_OPTIONS}


@dataclass
class GenerativePGConfig(OnPolicyConfig, GenerativeHeadConfig):
    """Shared by DPPO and FPO: the head's fields are BC's (algos/generative_heads.py), so a BC run's head loads as
    `pretrained` when they match; `hidden_sizes` / `activation` are the critic's."""

    kind: ClassVar[str] = "diffusion"
    """The head: diffusion (DPPO) or flow (FPO)."""

    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    n_steps: int = 256
    lr: float = 1e-4
    """The actor's learning rate."""
    critic_lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 10
    clip_eps: float = 0.2
    target_kl: float | None = None
    """Stop an update's epochs once the approximate KL of a minibatch exceeds this (None: never)."""
    max_grad_norm: float | None = 1.0
    """Clip the actor's and the critic's gradient norms, each on its own (None: no clipping)."""
    pretrained: str | None = None
    """A run directory of `policylab train bc --set head=...` whose generative head starts the actor (and whose
    observation normalization, if any, this run keeps frozen)."""

    def validate(self) -> None:
        if self.bc_steps:
            raise ConfigError(
                f"bc_steps={self.bc_steps} clones a dataset into the Gaussian or categorical actor-critic of ppo, a2c "
                "or reinforce; a generative policy is cloned by its own run",
                "run policylab train bc --dataset D --set head=diffusion, and pass it as --set pretrained=RUN_DIR",
            )
        super().validate()
        self.validate_head(self.kind)
        if self.dataset is not None:
            raise ConfigError(
                "this generative on-policy algorithm takes no dataset as an imitation term",
                "clone the dataset first (policylab train bc --dataset D --set head=diffusion) and pass the run "
                "as --set pretrained=RUN_DIR",
            )
        if self.recurrent:
            raise ConfigError("generative policies have no recurrent version", "drop --set recurrent=true")
        ignored = [
            f"{key}={getattr(self, key)}"
            for key in GAUSSIAN_ACTOR_OPTIONS
            if getattr(self, key) != GAUSSIAN_DEFAULTS[key]
        ]
        if ignored:  # options that come with the on-policy config but shape a Gaussian or categorical actor-critic
            raise ConfigError(
                f"{', '.join(ignored)}: {'this option is' if len(ignored) == 1 else 'these options are'} for the "
                "Gaussian actor-critic of ppo, a2c, reinforce and trpo; a generative policy explores through its own "
                "sampling noise and has its own actor and critic",
                f"drop {' '.join(f'--set {item}' for item in ignored)} (or train ppo with it)",
            )
        rollout = self.n_steps * self.num_envs
        if not 0 < self.batch_size <= rollout:
            raise ConfigError(
                f"batch_size={self.batch_size} must be in 1..n_steps*num_envs={rollout}",
                f"set batch_size to a divisor of {rollout}",
            )
        if self.epochs <= 0 or self.clip_eps <= 0 or self.critic_lr <= 0:
            raise ConfigError(
                f"epochs={self.epochs}, clip_eps={self.clip_eps}, critic_lr={self.critic_lr} must all be > 0",
                "set them to e.g. 10, 0.2, 1e-3",
            )


def build_generative_actor_critic(
    cfg: GenerativePGConfig, obs_space: gym.Space, act_space: gym.Space, kind: str, algo: str, min_std: float = 0.1
) -> GenerativeActorCritic:
    """A generative actor of `kind` (diffusion: chains are stored; flow: actions) with the config's MLP critic."""
    check_vector_observations(obs_space)  # the actor and critic are MLPs over the flattened observation
    box = check_bounded_box(act_space, algo)
    head = generative_head(cfg, kind, int(np.prod(obs_space.shape or ())), int(np.prod(box.shape)))
    return GenerativeActorCritic(obs_space, box, head, cfg.hidden_sizes, cfg.activation, cfg.ddim_eta, min_std)


class GenerativePGAlgo:
    """The construction DPPO and FPO share: the network of the subclass's `build_policy` (its head kind), its
    learner (optimizer, RNG, the pretrained BC run's weights and frozen observation statistics)."""

    def __init__(self, cfg: GenerativePGConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.learner = GenerativePGLearner(self.net, cfg)
        self.optimizer, self.generator = self.learner.optimizer, self.learner.generator
        self.pretrained_obs_norm = self.learner.pretrained_obs_norm
        self.imitation = None

    @staticmethod
    def build_policy(cfg: Any, obs_space: gym.Space, act_space: gym.Space) -> GenerativeActorCritic:
        raise NotImplementedError


class GenerativePGLearner:
    """The network's optimizer and RNG, and the epochs of minibatch steps of an update."""

    def __init__(self, net: GenerativeActorCritic, cfg: GenerativePGConfig) -> None:
        self.net, self.cfg = net, cfg
        self.pretrained_obs_norm = load_pretrained(net, cfg.pretrained, cfg) if cfg.pretrained else None
        self.actor_params = list(net.actor.parameters())
        self.critic_params = list(net.critic.parameters())
        self.optimizer = torch.optim.Adam(
            [{"params": self.actor_params, "lr": cfg.lr}, {"params": self.critic_params, "lr": cfg.critic_lr}],
            eps=1e-5,
        )
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    def advantages(self, rollout: Batch) -> tuple[Tensor, Tensor]:
        return rollout_advantages(rollout, "gae", self.cfg)

    def minibatches(self, data: Batch) -> Iterator[Batch]:
        order = torch.randperm(len(data), generator=self.generator, device=data.obs.device)
        for start in range(0, len(data), self.cfg.batch_size):
            yield data.select(order[start : start + self.cfg.batch_size])

    def update(self, data: Batch, policy_loss: PolicyLoss, progress: float) -> dict[str, Tensor]:
        """Epochs of minibatch steps on the flattened rollout `data` (obs, actions, logp, advantages, returns,
        values); the advantages are normalized per minibatch if the config says so."""
        cfg = self.cfg
        for group, base in zip(self.optimizer.param_groups, (cfg.lr, cfg.critic_lr), strict=True):
            group["lr"] = annealed(base, progress, cfg.anneal_lr)
        history: dict[str, list[Tensor]] = defaultdict(list)
        for epoch in range(cfg.epochs):
            for mb in self.minibatches(data):
                if cfg.normalize_advantage and len(mb) > 1:
                    mb.advantages = normalize(mb.advantages)
                pg_loss, stats = policy_loss(mb)
                if cfg.target_kl is not None and stats["approx_kl"].item() > cfg.target_kl:
                    history["early_stop_epoch"].append(torch.tensor(float(epoch)))
                    return self._metrics(history)
                v_loss = value_loss(self.net.values(mb.obs), mb.returns)
                self.optimizer.zero_grad(set_to_none=True)
                (pg_loss + cfg.vf_coef * v_loss).backward()
                if cfg.max_grad_norm is not None:
                    for params in (self.actor_params, self.critic_params):
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
                self.optimizer.step()
                if epoch == cfg.epochs - 1:
                    history["policy_loss"].append(pg_loss.detach())
                    history["value_loss"].append(v_loss.detach())
                    for key, value in stats.items():
                        history[key].append(value)
        return self._metrics(history)

    def _metrics(self, history: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        metrics = mean_metrics(history)
        metrics["lr"] = torch.tensor(self.optimizer.param_groups[0]["lr"])
        return metrics


def load_pretrained(net: GenerativeActorCritic, run_dir: str, cfg: Any = None) -> dict[str, Tensor] | None:
    """Load a BC run's generative head into `net` (its head kind, env and head settings checked against `cfg`);
    returns its observation-normalization statistics (or None)."""
    from policylab.checkpoint import load_checkpoint
    from policylab.policy import load

    policy = load(run_dir)
    net.load_pretrained(policy.net.state_dict(), load_checkpoint(run_dir)[1].get("config"), cfg, run_dir)
    if policy.obs_normalizer is None:
        return None
    return {k: torch.as_tensor(v) for k, v in policy.obs_normalizer.rms.state().items()}


def flat_rollout(rollout: Batch, advantages: Tensor, returns: Tensor) -> Batch:
    """The rollout's steps as rows (obs, stored actions, log-probs, values, advantages, returns)."""
    return Batch(
        obs=rollout.obs,
        actions=rollout.actions,
        logp=rollout.logp,
        values=rollout.values,
        advantages=advantages,
        returns=returns,
    ).flatten()
