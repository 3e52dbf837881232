"""Vectorized envs (same-step autoreset, final observations, snapshots), env errors, running statistics."""

from __future__ import annotations

import copy
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

from policylab.envs import EpisodeTracker, ObsNormalizer, RewardScaler, RunningMeanStd, VecEnv, make_vec_env
from policylab.envs.cartpole import SameStepCartPoleVectorEnv
from policylab.envs.pendulum import PendulumVectorEnv
from policylab.envs.sync import SyncEnvs
from policylab.errors import EnvError

# --- envs reached through the 'module:attr' form ------------------------------------------------


class DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"pos": np.zeros(2, np.float32)}, {}

    def step(self, action):
        return {"pos": np.zeros(2, np.float32)}, 0.0, False, False, {}


class CountingEnv(gym.Env):
    """obs = [steps so far]; truncates after `horizon` steps."""

    observation_space = gym.spaces.Box(0.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, horizon: int = 3) -> None:
        self.horizon = horizon
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, False, self.t >= self.horizon, {}


def make_not_an_env():
    return object()


def zero_actions(env: VecEnv) -> np.ndarray:
    return np.zeros(env.num_envs, dtype=np.int64)


# --- CartPole: the numpy-vectorized same-step env ------------------------------------------------


def test_cartpole_uses_numpy_vector_env():
    env = make_vec_env("CartPole-v1", 3)
    assert isinstance(env.env, SameStepCartPoleVectorEnv)
    assert env.num_envs == 3
    assert env.env.max_episode_steps == 500
    assert env.reset(seed=0).shape == (3, 4)
    assert not isinstance(make_vec_env("CartPole-v1", 2, vectorization="sync").env, SameStepCartPoleVectorEnv)


def test_cartpole_termination_reports_final_obs_and_resets_same_step():
    env = make_vec_env("CartPole-v1", 3)
    reference = CartPoleVectorEnv(num_envs=3)  # Gymnasium's own (next-step autoreset) env
    obs = env.reset(seed=0)
    ref_obs, _ = reference.reset(seed=0)
    np.testing.assert_array_equal(obs, ref_obs)
    push_right = np.ones(3, dtype=np.int64)
    for _ in range(100):
        result = env.step(push_right)
        ref_obs, ref_reward, ref_term, _, _ = reference.step(push_right)
        if result.episode_end.any():
            break
        assert result.final_obs is None
        np.testing.assert_array_equal(result.obs, ref_obs)
    else:
        pytest.fail("no CartPole episode ended within 100 steps of pushing right")
    done = result.terminated
    assert done.any() and not result.truncated.any()
    np.testing.assert_array_equal(done, ref_term)
    np.testing.assert_array_equal(result.reward, [1.0, 1.0, 1.0])
    # final_obs holds the terminal observation Gymnasium's env reports on that step
    assert result.final_obs is not None
    np.testing.assert_allclose(result.final_obs, ref_obs)
    terminal = result.final_obs[done]
    assert ((np.abs(terminal[:, 0]) > 2.4) | (np.abs(terminal[:, 2]) > 12 * 2 * np.pi / 360)).all()
    # obs holds a fresh reset observation, |x| <= 0.05 in all 4 dims
    assert np.abs(result.obs[done]).max() <= 0.05
    assert not np.allclose(result.obs[done], result.final_obs[done])
    # envs that did not finish: obs and final_obs agree
    np.testing.assert_array_equal(result.obs[~done], result.final_obs[~done])
    # the next step is a real transition for every env (no zero-reward dummy step after a reset)
    after = env.step(push_right)
    np.testing.assert_array_equal(after.reward, [1.0, 1.0, 1.0])
    assert not after.terminated[done].any()


