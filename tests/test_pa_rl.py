"""PA-RL: action optimization against a hand-made critic, improvement over its BC start on a mixed-quality dataset
(Gaussian and diffusion heads), pretrained BC weights, exact resume, pl.load round trip, clear config errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import policylab as pl
from policylab.algos.pa_rl import PARL, PARLConfig, optimize_actions, sample_candidates
from policylab.checkpoint import load_checkpoint
from policylab.collect import collect
from policylab.data.dataset import concat_datasets, load_dataset, write_dataset
from policylab.errors import ConfigError, EnvError
from policylab.nets import GaussianActor
from tests.helpers import resumed_and_full_runs

GOAL_ENV = "tests.envs_for_tests:SparseGoalEnv"
SMALL = {"hidden_sizes": [64, 64], "denoiser_hidden_sizes": [64, 64], "diffusion_steps": 5, "lr": 3e-3,
         "batch_size": 64, "log_every": 250, "eval_every": 0, "eval_episodes": 10, "threads": 1}  # fmt: skip
PA_RL = {"n_samples": 8, "keep": 4, "local_steps": 3, "tau": 0.02, "bc_steps": 150}


class BowlCritic(nn.Module):
    """Q_k(s, a) = -(a - c_k s)^2 summed over action dims, for two members (c = 0.5, 0.7): known gradients."""

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        centers = torch.tensor([0.5, 0.7]).view(2, 1, 1) * obs[:, :1]
        return -(actions.unsqueeze(0) - centers).pow(2).sum(-1)


def _q(obs: Tensor, actions: Tensor) -> Tensor:
    return BowlCritic()(obs, actions).mean(0)


def test_action_optimization_takes_the_argmax_q_candidate_and_its_gradient_steps_raise_q():
    torch.manual_seed(0)
    actor = GaussianActor(1, -torch.ones(2), torch.ones(2), (8,))
    with torch.no_grad():
        actor.log_std.fill_(0.0)  # wide candidates
    obs = torch.linspace(-1.0, 1.0, 16).unsqueeze(1)
    cfg = PARLConfig(dataset="unused", n_samples=6, keep=6, local_steps=0, head="gaussian")
    chosen, _ = optimize_actions(actor, BowlCritic(), obs, cfg, torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same draws: the chosen action is each state's best of its 6 candidates
        candidates = sample_candidates(actor, obs, 6, 0.1, torch.Generator().manual_seed(3))
    q = _q(obs.repeat_interleave(6, 0), candidates.flatten(0, 1)).view(16, 6)
    torch.testing.assert_close(chosen, candidates[torch.arange(16), q.argmax(1)])
    # keeping 2 of 6 by Q changes nothing about the argmax; gradient steps of 0.1 towards the bowl's centre raise Q
    stepping = replace(cfg, keep=2, local_steps=5, step_size=0.1)
    stepped, metrics = optimize_actions(actor, BowlCritic(), obs, stepping, torch.Generator().manual_seed(3))
    assert (_q(obs, stepped) >= _q(obs, chosen) - 1e-6).all() and (_q(obs, stepped) > _q(obs, chosen) + 1e-3).any()
    assert metrics["q_optimized"] > metrics["q_sampled"]
    # the dataset's action is a candidate in training: at the bowl's centre, nothing beats it
    best = 0.6 * obs.expand(-1, 2)
    picked, _ = optimize_actions(actor, BowlCritic(), obs, cfg, torch.Generator().manual_seed(3), best)
    torch.testing.assert_close(picked, best)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """SparseGoalEnv, 10 episodes moving right at full speed (noise 0.3; returns 13 to 15 of 16) and 10 moving left
    (returns 0): at the start, half the data goes each way."""
    right, left = (lambda obs, v=v: np.full((len(obs), 1), v, np.float32) for v in (1.0, -1.0))
    good = collect(GOAL_ENV, right, 10, noise=0.3, seed=0)
    bad = collect(GOAL_ENV, left, 10, noise=0.3, seed=1)
    data = concat_datasets([good, bad])
    data.ref_min_score, data.ref_max_score = good.ref_min_score, good.ref_max_score
    return str(write_dataset(data, tmp_path_factory.mktemp("pa_rl") / "mixed"))


@pytest.fixture(scope="module")
def bc_runs(mixed, tmp_path_factory):
    root = tmp_path_factory.mktemp("bc")
    return {head: pl.train("bc", dataset=mixed, steps=1500, seed=1, overrides={**SMALL, "head": head},
                           runs_dir=root, name=head, verbose=False) for head in ("gaussian", "diffusion")}  # fmt: skip


def _score(dataset: str, ret: float) -> float:
    return float(load_dataset(dataset, validate=False).normalized_score(ret))


@pytest.mark.parametrize("head", ["gaussian", "diffusion"])
def test_pa_rl_improves_on_its_bc_start(mixed, bc_runs, tmp_path, head):
    """BC from 1,500 steps, then 1,500 PA-RL steps from its weights (the first 150 cloning while the critic learns).
    Measured, seeds 0 / 1 / 2 (normalized, 10 episodes): BC gaussian 81 / 0 / 69, diffusion 33 / 6 / 20; PA-RL
    acting by optimization 100 / 99 / 99 and 94 / 100 / 100; its distilled policy alone 100 / 100 / 100 and
    94 / 94 / 91. The test runs seed 1."""
    bc = bc_runs[head]
    run = pl.train("pa_rl", dataset=mixed, steps=1500, seed=1, runs_dir=tmp_path, verbose=False,
                   overrides={**SMALL, **PA_RL, "head": head, "pretrained": str(bc.dir)})  # fmt: skip
    bc_score, pa_score = _score(mixed, bc.final_eval["return_mean"]), _score(mixed, run.final_eval["return_mean"])
    policy = pl.load(run.dir)
    policy.net.cfg.act_with = "policy"
    distilled = _score(mixed, pl.evaluate(policy, 10, seed=100)["return_mean"])
    assert pa_score >= 85 and distilled >= 75 and min(pa_score, distilled) >= bc_score + 30, (
        bc_score, pa_score, distilled)  # fmt: skip


def test_resumed_offline_to_online_run_equals_uninterrupted_run(datasets, tmp_path):
    """200 offline steps (100 cloning), then 200 env steps exploring by action optimization; stopped at 300. On
    Pendulum (conftest's noisy dataset), whose env state a checkpoint keeps."""
    cfg = {**SMALL, **PA_RL, "bc_steps": 100, "log_every": 100, "checkpoint_every": 0, "eval_episodes": 1,
           "save_buffer": True, "batch_size": 16, "head": "diffusion"}  # fmt: skip
    kwargs = dict(
        dataset=datasets["medium"], steps=200, online_steps=200, seed=3, overrides=cfg, runs_dir=tmp_path, verbose=False
    )
    full, part, _ = resumed_and_full_runs("pa_rl", 300, **kwargs)
    assert part.steps == 300
    tensors, _, _ = load_checkpoint(full.dir)
    assert any(k.startswith("policy/critic.") for k in tensors), "the critic is saved with the policy"
    assert not any(k.startswith("critic/") for k in tensors), "and only there"
    assert any(k.startswith("critic_target/") for k in tensors) and any(k.startswith("value/") for k in tensors)


def test_loaded_policy_acts_from_the_checkpoint_alone(mixed, tmp_path):
    run = pl.train("pa_rl", dataset=mixed, steps=100, seed=0, runs_dir=tmp_path, verbose=False,
                   overrides={**SMALL, **PA_RL, "head": "flow", "sample_steps": 2})  # fmt: skip
    first, again = pl.load(run.dir), pl.load(run.dir)
    obs = np.linspace(-1.0, 1.0, 5, dtype=np.float32)[:, None]
    actions = first.act(obs)
    assert actions.shape == (5, 1) and np.all(np.abs(actions) <= 1.0)
    np.testing.assert_array_equal(actions, again.act(obs))  # the same seed: the same candidates and choice
    assert first.act(obs[0]).shape == (1,)
    first.net.cfg.act_with = "policy"
    assert first.act(obs).shape == (5, 1)


def test_pretrained_bc_weights_start_the_policy(mixed, bc_runs):
    from tests.envs_for_tests import SparseGoalEnv

    cfg = PARLConfig(dataset=mixed, head="diffusion", pretrained=str(bc_runs["diffusion"].dir), **SMALL)
    algo = PARL(cfg, SparseGoalEnv.observation_space, SparseGoalEnv.action_space)
    bc = pl.load(bc_runs["diffusion"].dir).net.state_dict()
    mine = algo.net.actor.state_dict()
    assert mine.keys() == bc.keys() and all(torch.equal(mine[k], bc[k]) for k in bc)


def test_bad_settings_are_clear_errors(mixed, bc_runs, tmp_path):
    def train(**overrides):
        pl.train("pa_rl", dataset=mixed, steps=10, runs_dir=tmp_path, verbose=False, overrides={**SMALL, **overrides})

    with pytest.raises(ConfigError, match="keep=9 exceeds n_samples=8"):
        train(n_samples=8, keep=9)
    with pytest.raises(ConfigError, match="horizon=2"):
        train(horizon=2, act_steps=1)
    with pytest.raises(ConfigError, match="q_reduce='max'"):
        train(q_reduce="max")
    with pytest.raises(ConfigError, match="act_with"):
        train(act_with="critic")
    gaussian, diffusion = str(bc_runs["gaussian"].dir), str(bc_runs["diffusion"].dir)
    with pytest.raises(ConfigError, match="head=gaussian there, diffusion here"):
        train(head="diffusion", pretrained=gaussian)
    with pytest.raises(ConfigError, match="diffusion_steps=5 there, 10 here"):
        train(head="diffusion", pretrained=diffusion, diffusion_steps=10)
    with pytest.raises(ConfigError, match="hidden_sizes"):
        train(head="gaussian", pretrained=gaussian, hidden_sizes=[32])
    cartpole = collect("CartPole-v1", "random", 2, seed=0, out=tmp_path / "cartpole").path
    with pytest.raises(EnvError, match="pa_rl needs a continuous"):
        pl.train("pa_rl", dataset=str(cartpole), steps=10, runs_dir=tmp_path, verbose=False, overrides=SMALL)
