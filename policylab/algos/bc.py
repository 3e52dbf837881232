"""Behaviour cloning: supervised learning of the dataset's actions, with any policy head.

Box actions (in [-1, 1] units, as the replay buffer holds them), by `head`:
    deterministic (CORL's BC):  a = tanh(mu(s)),  loss = mean (a - a_data)^2
    gaussian:                   a ~ N(tanh(mu(s)), std),  loss = -mean log pi(a_data | s)
    diffusion:                  DDPM on a_data (epsilon prediction), acting by K-step DDIM (nets/diffusion.py)
    flow:                       conditional flow matching on a_data, acting by K Euler steps (nets/flow.py)
    consistency:                consistency training on a_data, acting in one step (nets/consistency.py)
    loss (generative heads)   = mean over the batch of the head's per-sample loss
With `horizon` H > 1 a generative head models the dataset's next H actions as one chunk (padded with the
episode's last action) and acts by receding horizon: the first `act_steps` actions of each plan, then a new plan.
Discrete actions: a softmax policy, loss = cross-entropy with the dataset's actions; it acts greedily.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.algos.generative_heads import GenerativeHeadConfig, generative_head
from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    TargetNetwork,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
    uniform_discrete_actions,
)
from policylab.data import Batch
from policylab.errors import ConfigError, EnvError
from policylab.nets import DeterministicActor, DiscreteBCActor, GaussianActor
from policylab.nets.diffusion import DiffusionHead, ve_sigmas
from policylab.nets.generative import GENERATIVE_HEADS, GenerativeActor

HEADS = ("deterministic", "gaussian", *GENERATIVE_HEADS)


@dataclass
class BCConfig(OfflineConfig, GenerativeHeadConfig):
    """Behaviour cloning; CORL's values (lr 3e-4, [256, 256] ReLU, batch 256, observations normalized)."""

    head: str = "deterministic"
    """Box actions: deterministic, gaussian, diffusion, flow or consistency (see the module docstring)."""
    gaussian: bool = False
    """The older switch for head=gaussian (kept: true with head=deterministic means gaussian)."""
    action_noise: float = 0.1
    """Std of the exploration noise (Box) or epsilon (Discrete) when the run continues online (deterministic and
    gaussian heads; generative heads explore by their own sampling)."""
    horizon: int = 1
    """Generative heads: actions per chunk H (1: one action per observation)."""
    act_steps: int = 1
    """Generative heads: actions of each chunk executed before planning again (1 .. horizon)."""
    draw_when_deterministic: bool = True
    """Generative heads: deterministic acting (evaluation) still draws the initial noise from the policy's seeded
    generator; false takes the head's zero-noise sample, which falls between the modes of multimodal data."""
    teacher: str | None = None
    """head=consistency: a run directory of `policylab train bc --set head=diffusion` on the same dataset to distil
    (consistency distillation) instead of training from the data alone; the student's levels are the teacher's
    DDPM levels, so this run's `diffusion_steps` and `beta_schedule` must be the teacher's."""
    distill_ema: float = 0.95
    """With `teacher`: the target network of the distillation loss is an EMA copy of the student with this decay
    per step (Song et al.'s 0.95; 0: the student itself, stop-gradient)."""

    def validate(self) -> None:
        super().validate()
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {', '.join(HEADS)}", "set head to e.g. diffusion")
        if self.gaussian and self.head not in ("deterministic", "gaussian"):
            raise ConfigError(f"gaussian=true contradicts head={self.head}", "drop gaussian (head names the policy)")
        if self.horizon < 1 or not 1 <= self.act_steps <= self.horizon:
            raise ConfigError(
                f"horizon={self.horizon}, act_steps={self.act_steps}: need horizon >= 1 and 1 <= act_steps <= horizon",
                "set e.g. horizon=4, act_steps=2 (or both 1)",
            )
        if self.horizon > 1 and self.head not in GENERATIVE_HEADS:
            raise ConfigError(
                f"horizon={self.horizon} (action chunks) needs a generative head, not head={self.head}",
                f"set head to one of {', '.join(GENERATIVE_HEADS)}, or horizon=1",
            )
        if self.policy_head in GENERATIVE_HEADS:
            self.validate_head(self.policy_head)
        if not 0.0 <= self.distill_ema < 1.0:
            raise ConfigError(f"distill_ema={self.distill_ema} is outside [0, 1)", "set distill_ema to 0.95 (0: none)")
        if self.teacher is not None and self.policy_head != "consistency":
            raise ConfigError(
                f"teacher= distils a diffusion run into a consistency head, not head={self.policy_head}",
                "set head=consistency, or drop teacher",
            )

    @property
    def policy_head(self) -> str:
        """The head in effect (`gaussian=true` read as head=gaussian)."""
        return "gaussian" if self.gaussian and self.head == "deterministic" else self.head