@pytest.mark.parametrize("sutton_barto_reward", [False, True])
def test_cartpole_single_env_float_path_is_bit_identical_to_the_vector_path(sutton_barto_reward):
    """One env steps on Python floats (`_step_single`); it must give the vector path's bits, resets included."""
    single = SameStepCartPoleVectorEnv(num_envs=1, max_episode_steps=60, sutton_barto_reward=sutton_barto_reward)
    vector = SameStepCartPoleVectorEnv(num_envs=1, max_episode_steps=60, sutton_barto_reward=sutton_barto_reward)
    obs, _ = single.reset(seed=3)
    ref_obs, _ = vector.reset(seed=3)
    np.testing.assert_array_equal(obs, ref_obs)
    actions = np.random.default_rng(0).integers(0, 2, size=(600, 1))
    ends = {"terminated": 0, "truncated": 0}
    for action in actions:
        got, want = single.step(action), vector._step_vector(action)
        for a, b in zip(got[:4], want[:4]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()  # bit for bit (-0.0 rewards included)
        assert got[4].keys() == want[4].keys()
        if got[4]:
            assert got[4]["final_obs"].tobytes() == want[4]["final_obs"].tobytes()
            np.testing.assert_array_equal(got[4]["_final_obs"], want[4]["_final_obs"])
        ends["terminated"] += int(got[2][0])
        ends["truncated"] += int(got[3][0])
        assert single.state.tobytes() == vector.state.tobytes()
    assert ends["terminated"] > 5 and ends["truncated"] > 0  # both kinds of episode end were crossed


def test_cartpole_single_env_matches_gymnasium_until_its_first_end():
    env = SameStepCartPoleVectorEnv(num_envs=1)
    reference = CartPoleVectorEnv(num_envs=1)
    np.testing.assert_array_equal(env.reset(seed=5)[0], reference.reset(seed=5)[0])
    for action in np.random.default_rng(1).integers(0, 2, size=(200, 1)):
        obs, reward, terminated, _, info = env.step(action)
        ref_obs, ref_reward, ref_terminated, _, _ = reference.step(action)
        np.testing.assert_array_equal(info.get("final_obs", obs), ref_obs)
        np.testing.assert_array_equal(reward, ref_reward)
        np.testing.assert_array_equal(terminated, ref_terminated)
        if terminated[0]:
            return
    pytest.fail("no episode ended within 200 random steps")


def _balance(env: VecEnv, steps: int) -> list:
    """Step with the pole kept upright (state zeroed before each step) so that only the time limit ends episodes."""
    results = []
    for _ in range(steps):
        env.env.state[:] = 0.0
        results.append(env.step(zero_actions(env)))
    return results


def test_cartpole_truncates_at_500_steps():
    env = make_vec_env("CartPole-v1", 2)
    env.reset(seed=1)
    results = _balance(env, 501)
    assert not any(r.episode_end.any() for r in results[:499])
    last = results[499]
    np.testing.assert_array_equal(last.truncated, [True, True])
    np.testing.assert_array_equal(last.terminated, [False, False])
    np.testing.assert_array_equal(last.reward, [1.0, 1.0])
    assert last.final_obs is not None
    # one step from the zero state pushing left: x_dot = -0.02 * xacc != 0 in the final obs
    assert (last.final_obs[:, 1] < 0).all()
    assert np.abs(last.obs).max() <= 0.05
    assert not results[500].episode_end.any()  # the step counter restarted


def test_cartpole_max_episode_steps_direct():
    env = VecEnv(SameStepCartPoleVectorEnv(num_envs=2, max_episode_steps=5), "CartPole-v1", snapshot_able=True)
    env.reset(seed=0)
    results = _balance(env, 10)
    ends = [bool(r.truncated.all()) for r in results]
    assert ends == [False] * 4 + [True] + [False] * 4 + [True]
    assert all((r.reward == 1.0).all() for r in results)
    assert all(r.final_obs is None for i, r in enumerate(results) if i not in (4, 9))


# --- sync path ---------------------------------------------------------------------------------


def test_pendulum_truncates_at_200_steps():
    env = make_vec_env("Pendulum-v1", 2)
    assert isinstance(env.env, PendulumVectorEnv)
    env.reset(seed=0)
    actions = np.zeros((2, 1), np.float32)
    for _ in range(199):
        r = env.step(actions)
        assert not r.episode_end.any() and r.final_obs is None
    r = env.step(actions)
    np.testing.assert_array_equal(r.truncated, [True, True])
    np.testing.assert_array_equal(r.terminated, [False, False])
    assert r.final_obs is not None and r.final_obs.dtype == np.float32 and r.final_obs.shape == (2, 3)
    assert not np.allclose(r.final_obs, r.obs)
    # a fresh Pendulum observation: angular velocity drawn from [-1, 1]
    assert np.abs(r.obs[:, 2]).max() <= 1.0
    # the final observation is a real Pendulum observation: (cos, sin) on the unit circle
    np.testing.assert_allclose(r.final_obs[:, 0] ** 2 + r.final_obs[:, 1] ** 2, [1.0, 1.0], rtol=1e-5)


def test_module_attr_env_with_time_limit_in_sync_path():
    env = make_vec_env(f"{__name__}:CountingEnv", 2, env_kwargs={"horizon": 2})
    np.testing.assert_array_equal(env.reset(seed=0), [[0.0], [0.0]])
    first = env.step(zero_actions(env))
    assert first.final_obs is None
    np.testing.assert_array_equal(first.obs, [[1.0], [1.0]])
    second = env.step(zero_actions(env))
    np.testing.assert_array_equal(second.truncated, [True, True])
    np.testing.assert_array_equal(second.final_obs, [[2.0], [2.0]])  # the last obs of the episode
    np.testing.assert_array_equal(second.obs, [[0.0], [0.0]])  # the first obs of the next


# --- snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id, warmup, kind",
    [
        ("CartPole-v1", 10, SameStepCartPoleVectorEnv),
        ("Pendulum-v1", 195, PendulumVectorEnv),  # the snapshot's continuation crosses the time limit
        ("InvertedPendulum-v5", 10, SyncEnvs),
    ],
)
def test_get_set_state_reproduces_next_observations(env_id, warmup, kind):
    env = make_vec_env(env_id, 2)
    assert isinstance(env.env, kind)
    env.reset(seed=3)
    space = env.single_action_space
    rng = np.random.default_rng(0)
    if isinstance(space, gym.spaces.Discrete):
        actions = [rng.integers(0, 2, size=2) for _ in range(warmup + 30)]
    else:
        shape = (2, *space.shape)
        actions = [rng.uniform(space.low, space.high, shape).astype(np.float32) for _ in range(warmup + 30)]
    for a in actions[:warmup]:
        env.step(a)
    snapshot = copy.deepcopy(env.get_state())
    assert snapshot is not None
    first = [env.step(a) for a in actions[warmup:]]
    # at least one episode ends after the snapshot, so resets (the env's RNG) are covered too
    assert any(r.episode_end.any() for r in first)
    # restore into a fresh env that was reset with another seed
    other = make_vec_env(env_id, 2)
    other.reset(seed=12345)
    other.set_state(snapshot)
    again = [other.step(a) for a in actions[warmup:]]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.reward, b.reward)
        np.testing.assert_array_equal(a.terminated, b.terminated)
        np.testing.assert_array_equal(a.truncated, b.truncated)
        assert (a.final_obs is None) == (b.final_obs is None)
        if a.final_obs is not None:
            np.testing.assert_array_equal(a.final_obs, b.final_obs)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_env_id_suggests_close_match():
    with pytest.raises(EnvError) as info:
        make_vec_env("CartPole-v2", 2)
    assert "'CartPole-v2'" in str(info.value)
    assert "CartPole-v1" in str(info.value)


