"""PPO with Random Network Distillation (Burda et al. 2018, arXiv:1810.12894): a novelty bonus for exploration.

A fixed random network f and a trained predictor f_hat read the normalized next observation; the predictor's
error is the intrinsic reward, large where the agent has rarely been:

    r_int_t = ||f_hat(o_{t+1}) - f(o_{t+1})||^2 / 2 / std(discounted intrinsic returns)
        o = clip((s - mean) / std, -rnd_obs_clip, rnd_obs_clip), mean and std over every next observation so far
    A = ext_coef A_ext + int_coef A_int
        A_ext: GAE of the env's rewards with the policy's critic, cut at episode ends (PPO's, unchanged)
        A_int: GAE of r_int with an intrinsic critic V_int and int_gamma, never cut: novelty does not end with an
               episode (the paper's non-episodic intrinsic return)
    PPO's epochs on A; then the same epochs of minibatches fit V_int to the intrinsic returns and the predictor
    to f on a random rnd_update_proportion of each minibatch's rows, with one Adam of their own

As CleanRL's `ppo_rnd_envpool.py` (the intrinsic and extrinsic coefficients 1 and 2, int_gamma 0.99, a quarter of
the rows for the predictor, observations clipped at 5). Vector observations: f and f_hat are ReLU MLPs
(`rnd_hidden_sizes`, `rnd_features` outputs, orthogonal weights), V_int an MLP like the critic. Image observations
(uint8 frames): CleanRL's convolutional f and f_hat (the predictor two 512-unit layers deeper) on frames normalized
pixel by pixel, V_int on an image encoder of its own. The other settings are PPO's; the intrinsic statistics,
networks and optimizer are checkpointed with the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.offpolicy import obs_dim
from policylab.algos.onpolicy import ActorCriticLoss, annealed
from policylab.algos.ppo import PPO, PPOConfig
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.cnn import ImageLayout, image_layout, make_encoder
from policylab.nets.mlp import StackedMLP
from policylab.objectives import ADVANTAGES
from policylab.optim import Adam, ParameterBuffer, set_lr


@dataclass
class RNDConfig(PPOConfig):
    """PPO with an RND novelty bonus; the RND settings follow CleanRL's ppo_rnd_envpool.py."""

    int_coef: float = 1.0
    """Weight of the intrinsic advantages."""
    ext_coef: float = 2.0
    """Weight of the extrinsic (env) advantages."""
    int_gamma: float = 0.99
    """Discount of the intrinsic returns."""
    rnd_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    rnd_features: int = 64
    """Outputs of the random network and the predictor."""
    rnd_update_proportion: float = 0.25
    """Share of each minibatch's rows the predictor trains on (keeps the bonus from vanishing with many envs)."""
    rnd_obs_clip: float = 5.0

    def validate(self) -> None:
        super().validate()
        positive(self, "rnd_features", "rnd_obs_clip")
        if self.int_coef < 0 or self.ext_coef < 0:
            raise ConfigError(
                f"int_coef={self.int_coef}, ext_coef={self.ext_coef}: both must be >= 0", "set e.g. 1 and 2"
            )
        if not 0.0 < self.rnd_update_proportion <= 1.0:
            raise ConfigError(
                f"rnd_update_proportion={self.rnd_update_proportion} is outside (0, 1]", "set it to e.g. 0.25"
            )
        if not 0.0 <= self.int_gamma <= 1.0:
            raise ConfigError(f"int_gamma={self.int_gamma} is outside [0, 1]", "set int_gamma to e.g. 0.99")
        rejected = [k for k in ("dataset", "recurrent", "rollout_workers", "shared_net") if getattr(self, k, None)]
        if rejected:
            raise ConfigError(
                f"ppo_rnd does not take {', '.join(rejected)} yet: its intrinsic critic and bonus read whole "
                "in-process rollouts of separate networks",
                f"drop {', '.join(rejected)}, or use ppo for them",
            )


def _update_moments(mean: Tensor, var: Tensor, count: Tensor, batch: Tensor) -> None:
    """Merge a batch's mean and (biased) variance into running ones, in place (Chan et al.'s parallel update, as
    envs/normalize.RunningMeanStd does in numpy; here on tensors, the module's buffers, so that they stay on the
    run's device and checkpoints hold them)."""
    n = batch.shape[0]
    batch_mean = batch.mean(0)
    batch_var = batch.var(0, unbiased=False)
    delta = batch_mean - mean
    total = count + n
    var.mul_(count).add_(batch_var * n + delta * delta * count * n / total).div_(total)
    mean.add_(delta * n / total)
    count.copy_(total)


