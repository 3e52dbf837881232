"""Dict observations and hindsight experience replay: the Dict encoding and its policies, the bit-flipping env,
the buffer's episode bookkeeping, relabelled goals and rewards against a hand computation, exact resume, DQN
solving 15-bit flipping with HER and not without it, the continuous algorithms with HER, and the errors."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.data import ReplayBuffer
from policylab.data.her import HindsightRelabeler
from policylab.envs import make_vec_env
from policylab.envs.bitflip import BitFlippingEnv
from policylab.envs.encode import ObservationEncoder, needs_encoding
from policylab.errors import ConfigError
from policylab.policy import space_from_json, space_to_json
from tests.helpers import resumed_and_full_runs

BITS_15 = {"env_kwargs": {"n_bits": 15}, "threads": 1}
DQN_HER = {
    **BITS_15, "her": True, "lr": 1e-3, "batch_size": 128, "train_freq": 1, "target_update_interval": 1000,
    "hidden_sizes": [256], "learning_starts": 1000, "exploration_fraction": 0.2,
}  # fmt: skip


def test_a_dict_space_is_encoded_in_key_order_with_its_slices():
    pos, door, bits = gym.spaces.Box(-1.0, 1.0, (2,)), gym.spaces.Discrete(3), gym.spaces.MultiBinary(2)
    space = gym.spaces.Dict([("pos", pos), ("door", door), ("bits", bits)])
    encoder = ObservationEncoder(space)
    one = {"pos": np.array([0.5, -0.5]), "door": 2, "bits": np.array([1, 0])}
    np.testing.assert_array_equal(encoder.one(one), [0.5, -0.5, 0, 0, 1, 1, 0])
    assert encoder.slices == {"pos": slice(0, 2), "door": slice(2, 5), "bits": slice(5, 7)}
    two = [one, {"pos": np.zeros(2), "door": 0, "bits": np.array([0, 1])}]
    batch = encoder.batch(two)  # a list of dicts, or a dict of batches
    np.testing.assert_array_equal(batch, encoder.batch({k: np.stack([o[k] for o in two]) for k in one}))
    np.testing.assert_array_equal(batch[1], [0, 0, 1, 0, 0, 0, 1])
    assert encoder.is_single(one) and not encoder.is_single(two)
    np.testing.assert_array_equal(encoder.box.low, [-1, -1, 0, 0, 0, 0, 0])
    image = gym.spaces.Dict({"camera": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), "pos": gym.spaces.Box(0, 1, (2,))})
    assert needs_encoding(image)  # frames inside: their pixels in the vector, and where they are for the CNN
    assert ObservationEncoder(image).box.images == [(slice(0, 192), (8, 8, 3))]  # type: ignore[attr-defined]
    restored = space_from_json(space_to_json(space))
    assert restored == space and list(restored.spaces) == ["pos", "door", "bits"]


def test_bit_flipping_follows_its_rules():
    env = BitFlippingEnv(n_bits=4)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"observation", "achieved_goal", "desired_goal"}
    goal = obs["desired_goal"]
    total, steps, terminated, truncated = 0.0, 0, False, False
    for bit in np.flatnonzero(obs["observation"] != goal):  # flip exactly the differing bits
        obs, reward, terminated, truncated, info = env.step(int(bit))
        total, steps = total + reward, steps + 1
    if steps:
        assert terminated and info["is_success"] and total == -(steps - 1)
    np.testing.assert_array_equal(env.compute_reward(np.eye(3), np.eye(3)[[0, 2, 2]], None), [0, -1, 0])
    env.reset(seed=1)
    for _ in range(4):
        obs, _, terminated, truncated, _ = env.step(0)  # flipping one bit back and forth never reaches 4 bits apart
    assert truncated or terminated
    continuous = BitFlippingEnv(n_bits=3, continuous=True)
    obs, _ = continuous.reset(seed=0)
    obs, reward, terminated, _, _ = continuous.step(np.where(obs["observation"] != obs["desired_goal"], 1.0, -1.0))
    assert reward == 0.0 and terminated  # several bits flip in one step


def test_the_buffer_knows_each_transitions_episode_across_envs_and_the_ring():
    buffer = ReplayBuffer(16, 2, (1,), (), torch.long, episodes=True)  # 8 slots per env
    for t in range(11):  # env 0's episodes end every 3 steps, env 1's never
        end = np.array([t % 3 == 2, False])
        buffer.add(np.array([[t], [t]]), np.zeros(2, np.int64), np.zeros(2), np.array([[t + 1], [t + 1]]), end,
                   np.zeros(2, bool))  # fmt: skip
    assert buffer.episode_last is not None and buffer.episode_first is not None
    # env 0's slots: 4 per episode (3 steps + final obs); t = 6..8 ended on slot (t + 2) % 8 ... check by values
    for slot in range(buffer.slots):
        if not buffer.valid[slot, 0]:
            continue
        first, last = int(buffer.episode_first[slot, 0]), int(buffer.episode_last[slot, 0])
        t = int(buffer.obs[slot, 0, 0])
        if t >= 9:
            assert last == -1  # the running episode (steps 9, 10)
        else:
            assert int(buffer.obs[last, 0, 0]) == t // 3 * 3 + 2 and int(buffer.obs[first, 0, 0]) == t // 3 * 3
    assert int(buffer.episode_last[:, 1].max()) == -1  # env 1 never ended an episode


def test_relabelled_goals_and_rewards_match_a_hand_computation():
    """Two envs' 3-bit episodes written by hand: every relabelled row's goal is the achieved goal of the next
    observation of a step from it to its episode's end, its reward the env's for that goal."""
    env = BitFlippingEnv(n_bits=3)
    layout = ObservationEncoder(env.observation_space)
    envs = [BitFlippingEnv(n_bits=3) for _ in range(2)]
    buffer = ReplayBuffer(64, 2, (9,), (), torch.long, episodes=True)
    current = np.stack([layout.one(e.reset(seed=i)[0]) for i, e in enumerate(envs)])
    rng = np.random.default_rng(0)
    for _ in range(12):
        actions = rng.integers(0, 3, 2)
        steps = [e.step(int(a)) for e, a in zip(envs, actions)]
        final = np.stack([layout.one(s[0]) for s in steps])
        end = np.array([s[2] or s[3] for s in steps])
        nxt = [layout.one(e.reset()[0]) if d else layout.one(s[0]) for e, s, d in zip(envs, steps, end)]
        buffer.add(current, actions, np.array([s[1] for s in steps]), np.stack(nxt), np.array([s[2] for s in steps]),
                   np.array([s[3] for s in steps]), final)  # fmt: skip
        current = np.stack(nxt)
    achieved, desired = layout.slices["achieved_goal"], layout.slices["desired_goal"]
    relabel = HindsightRelabeler(env.compute_reward, achieved, desired, (3,))
    original = buffer.sample(200, torch.Generator().manual_seed(5))
    buffer.relabeler = relabel
    batch = buffer.sample(200, torch.Generator().manual_seed(5))
    n = int(0.8 * 200)
    np.testing.assert_array_equal(batch.obs[n:].numpy(), original.obs[n:].numpy())  # the rest stay as drawn
    for row in range(n):
        slot, e = int(batch.indices[row]) // 2, int(batch.indices[row]) % 2
        goal = batch.obs[row, desired].numpy()
        np.testing.assert_array_equal(batch.next_obs[row, desired].numpy(), goal)
        np.testing.assert_array_equal(batch.obs[row, : desired.start].numpy(), original.obs[row, : desired.start])
        # the goal is the achieved goal of some next observation from this step to the end of its episode
        later, k = [], slot
        while True:
            later.append(buffer.obs[(k + 1) % buffer.slots, e, achieved].numpy())
            if buffer.episode_end[k, e] or (k + 1) % buffer.slots == int(buffer.ptr[e]):
                break
            k = (k + 1) % buffer.slots
        assert any(np.array_equal(goal, g) for g in later)
        expected = 0.0 if np.array_equal(batch.next_obs[row, achieved].numpy(), goal) else -1.0
        assert float(batch.rewards[row]) == expected
    assert float((batch.rewards[:n] == 0).float().mean()) > float((original.rewards == 0).float().mean())


def _success_rate(run_dir, episodes: int = 50) -> float:
    policy = pl.load(run_dir)
    env = make_vec_env("BitFlipping-v0", episodes, env_kwargs=policy.env_kwargs)
    obs = env.reset(seed=123)
    done = np.zeros(episodes, bool)
    success = np.zeros(episodes, bool)
    while not done.all():
        res = env.step(np.asarray(policy.act(obs)))
        success |= res.terminated & ~done
        done |= res.episode_end
        obs = res.obs
    env.close()
    return float(success.mean())


def test_dqn_with_her_solves_15_bits_and_dqn_alone_does_not(tmp_path):
    """Andrychowicz et al.'s figure 1: with 15 bits DQN alone never sees a success, DQN + HER learns the task (at
    12,000 steps with an update every second step, 1.0, 0.98 and 1.0 of the episodes succeed over seeds 1-3; with
    an update every step 0.98, 1.0 and 0.96, in twice the time)."""
    overrides = {**DQN_HER, "train_freq": 2}
    her = pl.train("dqn", env="BitFlipping-v0", steps=12_000, seed=1, overrides=overrides, preset="none",
                   runs_dir=tmp_path, verbose=False)  # fmt: skip
    plain = pl.train("dqn", env="BitFlipping-v0", steps=12_000, seed=1, overrides={**overrides, "her": False},
                     preset="none", runs_dir=tmp_path, verbose=False)  # fmt: skip
    assert _success_rate(her.dir) >= 0.9
    assert _success_rate(plain.dir) == 0.0
    with open(her.dir / "train.csv") as f:
        assert float(list(csv.DictReader(f))[-1]["loss"]) > 0.0


@pytest.mark.parametrize(
    ("algo", "tuned"), [("td3", {}), ("sac", {"lr": 1e-3, "alpha": 0.1}), ("tqc", {"lr": 1e-3, "alpha": 0.1})]
)
def test_continuous_algorithms_learn_bit_flipping_with_her(tmp_path, algo, tuned):
    """6 bits, any of which flip in one step (Box actions): 90% success after 3,000 steps (SAC and TQC with lr
    1e-3 and an initial temperature of 0.1)."""
    run = pl.train(algo, env="BitFlipping-v0", steps=3000, seed=1, preset="none", runs_dir=tmp_path, verbose=False,
                   overrides={"env_kwargs": {"n_bits": 6, "continuous": True}, "her": True, "threads": 1,
                              "learning_starts": 500, "hidden_sizes": [64, 64], **tuned})  # fmt: skip
    assert _success_rate(run.dir) >= 0.9


def test_a_her_run_resumes_exactly(tmp_path):
    resumed_and_full_runs(
        "dqn", stop=2000, env="BitFlipping-v0", steps=4000, seed=3, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**DQN_HER, "learning_starts": 500, "save_buffer": True, "log_every": 500, "num_envs": 2},
    )  # fmt: skip


def test_a_loaded_policy_takes_dict_observations(tmp_path):
    run = pl.train("dqn", env="BitFlipping-v0", steps=300, seed=0, preset="none", runs_dir=tmp_path, verbose=False,
                   overrides={**DQN_HER, "learning_starts": 100})  # fmt: skip
    policy = pl.load(run.dir)
    env = BitFlippingEnv(n_bits=15)
    obs, _ = env.reset(seed=0)
    encoded = ObservationEncoder(env.observation_space).one(obs)
    assert isinstance(policy.act(obs), int) and policy.act(obs) == policy.act(encoded)
    env.step(policy.act(obs))


def test_her_errors_name_the_fix(tmp_path):
    def train(env: str, **overrides):
        return pl.train("dqn", env=env, steps=200, preset="none", runs_dir=tmp_path, verbose=False,
                        overrides={"her": True, **overrides})  # fmt: skip

    with pytest.raises(ConfigError, match="achieved_goal and desired_goal"):
        train("CartPole-v1")
    with pytest.raises(ConfigError, match="compute_reward"):
        train("tests.envs_for_tests:goal_env_without_compute_reward")
    with pytest.raises(ConfigError, match="n_step"):
        train("BitFlipping-v0", n_step=3)
    with pytest.raises(ConfigError, match="prioritized"):
        train("BitFlipping-v0", prioritized=True)
    with pytest.raises(ConfigError, match="her_strategy"):
        train("BitFlipping-v0", her_strategy="past")


def test_her_with_a_presets_n_step_names_the_preset(tmp_path):
    """DQN's CartPole preset uses 3-step returns: her=true there names the preset as where n_step=3 came from
    (the user never set it), and the fix keeps the rest of the preset or opts out of it."""
    with pytest.raises(ConfigError) as info:
        pl.train("dqn", env="CartPole-v1", steps=200, runs_dir=tmp_path, verbose=False, overrides={"her": True})
    assert "n_step=3 (n-step returns), which the dqn preset for CartPole-v1 sets" in info.value.problem
    assert info.value.fix == "overrides={'n_step': 1} (or preset='none'), or drop her"
    with pytest.raises(ConfigError) as info:  # set by the user: no preset named
        pl.train("dqn", env="BitFlipping-v0", steps=200, preset="none", runs_dir=tmp_path, verbose=False,
                 overrides={"her": True, "n_step": 3})  # fmt: skip
    assert info.value.problem == "her=true does not combine with n_step=3 (n-step returns)"
    assert info.value.fix == "set n_step=1, or drop her"
    assert not any(tmp_path.iterdir())
