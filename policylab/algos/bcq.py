"""BCQ: batch-constrained Q-learning (Fujimoto et al. 2019, arXiv:1812.02900, Box actions; discrete BCQ: Fujimoto
et al. 2019, arXiv:1910.01708), and PLAS, whose policy acts in the same behaviour VAE's latent space. Their policies
only take actions a model of the dataset's behaviour finds likely (nets/support.py), so the critics are never asked
about actions the data does not cover.

Box actions, for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    VAE step on mean [ mean_A (D(s, z) - a)^2 + vae_kl_weight KL(q(z|s,a) || N(0, I)) ],  z ~ q(z|s,a)
    a'_i = xi'(s', D(s', z_i)), i = 1..N,  z_i ~ N(0, I) clipped to +-latent_clip      (xi': the target perturbation)
    y = r + d (1 - done) max_i [ lam min_k Q'_k(s', a'_i) + (1 - lam) max_k Q'_k(s', a'_i) ]
    critic step on sum_k mean (Q_k(s, a) - y)^2
    every policy_delay steps: perturbation step on -mean Q_1(s, xi(s, D(s, z))),  z ~ N(0, I) clipped (D fixed)
    xi' <- (1 - tau) xi' + tau xi;  Q' <- (1 - tau) Q' + tau Q
act: the best of N perturbed VAE draws by Q_1 (nets/support.py: PerturbedVAEActor)

PLAS (Zhou et al. 2020, arXiv:2011.07213), Box actions: a deterministic policy in the VAE's latent space,
pi(s) = D(s, max_latent tanh(f(s))) (PLAS+P, with `perturbation` > 0: then moved by xi as BCQ's draws):
    the first vae_steps gradient steps: the VAE step alone; then, the VAE frozen:
    y = r + d (1 - done) [ lam min_k Q'_k(s', pi'(s')) + (1 - lam) max_k Q'_k(s', pi'(s')) ]   (pi': target f, xi)
    critic step on sum_k mean (Q_k(s, a) - y)^2
    every policy_delay steps: actor step (f, and xi) on -mean Q_1(s, pi(s)) through the frozen decoder;
    f' <- (1 - tau) f' + tau f;  Q' <- (1 - tau) Q' + tau Q
act: pi(s) (nets/support.py: LatentPolicyActor); online, plus Gaussian noise of std action_noise

Discrete actions, DQN (dqn.py) with a behaviour classifier G(a|s) on the Q-network's features:
    allowed(s) = {a : G(a|s) / max_a' G(a'|s) > threshold}
    y = r + d (1 - done) Q'(s', argmax over allowed(s') of Q(s', a'))
    step on mean huber(Q(s, a) - y) + cross-entropy(G(.|s), a) + imitation_beta mean logits^2
act: argmax over allowed(s) of Q(s, a) (epsilon-greedy online; nets/support.py: ImitationFilteredQNetwork)

Defaults are the authors' (github.com/sfujim/BCQ): Box: [400, 300] actor and critics, a [750, 750] VAE with latent
2 dim(A), lr 1e-3 everywhere, batch 100, tau 0.005, lam 0.75, phi 0.05, N 10 (d3rlpy's default N is 100 and its
networks [256, 256]: `benchmarks/offline.py` sets those on both sides). Discrete: threshold 0.3, lr 3e-4,
imitation_beta 0.01 (the authors' Atari values, lr 6.25e-5, batch 32 and hard target copies every 8k steps, which
are also d3rlpy's defaults, are `--set` options). PLAS: max_latent 2, actor and VAE lr 1e-4, critics 1e-3, 500k
VAE steps (capped at half the run), [400, 300] actor and critics, a [750, 750] VAE, as the authors' code.
D(s, z) ends in tanh, as the authors' decoders (d3rlpy's returns the unsquashed layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.algos.behaviour_vae import BehaviourVAEConfig, vae_loss
from policylab.algos.cql import OfflineDQNConfig
from policylab.algos.dqn import DQN, DQNConfig
from policylab.algos.fused_offpolicy import (
    fused_bcq_discrete_update,
    fused_dqn_applies,
    fused_plas_applies,
    fused_plas_update,
)
from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    TargetNetwork,
    box_bounds,
    discrete_actions,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
)
from policylab.algos.td3 import TD3Config
from policylab.config import algorithm_of, check_unit_interval, positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic
from policylab.nets.cnn import make_encoder
from policylab.nets.support import (
    ImitationFilteredQNetwork,
    LatentPolicyActor,
    Perturbation,
    PerturbedVAEActor,
    filtered_greedy,
)
from policylab.objectives.offline import discrete_imitation_loss
from policylab.objectives.q_targets import allowed_only, bootstrap, soft_clipped_double_q


@dataclass
class SupportConstrainedConfig(OfflineConfig, TD3Config, BehaviourVAEConfig):
    """What BCQ and PLAS share: TD3's critics and actor schedule (`policy_delay`, d3rlpy's update_actor_interval),
    a behaviour VAE, and the soft clipped double-Q target. TD3's `target_noise` and `bc_alpha` do not apply."""

    lr: float = 1e-3
    hidden_sizes: list[int] = field(default_factory=lambda: [400, 300])
    batch_size: int = 100
    policy_delay: int = 1
    target_noise: float = 0.0
    bcq_lambda: float = 0.75
    """The weight of the min over the critics in the target (1 - lambda on the max)."""
    perturbation: float = 0.05
    """phi: how far (in [-1, 1] action units) the perturbation network may move a decoded action (d3rlpy's
    action_flexibility)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "actor_lr")
        self.validate_vae()
        check_unit_interval(self, "bcq_lambda")
        if not 0 <= self.perturbation <= 2:
            raise ConfigError(
                f"perturbation={self.perturbation} must be in [0, 2] (action units of [-1, 1])",
                "set perturbation to e.g. 0.05",
            )
        if self.bc_alpha or self.target_noise:
            raise ConfigError(
                f"bc_alpha={self.bc_alpha} and target_noise={self.target_noise} are TD3's; {algorithm_of(self)}'s "
                "targets come from its VAE's actions",
                "drop bc_alpha and target_noise",
            )


@dataclass
class BCQConfig(SupportConstrainedConfig):
    """BCQ for Box actions with the authors' values (module docstring)."""

    actor_lr: float = 1e-3
    """The perturbation network's learning rate (`lr` is the critics')."""
    candidates: int = 10
    """N: VAE draws per state, in the target and when acting (d3rlpy's n_action_samples)."""
    latent_clip: float = 0.5
    """VAE draws use latents z ~ N(0, I) clipped to +-latent_clip."""

    def validate(self) -> None:
        super().validate()
        positive(self, "candidates", "latent_clip")
        if self.perturbation == 0:
            raise ConfigError("perturbation=0 leaves BCQ's actor nothing to learn", "set perturbation to e.g. 0.05")