class _MLPFeatures(nn.Module):
    """A one-member StackedMLP as [B, in] -> [B, out]."""

    def __init__(self, in_size: int, hidden_sizes: list[int], out_size: int, activation: str, gain: float) -> None:
        super().__init__()
        self.body = StackedMLP(1, in_size, hidden_sizes, out_size, activation)
        self.body.orthogonal_init([gain])

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(len(x), -1))[0]


def _frame_features(layout: ImageLayout, features: int, head: list[int]) -> nn.Sequential:
    """RND's image network (CleanRL's for Atari): three convolutions (32 8x8 stride 4, 64 4x4 stride 2, 64 3x3),
    leaky ReLU, then linear layers of `head` units (ReLU) and `features` outputs; orthogonal weights of gain sqrt(2).
    It reads normalized [B, C, H, W] frames."""
    height, width = layout.height, layout.width
    for kernel, stride in ((8, 4), (4, 2), (3, 1)):
        height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
    if min(height, width) < 1:
        raise ConfigError(
            f"frames of {layout.height}x{layout.width} are too small for RND's convolutions (36x36 at least)",
            "enlarge them with gymnasium.wrappers.ResizeObservation",
        )
    layers: list[nn.Module] = [
        nn.Conv2d(layout.channels, 32, 8, 4), nn.LeakyReLU(), nn.Conv2d(32, 64, 4, 2), nn.LeakyReLU(),
        nn.Conv2d(64, 64, 3, 1), nn.LeakyReLU(), nn.Flatten(),
    ]  # fmt: skip
    width_in = 64 * height * width
    for units in head:
        layers += [nn.Linear(width_in, units), nn.ReLU()]
        width_in = units
    layers.append(nn.Linear(width_in, features))
    net = nn.Sequential(*layers)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(module.weight, math.sqrt(2))
            nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return net