def test_module_attr_with_bad_module():
    with pytest.raises(EnvError, match="cannot import module 'no_such_module_policylab_test'"):
        make_vec_env("no_such_module_policylab_test:Env", 2)


def test_module_attr_is_found_in_the_current_directory_as_python_m_finds_it(tmp_path, monkeypatch):
    """A console script's sys.path lacks the current directory: `policylab train --env myenvs:MyEnv` run from the
    folder that holds myenvs.py imports it all the same (policylab.imports.import_user_module)."""
    (tmp_path / "policylab_cwd_envs.py").write_text(
        "import gymnasium as gym\nfrom tests.test_envs import CountingEnv as MyEnv\n"
    )
    (tmp_path / "policylab_cwd_broken.py").write_text("import no_such_package_policylab_test\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    try:
        env = make_vec_env("policylab_cwd_envs:MyEnv", 2)
        np.testing.assert_array_equal(env.reset(seed=0), [[0.0], [0.0]])
        with pytest.raises(EnvError, match=r"No module named 'no_such_package_policylab_test'(.|\n)*fix: install no_s"):
            make_vec_env("policylab_cwd_broken:Env", 2)
    finally:
        sys.modules.pop("policylab_cwd_envs", None)
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(EnvError, match="looked in the current directory(.|\n)*fix: run from the folder that holds it"):
        make_vec_env("policylab_cwd_envs_elsewhere:MyEnv", 2)


def test_mujoco_compiler_warnings_are_shown_once_not_printed_for_every_env(tmp_path, monkeypatch, capfd):
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        make_vec_env("HalfCheetah-v5", 3).close()
    out, err = capfd.readouterr()
    assert "settotalmass" not in out and err.count("settotalmass") <= 1
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_module_attr_with_missing_attribute_suggests():
    with pytest.raises(EnvError) as info:
        make_vec_env(f"{__name__}:DictObsEnvv", 2)
    assert "has no attribute 'DictObsEnvv'" in str(info.value)
    assert "Did you mean: DictObsEnv" in str(info.value)


def test_module_attr_not_returning_an_env():
    with pytest.raises(EnvError, match="not a gymnasium.Env"):
        make_vec_env(f"{__name__}:make_not_an_env", 2)


class NestedDictObsEnv(DictObsEnv):
    observation_space = gym.spaces.Dict({"arm": gym.spaces.Dict({"pos": gym.spaces.Box(-1.0, 1.0, (2,))})})


def test_a_dict_is_one_vector_and_a_nested_dict_is_rejected():
    env = make_vec_env(f"{__name__}:DictObsEnv", 2)
    assert env.reset(seed=0).shape == (2, 2)
    env.close()
    with pytest.raises(EnvError) as info:
        make_vec_env(f"{__name__}:NestedDictObsEnv", 2)
    msg = str(info.value)
    assert "one-level Tuples or Dicts" in msg and "FlattenObservation" in msg


# --- running statistics ------------------------------------------------------------------------


def test_running_mean_std_matches_numpy_over_concatenated_batches():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(3, 2))
    b = rng.normal(-1.0, 0.5, size=(5, 2))
    both = np.concatenate([a, b])
    rms = RunningMeanStd((2,))
    rms.update(a)
    rms.update(b)
    # the prior (mean 0, var 1, count 1e-4) shifts the result by about 1e-5
    np.testing.assert_allclose(rms.mean, both.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(rms.var, both.var(axis=0), rtol=1e-4)
    assert rms.count == pytest.approx(8.0001)
    # with no prior (count 0) the parallel update is exact
    exact = RunningMeanStd((2,))
    exact.load({"mean": np.zeros(2), "var": np.zeros(2), "count": np.array(0.0)})
    exact.update(a)
    exact.update(b)
    np.testing.assert_allclose(exact.mean, both.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(exact.var, both.var(axis=0), rtol=1e-12)


def test_running_mean_std_by_hand():
    rms = RunningMeanStd(())
    rms.load({"mean": np.array(0.0), "var": np.array(0.0), "count": np.array(0.0)})
    rms.update(np.array([1.0, 3.0]))  # mean 2, var 1
    rms.update(np.array([5.0, 7.0]))  # all four: mean 4, var (9 + 1 + 1 + 9) / 4 = 5
    assert rms.mean == pytest.approx(4.0)
    assert rms.var == pytest.approx(5.0)


def test_obs_normalizer_scales_and_clips():
    norm = ObsNormalizer((2,), clip=10.0)
    norm.rms.mean = np.array([1.0, 2.0])
    norm.rms.var = np.array([4.0, 0.25])  # std 2 and 0.5
    out = norm(np.array([[3.0, 2.0], [1.0, 102.0], [-100.0, 1.5]]))
    # [(3-1)/2, 0], [0, 100/0.5 = 200 -> 10], [-101/2 = -50.5 -> -10, -0.5/0.5 = -1]
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 10.0], [-10.0, -1.0]], rtol=1e-6)
    assert out.dtype == np.float32
    tight = ObsNormalizer((2,), clip=0.5)
    tight.rms.mean, tight.rms.var = norm.rms.mean, norm.rms.var
    np.testing.assert_allclose(tight(np.array([[3.0, 1.5]])), [[0.5, -0.5]], rtol=1e-6)


