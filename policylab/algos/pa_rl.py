"""PA-RL: policy-agnostic RL (Mark et al. 2024, arXiv:2412.06685), Box actions. Actor-critic RL for any policy
class: the critic is learned by an ordinary offline/off-policy objective, and the policy improves by imitating
actions that the critic has optimized, with the policy's own supervised loss. No gradient ever flows through the
policy, so the same update trains a Gaussian, deterministic, diffusion, flow or consistency head (BC's heads).

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    critic: IQL's V and Q steps (algos/iql.py, `value_and_critic_steps`), Q' <- (1 - tau) Q' + tau Q
    action optimization, for all states and candidates in one batched call:
        a_1..a_N ~ pi(.|s)                                           (N = `n_samples`)
        global: keep the `keep` best by Q(s, a_j) (the last place goes to the dataset's a: `dataset_candidate`)
        local:  `local_steps` times a <- clip(a + `step_size` grad_a Q(s, a), -1, 1); each keeps its best iterate
        a* = argmax_j Q(s, a_j)       (`distill_temperature` > 0: a_j drawn with probability softmax(Q / T))
    distillation: one step of the head's BC loss on (s, a*)     (algos/bc.py: -log pi, squared error, DDPM, ...)
Q is the mean over the critic ensemble (`q_reduce=min`: the minimum). Acting (`act_with=optimized`, the paper's)
runs the same optimization on the observation and takes a*; `act_with=policy` acts with the distilled policy.

The critic is IQL's: it never queries Q off the dataset's actions, so it needs no sampler from the policy, and it
continues online on replay data as it is. Cal-QL (the paper's other critic) does not compose here: cal_ql.py's
penalty and TD target sample a tanh-Gaussian actor with log-densities, which a generative head does not have.
Defaults are the authors' (N 32, keep 10, 10 local steps of 3e-4 on the ensemble mean); their code distils a
softmax(Q) draw among the kept candidates (temperature 1) where this distils the argmax by default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.algos.bc import BC, BCConfig, bc_run
from policylab.algos.iql import IQL, IQLConfig
from policylab.algos.offpolicy import box_bounds, obs_dim, seeded_generator, uniform_box_actions
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, DeterministicActor, GaussianActor
from policylab.nets.critics import scale_to_bounds
from policylab.nets.generative import GENERATIVE_HEADS, GenerativeActor


@dataclass
class PARLConfig(BCConfig):
    """PA-RL on any BC head (`head`, the generative heads' fields), with IQL's critic (`expectile`, `n_critics`,
    `hidden_sizes`, `lr`) and the authors' action-optimization values."""

    head: str = "diffusion"
    expectile: float = 0.7
    n_critics: int = 2
    n_samples: int = 32
    """Candidate actions drawn from the policy per state (global optimization)."""
    keep: int = 10
    """Candidates kept by Q for the local steps."""
    local_steps: int = 10
    step_size: float = 3e-4
    """Gradient-ascent steps on Q with respect to the kept actions, and their size (in [-1, 1] action units)."""
    q_reduce: str = "mean"
    """How the critic ensemble scores an action: mean (the authors') or min."""
    dataset_candidate: bool = True
    """Training: the batch's dataset action takes the last kept place (as the authors' code)."""
    distill_temperature: float = 0.0
    """0: distil the argmax-Q candidate; T > 0: one drawn with probabilities softmax(Q / T)."""
    actor_lr: float | None = None
    """The policy's learning rate (None: `lr`, the critic's)."""
    bc_steps: int = 0
    """For the first this many gradient steps the policy clones the dataset's actions while the critic learns: an
    untrained critic's argmax is noise (the paper starts PA-RL from a BC policy: `pretrained`, or these steps)."""
    act_with: str = "optimized"
    """optimized: act with the argmax-Q optimized candidate (the paper's); policy: the distilled policy alone."""
    pretrained: str | None = None
    """A run directory of `policylab train bc` with the same head settings on the same dataset: its policy's
    weights start this run's policy."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_samples", "keep", "n_critics")
        if self.keep > self.n_samples:
            raise ConfigError(f"keep={self.keep} exceeds n_samples={self.n_samples}", "set keep <= n_samples")
        if min(self.local_steps, self.step_size, self.distill_temperature, self.bc_steps) < 0:
            raise ConfigError(
                f"local_steps={self.local_steps}, step_size={self.step_size}, distill_temperature="
                f"{self.distill_temperature}, bc_steps={self.bc_steps} must be >= 0",
                "set e.g. local_steps=10, step_size=3e-4, distill_temperature=0, bc_steps=0",
            )
        for name, allowed in (("q_reduce", ("mean", "min")), ("act_with", ("optimized", "policy"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}",
                                  f"set {name}={allowed[0]}")  # fmt: skip
        if self.horizon != 1:
            raise ConfigError(
                f"horizon={self.horizon}: PA-RL's critic scores single actions, not chunks", "set horizon=1"
            )
        if not 0.0 < self.expectile < 1.0:
            raise ConfigError(f"expectile={self.expectile} is outside (0, 1)", "set expectile to e.g. 0.7")


class PARLPolicy(nn.Module):
    """What `pl.load` returns: the policy (`actor`, any BC head) and the critic (`critic`, saved once, here), acting
    by action optimization (`act_with=optimized`) or by the policy alone."""

    def __init__(self, actor: nn.Module, critic: ContinuousCritic, cfg: PARLConfig) -> None:
        super().__init__()
        self.actor: Any = actor
        self.critic = critic
        self.cfg = cfg

    def optimized(self, obs: Tensor, generator: torch.Generator | None) -> Tensor:
        return optimize_actions(self.actor, self.critic, obs, self.cfg, generator)[0]

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        if self.cfg.act_with == "policy":
            return self.actor.env_action(obs, deterministic, generator)
        return scale_to_bounds(self.optimized(obs, generator), self.actor.low, self.actor.high)

    def to_env_numpy(self, actions: np.ndarray) -> np.ndarray:
        return self.actor.to_env_numpy(actions)


def sample_candidates(actor: nn.Module, obs: Tensor, n: int, noise: float, generator: torch.Generator | None) -> Tensor:
    """n actions [B, n, A] in [-1, 1] per observation [B, O], drawn in one call over the B n repeated rows. A
    deterministic head proposes its action and n - 1 copies with Gaussian noise of std `noise`."""
    rows = obs.repeat_interleave(n, 0)
    if isinstance(actor, GenerativeActor):
        x = actor.head.sample(rows, generator)
    elif isinstance(actor, GaussianActor):
        x = actor.sample(rows, generator)
    else:
        assert isinstance(actor, DeterministicActor)
        mean = actor(rows).view(obs.shape[0], n, -1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        eps[:, 0] = 0.0
        return (mean + noise * eps).clamp(-1.0, 1.0)
    return x.view(obs.shape[0], n, -1)


def optimize_actions(
    actor: nn.Module,
    critic: ContinuousCritic,
    obs: Tensor,
    cfg: PARLConfig,
    generator: torch.Generator | None,
    dataset_actions: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PA-RL's action optimization for observations [B, O] -> (a* [B, A], metrics); no Python loop over states."""
    b = obs.shape[0]

    def q_of(rows: Tensor, actions: Tensor) -> Tensor:
        q = critic(rows, actions)
        return q.mean(0) if cfg.q_reduce == "mean" else q.min(0).values

    with torch.no_grad():
        candidates = sample_candidates(actor, obs, cfg.n_samples, cfg.action_noise, generator)  # [B, N, A]
        q_base = q_of(obs.repeat_interleave(cfg.n_samples, 0), candidates.flatten(0, 1)).view(b, -1)
        keep = cfg.keep - 1 if dataset_actions is not None and cfg.dataset_candidate else cfg.keep
        best = q_base.topk(keep, 1).indices  # [B, keep]
        kept = candidates.gather(1, best.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        if keep < cfg.keep:
            assert dataset_actions is not None
            kept = torch.cat([kept, dataset_actions.unsqueeze(1)], 1)
    rows = obs.repeat_interleave(kept.shape[1], 0)
    actions, best_q = kept.flatten(0, 1), torch.full((rows.shape[0],), -torch.inf, device=obs.device)
    best_actions = actions
    with torch.inference_mode(False), torch.enable_grad():  # acting runs in inference mode; the steps need grads
        rows, a = rows.clone(), actions.clone()
        for step in range(cfg.local_steps + 1):
            a.requires_grad_(True)
            q = q_of(rows, a)
            better = q.detach() > best_q
            best_q = torch.where(better, q.detach(), best_q)
            best_actions = torch.where(better.unsqueeze(-1), a.detach(), best_actions)
            if step == cfg.local_steps:
                break
            (grad,) = torch.autograd.grad(q.sum(), a)
            a = (a.detach() + cfg.step_size * grad).clamp(-1.0, 1.0)
    best_q, best_actions = best_q.view(b, -1), best_actions.view(b, -1, actions.shape[-1])
    if cfg.distill_temperature > 0 and dataset_actions is not None:
        probs = torch.softmax(best_q / cfg.distill_temperature, 1)
        pick = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        pick = best_q.argmax(1)
    index = torch.arange(b, device=obs.device)
    metrics = {"q_sampled": q_base.mean(), "q_optimized": best_q[index, pick].mean()}
    return best_actions[index, pick].detach(), metrics


class PARL:
    name = "pa_rl"
    config_cls = PARLConfig

    def __init__(self, cfg: PARLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        box_bounds(act_space, "pa_rl", cfg)
        self.bc = BC(replace(cfg, lr=cfg.actor_lr or cfg.lr), obs_space, act_space)  # the policy and its BC loss
        self.bc.generator = self.generator
        if cfg.pretrained:
            load_pretrained(self.bc.net, cfg)
        shared = {f.name: getattr(cfg, f.name) for f in fields(IQLConfig) if hasattr(cfg, f.name)}
        self.iql = IQL(IQLConfig(**shared), obs_space, act_space)  # its critic, value and steps (its actor unused)
        self.net = PARLPolicy(self.bc.net, self.iql.critic, cfg)
        self.act_dim = self.bc.act_dim
        self.modules: dict[str, nn.Module] = {"critic_target": self.iql.critic_target.module, "value": self.iql.value}
        self.optimizers = {"actor": self.bc.opt.optimizer, "critic": self.iql.critic_opt.optimizer,
                           "value": self.iql.value_opt.optimizer}  # fmt: skip
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32

    @staticmethod
    def build_policy(cfg: PARLConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        low, _ = box_bounds(act_space, "pa_rl", cfg)
        critic = ContinuousCritic(obs_dim(obs_space), low.numel(), cfg.hidden_sizes, cfg.activation, cfg.n_critics)
        return PARLPolicy(BC.build_policy(cfg, obs_space, act_space), critic, cfg)

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        if self.cfg.act_with == "policy":
            return self.bc.explore(obs, progress)
        with torch.inference_mode():
            return self.net.optimized(torch.as_tensor(obs, device=self.cfg.device), self.generator).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        _, metrics = self.iql.value_and_critic_steps(batch)
        self.iql.critic_target.update(self.cfg.tau)
        found: dict[str, Tensor] = {}
        if index < self.cfg.bc_steps:
            targets = batch.actions
        else:
            targets, found = optimize_actions(self.bc.net, self.iql.critic, batch.obs, self.cfg, self.generator,
                                              batch.actions)  # fmt: skip
        distill_loss = self.bc.loss(Batch(obs=batch.obs, actions=targets))
        self.bc.opt.step(distill_loss)
        return {**metrics, **found, "distill_loss": distill_loss.detach()}


WEIGHT_FIELDS = (
    "horizon",
    "denoiser_hidden_sizes",
    "denoiser_activation",
    "diffusion_steps",
    "beta_schedule",
    "flow_time",
    "consistency_sigma_max",
)
"""The head settings a BC run's weights were trained under (sample_steps, ddim_eta: acting only, may differ)."""


def load_pretrained(actor: nn.Module, cfg: PARLConfig) -> None:
    """A BC run's policy weights into `actor`; a clear error when its head, its settings or its dataset differ."""
    fix = (f"pretrain with `policylab train bc --dataset {cfg.dataset} --set head={cfg.policy_head}` and this "
           "run's head settings, or set them here as the bc run has them")  # fmt: skip
    theirs, bc = bc_run(str(cfg.pretrained), "pretrained", cfg.dataset, cfg.normalize_obs, fix)
    mine = actor.state_dict()
    if bc.teacher is not None:
        raise ConfigError(
            "the pretrained bc run was distilled from a teacher (its consistency levels are the teacher's)",
            "pretrain with a consistency head trained from the data (no teacher)",
        )
    names = WEIGHT_FIELDS + (() if cfg.policy_head in GENERATIVE_HEADS else ("hidden_sizes", "activation"))
    differ = [
        f"{k}={getattr(bc, k)!r} there, {getattr(cfg, k)!r} here" for k in names if getattr(bc, k) != getattr(cfg, k)
    ]
    if bc.policy_head != cfg.policy_head:
        differ.insert(0, f"head={bc.policy_head} there, {cfg.policy_head} here")
    if differ or theirs.keys() != mine.keys() or any(theirs[k].shape != v.shape for k, v in mine.items()):
        raise ConfigError(f"the pretrained bc run's policy does not match this run's ({'; '.join(differ)})", fix)
    actor.load_state_dict(theirs)
