"""PPO + RND: the bonus is the predictor's error on normalized next observations, it falls where the agent has
been, the intrinsic returns are never cut at episode ends, the advantages combine; a corridor's end that PPO alone
does not find; exact resume; bad settings."""

from __future__ import annotations

import pytest
import torch

import policylab as pl
from policylab.algos import get_algo
from policylab.algos.rnd import RNDConfig, _update_moments
from policylab.errors import ConfigError
from policylab.train import OnPolicyLoop, resolve_config
from tests.helpers import resumed_and_full_runs, train_until

SPARSE_GOAL = "tests.envs_for_tests:SparseGoalEnv"
LONG_CHAIN = "tests.envs_for_tests:LongChain"


def _loop(**overrides) -> OnPolicyLoop:
    spec = get_algo("ppo_rnd")
    settings = {"threads": 1, "num_envs": 2, "n_steps": 32, "batch_size": 32, "epochs": 2, **overrides}
    cfg, _ = resolve_config(spec, SPARSE_GOAL, 640, 0, overrides=settings)
    return OnPolicyLoop(spec, cfg)


def test_running_moments_equal_those_of_all_the_batches_at_once():
    torch.manual_seed(0)
    batches = [torch.randn(5, 3) * 2 + 1, torch.randn(7, 3), torch.randn(1, 3)]
    mean, var, count = torch.zeros(3), torch.ones(3), torch.tensor(0.0)
    for batch in batches:
        _update_moments(mean, var, count, batch)
    every = torch.cat(batches)
    torch.testing.assert_close(mean, every.mean(0))
    torch.testing.assert_close(var, every.var(0, unbiased=False))
    assert float(count) == 13


def test_the_bonus_is_the_predictors_error_on_the_next_observations_and_falls_where_it_has_been():
    loop = _loop()
    rnd = loop.algo.rnd
    rollout = loop.collect()
    with torch.no_grad():
        mean, var = rnd.obs_mean.clone(), rnd.obs_var.clone()
    advantages, returns, normalized = rnd.intrinsic(rollout)
    next_obs = torch.cat([rollout.obs[1:], rollout.last_obs.unsqueeze(0)])  # [T, N, 1]
    assert not torch.equal(rnd.obs_mean, mean) or not torch.equal(rnd.obs_var, var), "the statistics moved"
    expected = ((next_obs.flatten(0, 1) - rnd.obs_mean) / rnd.obs_var.sqrt()).clamp(-5, 5)
    torch.testing.assert_close(normalized.flatten(0, 1), expected)
    assert advantages.shape == returns.shape == rollout.rewards.shape
    before = rnd.prediction_error(normalized.flatten(0, 1)).mean().item()
    for _ in range(5):
        loop.algo.update(rollout, 0.0)
    after = rnd.prediction_error(normalized.flatten(0, 1)).mean().item()
    loop.close()
    assert after < 0.5 * before, (before, after)