@dataclass
class PLASConfig(SupportConstrainedConfig):
    """PLAS with the authors' and d3rlpy's values (module docstring); `perturbation` > 0 is PLAS+P."""

    actor_lr: float = 1e-4
    """The latent policy's (and perturbation network's) learning rate (`lr` is the critics')."""
    vae_lr: float = 1e-4
    perturbation: float = 0.0
    max_latent: float = 2.0
    """The latent policy's output is max_latent tanh(f(s)): the latents the VAE's prior makes likely."""
    vae_steps: int | None = None
    """Gradient steps of VAE training at the start of the run (part of `steps`); the VAE is frozen after them.
    None: d3rlpy's 500k, or half of `steps` if that is less."""

    @property
    def vae_pretraining_steps(self) -> int:
        return min(500_000, self.steps // 2) if self.vae_steps is None else self.vae_steps

    def validate(self) -> None:
        super().validate()
        positive(self, "max_latent")
        if not 0 <= self.vae_pretraining_steps < self.steps:
            raise ConfigError(
                f"vae_steps={self.vae_steps} must be >= 0 and below steps={self.steps} (they are part of the run)",
                "set vae_steps to e.g. half of steps",
            )


class SupportConstrainedActing:
    """The online side (after an offline phase) of BCQ, PLAS and BEAR: uniform random actions in [-1, 1], actions
    scaled to the env's bounds, nothing after a step; exploring by the acting network's own rule (BCQ's VAE draws,
    BEAR's best of its policy's draws; PLAS adds noise instead)."""

    net: Any
    cfg: Any
    act_dim: int
    generator: torch.Generator

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            return self.net.act(torch.as_tensor(obs, device=self.cfg.device), self.generator).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass


class BCQ(SupportConstrainedActing):
    name = "bcq"
    config_cls = BCQConfig

    def __init__(self, cfg: BCQConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = int(self.net.low.numel())
        self.vae, self.perturbation, self.critic = self.net.vae, self.net.perturbation, self.net.critic
        self.vae_opt = FlatAdam(self.vae, cfg.vae_lr, cfg.max_grad_norm)
        self.actor_opt = FlatAdam(self.perturbation, cfg.actor_lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.actor_target = TargetNetwork(self.perturbation, self.actor_opt.params)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.modules = {"actor_target": self.actor_target.module, "critic_target": self.critic_target.module}
        self.optimizers = {
            "actor": self.actor_opt.optimizer,
            "critic": self.critic_opt.optimizer,
            "vae": self.vae_opt.optimizer,
        }
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = False

    @staticmethod
    def build_policy(cfg: BCQConfig, obs_space: gym.Space, act_space: gym.Space) -> PerturbedVAEActor:
        low, high = box_bounds(act_space, "bcq", cfg)
        n_obs, n_act = obs_dim(obs_space), low.numel()
        vae = cfg.build_vae(n_obs, n_act, cfg.activation)
        perturbation = Perturbation(n_obs, n_act, cfg.perturbation, cfg.hidden_sizes, cfg.activation)
        critic = ContinuousCritic(n_obs, n_act, cfg.hidden_sizes, cfg.activation, cfg.n_critics, cfg.critic_layer_norm)
        return PerturbedVAEActor(vae, perturbation, critic, low, high, cfg.candidates, cfg.latent_clip)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        obs = batch.obs.flatten(1)
        vae_step_loss = vae_loss(self.vae, batch, cfg.vae_kl_weight, self.generator)
        self.vae_opt.step(vae_step_loss)
        with torch.no_grad():
            target = self.td_target(batch)
        td = self.critic(obs, batch.actions) - target  # [K, B]
        critic_loss = (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"vae_loss": vae_step_loss.detach(), "critic_loss": critic_loss.detach()}
        metrics["q"] = (td.detach() + target).mean()
        if (index + 1) % cfg.policy_delay == 0:
            with torch.no_grad():
                drawn = self.vae.sample(obs, self.generator, cfg.latent_clip)
            self.critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
            actor_loss = -self.critic(obs, self.perturbation(obs, drawn), members=1).mean()
            self.critic.requires_grad_(True)
            self.actor_opt.step(actor_loss)
            self.actor_target.update(cfg.tau)
            self.critic_target.update(cfg.tau)
            metrics["actor_loss"] = actor_loss.detach()
        return metrics

    def td_target(self, batch: Batch) -> Tensor:
        """y = r + d (1 - done) max_i [lam min_k + (1 - lam) max_k] Q'_k(s', a'_i) over N target proposals."""
        cfg = self.cfg
        repeated = batch.next_obs.flatten(1).repeat_interleave(cfg.candidates, 0)
        proposals = self.net.propose(repeated, self.generator, self.actor_target.module)
        next_value = soft_clipped_double_q(self.critic_target(repeated, proposals), cfg.bcq_lambda, cfg.candidates)
        return bootstrap(batch.rewards, batch.discounts, batch.terminated, next_value)


class PLAS(SupportConstrainedActing):
    """PLAS: the VAE alone for its first `vae_steps`, then, the VAE frozen, TD3's steps on the latent policy (and
    the perturbation network, PLAS+P) through the decoder, with BCQ's target (module docstring)."""

    name = "plas"
    config_cls = PLASConfig

    def __init__(self, cfg: PLASConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = int(self.net.low.numel())
        self.vae = self.net.vae
        self.actor = nn.ModuleDict({"latent": self.net.latent})  # what the actor step trains
        if self.net.perturbation is not None:
            self.actor["perturbation"] = self.net.perturbation
        self.critic = ContinuousCritic(obs_dim(obs_space), self.act_dim, cfg.hidden_sizes, cfg.activation,
                                       cfg.n_critics, cfg.critic_layer_norm).to(cfg.device)  # fmt: skip
        self.vae_opt = FlatAdam(self.vae, cfg.vae_lr, cfg.max_grad_norm)
        self.actor_opt = FlatAdam(self.actor, cfg.actor_lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.actor_target = TargetNetwork(self.actor, self.actor_opt.params)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.modules = {
            "critic": self.critic,
            "actor_target": self.actor_target.module,
            "critic_target": self.critic_target.module,
        }
        self.optimizers = {
            "actor": self.actor_opt.optimizer,
            "critic": self.critic_opt.optimizer,
            "vae": self.vae_opt.optimizer,
        }
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = fused_plas_applies(self)
        self._vae_frozen = False

    @staticmethod
    def build_policy(cfg: PLASConfig, obs_space: gym.Space, act_space: gym.Space) -> LatentPolicyActor:
        low, high = box_bounds(act_space, "plas", cfg)
        n_obs, n_act = obs_dim(obs_space), low.numel()
        perturbation = None
        if cfg.perturbation > 0:
            perturbation = Perturbation(n_obs, n_act, cfg.perturbation, cfg.hidden_sizes, cfg.activation)
        vae = cfg.build_vae(n_obs, n_act, cfg.activation)
        return LatentPolicyActor(n_obs, vae, low, high, cfg.hidden_sizes, cfg.activation, cfg.max_latent, perturbation)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        """Online (after the offline phase): the policy's action plus Gaussian noise of std action_noise."""
        with torch.inference_mode():
            actions = self.net(torch.as_tensor(obs, device=self.cfg.device))
            noise = torch.randn(actions.shape, generator=self.generator, device=actions.device)
            return (actions + self.cfg.action_noise * noise).clamp(-1.0, 1.0).cpu().numpy()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        vae_steps = cfg.vae_pretraining_steps
        if index < vae_steps:
            loss = vae_loss(self.vae, batch, cfg.vae_kl_weight, self.generator)
            self.vae_opt.step(loss)
            return {"vae_loss": loss.detach()}
        if not self._vae_frozen:
            self.vae.requires_grad_(False)
            self._vae_frozen = True
        if self.fused:
            return fused_plas_update(self, batch, index - vae_steps)
        return self.autograd_update(batch, index - vae_steps)

    def autograd_update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        """One step after the VAE's (`index` counts from its end)."""
        cfg = self.cfg
        obs = batch.obs.flatten(1)
        with torch.no_grad():
            target = self.td_target(batch)
        td = self.critic(obs, batch.actions) - target  # [K, B]
        critic_loss = (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        metrics = {"critic_loss": critic_loss.detach(), "q": (td.detach() + target).mean()}
        if (index + 1) % cfg.policy_delay == 0:
            self.critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
            actor_loss = -self.critic(obs, self.net(obs), members=1).mean()
            self.critic.requires_grad_(True)
            self.actor_opt.step(actor_loss)
            self.actor_target.update(cfg.tau)
            self.critic_target.update(cfg.tau)
            metrics["actor_loss"] = actor_loss.detach()
        return metrics

    def td_target(self, batch: Batch) -> Tensor:
        """y = r + d (1 - done) [lam min_k + (1 - lam) max_k] Q'_k(s', pi'(s')), pi' the target latent policy
        (and perturbation) through the frozen decoder."""
        target = cast(nn.ModuleDict, self.actor_target.module)
        next_obs = batch.next_obs.flatten(1)
        perturbation = target["perturbation"] if "perturbation" in target else None
        next_actions = self.net.act_with(next_obs, target["latent"], perturbation)
        next_value = soft_clipped_double_q(self.critic_target(next_obs, next_actions), self.cfg.bcq_lambda, 1)
        return bootstrap(batch.rewards, batch.discounts, batch.terminated, next_value)


@dataclass
class DiscreteBCQConfig(OfflineDQNConfig):
    """Discrete BCQ on DQN (module docstring). Double-DQN-style targets are part of the method (`double_q` is
    not read); `dueling` and image encoders apply."""

    threshold: float = 0.3
    """Actions whose behaviour probability is within this factor of the likeliest one's are allowed (tau in the
    paper; d3rlpy's action_flexibility). 0: every action (DQN); 1: only the likeliest (behaviour cloning)."""
    imitation_beta: float = 0.01
    """Weight of the classifier's mean squared logit (the authors' 0.01; d3rlpy's beta 0.5)."""

    def validate(self) -> None:
        super().validate()
        check_unit_interval(self, "threshold")
        if self.imitation_beta < 0:
            raise ConfigError(f"imitation_beta={self.imitation_beta} must be >= 0", "set imitation_beta to e.g. 0.01")


class DiscreteBCQ(DQN):
    name = "bcq_discrete"
    config_cls = DiscreteBCQConfig
    cfg: DiscreteBCQConfig
    net: ImitationFilteredQNetwork

    def __init__(self, cfg: DiscreteBCQConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = fused_dqn_applies(self)  # DQN's conditions; the step is its own

    @staticmethod
    def build_policy(cfg: DQNConfig, obs_space: gym.Space, act_space: gym.Space) -> ImitationFilteredQNetwork:
        assert isinstance(cfg, DiscreteBCQConfig)
        n_actions = discrete_actions(act_space, "bcq_discrete", cfg)
        encoder = make_encoder(cfg.encoder, obs_space)
        features = obs_dim(obs_space) if encoder is None else encoder.features
        return ImitationFilteredQNetwork(
            features, n_actions, cfg.hidden_sizes, cfg.activation, cfg.dueling, encoder=encoder,
            sample_epsilon=cfg.eps_final, threshold=cfg.threshold,
        )  # fmt: skip

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_bcq_discrete_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        cfg, net = self.cfg, self.net
        n = len(batch)
        q_both, logits_both = net.values_and_logits(torch.cat([batch.obs, batch.next_obs]))
        q_all, logits = q_both[0, :n], logits_both[:n]
        with torch.no_grad():
            mask = batch.get("next_action_mask")  # action masks: the allowed actions at s'
            bias = None if mask is None else allowed_only(torch.zeros_like(logits), mask)
            next_actions = filtered_greedy(q_both[0, n:], logits_both[n:], cfg.threshold, bias)
            next_value = self.q_target(batch.next_obs)[0].gather(1, next_actions.unsqueeze(1)).squeeze(1)
            target = bootstrap(batch.rewards, batch.discounts, batch.terminated, next_value)
        q = q_all.gather(1, batch.actions.long().unsqueeze(1)).squeeze(1)
        td_loss = (F.smooth_l1_loss if cfg.loss == "huber" else F.mse_loss)(q, target)
        imitation_loss = discrete_imitation_loss(logits, batch.actions, cfg.imitation_beta)
        self.q_opt.step(td_loss + imitation_loss)
        return {"loss": td_loss.detach(), "imitation_loss": imitation_loss.detach(), "q": q.detach().mean()}