def test_obs_normalizer_update_changes_statistics():
    norm = ObsNormalizer((1,))
    norm.rms.load({"mean": np.zeros(1), "var": np.zeros(1), "count": np.array(0.0)})
    norm.update(np.array([[2.0], [4.0]]))  # mean 3, var 1
    np.testing.assert_allclose(norm(np.array([[5.0]])), [[2.0]], rtol=1e-6)  # (5 - 3) / 1


def test_reward_scaler_resets_running_return_at_episode_end():
    scaler = RewardScaler(2, gamma=0.5)
    out = scaler(np.array([1.0, 2.0]), np.array([True, False]))
    # running returns [1, 2]: variance about var([1, 2]) = 0.25, std 0.5 -> rewards / 0.5
    np.testing.assert_allclose(out, [2.0, 4.0], rtol=1e-3)
    # env 0's episode ended: its running return restarts at 0
    np.testing.assert_array_equal(scaler.returns, [0.0, 2.0])
    scaler(np.array([1.0, 1.0]), np.array([False, False]))
    # env 0: 0 * 0.5 + 1 = 1 (it would be 1 * 0.5 + 1 = 1.5 without the reset); env 1: 2 * 0.5 + 1 = 2
    np.testing.assert_array_equal(scaler.returns, [1.0, 2.0])


def test_reward_scaler_clips():
    # one return of 5 against the prior: variance ~0.0026, 5 / 0.051 ~ 98 -> clipped to 1
    scaler = RewardScaler(1, gamma=0.0, clip=1.0)
    np.testing.assert_array_equal(scaler(np.array([5.0]), np.array([False])), [1.0])


