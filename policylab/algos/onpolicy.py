"""What the on-policy family (REINFORCE, A2C, PPO) shares: config fields, the network, the learner
(flat parameters, optimizer, RNG) and the gradient step (autograd here, analytic in fused.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.config import CommonConfig
from policylab.data import Batch
from policylab.data.sources import Demonstrations
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.objectives import ADVANTAGES, entropy_bonus, pg_surrogate, value_loss
from policylab.objectives.imitation import (
    WEIGHTINGS,
    ImitationSchedule,
    imitation_loss,
    imitation_weights,
    mixed_policy_loss,
    parse_schedule,
)
from policylab.optim import Adam, Optimizer, ParameterBuffer

DEFAULT_IMITATION = "cosine:0.5->0.02"
"""The imitation schedule of an on-policy run given a dataset and no `imitation` (mu from 0.5 to 0.02)."""
DEFAULT_IMITATION_AFTER_BC = "0"
"""... and of one that starts by behaviour cloning (`bc_steps` > 0): none, so the run is pure RL fine-tuning."""


@dataclass
class OnPolicyConfig(CommonConfig):
    n_steps: int = 2048
    """Steps per env per rollout (a rollout has n_steps * num_envs transitions)."""
    lr: float = 3e-4
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the run."""
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float | None = 0.5
    """Clip the global gradient norm (None: no clipping)."""
    normalize_advantage: bool = True
    shared_net: bool = False
    """One body for actor and critic (else two separate MLPs, evaluated in one batched call)."""
    ortho_init: bool = True
    log_std_init: float = 0.0
    """Box actions: the Gaussian's initial log std (with use_sde: of the noise matrices' weights)."""
    use_sde: bool = False
    """Box actions: gSDE exploration (Raffin et al. 2021; SB3's use_sde; nets/sde.py): the noise is phi(s) W, the
    actor's last hidden features times a Gaussian matrix per env, redrawn every `sde_sample_freq` steps, so it is
    smooth in time and in the state; `log_std` becomes [features, actions]. PPO (and MDPO, SPO, FixPO), A2C,
    REINFORCE and TRPO."""
    sde_sample_freq: int = -1
    """With use_sde: steps between redraws of each env's noise matrix (<= 0: once per rollout)."""
    squash_actions: bool = False
    """Box actions: tanh-squash into the bounds (else sample a Gaussian and clip)."""
    analytic_grads: bool = True
    """Fast path: hand-derived gradients for tanh/relu MLP actor-critics (same result as autograd, ~3x faster
    on small networks); false forces autograd. Other networks always use autograd."""
    imitation: str | None = None
    """With a `dataset` (demonstrations): the schedule of the imitation coefficient mu in
    (1 - mu) L_RL + mu L_imitation (objectives/imitation.py), e.g. "cosine:0.5->0.02" (the default with a
    dataset), "linear:1->0,warmup=0.1", "0.1" (constant)."""
    imitation_weighting: str = "uniform"
    """Per-sample weights of the imitation term: uniform (behaviour cloning), phi (CHORD's p (1 - p), discrete
    actions) or advantage (exp(imitation_beta (G - V(s))), clipped at imitation_max_weight)."""
    imitation_batch_size: int | None = None
    """Dataset samples in each gradient step (None: as many as the step's on-policy samples)."""
    imitation_beta: float = 1.0
    imitation_max_weight: float = 20.0
    bc_steps: int = 0
    """With a `dataset`: gradient steps of behaviour cloning, -mean log pi(a_D | s_D) on demonstration minibatches,
    before the first rollout (once, at step 0: a resumed run does not redo it), so that RL fine-tunes a cloned
    policy. A Box head's log std stays at `log_std_init` meanwhile (it sets the fine-tuning's exploration), the
    critic is left as it is, the observation statistics start from the dataset's (with `normalize_obs`), and
    `imitation` defaults to 0 (pure fine-tuning; set it to keep a term). See `clone_demonstrations`."""
    bc_batch_size: int = 256
    """Demonstration rows in each behaviour-cloning step."""
    bc_lr: float = 1e-3
    """The learning rate of behaviour cloning's own Adam (the run's optimizer starts fine-tuning untouched)."""
    lstm_hidden: int = 256
    """With recurrent=true: the hidden size of the actor's and the critic's LSTMs (SB3-contrib's default)."""

    def validate(self) -> None:
        super().validate()
        if self.lstm_hidden < 1:
            raise ConfigError(f"lstm_hidden={self.lstm_hidden} must be >= 1", "set lstm_hidden to e.g. 256")
        if self.dataset is None and self.imitation is not None:
            raise ConfigError(
                f"imitation={self.imitation!r} needs demonstrations", "pass a dataset (--dataset PATH), or drop it"
            )
        if self.bc_steps < 0 or self.bc_batch_size <= 0 or self.bc_lr <= 0:
            raise ConfigError(
                f"bc_steps={self.bc_steps}, bc_batch_size={self.bc_batch_size}, bc_lr={self.bc_lr}: bc_steps must be "
                ">= 0, the others > 0",
                "set e.g. bc_steps=2000, bc_batch_size=256, bc_lr=1e-3",
            )
        if self.dataset is None and self.bc_steps > 0:
            raise ConfigError(
                f"bc_steps={self.bc_steps} clones demonstrations before the first rollout, but the run has no dataset",
                "pass the demonstrations (--dataset PATH), or drop bc_steps",
            )
        if self.dataset is not None:
            parse_schedule(imitation_schedule_text(self))
        if self.imitation_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"imitation_weighting={self.imitation_weighting!r} is not one of {', '.join(WEIGHTINGS)}",
                "set imitation_weighting to uniform, phi or advantage",
            )
        if self.imitation_batch_size is not None and self.imitation_batch_size <= 0:
            raise ConfigError(
                f"imitation_batch_size={self.imitation_batch_size} must be > 0", "set it to e.g. 64, or null"
            )
        if self.n_steps <= 0:
            raise ConfigError(f"n_steps={self.n_steps} must be > 0", "set n_steps to e.g. 128")

        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "set lr to e.g. 3e-4")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ConfigError(f"gae_lambda={self.gae_lambda} is outside [0, 1]", "set gae_lambda to e.g. 0.95")


