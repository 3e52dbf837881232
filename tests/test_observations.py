"""Discrete, MultiDiscrete and Tuple observations: the encoding, bit-for-bit equality with a hand one-hot env,
FrozenLake learned by PPO and DQN, policies that take the env's own observations, and exact resume."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.envs import make_vec_env
from policylab.envs.encode import ObservationEncoder, needs_encoding
from policylab.errors import PolicylabError
from tests.helpers import assert_same_params, params_of, resumed_and_full_runs

LAKE = {"env_kwargs": {"is_slippery": False}}
PPO_LAKE = {**LAKE, "n_steps": 128, "ent_coef": 0.01, "threads": 1}
DQN_LAKE = {**LAKE, "learning_starts": 1000, "exploration_fraction": 0.5, "target_update_interval": 500, "lr": 1e-3}


def test_the_encoding_of_each_space():
    discrete = ObservationEncoder(gym.spaces.Discrete(4, start=1))
    np.testing.assert_array_equal(discrete.one(3), [0, 0, 1, 0])
    np.testing.assert_array_equal(discrete.batch(np.array([1, 4])), [[1, 0, 0, 0], [0, 0, 0, 1]])
    multi = ObservationEncoder(gym.spaces.MultiDiscrete([2, 3]))
    np.testing.assert_array_equal(multi.one(np.array([1, 2])), [0, 1, 0, 0, 1])
    mixed = ObservationEncoder(gym.spaces.Tuple((gym.spaces.Discrete(3), gym.spaces.Box(-2.0, 2.0, (2,)))))
    np.testing.assert_array_equal(mixed.one((2, np.array([0.5, -1.0]))), [0, 0, 1, 0.5, -1.0])
    batch = mixed.batch([(0, np.array([1.0, 1.0])), (1, np.array([0.0, 2.0]))])  # a list of tuples
    np.testing.assert_array_equal(batch, [[1, 0, 0, 1, 1], [0, 1, 0, 0, 2]])
    np.testing.assert_array_equal(mixed.box.low, [0, 0, 0, -2, -2])
    assert mixed.box.dtype == np.float32 and mixed.dim == 5
    assert discrete.is_single(3) and not discrete.is_single(np.array([1, 2]))
    assert mixed.is_single((1, np.zeros(2))) and not mixed.is_single([(1, np.zeros(2))])
    assert discrete.is_encoded(np.zeros(4, np.float32)) and not discrete.is_encoded(np.arange(4))
    assert not needs_encoding(gym.spaces.Box(0, 1, (2,))) and not needs_encoding(gym.spaces.Dict({}))


def test_discrete_envs_are_vectors_for_the_loops():
    env = make_vec_env("FrozenLake-v1", 3, env_kwargs=LAKE["env_kwargs"])
    obs = env.reset(seed=0)
    assert obs.shape == (3, 16) and obs.dtype == np.float32 and np.all(obs.sum(1) == 1)
    assert isinstance(env.raw_observation_space, gym.spaces.Discrete) and env.single_observation_space.shape == (16,)
    blackjack = make_vec_env("Blackjack-v1", 2)
    assert blackjack.reset(seed=0).shape == (2, 32 + 11 + 2)
    env.close()
    blackjack.close()


@pytest.mark.parametrize(("algo", "overrides"), [("ppo", PPO_LAKE), ("dqn", {**DQN_LAKE, "threads": 1})])
def test_automatic_one_hot_equals_a_hand_one_hot_env_bit_for_bit(tmp_path, algo, overrides):
    runs = {}
    for env in ("FrozenLake-v1", "tests.envs_for_tests:hand_one_hot_frozen_lake"):
        runs[env] = pl.train(
            algo, env=env, steps=3000, seed=2, overrides=overrides, preset="none", runs_dir=tmp_path, verbose=False
        )
    auto, hand = runs.values()
    assert_same_params(params_of(auto.dir), params_of(hand.dir))
    assert auto.final_eval == hand.final_eval


def first_eval_reaching(run_dir, bar: float) -> int | None:
    with open(run_dir / "eval.csv") as f:
        return next((int(r["step"]) for r in csv.DictReader(f) if float(r["return_mean"]) >= bar), None)


@pytest.mark.parametrize(("algo", "overrides"), [("ppo", PPO_LAKE), ("dqn", DQN_LAKE)])
def test_frozen_lake_is_solved(tmp_path, algo, overrides):
    """Non-slippery FrozenLake-v1: an evaluation reaches the goal in every episode within 20k steps."""

    def stop_when_solved(info: pl.IterationInfo) -> bool:
        return not (info.eval_return is not None and info.eval_return >= 1.0)

    run = pl.train(
        algo, env="FrozenLake-v1", steps=20_000, seed=1, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**overrides, "eval_every": 2000, "eval_episodes": 5}, callback=stop_when_solved,
    )  # fmt: skip
    assert first_eval_reaching(run.dir, 1.0) is not None


def test_a_loaded_policy_takes_the_envs_own_observations(tmp_path):
    run = pl.train(
        "ppo", env="FrozenLake-v1", steps=1024, seed=0, overrides=PPO_LAKE, preset="none", runs_dir=tmp_path,
        verbose=False,
    )  # fmt: skip
    policy = pl.load(run.dir)
    assert isinstance(policy.act(0), int)
    assert "observation_space=Discrete(16) (read as Box(0.0, 1.0, (16,), float32))" in repr(policy)
    encoded = np.eye(16, dtype=np.float32)
    np.testing.assert_array_equal(policy.act(np.arange(16)), policy.act(encoded))
    assert policy.act(5) == policy.act(encoded[5])
    env = gym.make("FrozenLake-v1", is_slippery=False)
    obs, _ = env.reset(seed=0)
    env.step(policy.act(obs))  # a plain Gymnasium env's observation in, an action it accepts out
    tuple_run = pl.train("ppo", env="Blackjack-v1", steps=512, seed=0, overrides={"n_steps": 64}, preset="none",
                         runs_dir=tmp_path, verbose=False)  # fmt: skip
    cards = pl.load(tuple_run.dir)
    assert cards.act((14, 10, 0)) in (0, 1)
    assert cards.act([(14, 10, 0), (20, 3, 1)]).shape == (2,)
    for bad in (16, -1, np.array([3, 16])):  # not an IndexError, nor a wrapped-around -1 acting as 15
        with pytest.raises(PolicylabError, match=r"outside the observation space Discrete\(16\) \(valid: 0 to 15\)"):
            policy.act(bad)


def test_out_of_range_discrete_observations_name_the_valid_range():
    discrete = ObservationEncoder(gym.spaces.Discrete(4, start=1))
    with pytest.raises(PolicylabError, match=r"observation 5 is outside .* \(valid: 1 to 4\)"):
        discrete.one(5)
    with pytest.raises(PolicylabError, match="observation 0 is outside"):
        discrete.batch(np.array([1, 0]))
    multi = ObservationEncoder(gym.spaces.MultiDiscrete([2, 3]))
    for bad in (np.array([0, 3]), np.array([[0, 1], [-1, 0]])):
        with pytest.raises(PolicylabError, match=r"outside the observation space MultiDiscrete\(\[2 3\]\)"):
            multi.one(bad) if bad.ndim == 1 else multi.batch(bad)
    np.testing.assert_array_equal(multi.batch(np.array([[1, 2], [0, 0]])), [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0]])


def test_a_frozen_lake_run_resumes_exactly(tmp_path):
    resumed_and_full_runs(
        "ppo", stop=1024, env="FrozenLake-v1", steps=2048, seed=3, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**PPO_LAKE, "n_steps": 64, "num_envs": 4},
    )  # fmt: skip


def test_an_evaluation_episode_that_never_ends_is_an_error_naming_the_time_limit(tmp_path, monkeypatch):
    """CliffWalking-v1 has no time limit, and stepping off the cliff only sends the agent back to the start."""
    import policylab.policy

    monkeypatch.setattr(policylab.policy, "MAX_EVAL_EPISODE_STEPS", 300)
    never_ends = pl.Policy(_StayPut(), gym.spaces.Box(0, 1, (48,), np.float32), gym.spaces.Discrete(4),
                           env_id="CliffWalking-v1", raw_observation_space=gym.spaces.Discrete(48))  # fmt: skip
    with pytest.raises(pl.PolicylabError, match="ran 300 steps without ending") as info:
        pl.evaluate(never_ends, episodes=2, seed=0)
    assert "max_episode_steps" in info.value.fix
    limited = pl.evaluate(never_ends, episodes=2, seed=0, env_kwargs={"max_episode_steps": 50})
    assert limited["length_mean"] == 50


class _StayPut(torch.nn.Module):
    """Always action 3 (left): at CliffWalking's start, against the wall, forever."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def env_action(self, obs, deterministic=True, generator=None):
        return torch.full((len(obs),), 3, dtype=torch.int64)
