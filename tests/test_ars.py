"""ARS (augmented random search): the step against a hand computation, the population's batched acting against
the policy's own, episode scheduling on fewer env rows than episodes, learning, exact resume and refusals."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos import get_algo
from policylab.algos.ars import ARS, ARSConfig
from policylab.envs import RunningMeanStd, make_vec_env
from policylab.errors import ConfigError
from policylab.nets.population import PopulationActor, SearchPolicy
from policylab.train import PopulationLoop
from tests.helpers import resumed_and_full_runs

BOX = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)


def test_the_step_is_the_papers_formula_computed_by_hand():
    cfg = ARSConfig(n_delta=3, n_top=2, lr=0.1, delta_std=0.5)
    algo = ARS(cfg, gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.Discrete(2))  # linear: 2 x 2 = 4 params
    algo.net.load_flat(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    candidates = algo.candidates()
    deltas = algo.directions.numpy()
    np.testing.assert_allclose(candidates[:3], [1.0, 0.0, 0.0, 1.0] + 0.5 * deltas, rtol=1e-6)
    np.testing.assert_allclose(candidates[3:], [1.0, 0.0, 0.0, 1.0] - 0.5 * deltas, rtol=1e-6)
    scores = np.array([3.0, 10.0, 1.0, 5.0, 2.0, 4.0])  # r+ = 3, 10, 1; r- = 5, 2, 4: max 5, 10, 4 keeps 1 and 0
    algo.update(scores)
    kept = np.array([10.0, 3.0, 2.0, 5.0])  # r+ of directions 1, 0, then their r-
    sigma = np.sqrt(((kept - kept.mean()) ** 2).sum() / 3)
    expected = np.array([1.0, 0.0, 0.0, 1.0]) + 0.1 / (2 * sigma + 1e-6) * ((10 - 2) * deltas[1] + (3 - 5) * deltas[0])
    np.testing.assert_allclose(algo.net.flat().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("act_space", "policy"),
    [(gym.spaces.Discrete(4), "linear"), (gym.spaces.Discrete(4), "mlp"), (BOX, "linear"), (BOX, "mlp")],
)
def test_the_population_acts_as_each_candidate_policy_does(act_space, policy):
    cfg = ARSConfig(policy=policy, hidden_sizes=[8, 5], activation="tanh", zero_policy=False)
    obs_space = gym.spaces.Box(-5, 5, (6,), np.float32)
    algo = ARS(cfg, obs_space, act_space)
    candidates = algo.candidates() * 4.0  # large enough that clipping and squashing matter
    actor = PopulationActor(algo.net, rows=5)
    actor.use(candidates)
    owners = np.array([3, 0, 15, 7, 3])
    actor.assign(np.arange(5), owners)
    obs = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32) * 2
    got = actor.act(obs)
    one = ARS.build_policy(cfg, obs_space, act_space)
    for row, owner in enumerate(owners):
        one.load_flat(torch.from_numpy(candidates[owner]))
        want = one.env_action(torch.from_numpy(obs[row : row + 1]))[0].numpy()
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)
    if isinstance(act_space, gym.spaces.Box):
        assert np.all(got >= -1.0) and np.all(got <= 1.0)


class ConstantEnv(gym.Env):
    """Observation always ones; reward = the action's first component; `length` steps per episode: a candidate's
    return is length x its action on the ones vector, known without running it."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-10.0, 10.0, (1,), np.float32)

    def __init__(self, length: int = 5) -> None:
        self.length, self.t = length, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.ones(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.ones(2, np.float32), float(action[0]), False, self.t >= self.length, {}


@pytest.mark.parametrize(("rows", "vectorization"), [(1, "sync"), (3, "sync"), (16, "sync"), (3, "async")])
def test_every_candidate_episode_is_scored_once_whatever_the_number_of_rows(rows, vectorization):
    """Rows of envs stepped one by one skip rows without an episode; subprocess envs step them and ignore them."""
    loop_cfg = ARSConfig(
        env="tests.test_ars:ConstantEnv", num_envs=rows, n_delta=8, n_eval_episodes=2, vectorization=vectorization
    )
    loop = PopulationLoop(get_algo("ars"), loop_cfg)
    try:
        candidates = loop.algo.candidates()
        seen = RunningMeanStd((2,), count=0.0)
        scores, steps = loop._run_episodes(candidates, seen)
    finally:
        loop.close()
    expected = 5 * np.clip(candidates[:, 0] + candidates[:, 1], -10, 10)  # 5 steps, reward = the action
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert steps == seen.count == 16 * 2 * 5  # every step of the 32 episodes, and nothing else
    assert loop.tracker.episodes == 32


def test_rows_without_an_episode_are_not_stepped():
    env = make_vec_env("tests.test_ars:ConstantEnv", 3)
    env.reset(seed=0)
    inner = env.env.envs  # type: ignore[union-attr]
    result = env.step(np.ones((3, 1), np.float32), rows=np.array([1]))
    assert [e.unwrapped.t for e in inner] == [0, 1, 0]
    assert result.reward.tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_array_equal(result.obs, np.ones((3, 2)))
    env.close()


def test_alive_bonus_offset_is_added_per_step():
    cfg = ARSConfig(env="tests.test_ars:ConstantEnv", num_envs=4, n_delta=2, alive_bonus_offset=-1.5)
    loop = PopulationLoop(get_algo("ars"), cfg)
    try:
        candidates = loop.algo.candidates()
        scores, _ = loop._run_episodes(candidates, None)
    finally:
        loop.close()
    np.testing.assert_allclose(scores, 5 * np.clip(candidates.sum(axis=1), -10, 10) - 7.5, rtol=1e-5)


def test_ars_learns_cartpole_with_the_linear_policy(tmp_path):
    run = pl.train(
        "ars", env="CartPole-v1", steps=60_000, seed=1, runs_dir=tmp_path, verbose=False, progress=False,
        overrides={"eval_every": 5_000, "stop_return": 475, "checkpoint_every": 0, "threads": 1},
    )  # fmt: skip
    assert run.stopped is not None and run.final_eval["return_mean"] >= 475
    assert run.steps < 60_000
    policy = pl.load(run.dir)
    assert isinstance(policy.act(np.zeros(4, np.float32)), int)


def test_ars_learns_mountain_car_continuous_with_its_preset(tmp_path):
    """The rl-zoo preset: observations normalized (ARS V2), 16 directions; the car reaches the flag (reward +100
    minus the actions' cost) within 80k of the preset's 1M steps."""
    run = pl.train(
        "ars", env="MountainCarContinuous-v0", steps=80_000, seed=2, runs_dir=tmp_path, verbose=False,
        progress=False, overrides={"eval_every": 10_000, "stop_return": 50, "checkpoint_every": 0, "threads": 1},
    )  # fmt: skip
    assert run.config.normalize_obs and run.config.n_delta == 16
    assert run.final_eval["return_mean"] >= 50
    assert pl.load(run.dir).obs_normalizer is not None


@pytest.mark.parametrize("extra", [{}, {"normalize_obs": True, "policy": "mlp", "num_envs": 5}])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, extra):
    resumed_and_full_runs(
        "ars", stop=3_000, env="CartPole-v1", steps=8_000, seed=3, runs_dir=tmp_path, verbose=False, progress=False,
        overrides={"eval_every": 0, "checkpoint_every": 0, **extra},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"n_top": 9}, "n_top=9 must be between 1 and n_delta=8"),
        ({"delta_std": 0.0}, "delta_std=0.0 must be > 0"),
        ({"policy": "cnn"}, "policy='cnn' is not one of linear, mlp"),
        ({"action_masks": True}, "ars does not take action_masks"),
        ({"normalize_reward": True}, "ars does not take normalize_reward"),
    ],
)
def test_settings_it_does_not_take_are_errors(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        pl.train("ars", env="CartPole-v1", steps=1_000, runs_dir=tmp_path, overrides=overrides, verbose=False)


def test_action_spaces_it_does_not_take_are_errors():
    with pytest.raises(ConfigError, match="ars acts in Discrete or 1-d Box action spaces"):
        SearchPolicy(BOX, gym.spaces.MultiDiscrete([2, 3]), [], "relu", bias=False, squash=False)
    with pytest.raises(ConfigError, match="infinite"):
        SearchPolicy(BOX, gym.spaces.Box(-np.inf, np.inf, (2,)), [4], "relu", bias=True, squash=True)


def test_annealing_scales_the_perturbations_and_the_step_by_the_run_left():
    cfg = ARSConfig(n_delta=2, lr=0.1, delta_std=0.5, anneal_lr=True, anneal_delta_std=True)
    algo = ARS(cfg, gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.Discrete(2))
    candidates = algo.candidates(progress=0.75)
    np.testing.assert_allclose(candidates[:2], 0.125 * algo.directions.numpy(), rtol=1e-6)  # theta = 0
    scores = np.array([2.0, 0.0, 1.0, 1.0])
    kept = np.array([2.0, 0.0, 1.0, 1.0])  # both directions kept (n_top = n_delta)
    sigma = kept.std(ddof=1)
    algo.update(scores, progress=0.75)
    expected = 0.025 / (2 * sigma + 1e-6) * ((2 - 1) * algo.directions[0] + (0 - 1) * algo.directions[1])
    np.testing.assert_allclose(algo.net.flat().numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