def imitation_schedule_text(cfg: OnPolicyConfig) -> str:
    """The run's imitation schedule: `imitation`, else none after behaviour cloning, else DEFAULT_IMITATION."""
    if cfg.imitation is not None:
        return cfg.imitation
    return DEFAULT_IMITATION_AFTER_BC if cfg.bc_steps > 0 else DEFAULT_IMITATION


def build_actor_critic(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space, algo: str) -> ActorCritic:
    return ActorCritic(
        obs_space,  # type: ignore[arg-type]
        act_space,
        hidden_sizes=cfg.hidden_sizes,
        activation=cfg.activation,
        shared=cfg.shared_net,
        ortho_init=cfg.ortho_init,
        log_std_init=cfg.log_std_init,
        squash=cfg.squash_actions,
        algo=algo,
        encoder=cfg.encoder,
        memory=cfg.lstm_hidden if cfg.recurrent else 0,
        sde=cfg.use_sde,
        sde_sample_freq=cfg.sde_sample_freq,
    )


def adam(params: list[nn.Parameter], lr: float, eps: float = 1e-5) -> Adam:
    """policylab's Adam: torch's fused kernel without torch.optim's import and per-step overhead."""
    return Adam(params, lr=lr, eps=eps)


def whole_rollouts(cfg: Any) -> int:
    """An on-policy run's budget: --steps rounded up to whole rollouts of n_steps x num_envs env steps."""
    rollout = cfg.n_steps * cfg.num_envs
    return int(-(-cfg.steps // rollout) * rollout)


def annealed(value: float, progress: float, anneal: bool) -> float:
    """`value` decayed linearly to 0 over the run (progress 0 -> 1), if `anneal`; the last rollout may
    overshoot the step budget, so the factor is clamped at 0."""
    return value * max(0.0, 1.0 - progress) if anneal else value


def rollout_advantages(rollout: Batch, estimator: str, cfg: OnPolicyConfig) -> tuple[Tensor, Tensor]:
    """(advantages, returns) of a T x N rollout by a registered estimator ("gae", "mc")."""
    return ADVANTAGES.get(estimator)(
        rollout.rewards,
        rollout.values,
        rollout.next_values,
        rollout.terminated,
        rollout.episode_end,
        cfg.gamma,
        cfg.gae_lambda,
    )


def with_logit_bias(data: Batch, rollout: Batch) -> Batch:
    """`data` (flat rows of `rollout`) with the rollout's action-mask logit bias, flattened alike, where the run
    masks actions: every loss then evaluates the policy the rollout acted with."""
    bias = rollout.get("logit_bias")
    if bias is not None:
        data.logit_bias = bias.flatten(0, 1)
    return data


def step_logit_bias(batch: Batch, imitation: ImitationTerm | None) -> Tensor | None:
    """A gradient step's bias on the head's inputs: the batch's action masks' logit bias, or RPO's shift of the
    Gaussian's mean (None without), with zero rows (nothing masked or moved) for the demonstration rows of
    `imitation`."""
    bias = batch.get("logit_bias")
    if bias is None or imitation is None:
        return bias
    return torch.cat([bias, bias.new_zeros(len(imitation.batch.actions), bias.shape[1])])


def optimizer_step(
    optimizer: Optimizer, loss: Tensor, params: ParameterBuffer, max_grad_norm: float | None
) -> Tensor | None:
    """Zero the gradients, backward, optional global-norm clipping, step. Returns the pre-clip gradient norm."""
    params.zero_grad()
    loss.backward()
    norm = params.clip_grad_norm_(max_norm=max_grad_norm) if max_grad_norm is not None else None
    optimizer.step()
    return norm


@dataclass(frozen=True)
class ActorCriticLoss:
    """The actor-critic loss: pg_surrogate(clip_low, clip_high, dual_clip, spo_eps, kl_coef, kl)
    + vf_coef * value_loss(clip_value) - ent_coef * entropy. clip_low=None is the unclipped (REINFORCE / A2C)
    surrogate; spo_eps (with clip_low=None) SPO's; kl_coef > 0 adds the KL penalty of MDPO / FixPO (a tensor
    coefficient, e.g. a learned multiplier, costs no host sync)."""

    clip_low: float | None = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    clip_value: float | None = None
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    spo_eps: float | None = None
    kl_coef: float | Tensor = 0.0
    kl: str = "reverse"

    def surrogate_options(self) -> dict[str, Any]:
        """The keyword arguments of `pg_surrogate` / `pg_surrogate_grad` this loss sets."""
        return {
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "dual_clip": self.dual_clip,
            "spo_eps": self.spo_eps,
            "kl_coef": self.kl_coef,
            "kl": self.kl,
        }


@dataclass(frozen=True)
class ImitationTerm:
    """The demonstration rows of one gradient step and how they enter the loss:
    (1 - coef) L_RL + coef L_imitation over `batch` (obs, actions, returns), weighted per `weighting`."""

    batch: Batch
    coef: float
    weighting: str = "uniform"
    beta: float = 1.0
    max_weight: float = 20.0

    def weights(self, logp: Tensor, values: Tensor) -> Tensor:
        """Per-sample weights (detached), given the rows' log-probs and values under the current network."""
        advantages = self.batch.returns - values.detach() if self.weighting == "advantage" else None
        return imitation_weights(
            logp, self.weighting, advantages=advantages, beta=self.beta, max_weight=self.max_weight
        )


StepFn = Callable[..., tuple[dict[str, Tensor], bool]]
"""step(batch, loss, *, kl_limit=None, with_metrics=True, imitation=None) -> (metrics, stepped).

`batch` has obs, actions, advantages, returns, and optionally logp and values
from collection time (without logp the step is on-policy: ratio 1). With
`imitation` (an `ImitationTerm`), the policy loss mixes in its rows."""


class AutogradStep:
    """One gradient step of the actor-critic loss through autograd (the reference path)."""

    def __init__(
        self, net: ActorCritic, params: ParameterBuffer, optimizer: Optimizer, max_grad_norm: float | None
    ) -> None:
        self.net = net
        self.params = params
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm

    def __call__(
        self,
        batch: Batch,
        loss_spec: ActorCriticLoss,
        *,
        kl_limit: float | None = None,
        with_metrics: bool = True,
        imitation: ImitationTerm | None = None,
    ) -> tuple[dict[str, Tensor], bool]:
        """One autograd step; `with_metrics` is accepted for symmetry (the metrics cost nothing extra here)."""
        spec = loss_spec
        rows = len(batch.advantages)
        obs, actions = batch.obs, batch.actions
        if imitation is not None:  # one forward pass over the on-policy rows and the demonstration rows
            obs, actions = torch.cat([obs, imitation.batch.obs]), torch.cat([actions, imitation.batch.actions])
        bias = step_logit_bias(batch, imitation)
        if "states" in batch.keys():  # recurrent: whole sequences [T, E] from their LSTM states
            all_logp, all_entropy, all_values = self.net.evaluate_sequences(
                obs, actions, batch.states, batch.starts, bias
            )
        else:
            all_logp, all_entropy, all_values = self.net.evaluate(obs, actions, bias)
        logp, entropy, values = all_logp[:rows], all_entropy[:rows], all_values[:rows]
        old_logp = batch.get("logp")
        old = logp.detach() if old_logp is None else old_logp
        pg_loss, stats = pg_surrogate(logp, old, batch.advantages, **spec.surrogate_options())
        if kl_limit is not None and stats["approx_kl"].item() > kl_limit:
            return stats, False
        policy_loss = pg_loss
        if imitation is not None:
            demo_logp = all_logp[rows:]
            weights = imitation.weights(demo_logp, all_values[rows:])
            policy_loss, imitation_stats = mixed_policy_loss(pg_loss, demo_logp, imitation.coef, weights=weights)
            stats.update(imitation_stats)
        v_loss = value_loss(values, batch.returns, old_values=batch.get("values"), clip=spec.clip_value)
        ent = entropy_bonus(entropy)
        loss = policy_loss + spec.vf_coef * v_loss - spec.ent_coef * ent
        grad_norm = optimizer_step(self.optimizer, loss, self.params, self.max_grad_norm)
        metrics = {**stats, "loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": v_loss.detach()}
        metrics["entropy"] = ent.detach()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics, True


@dataclass
class ActorCriticLearner:
    """What every on-policy algorithm is built from: the network, its flat parameters, the optimizer,
    the RNG for sampling and minibatches, and the gradient step (analytic where possible)."""

    net: ActorCritic
    params: ParameterBuffer
    optimizer: Optimizer
    generator: torch.Generator
    step: StepFn


def make_learner(
    net: ActorCritic, cfg: OnPolicyConfig, optimizer: Callable[[list[nn.Parameter]], Optimizer]
) -> ActorCriticLearner:
    """Flatten `net`'s parameters, build the optimizer over them and pick the gradient step."""
    from policylab.algos.fused import FusedActorCriticStep

    params = ParameterBuffer(net.parameters())
    opt = optimizer([params.flat])
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    if cfg.analytic_grads and FusedActorCriticStep.supports(net):
        step: StepFn = FusedActorCriticStep(net, params, opt, cfg.max_grad_norm)
    else:
        step = AutogradStep(net, params, opt, cfg.max_grad_norm)
    return ActorCriticLearner(net, params, opt, generator, step)


def whole_rollout_step(
    learner: ActorCriticLearner,
    rollout: Batch,
    advantages: Tensor,
    returns: Tensor,
    cfg: OnPolicyConfig,
    imitation: Imitation | None = None,
    progress: float = 0.0,
) -> dict[str, Tensor]:
    """One on-policy gradient step on the whole rollout (A2C, REINFORCE), with demonstration rows if given."""
    if "states" in rollout.keys():  # recurrent: the rollout as [T, N] sequences, the rest flat
        data = Batch(obs=rollout.obs, states=rollout.states, starts=rollout.starts)
        for name, value in (("actions", rollout.actions), ("advantages", advantages), ("returns", returns)):
            setattr(data, name, value.flatten(0, 1))
    else:
        data = Batch(obs=rollout.obs, actions=rollout.actions, advantages=advantages, returns=returns).flatten()
    with_logit_bias(data, rollout)
    if cfg.normalize_advantage:
        data.advantages = normalize(data.advantages)
    loss = ActorCriticLoss(clip_low=None, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)
    term = None if imitation is None else imitation.term(progress, len(data), learner.generator)
    metrics, _ = learner.step(data, loss, imitation=term)
    return metrics


class Imitation:
    """An on-policy algorithm's demonstrations (`data.sources.Demonstrations`, attached by the loop when the run
    has a dataset) and the schedule of their coefficient: `term` draws the rows of one gradient step."""

    def __init__(self, demos: Demonstrations, cfg: OnPolicyConfig) -> None:
        self.demos, self.cfg = demos, cfg
        self.schedule: ImitationSchedule = parse_schedule(imitation_schedule_text(cfg))

    def term(self, progress: float, rows: int, generator: torch.Generator) -> ImitationTerm | None:
        """The demonstration rows for a gradient step on `rows` on-policy samples (None once mu is 0)."""
        coef = self.schedule(progress)
        if coef == 0.0:
            return None
        cfg = self.cfg
        batch = self.demos.sample(cfg.imitation_batch_size or rows, generator)
        return ImitationTerm(batch, coef, cfg.imitation_weighting, cfg.imitation_beta, cfg.imitation_max_weight)


def clone_demonstrations(learner: ActorCriticLearner, demos: Demonstrations, cfg: OnPolicyConfig) -> dict[str, float]:
    """Behaviour cloning of the run's own actor-critic before its first rollout (`bc_steps`):

        for step in 1..bc_steps:  (s_D, a_D) ~ demos (bc_batch_size rows)
                                  L = mean [-log pi(a_D | s_D)]          (objectives.imitation_loss)
                                  Adam step (lr bc_lr)

    Its own Adam, dropped afterwards: the fine-tuning's optimizer (PPO's Adam at the RL learning rate, A2C's
    RMSprop) starts with no moments of a supervised loss whose gradients have another scale, and cloning can
    use a larger rate than RL. A Box head's state-independent log std keeps its value (its gradient is zeroed):
    maximum likelihood on a near-deterministic expert would shrink it to the fit's residual and leave RL no
    exploration, so `log_std_init` sets the exploration of fine-tuning, as DPPO's min std does for its chain.
    The critic gets no gradient (separate networks) and starts fine-tuning as initialized. The rows are drawn
    with the learner's generator (the run stays reproducible). Returns the mean loss of the first and the last
    tenth of the steps."""
    net, params = learner.net, learner.params
    optimizer = adam([params.flat], cfg.bc_lr)
    log_std = net.log_std
    losses = []
    for _ in range(cfg.bc_steps):
        batch = demos.sample(cfg.bc_batch_size, learner.generator)
        logp, _, _ = net.evaluate(batch.obs, batch.actions)
        loss = imitation_loss(logp)
        params.zero_grad()
        loss.backward()
        if log_std is not None:
            assert log_std.grad is not None
            log_std.grad.zero_()
        optimizer.step()
        losses.append(loss.detach())
    tenth = max(1, len(losses) // 10)
    history = torch.stack(losses)
    return {"bc_loss_first": float(history[:tenth].mean()), "bc_loss_last": float(history[-tenth:].mean())}


def normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    return (x - x.mean()) / (x.std() + eps)


def mean_metrics(history: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Stack per-step metric tensors once at the end of an update (no per-step host syncs)."""
    return {k: torch.stack(v).mean() for k, v in history.items() if v}
