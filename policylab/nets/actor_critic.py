"""Actor-critic network: policy head + value function, separate or with a shared body; optionally an image
encoder in front, and LSTMs (`memory` > 0) between the features and the body.

Recurrent networks (`memory` > 0, RecurrentPPO-style): the actor and the critic each have an LSTM (one shared
LSTM with `shared`), whose hidden and cell states, [2, members, envs, memory], are carried from step to step
and rollout to rollout, and zeroed where an episode starts. In rollouts the network keeps them itself
(`rollout_state`, stepped by `act`, zeroed by `reset_states`); in updates, `evaluate_sequences` replays each
env's rollout from its state at the rollout's start, zeroing at the recorded episode starts, so minibatches are
whole sequences, never shuffled steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.errors import ConfigError
from policylab.nets.cnn import make_encoder
from policylab.nets.heads import make_head
from policylab.nets.mlp import StackedMLP
from policylab.nets.sde import (
    exploration_matrices,
    sde_log_std,
    sde_log_std_numpy,
    standardized_noise,
    standardized_noise_numpy,
)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (two members of one StackedMLP) or one shared body.

    forward(obs) -> (policy outputs [B, n], values [B]). The policy outputs are
    logits (Discrete) or Gaussian means (Box, with the parameter `log_std`). With `sde` (Box actions), the
    exploration is gSDE's (nets/sde.py): `log_std` is [features, n], the Gaussian's log std per row comes from
    the actor's last hidden features, and rollouts act with each env's noise matrix, redrawn every
    `sde_sample_freq` steps (<= 0: once per rollout).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        shared: bool = False,
        ortho_init: bool = True,
        log_std_init: float = 0.0,
        squash: bool = False,
        algo: str = "this algorithm",
        encoder: str = "auto",
        memory: int = 0,
        sde: bool = False,
        sde_sample_freq: int = -1,
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder, observation_space, orthogonal=ortho_init)
        """The image encoder shared by actor and critic (nets/cnn.py), None for vector observations."""
        self.obs_dim = int(np.prod(observation_space.shape)) if self.encoder is None else self.encoder.features
        self.head = make_head(action_space, squash, algo)
        n = self.head.n_outputs
        self.n_outputs = n
        self.shared = shared
        out_dim = n + 1 if shared else n
        members = 1 if shared else 2
        self.memory = memory
        self.lstms = nn.ModuleList(nn.LSTM(self.obs_dim, memory) for _ in range(members if memory else 0))
        self.rollout_state: Tensor | None = None
        """The LSTM states of the envs being stepped in rollouts (recurrent networks only)."""
        self.last_state: Tensor | None = None
        """The state after the latest recurrent `forward`."""
        self.body = StackedMLP(members, memory or self.obs_dim, hidden_sizes, out_dim, activation)
        if ortho_init:
            gains = [0.01] * n + [1.0] if shared else [0.01, 1.0]
            self.body.orthogonal_init(gains)
        self.sde, self.sde_sample_freq = sde, sde_sample_freq
        self.latent_dim = int(hidden_sizes[-1]) if len(hidden_sizes) else self.obs_dim
        """The width of the actor's last hidden layer (gSDE's features)."""
        if sde:
            check_sde(self.head.continuous and not squash, memory > 0)
        if self.head.continuous:
            shape = (self.latent_dim, n) if sde else (n,)
            self.log_std = nn.Parameter(torch.full(shape, float(log_std_init)))
        else:
            self.register_parameter("log_std", None)

    @property
    def recurrent(self) -> bool:
        return self.memory > 0

    def _features(self, obs: Tensor) -> Tensor:
        return obs.reshape(obs.shape[0], self.obs_dim) if self.encoder is None else self.encoder(obs)

    def _split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.shared:
            return y[0, :, : self.n_outputs], y[0, :, self.n_outputs]
        return y[0, :, : self.n_outputs], y[1, :, 0]

    def forward(self, obs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(policy outputs, values) of a batch of observations; a recurrent network takes its LSTM `state` (zeros if
        None) and steps it once (the stepped state is `self.last_state`)."""
        x = self._features(obs)
        if self.recurrent:
            state = self.initial_state(len(obs), obs.device) if state is None else state
            h, self.last_state = self._recur(x.unsqueeze(0), state)
            return self._split(self.body.forward(h))
        return self._split(self.body.forward(x))  # .forward: no hook overhead on the hot path

    def _outputs(self, obs: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(policy outputs, the head's log std: the shared parameter, or under gSDE one per row, values, the actor's
        last hidden features) of a non-recurrent network."""
        y, hidden = self.body.forward_features(self._features(obs))
        out, values = self._split(y)
        if not self.sde:
            return out, self.log_std, values, hidden[0]
        return out, sde_log_std(hidden[0], self.log_std), values, hidden[0]  # type: ignore[arg-type]

    def _head_inputs(self, obs: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(the head's inputs, its log std, values) at `obs` (a recurrent network from zero states)."""
        if self.recurrent:
            out, values = self(obs)
            return out, self.log_std, values
        out, log_std, values, _ = self._outputs(obs)
        return out, log_std, values

    def distribution(self, obs: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the head's inputs, its log std) at `obs`: what `head.sample` and `head.log_prob_entropy` take."""
        out, log_std, _ = self._head_inputs(obs)
        return out, log_std

    def row_log_std(self, hidden: Tensor) -> Tensor | None:
        """The head's log std given the actor's last hidden features [B, features] (`forward_cached`'s last input):
        the shared parameter, or under gSDE one per row."""
        return sde_log_std(hidden, self.log_std) if self.sde else self.log_std  # type: ignore[arg-type]

    # gSDE exploration -----------------------------------------------------------------------

    def rollout_noise(
        self, steps: int, envs: int, generator: torch.Generator | None, device: torch.device | str
    ) -> Tensor:
        """A rollout's noise in one RNG call, [draws, envs, ...] (envs on axis 1, so slices of envs take slices of
        it): the head's per-step noise (draws = steps), or under gSDE the standard normal draws of each env's noise
        matrices, one per `sde_sample_freq` steps (one per rollout if <= 0)."""
        if not self.sde:
            return self.head.noise((steps, envs), generator, device)
        draws = 1 if self.sde_sample_freq <= 0 else -(-steps // self.sde_sample_freq)
        return torch.randn((draws, envs, self.latent_dim, self.n_outputs), generator=generator, device=device)

    def noise_at(self, noise: Any, step: int) -> Any:
        """The part of `rollout_noise` that rollout step `step` acts with."""
        if not self.sde:
            return noise[step]
        return noise[0 if self.sde_sample_freq <= 0 else step // self.sde_sample_freq]

    # recurrent networks ----------------------------------------------------------------------

    def initial_state(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Zero LSTM states for n envs: [2 (hidden, cell), members, n, memory]."""
        return torch.zeros(2, len(self.lstms), n, self.memory, device=device)

    def _recur(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Run the LSTMs over features x [T, N, F] from `state`. Returns ([members, T * N, memory] outputs, the
        final state)."""
        outputs, finals = [], []
        for k, lstm in enumerate(self.lstms):
            out, (h, c) = lstm(x, (state[0, k].unsqueeze(0), state[1, k].unsqueeze(0)))
            outputs.append(out.reshape(-1, self.memory))
            finals.append(torch.stack([h[0], c[0]]))
        return torch.stack(outputs), torch.stack(finals, 1)

    def _recur_segments(self, x: Tensor, state: Tensor, starts: Tensor) -> Tensor:
        """The LSTMs' outputs [members, T * N, memory] over x [T, N, F] from `state`, zeroed before the steps where
        `starts` [T, N] is set: each env's steps are cut at its episode starts into segments, and all segments
        go through one LSTM call side by side (padded at their ends), the first of each env from its state and
        the others from zeros. The same arithmetic as stepping one step at a time, in one call instead of T."""
        t, n = starts.shape
        begins = starts.t().reshape(-1).clone()  # env-major: position e * T + s
        begins[::t] = True
        segment = torch.cumsum(begins, 0) - 1
        first_position = torch.nonzero(begins).squeeze(1)
        offset = torch.arange(t * n, device=x.device) - first_position[segment]
        segments, length = len(first_position), int(offset.max()) + 1
        first_of_env = segment[::t]
        keep = (~starts[0]).to(x.dtype).view(1, n, 1)
        padded = x.new_zeros(length, segments, x.shape[-1])
        padded[offset, segment] = x.transpose(0, 1).reshape(t * n, -1)
        outputs = []
        for k, lstm in enumerate(self.lstms):
            h0 = x.new_zeros(2, 1, segments, self.memory)
            h0[:, :, first_of_env] = state[:, k].unsqueeze(1) * keep
            out, _ = lstm(padded, (h0[0], h0[1]))
            outputs.append(out[offset, segment].view(n, t, self.memory).transpose(0, 1).reshape(-1, self.memory))
        return torch.stack(outputs)

    def reset_states(self, ended: np.ndarray | Tensor) -> None:
        """Zero the rollout states of the envs whose episode just ended (the next step starts a new one)."""
        if self.rollout_state is not None:
            mask = torch.as_tensor(ended, device=self.rollout_state.device)
            if bool(mask.any()):  # not in place: the state may come from inference mode
                self.rollout_state = self.rollout_state.masked_fill(mask.view(1, 1, -1, 1), 0.0)

    def current_states(self, n: int, device: torch.device) -> Tensor:
        """The rollout states of n envs (zeros at first, or when the number of envs changed)."""
        if self.rollout_state is None or self.rollout_state.shape[2] != n:
            self.rollout_state = self.initial_state(n, device)
        return self.rollout_state

    def evaluate_sequences(
        self, obs: Tensor, actions: Tensor, states: Tensor, starts: Tensor, logit_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`evaluate` over whole sequences: obs [T, E, ...] of E envs from their LSTM `states` at the sequence start,
        zeroed where `starts` [T, E]; actions [T * E, ...] (time-major). Returns flat (log-probs, entropies, values)."""
        t, e = obs.shape[:2]
        x = self._features(obs.reshape(t * e, *obs.shape[2:])).view(t, e, -1)
        h = self._recur_segments(x, states, starts) if bool(starts.any()) else self._recur(x, states)[0]
        out, values = self._split(self.body.forward(h))
        logp, entropy = self.masked_log_prob_entropy(out, self.log_std, actions, logit_bias)
        return logp, entropy, values

    def act(
        self,
        obs: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        logit_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions (with pre-drawn `noise` from `head.noise`, if given); returns (actions, log-probs, values).
        A recurrent network steps its `rollout_state`. `logit_bias`: the action masks' (`head.mask_bias`), added to
        the logits."""
        if self.recurrent:
            out, values = self.forward(obs, self.current_states(len(obs), obs.device))
            self.rollout_state = self.last_state
        elif self.sde:  # `noise`: the envs' standard normal matrix draws (`noise_at`)
            out, log_std, values, hidden = self._outputs(obs)
            assert log_std is not None
            if noise is None:
                noise = torch.randn((len(obs), self.latent_dim, self.n_outputs), generator=generator, device=obs.device)
            matrices = exploration_matrices(self.log_std, noise)  # type: ignore[arg-type]
            actions, logp = self.head.sample(out, log_std, generator, standardized_noise(hidden, matrices, log_std))
            return actions, logp, values
        else:
            out, values = self.forward(obs)
        actions, logp = self.head.sample(masked(out, logit_bias), self.log_std, generator, noise)
        return actions, logp, values

    @property
    def numpy_acting(self) -> bool:
        """Whether `act_numpy` applies: tanh/relu MLPs on vectors, without memory, on the CPU."""
        return (
            self.encoder is None
            and not self.recurrent
            and self.body.analytic_backward
            and self.body.weights[0].device.type == "cpu"
        )

    def act_numpy(
        self, obs: np.ndarray, noise: np.ndarray, logit_bias: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`act` in numpy with pre-drawn noise (rollouts on CPU); returns (actions, log-probs, values)."""
        y, hidden = self.body.numpy_forward_features(obs.reshape(obs.shape[0], self.obs_dim))
        values = y[0, :, self.n_outputs] if self.shared else y[1, :, 0]
        log_std = None if self.log_std is None else self.log_std.detach().numpy()
        if self.sde:  # `noise`: the envs' standard normal matrix draws
            assert log_std is not None
            features = hidden[0] if hidden.ndim == 3 else hidden
            row_log_std = sde_log_std_numpy(features, log_std)
            noise = standardized_noise_numpy(features, np.exp(log_std) * noise, row_log_std)
            log_std = row_log_std
        out = y[0, :, : self.n_outputs]
        actions, logp = self.head.sample_numpy(out if logit_bias is None else out + logit_bias, log_std, noise)
        return actions, logp, values

    def evaluate(self, obs: Tensor, actions: Tensor, logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs of `actions`, entropies, values) under the current parameters (and the action masks'
        `logit_bias`, if given)."""
        out, log_std, values = self._head_inputs(obs)
        logp, entropy = self.masked_log_prob_entropy(out, log_std, actions, logit_bias)
        return logp, entropy, values

    def masked_log_prob_entropy(
        self, out: Tensor, log_std: Tensor | None, actions: Tensor, logit_bias: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The head's (log-probs, entropies) of `actions`, under the action masks' `logit_bias` if given."""
        return self.head.log_prob_entropy(masked(out, logit_bias), log_std, actions, masked=logit_bias is not None)

    def predict_values(self, obs: Tensor, rows: Tensor | None = None) -> Tensor:
        """V(obs); a recurrent network reads (without stepping) the rollout states of the envs `rows` (all: None)."""
        if not self.recurrent:
            return self.forward(obs)[1]
        if rows is None:
            return self.forward(obs, self.current_states(len(obs), obs.device))[1]
        assert self.rollout_state is not None
        return self.forward(obs, self.rollout_state[:, :, rows])[1]

    def policy_distribution(self, obs: Tensor) -> tuple[Tensor, Tensor | None]:
        """`distribution` (the head's inputs and log std) alone: with separate networks only the actor's member is
        computed (TRPO's many policy-only passes), with a shared body or memory the whole forward."""
        if self.shared or self.recurrent:
            return self.distribution(obs)
        y, hidden = self.body.forward_features(self._features(obs), members=1)
        return y[0, :, : self.n_outputs], self.row_log_std(hidden[0])

    def deterministic(self, obs: Tensor) -> Tensor:
        return self.head.mode(self.forward(obs)[0])

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        state: Tensor | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """Actions as the env takes them (every policy network has this method; `Policy.act` calls it). A recurrent
        network starts from `state` (zeros if None) and leaves the stepped state in `last_state`. `logit_bias`: the
        action masks' (`head.mask_bias`)."""
        log_std: Tensor | None
        if self.recurrent:
            out, log_std = self.forward(obs, state)[0], self.log_std
        else:  # sampled under gSDE: from each row's Gaussian (its law given s), without a held noise matrix
            out, log_std = self.distribution(obs)
        out = masked(out, logit_bias)
        raw = self.head.mode(out) if deterministic else self.head.sample(out, log_std, generator, None)[0]
        return self.head.to_env(raw)


def masked(logits: Tensor, logit_bias: Tensor | None) -> Tensor:
    """Logits with the action masks' bias (0 where allowed, -1e9 where not: `head.mask_bias`) added, if any."""
    return logits if logit_bias is None else logits + logit_bias


def check_sde(box_actions: bool, recurrent: bool) -> None:
    """One clear error where gSDE does not apply to the network."""
    if not box_actions:
        raise ConfigError(
            "use_sde explores continuous actions with state-dependent Gaussian noise: it needs Box actions without "
            "tanh squashing",
            "drop use_sde (discrete actions), or set squash_actions=false",
        )
    if recurrent:
        raise ConfigError("use_sde does not combine with recurrent=true", "drop one of use_sde and recurrent")