class BC:
    name = "bc"
    config_cls = BCConfig
    batch_fields = ("obs", "actions")
    """All BC reads of a replay batch (the buffer gathers only these; action chunks come with them)."""

    def __init__(self, cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.generative = isinstance(self.net, GenerativeActor)
        self.n_actions = int(act_space.n) if isinstance(act_space, gym.spaces.Discrete) else 0
        self.act_dim = 0 if self.discrete else int(np.prod(act_space.shape or ()))
        self.action_chunk = cfg.horizon
        """The loop's replay batches carry `action_chunks` of this many steps when > 1."""
        self.opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers = {"actor": self.opt.optimizer}
        self.action_shape = () if self.discrete else (self.act_dim,)
        self.action_dtype = torch.long if self.discrete else torch.float32
        self.teacher = load_teacher(cfg, obs_space, act_space) if cfg.teacher else None
        self.fused = bool(
            cfg.analytic_grads and isinstance(self.net, DeterministicActor) and self.net.body.analytic_backward
        )
        self.distill_target: TargetNetwork | None = None
        if self.teacher is not None and cfg.distill_ema > 0:
            self.distill_target = TargetNetwork(self.net, self.opt.params)
            self.modules["distill_target"] = self.distill_target.module

    @staticmethod
    def build_policy(cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        head = cfg.policy_head
        if isinstance(act_space, gym.spaces.Discrete):
            if head != "deterministic":
                raise EnvError(f"head={head} needs Box actions; this env's are Discrete", "drop head (softmax BC)")
            return DiscreteBCActor(obs_dim(obs_space), int(act_space.n), cfg.hidden_sizes, cfg.activation)
        low, high = box_bounds(act_space, "bc", cfg)
        if head in GENERATIVE_HEADS:
            sigmas = ve_sigmas(cfg.beta_schedule, cfg.diffusion_steps) if cfg.teacher else None  # the teacher's levels
            return GenerativeActor(generative_head(cfg, head, obs_dim(obs_space), cfg.horizon * low.numel(), sigmas),
                                   low, high, cfg.horizon, cfg.act_steps, cfg.draw_when_deterministic)  # fmt: skip
        actor = GaussianActor if head == "gaussian" else DeterministicActor
        return actor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        if self.discrete:
            return uniform_discrete_actions(n, self.n_actions, self.generator)
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=self.cfg.device)
            if self.discrete:
                greedy = self.net.env_action(x, True)
                explore = torch.rand(len(obs), generator=self.generator, device=self.generator.device)
                random = torch.from_numpy(self.random_actions(len(obs))).to(greedy.device)
                return torch.where(explore < self.cfg.action_noise, random, greedy).cpu().numpy()
            if self.generative:
                return self.net.act(x, self.generator).cpu().numpy()
            mean = self.net(x)
            noise = torch.randn(mean.shape, generator=self.generator, device=mean.device)
            return (mean + self.cfg.action_noise * noise).clamp(-1.0, 1.0).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions if self.discrete else self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def loss(self, batch: Batch) -> Tensor:
        if self.discrete:
            return F.cross_entropy(self.net(batch.obs), batch.actions.long())
        if self.generative:
            targets = batch.action_chunks if self.action_chunk > 1 else batch.actions
            if self.teacher is not None:
                flat = targets.reshape(targets.shape[0], -1)
                ema = None if self.distill_target is None else self.distill_target.module.head
                return self.net.head.distillation_loss(batch.obs, flat, self.teacher, self.generator, ema).mean()
            return self.net.loss(batch.obs, targets, self.generator).mean()
        if self.cfg.policy_head == "gaussian":
            return -self.net.log_prob(batch.obs, batch.actions).mean()
        return (self.net(batch.obs) - batch.actions).pow(2).mean()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        if self.fused:
            return {"bc_loss": self.fused_deterministic_step(batch)}
        loss = self.loss(batch)
        self.opt.step(loss)
        if self.distill_target is not None:
            self.distill_target.update(1.0 - self.cfg.distill_ema)
        return {"bc_loss": loss.detach()}

    def fused_deterministic_step(self, batch: Batch) -> Tensor:
        """The deterministic head's step with its gradient by hand (no autograd graph; equal to `loss` under
        autograd, tests/test_fused_offpolicy.py): m = tanh(out), L = mean (m - a)^2,
        dL/d out = 2 (m - a) (1 - m^2) / (B A)."""
        body = self.net.body
        with torch.no_grad():
            out, inputs = body.forward_cached(batch.obs.flatten(1))
            mean = torch.tanh(out[0])
            gap = mean - batch.actions
            g_out = gap * (1.0 - mean * mean)
            g_out.mul_(2.0 / gap.numel())
            self.opt.zero_grad_unless_written_by(body)
            body.backward(inputs, g_out.unsqueeze(0))
            self.opt.clip_and_step()
            return gap.pow(2).mean()


def bc_run(run_dir: str, option: str, dataset: str | None, normalize_obs: bool, fix: str) -> tuple[dict, BCConfig]:
    """A BC run's policy tensors and config, for an option naming one (`pretrained=`, `teacher=`): one clear error
    unless it is a bc run that learned from `dataset` with the same observation normalization (its policy sees
    observations normalized by that dataset's statistics)."""
    from policylab.checkpoint import load_checkpoint, unprefixed

    tensors, state, _ = load_checkpoint(run_dir)
    if state.get("algo") != "bc":
        raise ConfigError(f"{option}={run_dir} is a {state.get('algo')} run, not a bc run", fix)
    bc = BCConfig(**{k: v for k, v in state["config"].items() if k in {f.name for f in fields(BCConfig)}})
    if bc.dataset is None or dataset is None or Path(bc.dataset).resolve() != Path(dataset).resolve():
        raise ConfigError(f"the {option} bc run learned from {bc.dataset}, this run from {dataset}: its "
                          "observation normalization would not match", fix)  # fmt: skip
    if bc.normalize_obs != normalize_obs:
        raise ConfigError(f"the {option} bc run and this run differ in normalize_obs", "use the same normalize_obs")
    return unprefixed("policy", tensors), bc


def load_teacher(cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> DiffusionHead:
    """The diffusion head of the `teacher` run, frozen; an error when it cannot teach this run's consistency head."""
    fix = (f"train the teacher with `policylab train bc --dataset {cfg.dataset} --set head=diffusion` and give this "
           "run its diffusion_steps, beta_schedule and horizon")  # fmt: skip
    tensors, teacher_cfg = bc_run(str(cfg.teacher), "teacher", cfg.dataset, cfg.normalize_obs, fix)
    differ = (
        [f"head={teacher_cfg.policy_head} there, diffusion needed"] if teacher_cfg.policy_head != "diffusion" else []
    )
    differ += [
        f"{k}={getattr(teacher_cfg, k)!r} there, {getattr(cfg, k)!r} here"
        for k in ("diffusion_steps", "beta_schedule", "horizon")
        if getattr(teacher_cfg, k) != getattr(cfg, k)
    ]
    if differ:
        raise ConfigError(f"the teacher run cannot teach this run ({'; '.join(differ)})", fix)
    teacher = BC.build_policy(teacher_cfg, obs_space, act_space)
    teacher.load_state_dict(tensors)
    teacher.to(cfg.device).requires_grad_(False).eval()
    assert isinstance(teacher, GenerativeActor) and isinstance(teacher.head, DiffusionHead)
    return teacher.head
