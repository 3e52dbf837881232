"""RPO: the shifted mean in the log-probabilities, the shift's draw per minibatch, the entropy it keeps against PPO's,
learning InvertedPendulum, bad settings. (Its fused step against autograd: tests/test_fused.py.)"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos import get_algo
from policylab.algos.rpo import RPOConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.train import OnPolicyLoop, resolve_config
from tests.helpers import train_until
from tests.test_learning import FAST


def test_a_shift_on_the_heads_inputs_moves_the_gaussians_mean():
    torch.manual_seed(0)
    net = ActorCritic(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (2,), np.float32), (16,), "tanh")
    obs, actions, shift = torch.randn(5, 3), torch.randn(5, 2), torch.rand(5, 2) - 0.5
    logp, _, _ = net.evaluate(obs, actions, shift)
    mean, log_std = net.distribution(obs)
    assert log_std is not None
    expected = torch.distributions.Normal(mean + shift, log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(logp, expected)


def test_each_minibatch_draws_its_own_uniform_shift():
    spec = get_algo("rpo")
    settings = {"n_steps": 64, "num_envs": 1, "batch_size": 16, "epochs": 2, "rpo_alpha": 0.3, "threads": 1}
    cfg, _ = resolve_config(spec, "Pendulum-v1", 64, 0, overrides=settings)
    loop = OnPolicyLoop(spec, cfg)
    shifts: list[torch.Tensor] = []
    step = loop.algo.learner.step

    def recording_step(mb: Batch, *args, **kwargs):
        shifts.append(mb.logit_bias.clone())
        return step(mb, *args, **kwargs)

    loop.algo.learner.step = recording_step
    loop.iterate()
    loop.close()
    assert len(shifts) == 8 and all(s.shape == (16, 1) for s in shifts)
    drawn = torch.cat(shifts)
    assert drawn.abs().max() <= 0.3 and drawn.min() < -0.2 and drawn.max() > 0.2
    assert len({float(s.sum()) for s in shifts}) == 8, "a new draw for every minibatch"


def test_rpo_keeps_a_wider_policy_than_ppo(tmp_path):
    """The same seed and settings after 32k InvertedPendulum steps: RPO's log std stays well above PPO's."""
    log_std = {}
    for algo in ("ppo", "rpo"):
        run = pl.train(algo, env="InvertedPendulum-v5", steps=32_768, seed=1, verbose=False, runs_dir=tmp_path,
                       overrides={**FAST, "eval_episodes": 1})  # fmt: skip
        log_std[algo] = float(pl.load(run.dir).net.log_std.detach().mean())
    assert log_std["rpo"] > log_std["ppo"] + 0.3, log_std


def test_rpo_solves_inverted_pendulum(tmp_path):
    """A slower start than PPO's (the noise), so a larger budget than PPO's test; the first evaluation at 900 or
    more stops the run."""
    _, evaluations = train_until(
        900, "rpo", env="InvertedPendulum-v5", steps=200_000, seed=1, runs_dir=tmp_path,
        overrides={**FAST, "eval_every": 8192},
    )  # fmt: skip
    assert evaluations and max(r for _, r in evaluations) >= 900, evaluations


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="rpo_alpha moves a Gaussian policy's mean"):
        pl.train("rpo", env="CartPole-v1", steps=10, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="not for gSDE's state-dependent noise"):
        RPOConfig(env="Pendulum-v1", use_sde=True).validate()
    with pytest.raises(ConfigError, match="rpo_alpha=-1.0 must be >= 0"):
        RPOConfig(env="Pendulum-v1", rpo_alpha=-1.0).validate()
