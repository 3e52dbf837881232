"""Diffusion-QL (Wang et al. 2023, arXiv:2208.06193), its EDP speed-up (Kang et al. 2023, arXiv:2305.20081) and the
consistency actor-critic (Ding & Jin 2024, arXiv:2309.16984): a generative actor trained by behaviour cloning plus
a Q-learning term, twin critics with TD3-style targets. Box actions.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    a' ~ mu_ema(.|s')  (max_q_backup: M draws, y uses max_j Q'_k(s', a'_j) per critic)
    y = r + d (1 - done) min_k Q'_k(s', a')
    critic step on sum_k mean (Q_k(s, a) - y)^2
    actor step on  L_bc + eta L_q,  critics frozen:
        diffusion (Diffusion-QL): L_bc = mean |eps_theta(s, x_t, t) - eps|^2,  t ~ U{0..T-1},  eps ~ N(0, I),
                                        x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps;
                                   a_pi = the whole K-step reverse chain from x_K ~ N(0, I), with gradients
        action_approx (EDP):       the same L_bc, and a_pi = clip((x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t))
                                   from the same noised dataset action: one denoiser call instead of K
        consistency (Consistency-AC): L_bc = the consistency-training loss, a_pi = f(s, sigma_max z) (one step)
        L_q = -mean Q_j(s, a_pi) / stopgrad(mean |Q_other(s, a_pi)|),  j in {1, 2} by a fair coin per step
    Q' <- (1 - tau) Q' + tau Q;  mu_ema <- (1 - ema) mu_ema + ema mu  (a copy until `ema_start` updates)
act: N = `candidates` draws from the trained actor mu, one chosen by Q' (nets/selection.py): softmax(Q') at
     temperature 1 as Diffusion-QL's and EDP's evaluation, or greedy; N = 1: the actor's own draw. Both released
     codes act with the trained actor; the EMA copy only draws the target's next actions.

The acting network `net` (CriticSelectedActor) holds the trained actor and Q': what `pl.load` needs; the EMA actor
and the online critics are checkpointed as `modules`.

Diffusion-QL's values for the D4RL locomotion tasks: T = 5 steps, eta 1, lr 3e-4, tau 0.005, EMA 0.995 every 5
steps from step 1000 (here a rate of 0.001 per step), batch 256, 50 candidates with softmax at evaluation.
Replaced: its 3 x 256 Mish MLPs by the [256, 256, 256] SiLU denoiser and [256, 256] ReLU critics, the "vp" beta
schedule by the cosine one, its learning-rate cosine decay by `anneal_lr` (off). EDP (`edp`) keeps T = 1000 training
steps (its point: training cost no longer grows with T) and acts by DDIM with 15 steps (EDP uses DPM-Solver).
Consistency-AC (`consistency_ac`) is this update with head=consistency (N = 40 levels, one-step sampling) and the
original consistency-training loss (`consistency_loss=ct`; BC's consistency head defaults to improved CT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.generative_heads import CandidateSelectionConfig, GenerativeHeadConfig, generative_head
from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    TargetNetwork,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
)
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic
from policylab.nets.diffusion import DiffusionHead
from policylab.nets.generative import GENERATIVE_HEADS, GenerativeActor
from policylab.nets.selection import CriticSelectedActor
from policylab.objectives.q_targets import td3_target


@dataclass
class DiffusionQLConfig(OfflineConfig, GenerativeHeadConfig, CandidateSelectionConfig):
    """Diffusion-QL with the paper's locomotion values (see the module docstring for what differs)."""

    head: str = "diffusion"
    """The actor's head: diffusion (Diffusion-QL, EDP), consistency (Consistency-AC) or flow."""
    diffusion_steps: int = 5
    """diffusion: DDPM's T (Diffusion-QL's 5); consistency: the grid's N."""
    ddim_eta: float = 1.0
    """diffusion: 1 with sample_steps = T is DDPM's ancestral sampler, as Diffusion-QL samples."""
    eta: float = 1.0
    """Weight of the Q term: actor loss = L_bc + eta * (-Q / mean |Q|)."""
    action_approx: bool = False
    """EDP's action approximation: the Q term at the one-step estimate of the action from a noised dataset action
    (one denoiser call) instead of the whole reverse chain (diffusion head only)."""
    n_critics: int = 2
    max_q_backup: bool = False
    """The target takes, per critic, the max over `backup_samples` next actions (Diffusion-QL's AntMaze option)."""
    backup_samples: int = 10
    actor_ema: float = 0.001
    """Rate of the EMA copy of the actor that draws the target's next actions (0: the actor itself)."""
    candidates: int = 50
    selection: str = "softmax"
    """How a candidate is chosen when exploring: softmax or greedy (no V here, so no expectile)."""
    eval_selection: str = "softmax"
    """How a candidate is chosen when evaluating: softmax (Diffusion-QL's) or greedy."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_critics")
        positive(self, "backup_samples")
        positive(self, "candidates")
        if self.head not in GENERATIVE_HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {', '.join(GENERATIVE_HEADS)}", "set head=diffusion")
        self.validate_head(self.head)
        if self.action_approx and self.head != "diffusion":
            raise ConfigError(f"action_approx (EDP) needs head=diffusion, not {self.head}", "drop action_approx")
        if self.eta < 0:
            raise ConfigError(f"eta={self.eta} must be >= 0", "set eta to e.g. 1.0 (0: plain BC)")
        self.validate_selection(("softmax", "greedy"))


@dataclass
class EDPConfig(DiffusionQLConfig):
    """EDP: Diffusion-QL with the action approximation, T = 1000, DDIM with 15 steps when acting."""

    action_approx: bool = True
    diffusion_steps: int = 1000
    sample_steps: int | None = 15
    ddim_eta: float = 0.0


@dataclass
class ConsistencyACConfig(DiffusionQLConfig):
    """Consistency actor-critic: Diffusion-QL's update on a consistency head (N = 40 levels, one-step sampling), trained
    by the original consistency-training loss (squared distance), whose gradient leaves room for the Q term."""

    head: str = "consistency"
    diffusion_steps: int = 40
    consistency_loss: str = "ct"


def one_step_action(
    head: DiffusionHead, obs: Tensor, actions: Tensor, noise: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """EDP's estimate of the action from one denoiser call, and the DDPM loss of the same call [B]:
    x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps,  a_hat = clip((x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t))."""
    abar = head.abar[t].unsqueeze(-1)
    x_t = abar.sqrt() * actions + (1.0 - abar).sqrt() * noise
    eps = head.eps(obs, x_t, t)
    a_hat = ((x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)
    return a_hat, (eps - noise).pow(2).mean(-1)


class DiffusionQL:
    name = "diffusion_ql"
    config_cls = DiffusionQLConfig

    def __init__(self, cfg: DiffusionQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.actor = cast(GenerativeActor, self.net.actor)
        self.critic: ContinuousCritic = self.net.critic
        self.act_dim = int(self.actor.act_dim)
        self.actor_opt = FlatAdam(self.actor, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.net.critic = cast(
            ContinuousCritic, self.critic_target.module
        )  # acting scores candidates with Q' (as Diffusion-QL)
        self.modules: dict[str, nn.Module] = {"critic": self.critic}
        self.actor_ema: TargetNetwork | None = None
        self.target_actor = self.actor  # draws the target's next actions: the EMA copy when there is one
        if cfg.actor_ema > 0:
            self.actor_ema = TargetNetwork(self.actor, self.actor_opt.params)
            self.target_actor = cast(GenerativeActor, self.actor_ema.module)
            self.modules["actor_ema"] = self.target_actor
        self.optimizers = {"actor": self.actor_opt.optimizer, "critic": self.critic_opt.optimizer}
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32

    @staticmethod
    def build_policy(cfg: DiffusionQLConfig, obs_space: gym.Space, act_space: gym.Space) -> CriticSelectedActor:
        low, high = box_bounds(act_space, "diffusion_ql", cfg)
        n_obs = obs_dim(obs_space)
        actor = GenerativeActor(generative_head(cfg, cfg.head, n_obs, low.numel()), low, high)
        critic = ContinuousCritic(n_obs, low.numel(), cfg.hidden_sizes, cfg.activation, cfg.n_critics)
        return CriticSelectedActor(actor, critic, None, cfg.candidates, cfg.selection, cfg.eval_selection,
                                   temperature=cfg.temperature)  # fmt: skip

    def random_actions(self, n: int) -> Any:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: Any, progress: float) -> Any:
        with torch.inference_mode():
            return self.net.act(torch.as_tensor(obs, device=self.cfg.device), self.generator).cpu().numpy()

    def to_env(self, actions: Any) -> Any:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        obs = batch.obs.flatten(1)
        with torch.no_grad():
            target = self.td_target(batch)
        td = self.critic(obs, batch.actions) - target  # [K, B]
        critic_loss = (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        self.critic.requires_grad_(False)  # the actor needs dQ/da, not critic weight gradients
        bc_loss, q_loss = self.actor_losses(obs, batch.actions)
        self.critic.requires_grad_(True)
        self.actor_opt.step(bc_loss + cfg.eta * q_loss)
        self.critic_target.update(cfg.tau)
        if self.actor_ema is not None:
            self.actor_ema.update(1.0 if index < cfg.ema_start else cfg.actor_ema)
        return {
            "critic_loss": critic_loss.detach(),
            "q": (td.detach() + target).mean(),
            "bc_loss": bc_loss.detach(),
            "q_loss": q_loss.detach(),
        }

    def td_target(self, batch: Batch) -> Tensor:
        """y = r + d (1 - done) min_k Q'_k(s', a'), a' from the acting (EMA) actor; max_q_backup: max over M draws."""
        next_obs = batch.next_obs.flatten(1)
        draws = self.cfg.backup_samples if self.cfg.max_q_backup else 1
        repeated = next_obs.repeat_interleave(draws, 0) if draws > 1 else next_obs
        next_actions = self.target_actor.head.sample(repeated, self.generator)
        next_q = self.critic_target(repeated, next_actions)  # [K, B M]
        if draws > 1:
            next_q = next_q.view(next_q.shape[0], -1, draws).amax(-1)
        return td3_target(batch.rewards, batch.discounts, batch.terminated, next_q)

    def actor_losses(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """(L_bc, L_q) of the module docstring, with gradients into the actor only."""
        head = self.actor.head
        if self.cfg.action_approx:
            assert isinstance(head, DiffusionHead)
            t = torch.randint(head.train_steps, (obs.shape[0],), generator=self.generator, device=obs.device)
            noise = torch.randn(actions.shape, generator=self.generator, device=obs.device)
            a_pi, bc_losses = one_step_action(head, obs, actions, noise, t)
            bc_loss = bc_losses.mean()
        else:
            bc_loss = head.loss(obs, actions, self.generator).mean()
            a_pi = head.sample(obs, self.generator)
        q = self.critic(obs, a_pi, members=min(2, self.cfg.n_critics))  # [2, B] (one critic: both terms use it)
        q_other = q.flip(0) if q.shape[0] == 2 else q
        coin = torch.rand((), generator=self.generator, device=obs.device) < 0.5
        first = -q[0].mean() / q_other[0].abs().mean().detach()
        second = -q[-1].mean() / q_other[-1].abs().mean().detach()
        return bc_loss, torch.where(coin, first, second)