class RandomNetworkDistillation(nn.Module):
    """The random network, the predictor, the intrinsic critic and the running statistics (see the module
    docstring). Vector observations: MLPs. Image observations (uint8 frames): CleanRL's convolutional random
    network and predictor (the predictor with two more 512-unit layers) on frames normalized pixel by pixel, and
    an intrinsic critic on the run's image encoder. Buffers: the next observations' mean / var / count (per
    feature or pixel), the intrinsic returns' var / count, and each env's running discounted intrinsic return."""

    obs_mean: Tensor
    obs_var: Tensor
    obs_count: Tensor
    return_mean: Tensor
    return_var: Tensor
    return_count: Tensor
    running_return: Tensor

    def __init__(self, obs_space: gym.Space, num_envs: int, cfg: RNDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = image_layout(obs_space)
        self.target: nn.Module
        self.predictor: nn.Module
        self.critic: nn.Module
        if self.layout is None:
            size = obs_dim(obs_space)
            stats_shape: tuple[int, ...] = (size,)
            self.target = _MLPFeatures(size, cfg.rnd_hidden_sizes, cfg.rnd_features, "relu", math.sqrt(2))
            self.predictor = _MLPFeatures(size, cfg.rnd_hidden_sizes, cfg.rnd_features, "relu", math.sqrt(2))
            self.critic = _MLPFeatures(size, cfg.hidden_sizes, 1, cfg.activation, 1.0)
        else:
            stats_shape = (self.layout.channels, self.layout.height, self.layout.width)
            self.target = _frame_features(self.layout, cfg.rnd_features, [])
            self.predictor = _frame_features(self.layout, cfg.rnd_features, [512, 512])
            encoder = make_encoder(cfg.encoder, obs_space, orthogonal=True)
            assert encoder is not None
            self.critic = nn.Sequential(encoder, nn.Linear(encoder.features, 1))
        self.target.requires_grad_(False)
        for name, value in (("obs_mean", torch.zeros(stats_shape)), ("obs_var", torch.ones(stats_shape)),
                            ("obs_count", torch.tensor(1e-4)), ("return_mean", torch.zeros(())),
                            ("return_var", torch.ones(())), ("return_count", torch.tensor(1e-4)),
                            ("running_return", torch.zeros(num_envs))):  # fmt: skip
            self.register_buffer(name, value)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [*self.predictor.parameters(), *self.critic.parameters()]

    def _inputs(self, obs: Tensor) -> Tensor:
        """Vectors flattened [B, D], frames as [B, C, H, W] in [0, 1]."""
        return obs.reshape(len(obs), -1).float() if self.layout is None else self.layout.to_nchw(obs)

    def normalized(self, obs: Tensor) -> Tensor:
        clip = self.cfg.rnd_obs_clip
        return ((self._inputs(obs) - self.obs_mean) / self.obs_var.sqrt()).clamp_(-clip, clip)

    def prediction_error(self, normalized_obs: Tensor) -> Tensor:
        """||f_hat(o) - f(o)||^2 / 2 per row (with autograd through the predictor)."""
        with torch.no_grad():
            target = self.target(normalized_obs)
        return (self.predictor(normalized_obs) - target).pow(2).sum(-1) / 2

    def values(self, obs: Tensor) -> Tensor:
        return self.critic(obs)[:, 0]

    @torch.no_grad()
    def intrinsic(self, rollout: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(A_int, R_int, the normalized next observations), [T, N] and [T, N, ...], for a rollout that carries
        `last_obs`."""
        steps, envs = rollout.rewards.shape
        next_obs = torch.cat([rollout.obs[1:], rollout.last_obs.unsqueeze(0)]).flatten(0, 1)
        _update_moments(self.obs_mean, self.obs_var, self.obs_count, self._inputs(next_obs))
        normalized = self.normalized(next_obs)
        rewards = self.prediction_error(normalized).view(steps, envs)
        returns = torch.empty_like(rewards)
        running = self.running_return
        for t in range(steps):  # each env's discounted sum of the bonus so far, never reset
            running.mul_(self.cfg.int_gamma).add_(rewards[t])
            returns[t] = running
        _update_moments(self.return_mean, self.return_var, self.return_count, returns.reshape(-1))
        rewards /= self.return_var.sqrt()
        values = self.values(rollout.obs.flatten(0, 1)).view(steps, envs)
        after_last = self.values(rollout.last_obs)
        next_values = torch.cat([values[1:], after_last.unsqueeze(0)])
        never = torch.zeros_like(rewards, dtype=torch.bool)
        gae = ADVANTAGES.get("gae")
        advantages, int_returns = gae(rewards, values, next_values, never, never, self.cfg.int_gamma,
                                      self.cfg.gae_lambda)  # fmt: skip
        return advantages, int_returns, normalized.view(steps, envs, *normalized.shape[1:])


class PPORND(PPO):
    """PPO whose advantages add RND's intrinsic ones; RND's networks train after PPO's epochs."""

    name = "ppo_rnd"
    config_cls = RNDConfig

    def __init__(self, cfg: RNDConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.rnd = RandomNetworkDistillation(obs_space, cfg.num_envs, cfg).to(cfg.device)
        self.rnd_params = ParameterBuffer(self.rnd.trained_parameters())
        self.rnd_optimizer = Adam([self.rnd_params.flat], lr=cfg.lr, eps=1e-5)
        self.modules = {"rnd": self.rnd}
        """Checkpointed beside the policy (the on-policy loop saves `modules` and `optimizers`)."""
        self.optimizers = {"rnd": self.rnd_optimizer}
        self._intrinsic_advantages: Tensor | None = None

    def update(
        self,
        rollout: Batch,
        progress: float,
        loss: ActorCriticLoss | None = None,
        after_step: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        advantages, returns, normalized = self.rnd.intrinsic(rollout)
        self._intrinsic_advantages = advantages
        metrics = super().update(rollout, progress, loss, after_step)
        set_lr(self.rnd_optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        metrics.update(self._fit(rollout.obs.flatten(0, 1), returns.flatten(), normalized.flatten(0, 1)))
        metrics["intrinsic_return"] = returns.mean()
        return metrics

    def rollout_data(self, rollout: Batch) -> Batch:
        """PPO's flattened rollout with A = ext_coef A_ext + int_coef A_int."""
        data = super().rollout_data(rollout)
        assert self._intrinsic_advantages is not None
        cfg: RNDConfig = self.cfg  # type: ignore[assignment]
        data.advantages = cfg.ext_coef * data.advantages + cfg.int_coef * self._intrinsic_advantages.flatten()
        return data

    def _fit(self, obs: Tensor, int_returns: Tensor, normalized: Tensor) -> dict[str, Tensor]:
        """The intrinsic critic's regression and the predictor's distillation, PPO's epochs of minibatches."""
        cfg: RNDConfig = self.cfg  # type: ignore[assignment]
        n, size = len(int_returns), min(cfg.batch_size, len(int_returns))
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=self.generator, device=obs.device)
            for start in range(0, n, size):
                rows = order[start : start + size]
                value_loss = (self.rnd.values(obs[rows]) - int_returns[rows]).pow(2).mean()
                errors = self.rnd.prediction_error(normalized[rows])
                keep = (torch.rand(len(rows), generator=self.generator, device=obs.device)
                        < cfg.rnd_update_proportion).to(errors.dtype)  # fmt: skip
                forward_loss = (errors * keep).sum() / keep.sum().clamp_min(1.0)
                self.rnd_params.zero_grad()
                (value_loss + forward_loss).backward()
                if cfg.max_grad_norm is not None:
                    self.rnd_params.clip_grad_norm_(cfg.max_grad_norm)
                self.rnd_optimizer.step()
        return {"intrinsic_value_loss": value_loss.detach(), "forward_loss": forward_loss.detach()}