def test_episode_tracker_by_hand():
    tracker = EpisodeTracker(2)
    assert tracker.mean_return() is None and tracker.mean_length() is None
    steps = [
        ([1.0, 2.0], [False, False]),
        ([1.0, 2.0], [True, False]),  # env 0 ends: return 1 + 1 = 2, length 2
        ([3.0, 1.0], [False, True]),  # env 1 ends: return 2 + 2 + 1 = 5, length 3
        ([1.0, 1.0], [True, False]),  # env 0 ends: return 3 + 1 = 4, length 2
    ]
    for reward, end in steps:
        tracker.update(np.array(reward), np.array(end))
    assert list(tracker.recent_returns) == [2.0, 5.0, 4.0]
    assert list(tracker.recent_lengths) == [2, 3, 2]
    assert tracker.episodes == 3
    assert tracker.mean_return() == pytest.approx(11 / 3)
    assert tracker.mean_length() == pytest.approx(7 / 3)
    assert tracker.mean_return(last=1) == 4.0
    # in-progress episodes: env 0 just reset, env 1 has one step of reward 1
    assert tracker.returns.tolist() == [0.0, 1.0]
    assert tracker.lengths.tolist() == [0, 1]
    restored = EpisodeTracker(2)
    restored.load(tracker.state())
    assert restored.state() == tracker.state()


def test_episode_tracker_window():
    tracker = EpisodeTracker(1, window=2)
    for reward in (1.0, 2.0, 3.0):
        tracker.update(np.array([reward]), np.array([True]))
    assert list(tracker.recent_returns) == [2.0, 3.0]
    assert tracker.episodes == 3


def test_sync_envs_match_gymnasium_sync_vector_env_same_step():
    """SyncEnvs is Gymnasium's SyncVectorEnv(SAME_STEP) minus the info merging: same seeds, same transitions."""
    from gymnasium.vector import AutoresetMode

    ours = make_vec_env("InvertedPendulum-v5", 3)
    ref = gym.vector.SyncVectorEnv(
        [lambda: gym.make("InvertedPendulum-v5")] * 3, autoreset_mode=AutoresetMode.SAME_STEP
    )
    np.testing.assert_array_equal(ours.reset(seed=5), ref.reset(seed=5)[0].astype(np.float32))
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(300):
        actions = rng.uniform(-3, 3, (3, 1)).astype(np.float32)
        res = ours.step(actions)
        obs, reward, terminated, truncated, info = ref.step(actions)
        np.testing.assert_array_equal(res.obs, obs.astype(np.float32))
        np.testing.assert_array_equal(res.reward, reward.astype(np.float32))
        np.testing.assert_array_equal(res.terminated, terminated)
        np.testing.assert_array_equal(res.truncated, truncated)
        if res.final_obs is not None:
            ends += int(res.episode_end.sum())
            mask = info["_final_obs"]
            np.testing.assert_array_equal(res.final_obs[mask], np.stack(info["final_obs"][mask]).astype(np.float32))
    assert ends > 3, "the comparison crossed several episode ends"


@pytest.mark.parametrize("env_kwargs", [{}, {"g": 9.81}])
def test_the_numpy_pendulum_is_bit_identical_to_one_gymnasium_pendulum_per_env(env_kwargs):
    """N envs in one numpy step against N `gym.make("Pendulum-v1")` behind SyncEnvs: the same seeds, the same
    observations, rewards, truncations, final observations and resets, bit for bit; snapshots interchange."""
    ours = make_vec_env("Pendulum-v1", 3, env_kwargs=env_kwargs)
    assert isinstance(ours.env, PendulumVectorEnv)
    ref = make_vec_env("Pendulum-v1", 3, vectorization="sync", env_kwargs=env_kwargs)
    assert isinstance(ref.env, SyncEnvs)
    np.testing.assert_array_equal(ours.reset(seed=5), ref.reset(seed=5))
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(450):
        actions = rng.uniform(-3, 3, (3, 1)).astype(np.float32)  # beyond the bounds: the env clips
        a, b = ours.step(actions), ref.step(actions)
        for field in ("obs", "reward", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{field} at step {t}")
        assert (a.final_obs is None) == (b.final_obs is None)
        if a.final_obs is not None:
            ends += int(a.episode_end.sum())
            np.testing.assert_array_equal(a.final_obs, b.final_obs)
        if t == 300:  # a snapshot of one restores into the other
            ours.set_state(copy.deepcopy(ref.get_state()))
    assert ends == 6, "two time limits crossed by each env"