def test_intrinsic_returns_run_across_episode_ends():
    """Every 30 steps an episode ends; the intrinsic returns (lambda-returns of V_int) do not drop to the bare
    reward there, as the extrinsic ones would: with int_gamma 0.99 and gae_lambda 1 each is the discounted sum of
    the rest of the rollout's normalized bonus plus the bootstrap."""
    loop = _loop(gae_lambda=1.0, num_envs=1, n_steps=64)
    rollout = loop.collect()
    rnd = loop.algo.rnd
    with torch.no_grad():
        _, returns, normalized = rnd.intrinsic(rollout)
        bonus = rnd.prediction_error(normalized.flatten(0, 1)) / rnd.return_var.sqrt()
        tail = rnd.values(rollout.last_obs.float())[0]
    loop.close()
    assert bool(rollout.episode_end.any())
    expected = torch.empty(64)
    running = tail
    for t in range(63, -1, -1):
        running = bonus[t] + 0.99 * running
        expected[t] = running
    torch.testing.assert_close(returns[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_advantages_combine_the_two_streams_with_their_coefficients():
    loop = _loop(ext_coef=2.0, int_coef=0.5, normalize_advantage=False)
    rollout = loop.collect()
    algo = loop.algo
    algo._intrinsic_advantages = torch.ones_like(rollout.rewards)
    from policylab.algos.ppo import PPO

    extrinsic = PPO.rollout_data(algo, rollout).advantages
    combined = algo.rollout_data(rollout).advantages
    loop.close()
    torch.testing.assert_close(combined, 2.0 * extrinsic + 0.5)


def test_rnd_finds_the_end_of_a_long_corridor_that_ppo_alone_does_not(tmp_path):
    """LongChain: the only reward waits at the end of a 60-cell corridor, 59 moves right within 80 steps. PPO + RND's
    policy walks there within 30k steps; PPO's, with the same settings and budget, never does. The evaluations
    sample the policy: the greedy action of an untrained two-action policy is the same in every cell about half the
    time (its logits differ by a shared bias more than by the cell), which would walk the corridor by chance."""
    settings = {"num_envs": 8, "n_steps": 64, "batch_size": 128, "epochs": 4, "eval_every": 3072, "eval_episodes": 3,
                "eval_deterministic": False, "threads": 1}  # fmt: skip
    kwargs = {"env": LONG_CHAIN, "steps": 30_000, "seed": 1, "runs_dir": tmp_path, "overrides": settings}
    _, found = train_until(1.0, "ppo_rnd", **kwargs)
    assert found[-1][1] == 1.0, found
    _, plain = train_until(1.0, "ppo", **kwargs)
    assert max(score for _, score in plain) == 0.0 and plain[-1][0] >= 27_000, plain


def test_resumed_rnd_run_equals_uninterrupted_run(tmp_path):
    """The predictor, the intrinsic critic, their optimizer and the running statistics all resume."""
    full, _, resumed = resumed_and_full_runs(
        "ppo_rnd", 256, env="CartPole-v1", steps=512, seed=2, runs_dir=tmp_path, verbose=False,
        overrides={"num_envs": 2, "n_steps": 64, "batch_size": 64, "epochs": 2, "eval_every": 0},
    )  # fmt: skip
    from safetensors.torch import load_file

    def rnd_tensors(run: pl.Run) -> dict[str, torch.Tensor]:
        latest = sorted((run.dir / "checkpoints").glob("step_*"))[-1]
        return {k: v for k, v in load_file(latest / "weights.safetensors").items() if k.startswith("rnd/")}

    a, b = rnd_tensors(full), rnd_tensors(resumed)
    assert a.keys() == b.keys() and "rnd/running_return" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="ppo_rnd does not take recurrent"):
        RNDConfig(recurrent=True).validate()
    with pytest.raises(ConfigError, match="rnd_update_proportion=0 is outside"):
        RNDConfig(rnd_update_proportion=0).validate()
    with pytest.raises(ConfigError, match="ppo_rnd does not take image observations yet"):
        pl.train("ppo_rnd", env="tests.envs_for_tests:PixelGridDict", steps=512, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="too small for RND's convolutions"):
        pl.train("ppo_rnd", env="tests.envs_for_tests:PixelGrid", steps=512, runs_dir=tmp_path, verbose=False,
                 overrides={"encoder": "impala", "env_kwargs": {"size": 4}})  # fmt: skip


def test_on_frames_the_bonus_reads_pixels_normalized_one_by_one_and_falls_where_it_has_been():
    """PixelGrid's 40x40 uint8 frames: the statistics are per pixel, the networks convolutional (the predictor
    deeper than the random network), and the predictor's error on the rollout's frames falls as it trains."""
    spec = get_algo("ppo_rnd")
    settings = {"threads": 1, "num_envs": 2, "n_steps": 32, "batch_size": 32, "epochs": 2}
    cfg, _ = resolve_config(spec, "tests.envs_for_tests:PixelGrid", 640, 0, overrides=settings)
    loop = OnPolicyLoop(spec, cfg)
    rnd = loop.algo.rnd
    assert rnd.obs_mean.shape == (1, 40, 40)
    assert len(list(rnd.predictor.parameters())) > len(list(rnd.target.parameters()))
    rollout = loop.collect()
    _, _, normalized = rnd.intrinsic(rollout)
    frames = torch.cat([rollout.obs[1:], rollout.last_obs.unsqueeze(0)]).flatten(0, 1).float() / 255.0
    expected = ((frames.unsqueeze(1) - rnd.obs_mean) / rnd.obs_var.sqrt()).clamp(-5, 5)
    torch.testing.assert_close(normalized.flatten(0, 1), expected)
    before = rnd.prediction_error(normalized.flatten(0, 1)).mean().item()
    for _ in range(3):
        loop.algo.update(rollout, 0.0)
    after = rnd.prediction_error(normalized.flatten(0, 1)).mean().item()
    loop.close()
    assert after < 0.5 * before, (before, after)
