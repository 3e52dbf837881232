"""What the off-policy family (DQN, DDPG, TD3, SAC, discrete SAC, TQC) shares: config fields, flat-parameter
Adam, target networks, the entropy temperature, action-space checks and random actions.

An off-policy algorithm is a class with:

- `net`: the acting policy (saved as `policy/`, what `pl.load` returns), with `env_action(obs, deterministic)`;
- `modules` / `optimizers`: everything else a checkpoint needs (critics, targets, temperature);
- `generator`: the one torch RNG for exploration, sampling and target noise;
- `random_actions(n)`, `explore(obs, progress)`: replay-format actions (numpy) for the warm-up and after it;
- `to_env(actions)`: replay format -> what the env takes (Box actions live in [-1, 1] in the buffer and
  the critics, as in SB3, and are scaled to the env's bounds on the way out); these three only where the
  algorithm acts online (an offline-only one, as the Decision Transformer, has none);
- `after_step(step)`: called after every vector-env step (DQN's target updates count env steps), and in an
  offline phase after every gradient step (where `step` counts gradient steps);
- `update(batch, index) -> metrics`: one gradient step on a replay `Batch` (from envs or a dataset: the
  same fields). With `prioritized=True` a metric named `td_error` ([B], the TD error; its magnitude is the
  priority) feeds prioritized replay and is not logged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.config import CommonConfig, algorithm_of, check_unit_interval, set_by
from policylab.data.her import check_her_config
from policylab.errors import ConfigError, EnvError
from policylab.nets import TanhGaussianActor
from policylab.nets.cnn import check_vector_observations
from policylab.nets.renorm import RenormSettings
from policylab.objectives.q_targets import polyak_update
from policylab.optim import Adam, ParameterBuffer


@dataclass
class OffPolicyConfig(CommonConfig):
    num_envs: int = 1
    preferred_threads: ClassVar[int] = 2
    """What threads=auto uses when both cores are free. Per update on the benchmark machine (2 cores), 1 -> 2
    threads: SAC Pendulum 3.54 -> 2.8 ms, TD3 3.9 -> 3.0 ms, DQN CartPole rl-zoo preset 0.55 -> 0.49-0.60 ms
    (micro.py --only threads)."""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    lr: float = 3e-4
    anneal_lr: bool = False
    """Decay every optimizer's learning rate linearly from `lr` to 0 over the run (rl-zoo's `lin_X`)."""
    buffer_size: int = 1_000_000
    """Replay capacity in transitions (next observations are not stored twice; see ReplayBuffer)."""
    learning_starts: int = 100
    """Env steps of uniformly random actions before the first update."""
    batch_size: int = 256
    train_freq: int = 1
    """Update after every train_freq vector-env steps (train_freq * num_envs env steps)."""
    gradient_steps: int = 1
    """Gradient steps per update (-1: one per env step collected since the last update); the
    update-to-data ratio is gradient_steps / (train_freq * num_envs)."""
    tau: float = 0.005
    """Polyak factor of the target networks (1.0: hard copies)."""
    n_step: int = 1
    """n-step returns from the replay buffer (they stop at episode ends)."""
    prioritized: bool = False
    """Proportional prioritized replay (Schaul et al. 2016)."""
    per_alpha: float = 0.6
    per_beta: float = 0.4
    max_grad_norm: float | None = None
    """Clip each network's global gradient norm (None: no clipping)."""
    save_buffer: bool = False
    """Save the replay buffer in checkpoints (large) so that resume is exact; without it, a resumed run
    refills the buffer before updating again."""
    log_every: int = 1_000
    """Env steps per training iteration: one log row, progress update and NaN check each."""
    offline_ratio: float | None = None
    """With a `dataset`: the share of each batch drawn from the dataset while the envs are stepped (RLPD-style
    symmetric sampling at 0.5): from the start (hybrid: `steps` are env steps), or after the offline `steps`
    with `online_steps`. None: a dataset run trains offline for `steps` gradient steps, then (`online_steps`)
    online with the dataset as the start of its replay buffer."""
    online_steps: int = 0
    """With a `dataset`: env steps of online training after the offline `steps` (offline-to-online)."""
    reward_scale: float = 1.0
    reward_bias: float = 0.0
    """Rewards enter the replay buffer (dataset and env steps alike) as r * scale + bias; evaluation returns
    stay the env's. CORL's AntMaze CQL uses scale 5, bias -1."""
    reward_normalization: str = "none"
    """With a dataset: "return_range" multiplies rewards (before `reward_scale`) by 1000 / (max - min episode
    return of the dataset), as the IQL paper and CORL's IQL do on the D4RL locomotion datasets; "none"."""
    analytic_grads: bool = True
    """Fast path where an algorithm has one (SAC, TQC, CrossQ, TD3/DDPG, DQN, QR-DQN, IQL, CQL, ... with ReLU/tanh
    MLPs): hand-derived gradients, the same update as autograd's (tested); false forces autograd."""
    her: bool = False
    """Hindsight experience replay (data/her.py) on a goal-conditioned env (Dict observations with achieved_goal
    and desired_goal, and a compute_reward method): a share of every batch trains on goals reached later."""
    her_strategy: str = "future"
    """Where relabelled goals come from: future (a later step of the same episode), final (its last step) or
    episode (any of its steps)."""
    her_goals: int = 4
    """Relabelled goals per real transition (SB3's n_sampled_goal): 4 relabels 80% of each batch."""
    frame_stack_replay: bool | None = None
    """Store each frame of stacked-frame observations ([k, H, W], e.g. Atari's 4 frames) once in the replay buffer
    (data/replay.py, StackedFrameReplay): a quarter of the memory. None: on for Atari games."""

    def validate(self) -> None:
        super().validate()
        if self.her and self.n_step > 1:  # before check_her_config: say where n_step came from (often a preset)
            where = set_by(self, "n_step")  # named when it is not the user's own --set (a preset, a config file)
            where = None if where in (None, "--set", "--set (overrides)", "the arguments") else where
            preset = where is not None and "preset" in where
            raise ConfigError(
                f"her=true does not combine with n_step={self.n_step} (n-step returns)"
                + (f", which {where} sets" if where else ""),
                "--set n_step=1 (or --preset none), or drop her" if preset else "set n_step=1, or drop her",
            )
        check_her_config(self)
        check_sde_config(self)
        for name in ("buffer_size", "batch_size", "train_freq", "n_step", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0", f"set {name} to a positive value")
        if self.batch_size > self.buffer_size:
            raise ConfigError(
                f"batch_size={self.batch_size:,} is more than buffer_size={self.buffer_size:,} transitions",
                "set batch_size to e.g. 256 (or a larger buffer_size)",
            )
        check_unit_interval(self, "per_alpha", "per_beta")
        if self.gradient_steps == 0 or self.gradient_steps < -1:
            raise ConfigError(
                f"gradient_steps={self.gradient_steps} must be > 0 or -1",
                "set gradient_steps to e.g. 1 (or -1: one per env step collected)",
            )
        if self.learning_starts < 0:
            raise ConfigError(
                f"learning_starts={self.learning_starts} must be >= 0", "set learning_starts to 0 or more"
            )
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"tau={self.tau} is outside (0, 1]", "set tau to e.g. 0.005 (1.0: hard target copies)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "set lr to e.g. 3e-4")
        if self.normalize_reward:
            raise ConfigError(
                "normalize_reward is not supported by the off-policy algorithms yet",
                "drop it (--set normalize_reward=false); off-policy presets do not use it",
            )
        if self.offline_ratio is not None and not 0.0 <= self.offline_ratio <= 1.0:
            raise ConfigError(
                f"offline_ratio={self.offline_ratio} is outside [0, 1]",
                "set offline_ratio to the dataset's share of each batch, e.g. 0.5",
            )
        if self.reward_normalization not in ("none", "return_range"):
            raise ConfigError(
                f"reward_normalization={self.reward_normalization!r} is not one of none, return_range",
                "set reward_normalization to none or return_range",
            )
        if self.reward_normalization != "none" and self.dataset is None:
            raise ConfigError(
                "reward_normalization=return_range takes the return range of a dataset",
                "pass --dataset PATH, or use reward_scale alone",
            )
        if self.online_steps < 0:
            raise ConfigError(f"online_steps={self.online_steps} must be >= 0", "set online_steps to 0 or more")
        if self.dataset is None and (self.offline_ratio is not None or self.online_steps):
            raise ConfigError("offline_ratio and online_steps need a dataset", "pass --dataset PATH (or drop them)")
        if self.prioritized and self.offline_ratio not in (None, 0.0, 1.0):
            raise ConfigError(
                "prioritized replay with a mixed batch (0 < offline_ratio < 1) is not supported",
                "drop prioritized, or use offline_ratio 0 or 1",
            )

    @property
    def updates_per_train(self) -> int:
        return self.train_freq * self.num_envs if self.gradient_steps == -1 else self.gradient_steps


@dataclass
class SDEConfig:
    """gSDE for the tanh-Gaussian actors (SAC, TQC, off-policy MDPO), as SB3's `use_sde` (nets/sde.py)."""

    use_sde: bool = False
    """Explore with state-dependent noise: a = tanh(mean(s) + phi(s) W), phi(s) the actor's last hidden features
    and W a Gaussian matrix per env held across steps, instead of white noise at every step; log-probs, the
    entropy and the gradients use each row's Gaussian N(mean, sum_j phi_j^2 exp(2 log_std_j))."""
    sde_sample_freq: int = -1
    """With use_sde: each env's matrix is redrawn at the start of every collection between two updates
    (train_freq vector steps, counted from the first exploring step, as SB3) and, within one, every this many
    steps (<= 0: only at the start)."""
    use_sde_at_warmup: bool = False
    """With use_sde: explore with gSDE instead of uniformly random actions before learning_starts (SB3's option)."""
    log_std_init: float = -3.0
    """With use_sde: the initial log std of the noise matrices' weights (SB3's SAC default)."""


def check_sde_config(cfg: OffPolicyConfig) -> None:
    if getattr(cfg, "use_sde_at_warmup", False) and not getattr(cfg, "use_sde", False):
        raise ConfigError("use_sde_at_warmup=true needs use_sde=true", "set use_sde=true, or drop use_sde_at_warmup")


class SDEExploration(nn.Module):
    """The standard normal draws [envs, latent, A] of an off-policy run's gSDE matrices, and the exploring steps
    taken (both checkpointed with the algorithm, so a resumed run continues the same matrices)."""

    standard: Tensor
    steps: Tensor

    def __init__(self, actor: TanhGaussianActor, n_envs: int, train_freq: int, sample_freq: int) -> None:
        super().__init__()
        self.period, self.sample_freq = train_freq, sample_freq if sample_freq > 0 else train_freq
        self.register_buffer("standard", torch.zeros(n_envs, actor.latent_dim, actor.act_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def draws(self, n: int, generator: torch.Generator) -> Tensor:
        """The matrices' draws for this step of `n` envs (redrawn at the start of a collection, every
        `sample_freq` steps within one, or when the number of envs changes)."""
        position = int(self.steps) % self.period
        if position % self.sample_freq == 0 or len(self.standard) != n:
            shape = (n, *self.standard.shape[1:])
            self.standard = torch.randn(shape, generator=generator, device=generator.device)
        self.steps.add_(1)
        return self.standard

    def get_state(self) -> dict[str, Any]:
        return {"standard": self.standard.cpu().numpy().copy(), "steps": int(self.steps)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.standard = torch.as_tensor(np.asarray(state["standard"]), device=self.standard.device).clone()
        self.steps.fill_(int(state["steps"]))


@dataclass
class OfflineConfig(OffPolicyConfig):
    """What the offline algorithms (BC, IQL, ...) share: `steps` counts gradient steps on the `dataset`,
    observations are normalized with the dataset's statistics, `online_steps` continues online."""

    normalize_obs: bool = True
    learning_starts: int = 0
    eval_every: int = 5_000
    """Evaluation every this many gradient steps (then env steps online)."""

    def validate(self) -> None:
        if self.dataset is None:
            raise ConfigError(
                "this offline algorithm learns from a dataset",
                "pass --dataset PATH (make one with `policylab collect`)",
            )
        if getattr(self, "use_sde", False):
            raise ConfigError(
                "use_sde is an exploration setting of the online tanh-Gaussian algorithms; this offline algorithm "
                "does not take it",
                "drop use_sde, or train sac / tqc with --dataset and offline_ratio (hybrid) to explore with gSDE",
            )
        super().validate()


class FlatAdam:
    """A module's parameters as one flat tensor with Adam on it: zeroing, clipping and the step are one
    operator call each, whatever the number of parameter tensors."""

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        max_grad_norm: float | None = None,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> None:
        """`weight_decay` > 0: AdamW's decoupled decay, on every parameter."""
        self.module = module
        self.params = ParameterBuffer(module.parameters())
        self.optimizer = Adam(
            [self.params.flat], lr=lr, eps=eps, betas=betas, weight_decay=weight_decay, decoupled_weight_decay=True
        )
        self.max_grad_norm = max_grad_norm
        self._written_by: tuple[nn.Module, bool] | None = None

    def step(self, loss: Tensor) -> None:
        self.params.zero_grad()
        loss.backward()
        self.clip_and_step()

    def zero_grad_unless_written_by(self, body: nn.Module) -> None:
        """Before a hand-derived backward of `body` (StackedMLP.backward writes every weight and bias
        gradient of it): zero the gradients only if `body` does not hold all of this module's parameters."""
        if self._written_by is None or self._written_by[0] is not body:
            own = {p.data_ptr() for p in body.parameters()}
            self._written_by = (body, all(p.data_ptr() in own for p in self.params.params))
        if not self._written_by[1]:
            self.params.zero_grad()

    def clip_and_step(self) -> None:
        """The step after gradients were written into `params.grad` (by autograd or by hand)."""
        if self.max_grad_norm is not None:
            self.params.clip_grad_norm_(self.max_grad_norm)
        self.optimizer.step()


class TargetNetwork:
    """A frozen copy of a network, its parameters in one flat tensor: a Polyak update is one lerp."""

    def __init__(self, online: nn.Module, online_params: ParameterBuffer) -> None:
        self.module = copy.deepcopy(online)
        self.params = ParameterBuffer(self.module.parameters(), with_grad=False)
        self._online = online_params

    def update(self, tau: float) -> None:
        polyak_update([self.params.flat.data], [self._online.flat.data], tau)

    def __call__(self, *args: Tensor) -> Tensor:
        return self.module(*args)


class Temperature(nn.Module):
    """SAC's entropy temperature alpha = exp(log_alpha), tuned so that the policy's entropy tracks a target
    (Haarnoja et al. 2018b): loss = -log_alpha * (log pi + target_entropy), detached."""

    def __init__(self, initial: float, auto: bool, target_entropy: float, lr: float) -> None:
        super().__init__()
        if initial <= 0:
            raise ConfigError(f"alpha={initial} must be > 0", "set alpha to e.g. 1.0 (the initial temperature)")
        self.log_alpha = nn.Parameter(torch.tensor([float(np.log(initial))]), requires_grad=auto)
        self.target_entropy = target_entropy
        self.optimizer = Adam([self.log_alpha], lr=lr) if auto else None

    def update(self, entropy_gap: Tensor) -> Tensor:
        """One step on E[log pi + target_entropy] (`entropy_gap`, [B]); returns alpha from before the step."""
        alpha = self.log_alpha.detach().exp()
        if self.optimizer is not None:  # d loss / d log_alpha = -mean(gap): no autograd graph needed
            self.log_alpha.grad = -entropy_gap.detach().mean().reshape(1)
            self.optimizer.step()
        return alpha


def tanh_gaussian_policy(
    cfg: OffPolicyConfig,
    obs_space: gym.Space,
    act_space: gym.Space,
    algo: str,
    batch_renorm: RenormSettings | None = None,
) -> TanhGaussianActor:
    """The actor of SAC, TQC and CrossQ (with `use_sde`: gSDE's; with `batch_renorm`: CrossQ's)."""
    low, high = box_bounds(act_space, algo, cfg)
    sde, log_std_init = bool(getattr(cfg, "use_sde", False)), float(getattr(cfg, "log_std_init", -3.0))
    return TanhGaussianActor(
        obs_dim(obs_space),
        low,
        high,
        cfg.hidden_sizes,
        cfg.activation,
        sde=sde,
        log_std_init=log_std_init,
        batch_renorm=batch_renorm,
    )


def sde_exploration(
    cfg: OffPolicyConfig, actor: TanhGaussianActor, modules: dict[str, nn.Module]
) -> SDEExploration | None:
    """gSDE's held matrices for an actor built with `use_sde` (added to the checkpointed `modules`), else None."""
    if not actor.sde:
        return None
    exploration = SDEExploration(actor, cfg.num_envs, cfg.train_freq, getattr(cfg, "sde_sample_freq", -1))
    modules["sde_exploration"] = exploration.to(cfg.device)
    return exploration


def soft_actor_critic_state(
    actor_opt: FlatAdam, critic_opt: FlatAdam, critic_target: TargetNetwork | None, temperature: Temperature
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The checkpointed modules and optimizers of SAC, discrete SAC, TQC and CrossQ (no target networks: None); the
    actor is saved as `policy/`."""
    modules = {"critic": critic_opt.module, "temperature": temperature}
    if critic_target is not None:
        modules["critic_target"] = critic_target.module
    optimizers: dict[str, Any] = {"actor": actor_opt.optimizer, "critic": critic_opt.optimizer}
    if temperature.optimizer is not None:
        optimizers["temperature"] = temperature.optimizer
    return modules, optimizers


DATASET_BOX_ALGOS = "iql, cql, td3_bc, awac, rebrac or bc"
DATASET_DISCRETE_ALGOS = "cql_discrete, bcq_discrete or bc (or dqn, c51, sac_discrete with the dataset mixed in)"


def run_algo(algo: str, cfg: Any) -> tuple[str, bool]:
    """(the name of the algorithm `cfg` configures, e.g. td3_bc for TD3 built from a TD3BCConfig, else `algo`;
    whether the run learns from a dataset) for the errors below."""
    if cfg is None:
        return algo, False
    return algorithm_of(cfg) or algo, getattr(cfg, "dataset", None) is not None


def box_bounds(act_space: gym.Space, algo: str, cfg: Any = None) -> tuple[Tensor, Tensor]:
    """The finite bounds of a Box action space (off-policy actors squash into them); `cfg` (the run's config) names
    the algorithm run and whether it has a dataset in the error."""
    if not isinstance(act_space, gym.spaces.Box):
        name, dataset = run_algo(algo, cfg)
        where = "the dataset's" if dataset else "this env's"
        raise EnvError(
            f"{name} needs a continuous (Box) action space; {where} is {type(act_space).__name__}",
            f"use {DATASET_DISCRETE_ALGOS} for a dataset of Discrete actions"
            if dataset
            else "use dqn or sac_discrete for Discrete actions, or another env",
        )
    low, high = np.asarray(act_space.low, np.float32), np.asarray(act_space.high, np.float32)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise EnvError(
            f"{run_algo(algo, cfg)[0]} needs finite action bounds; this env's Box is [{low.min()}, {high.max()}]",
            "wrap the env with gymnasium.wrappers.RescaleAction (or ClipAction) to give it finite bounds",
        )
    return torch.from_numpy(low), torch.from_numpy(high)


def discrete_actions(act_space: gym.Space, algo: str, cfg: Any = None) -> int:
    if not isinstance(act_space, gym.spaces.Discrete):
        name, dataset = run_algo(algo, cfg)
        where = "the dataset's" if dataset else "this env's"
        raise EnvError(
            f"{name} needs a Discrete action space; {where} is {type(act_space).__name__}",
            f"use {DATASET_BOX_ALGOS} for a dataset of Box actions"
            if dataset
            else "use sac, td3, tqc, crossq or ddpg for Box actions, or another env",
        )
    return int(act_space.n)


def obs_dim(obs_space: gym.Space) -> int:
    """The flattened size of vector observations (image observations: an error naming the algorithms that take them)."""
    check_vector_observations(obs_space)
    return int(np.prod(obs_space.shape or ()))


def uniform_box_actions(n: int, act_dim: int, generator: torch.Generator) -> np.ndarray:
    """Uniform actions in [-1, 1] (the replay format of Box actions)."""
    return (torch.rand((n, act_dim), generator=generator, device=generator.device) * 2.0 - 1.0).cpu().numpy()


def uniform_discrete_actions(n: int, n_actions: int, generator: torch.Generator) -> np.ndarray:
    return torch.randint(n_actions, (n,), generator=generator, device=generator.device).cpu().numpy()


def explore_tanh_gaussian(
    actor: TanhGaussianActor, obs: np.ndarray, generator: torch.Generator, sde: SDEExploration | None = None
) -> np.ndarray:
    """a = tanh(mean + std * noise) for a batch of env observations (numpy on the CPU: small batches); with
    gSDE's held matrices `sde`, a = tanh(mean + phi(s) W)."""
    if sde is not None:
        noise = sde.draws(len(obs), generator)
    else:
        noise = torch.randn((len(obs), actor.act_dim), generator=generator, device=generator.device)
    if actor.body.numpy_acting and noise.device.type == "cpu":
        return actor.sample_numpy(obs, noise.numpy())
    with torch.inference_mode():
        obs_tensor = torch.as_tensor(obs, device=noise.device)
        if sde is not None:
            return actor.sample_matrices(obs_tensor, noise).cpu().numpy()
        mean, log_std = actor._mean_log_std(obs_tensor)
        return torch.tanh(mean + log_std.exp() * noise).cpu().numpy()


class TanhGaussianActing:
    """How SAC, TQC and CrossQ act in the loop: uniform actions before learning starts, then their tanh-Gaussian
    actor (gSDE's held matrices with use_sde), in [-1, 1] until `to_env` scales to the env's bounds."""

    net: TanhGaussianActor
    act_dim: int
    generator: torch.Generator
    sde: SDEExploration | None

    def random_actions(self, n: int) -> np.ndarray:
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        return explore_tanh_gaussian(self.net, obs, self.generator, self.sde)

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass


def temperature_for(cfg: Any, act_dim: int) -> Temperature:
    """SAC's entropy temperature from a config's alpha, auto_alpha, target_entropy (None: -dim(A)) and lr."""
    target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
    return Temperature(cfg.alpha, cfg.auto_alpha, target_entropy, cfg.lr).to(cfg.device)


def seeded_generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
