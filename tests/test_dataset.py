"""Offline datasets: Minari-compatible write/read, D4RL flat files, validation and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer
from minari.dataset._storages.hdf5_storage import HDF5Storage

from policylab.cli import main
from policylab.data.dataset import (
    Dataset,
    best_episodes,
    check_compatible,
    concat_datasets,
    format_info,
    load_dataset,
    select_episodes,
    sha256_file,
    validate_dataset,
    write_dataset,
)
from policylab.errors import DatasetError

PENDULUM_OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
PENDULUM_ACT = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
CARTPOLE_OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
ARRAYS = ("observations", "actions", "rewards", "terminations", "truncations", "episode_lengths")


def _ends(lengths: list[int], truncated_last: bool) -> tuple[np.ndarray, np.ndarray]:
    n = sum(lengths)
    last = np.cumsum(lengths) - 1
    terminations, truncations = np.zeros(n, bool), np.zeros(n, bool)
    terminations[last] = True
    if truncated_last:
        terminations[last[-1]], truncations[last[-1]] = False, True
    return terminations, truncations


def pendulum(lengths: list[int] = [5, 3, 7], seed: int = 0, **extra) -> Dataset:  # noqa: B006
    rng = np.random.default_rng(seed)
    n, e = sum(lengths), len(lengths)
    terminations, truncations = _ends(lengths, truncated_last=True)
    fields = dict(
        env_id="Pendulum-v1",
        env_kwargs={"g": 9.81},
        behavior_log_probs=rng.normal(size=n).astype(np.float32),
        ref_min_score=-1200.0,
        ref_max_score=-150.0,
        metadata={"algorithm_name": "sac", "description": "random pendulum data", "seed": seed},
    )
    fields.update(extra)
    return Dataset(
        observations=rng.normal(size=(n + e, 3)).astype(np.float32),
        actions=rng.uniform(-2, 2, size=(n, 1)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminations=terminations,
        truncations=truncations,
        episode_lengths=np.array(lengths, np.int64),
        observation_space=PENDULUM_OBS,
        action_space=PENDULUM_ACT,
        **fields,
    )


def cartpole(lengths: list[int] = [4, 6], seed: int = 1) -> Dataset:  # noqa: B006
    rng = np.random.default_rng(seed)
    n, e = sum(lengths), len(lengths)
    terminations, truncations = _ends(lengths, truncated_last=False)
    return Dataset(
        observations=rng.normal(size=(n + e, 4)).astype(np.float32),
        actions=rng.integers(0, 2, size=n).astype(np.int64),
        rewards=np.ones(n, np.float32),
        terminations=terminations,
        truncations=truncations,
        episode_lengths=np.array(lengths, np.int64),
        observation_space=CARTPOLE_OBS,
        action_space=gym.spaces.Discrete(2),
        env_id="CartPole-v1",
    )


def assert_same_arrays(a: Dataset, b: Dataset) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def _problem(fn, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    assert info.value.fix, "every DatasetError says how to fix it"
    return str(info.value)


# --------------------------------------------------------------------------------------- round trips


def test_write_load_round_trip_keeps_everything(tmp_path):
    ds = pendulum()
    path = write_dataset(ds, tmp_path / "pend-medium")
    assert (path / "data" / "main_data.hdf5").is_file() and (path / "data" / "metadata.json").is_file()
    back = load_dataset(path)
    assert_same_arrays(ds, back)
    np.testing.assert_array_equal(back.behavior_log_probs, ds.behavior_log_probs)
    assert back.observation_space == ds.observation_space and back.action_space == ds.action_space
    assert (back.ref_min_score, back.ref_max_score) == (-1200.0, -150.0)
    assert back.env_id == "Pendulum-v1" and back.env_kwargs == {"g": 9.81}
    assert back.metadata == ds.metadata
    assert back.path == path and back.checksum == sha256_file(path / "data" / "main_data.hdf5")
    assert len(back.checksum) == 64
    assert load_dataset(path / "data").checksum == back.checksum  # pointing at data/ works too


def test_a_relative_path_is_written_where_it_points(tmp_path, monkeypatch):
    """`collect --out datasets/x` from the working directory: the dataset lands at datasets/x (minari takes its
    root from the environment, and a relative root used to be joined to the path a second time)."""
    monkeypatch.chdir(tmp_path)
    path = write_dataset(pendulum(), Path("datasets") / "pend-medium")
    assert path == tmp_path / "datasets" / "pend-medium" and (path / "data" / "main_data.hdf5").is_file()
    assert_same_arrays(pendulum(), load_dataset("datasets/pend-medium"))


def test_discrete_round_trip_without_refs_or_log_probs(tmp_path):
    ds = cartpole()
    back = load_dataset(write_dataset(ds, tmp_path / "cp"))
    assert_same_arrays(ds, back)
    assert back.actions.dtype == np.int64 and back.action_space == gym.spaces.Discrete(2)
    assert back.behavior_log_probs is None and back.ref_min_score is None and back.ref_max_score is None
    assert back.normalized_score(10.0) is None
    assert back.env_id == "CartPole-v1" and back.env_kwargs == {}


def test_module_class_env_is_recorded_without_a_gymnasium_spec(tmp_path):
    ds = pendulum(env_id="tests.envs_for_tests:TupleActionEnv", env_kwargs={"size": 3})
    path = write_dataset(ds, tmp_path / "custom")
    meta = json.loads((path / "data" / "metadata.json").read_text())
    assert "env_spec" not in meta and meta["dataset_id"] == "custom-v0"
    back = load_dataset(path)
    assert back.env_id == "tests.envs_for_tests:TupleActionEnv" and back.env_kwargs == {"size": 3}


def _minari_buffers(ds: Dataset) -> list[EpisodeBuffer]:
    buffers = []
    for i, (start, length) in enumerate(zip(ds.episode_starts(), ds.episode_lengths)):
        steps = slice(start, start + length)
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=ds.observations[start + i : start + i + length + 1],
                actions=ds.actions[steps],
                rewards=ds.rewards[steps],
                terminations=ds.terminations[steps],
                truncations=ds.truncations[steps],
            )
        )
    return buffers


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dataset_written_by_minari_loads_by_path_and_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ds = pendulum()
    minari.create_dataset_from_buffers(
        "pend-random-v0", _minari_buffers(ds), observation_space=PENDULUM_OBS, action_space=PENDULUM_ACT
    )
    newer = pendulum(lengths=[2, 2], seed=5)
    minari.create_dataset_from_buffers(
        "pend-random-v1", _minari_buffers(newer), observation_space=PENDULUM_OBS, action_space=PENDULUM_ACT
    )
    by_path = load_dataset(tmp_path / "minari" / "pend-random-v0")
    assert_same_arrays(ds, by_path)
    assert by_path.behavior_log_probs is None and by_path.env_id is None
    assert by_path.metadata["dataset_id"] == "pend-random-v0"
    assert_same_arrays(ds, load_dataset("pend-random-v0"))
    assert_same_arrays(newer, load_dataset("pend-random"))  # no version: the highest local one


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minari_dataset_with_env_spec_gives_env_id_and_kwargs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    ds = cartpole()
    minari.create_dataset_from_buffers("cartpole/test-v0", _minari_buffers(ds), env="CartPole-v1")
    back = load_dataset("cartpole/test-v0")
    assert_same_arrays(ds, back)
    assert back.env_id == "CartPole-v1" and back.action_space == gym.spaces.Discrete(2)


def _assert_matches_minari(ds: Dataset, md: minari.MinariDataset) -> None:
    episodes = list(md.iterate_episodes())
    assert len(episodes) == ds.num_episodes and md.total_steps == ds.num_steps
    starts = ds.episode_starts()
    for i, episode in enumerate(episodes):
        length, start = int(ds.episode_lengths[i]), int(starts[i])
        steps = slice(start, start + length)
        np.testing.assert_array_equal(episode.observations, ds.observations[start + i : start + i + length + 1])
        np.testing.assert_array_equal(episode.actions, ds.actions[steps])
        np.testing.assert_array_equal(episode.rewards, ds.rewards[steps])
        np.testing.assert_array_equal(episode.terminations, ds.terminations[steps])
        np.testing.assert_array_equal(episode.truncations, ds.truncations[steps])
        logp = episode.infos["behavior_log_prob"]
        assert len(logp) == length + 1 and np.isnan(logp[-1])
        np.testing.assert_array_equal(logp[:-1], ds.behavior_log_probs[steps])


def test_written_dataset_opens_in_minari(tmp_path, monkeypatch):
    ds = pendulum()
    path = write_dataset(ds, tmp_path / "pend")
    _assert_matches_minari(ds, minari.MinariDataset(path / "data"))

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    write_dataset(ds, tmp_path / "root" / "pend-expert-v0")
    loaded = minari.load_dataset("pend-expert-v0")
    _assert_matches_minari(ds, loaded)
    assert loaded.spec.dataset_id == "pend-expert-v0"
    assert minari.get_normalized_score(loaded, np.array([-150.0])) == pytest.approx(1.0)
    assert load_dataset("pend-expert").num_episodes == 3


# --------------------------------------------------------------------------------------- D4RL flat files


def _write_flat(path: Path, next_observations: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 10
    arrays = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        # episodes: steps 0-2 (terminal), 3-6 (timeout), 7-9 (unfinished: kept as truncated)
        "terminals": np.isin(np.arange(n), [2]),
        "timeouts": np.isin(np.arange(n), [6]),
    }
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if key != "next_observations" or next_observations:
                f.create_dataset(key, data=value)
        f.create_dataset("infos/action_log_probs", data=-np.arange(n, dtype=np.float32))
        f.attrs["env_id"] = "Hopper-v5"
        f.attrs["ref_min_score"] = -20.0
        f.attrs["ref_max_score"] = 3000.0
    return arrays


def test_d4rl_flat_file_splits_episodes_and_uses_next_observations(tmp_path):
    raw = _write_flat(tmp_path / "hopper.hdf5")
    ds = load_dataset(tmp_path / "hopper.hdf5")
    np.testing.assert_array_equal(ds.episode_lengths, [3, 4, 3])
    np.testing.assert_array_equal(np.flatnonzero(ds.terminations), [2])
    np.testing.assert_array_equal(np.flatnonzero(ds.truncations), [6, 9])
    np.testing.assert_array_equal(ds.observations[ds.obs_index()], raw["observations"])
    np.testing.assert_array_equal(ds.observations[[3, 8, 12]], raw["next_observations"][[2, 6, 9]])
    np.testing.assert_array_equal(ds.episode_returns(), [0 + 1 + 2, 3 + 4 + 5 + 6, 7 + 8 + 9])
    np.testing.assert_array_equal(ds.behavior_log_probs, -np.arange(10))
    assert ds.env_id == "Hopper-v5" and (ds.ref_min_score, ds.ref_max_score) == (-20.0, 3000.0)
    assert ds.action_space.shape == (2,) and ds.observation_space.shape == (3,)
    assert ds.checksum == sha256_file(tmp_path / "hopper.hdf5")


def test_d4rl_flat_file_without_next_observations_repeats_the_last(tmp_path):
    raw = _write_flat(tmp_path / "hopper.h5", next_observations=False)
    ds = load_dataset(tmp_path / "hopper.h5")
    np.testing.assert_array_equal(ds.observations[[3, 8, 12]], raw["observations"][[2, 6, 9]])


def _write_pendulum_flat(path: Path, action_scale: float = 2.0) -> Path:
    """A flat file as D4RL's: no env id, no spaces (Pendulum-like data: |obs| <= 1, actions within +-scale)."""
    rng = np.random.default_rng(0)
    n = 12
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32))
        f.create_dataset("actions", data=rng.uniform(-action_scale, action_scale, size=(n, 1)).astype(np.float32))
        f.create_dataset("rewards", data=-np.ones(n, np.float32))
        f.create_dataset("terminals", data=np.zeros(n, bool))
        f.create_dataset("timeouts", data=np.isin(np.arange(n), [5, 11]))
    return path


def test_flat_file_without_bounds_fits_any_env_of_its_shapes_and_takes_its_spaces(tmp_path):
    """The file's spaces are guesses (unbounded observations, the actions' range): a bounded env of the same shapes
    that holds the data fits, and the dataset then has the env's spaces; data outside the env's bounds does not."""
    env = gym.make("Pendulum-v1")
    ds = load_dataset(_write_pendulum_flat(tmp_path / "flat.hdf5"))
    check_compatible(ds, env.observation_space, env.action_space, "--env Pendulum-v1")
    assert ds.observation_space == env.observation_space and ds.action_space == env.action_space
    wide = load_dataset(_write_pendulum_flat(tmp_path / "wide.hdf5", action_scale=3.0))
    err = _problem(check_compatible, wide, env.observation_space, env.action_space, "--env Pendulum-v1")
    assert "action space" in err and "outside these bounds" in err
    cartpole_env = gym.make("CartPole-v1")
    assert "shape (3,) vs (4,)" in _problem(
        check_compatible, load_dataset(tmp_path / "flat.hdf5"), cartpole_env.observation_space,
        cartpole_env.action_space, "--env CartPole-v1")  # fmt: skip
    both = concat_datasets([load_dataset(tmp_path / "flat.hdf5"), pendulum()])
    assert both.env_id == "Pendulum-v1" and both.observation_space == PENDULUM_OBS
    assert both.action_space == PENDULUM_ACT and both.num_episodes == 2 + 3
    assert "outside these bounds" in _problem(concat_datasets, [pendulum(), load_dataset(tmp_path / "wide.hdf5")])


# --------------------------------------------------------------------------------------- errors


def test_missing_path_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    assert "does not exist" in _problem(load_dataset, tmp_path / "nowhere")
    err = _problem(load_dataset, "hopper-medium-v2")
    assert "does not download" in err and str(tmp_path / "root") in err and "policylab collect" in err
    write_dataset(pendulum(), tmp_path / "root" / "pend-medium-v0")
    assert "Did you mean: pend-medium-v0" in _problem(load_dataset, "pend-mediun-v0")
    (tmp_path / "empty").mkdir()
    assert "not a Minari dataset" in _problem(load_dataset, tmp_path / "empty")


def test_corrupt_and_truncated_files(tmp_path):
    path = write_dataset(pendulum(), tmp_path / "ds")
    main_file = path / "data" / "main_data.hdf5"
    good = main_file.read_bytes()
    main_file.write_bytes(b"this is not an hdf5 file" * 100)
    err = _problem(load_dataset, path)
    assert err.startswith(f"cannot read {main_file}") and "re-create" in err
    main_file.write_bytes(good[: len(good) // 2])
    assert _problem(load_dataset, path).startswith(f"cannot read {main_file}")
    (path / "data" / "metadata.json").write_text("{ not json")
    assert "cannot read" in _problem(load_dataset, path)


def test_nan_reward_on_disk_names_episode_and_field(tmp_path):
    path = write_dataset(pendulum(), tmp_path / "ds")
    with h5py.File(path / "data" / "main_data.hdf5", "r+") as f:
        f["episode_1/rewards"][2] = np.nan
    err = _problem(load_dataset, path)
    assert "episode 1: rewards has NaN at step 2" in err and str(path) in err
    assert load_dataset(path, validate=False).num_episodes == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.rewards.__setitem__(9, np.inf), "episode 2: rewards has inf at step 1"),
        (lambda d: d.observations.__setitem__(6, np.nan), "episode 1: observations has NaN at observation 0"),
        (lambda d: d.behavior_log_probs.__setitem__(0, np.nan), "episode 0: behavior_log_probs has NaN at step 0"),
        (lambda d: setattr(d, "rewards", d.rewards[:-1]), "rewards has 14 rows but episode_lengths add up to 15"),
        (lambda d: setattr(d, "observations", d.observations[:-1]), "observations has 17 rows; 15 steps in 3"),
        (lambda d: d.actions.__setitem__(6, 2.5), "episode 1: action [2.5] at step 1 is outside the action space"),
        (lambda d: d.terminations.__setitem__(1, True), "episode 0: terminations is set at step 1, before its last"),
        (lambda d: d.truncations.__setitem__(14, False), "episode 2: its last step 6 is neither terminated"),
        (lambda d: setattr(d, "episode_lengths", np.array([5, 0, 3, 7])), "episode 1: length 0"),
        (lambda d: setattr(d, "observations", d.observations[:, :2]), "observations have shape (2,)"),
        (lambda d: setattr(d, "terminations", d.terminations.astype(np.int64)), "terminations has dtype int64"),
    ],
)
def test_validate_names_the_first_problem(change, expected):
    ds = pendulum()
    validate_dataset(ds)
    change(ds)
    assert expected in _problem(validate_dataset, ds)


def test_discrete_action_out_of_range():
    ds = cartpole()
    ds.actions[5] = 2
    assert "episode 1: action 2 at step 1 is outside the action space Discrete(2)" in _problem(validate_dataset, ds)


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = write_dataset(pendulum(), tmp_path / "ds")
    err = _problem(write_dataset, cartpole(), path)
    assert f"{path} already exists" in err and "--overwrite" in err and "--out" in err
    write_dataset(cartpole(), path, overwrite=True)
    assert load_dataset(path).env_id == "CartPole-v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_invalid_dataset_is_not_written(tmp_path):
    ds = pendulum()
    ds.rewards[0] = np.nan
    assert "episode 0: rewards has NaN" in _problem(write_dataset, ds, tmp_path / "ds")
    assert not any(tmp_path.iterdir())


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real_update = HDF5Storage.update_episodes

    def update_then_interrupt(self, episodes):
        real_update(self, list(episodes)[:1])  # part of the data is on disk ...
        raise KeyboardInterrupt  # ... when the user hits ctrl-c

    monkeypatch.setenv("MINARI_DATASETS_PATH", "/elsewhere")
    monkeypatch.setattr(HDF5Storage, "update_episodes", update_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(pendulum(), tmp_path / "ds")
    assert not any(tmp_path.iterdir()), "no dataset and no temporary directory"
    assert os.environ["MINARI_DATASETS_PATH"] == "/elsewhere"

    monkeypatch.setattr(HDF5Storage, "update_episodes", real_update)
    old = write_dataset(cartpole(), tmp_path / "ds")
    monkeypatch.setattr(HDF5Storage, "update_episodes", update_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(pendulum(), old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert load_dataset(old).env_id == "CartPole-v1", "a failed overwrite keeps the old dataset"


def test_concat_and_its_errors():
    a, b = pendulum(), pendulum(lengths=[2, 4], seed=7, ref_min_score=-1300.0, ref_max_score=-100.0)
    b.metadata["name"] = "b"
    ab = concat_datasets([a, b])
    assert ab.num_episodes == 5 and ab.num_steps == 21
    np.testing.assert_array_equal(ab.observations[: len(a.observations)], a.observations)
    np.testing.assert_array_equal(ab.episode_returns(), np.concatenate([a.episode_returns(), b.episode_returns()]))
    assert (ab.ref_min_score, ab.ref_max_score) == (-1300.0, -100.0)
    assert ab.behavior_log_probs is not None and ab.metadata == {"concat_of": ["dataset 0", "b"]}
    validate_dataset(ab)
    assert concat_datasets([a, pendulum(behavior_log_probs=None)]).behavior_log_probs is None

    err = _problem(concat_datasets, [a, cartpole()])
    assert "cannot concatenate dataset 0 and dataset 1: their observation spaces differ" in err
    assert "(3,) vs (4,)" in err
    assert "env_id 'Pendulum-v1' vs 'Other-v0'" in _problem(concat_datasets, [a, pendulum(env_id="Other-v0")])


def test_select_episodes_keeps_each_episodes_rows_in_order():
    ds = pendulum(lengths=[2, 3, 1, 4])
    kept = select_episodes(ds, [3, 1])  # the dataset's order, whatever the order asked
    np.testing.assert_array_equal(kept.episode_lengths, [3, 4])
    # steps 2-4 and 6-9; observation rows 3-6 (episode 1's 4) and 9-13 (episode 3's 5)
    np.testing.assert_array_equal(kept.actions, ds.actions[[2, 3, 4, 6, 7, 8, 9]])
    np.testing.assert_array_equal(kept.rewards, ds.rewards[[2, 3, 4, 6, 7, 8, 9]])
    np.testing.assert_array_equal(kept.behavior_log_probs, ds.behavior_log_probs[[2, 3, 4, 6, 7, 8, 9]])
    np.testing.assert_array_equal(kept.observations, ds.observations[[3, 4, 5, 6, 9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(kept.truncations, [False, False, False, False, False, False, True])
    np.testing.assert_array_equal(kept.terminations, [False, False, True, False, False, False, False])
    validate_dataset(kept)
    assert (kept.env_id, kept.ref_min_score, kept.ref_max_score) == (ds.env_id, ds.ref_min_score, ds.ref_max_score)


def test_best_episodes_keeps_the_top_share_by_return_and_names_its_source():
    ds = pendulum(lengths=[1] * 10)
    ds.rewards[:] = [5.0, 1.0, 9.0, 3.0, 9.0, 0.0, 7.0, 2.0, 8.0, 4.0]
    top = best_episodes(ds, 0.3)
    np.testing.assert_array_equal(top.rewards, [9.0, 9.0, 8.0])  # episodes 2, 4, 8, in the dataset's order
    assert best_episodes(ds, 0.29).num_episodes == 2, "floor(0.29 * 10)"
    assert best_episodes(ds, 0.01).num_episodes == 1, "at least one episode"
    assert best_episodes(ds, 0.2).rewards.tolist() == [9.0, 9.0], "ties: the earlier episode first"
    assert best_episodes(ds, 1.0) is ds
    assert top.metadata["top_fraction"] == 0.3 and top.metadata["best_episodes_of"] == ds.name
    assert "0.1 for the best 10%" in _problem(best_episodes, ds, 0.0)
    assert "outside (0, 1]" in _problem(best_episodes, ds, 1.5)


def test_check_compatible_names_both_spaces_and_the_env():
    ds = pendulum()
    check_compatible(ds, PENDULUM_OBS, PENDULUM_ACT, "the env Pendulum-v1")
    err = _problem(check_compatible, ds, CARTPOLE_OBS, gym.spaces.Discrete(2), "the env CartPole-v1")
    assert "does not fit the env CartPole-v1: the dataset's observation space is Box(-inf, inf, (3,), float32)" in err
    assert "the env CartPole-v1 has Box(-inf, inf, (4,), float32)" in err
    assert "env='Pendulum-v1'" in err
    wider = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert "bounds differ" in _problem(check_compatible, ds, PENDULUM_OBS, wider, "the env X")


# --------------------------------------------------------------------------------------- returns and scores


def test_episode_returns_and_normalized_score():
    ds = pendulum(lengths=[2, 3, 1])
    ds.rewards[:] = [1.0, 2.0, -1.0, -1.0, 0.5, 10.0]
    np.testing.assert_allclose(ds.episode_returns(), [3.0, -1.5, 10.0])
    assert ds.episode_returns().dtype == np.float64
    np.testing.assert_array_equal(ds.episode_starts(), [0, 2, 5])
    np.testing.assert_array_equal(ds.obs_index(), [0, 1, 3, 4, 5, 7])
    ds.ref_min_score, ds.ref_max_score = -10.0, 30.0
    assert ds.normalized_score(10.0) == pytest.approx(50.0)
    np.testing.assert_allclose(ds.normalized_score(ds.episode_returns()), [32.5, 21.25, 50.0])
    ds.ref_max_score = None
    assert ds.normalized_score(10.0) is None
    info = ds.info()
    assert info["episodes"] == 3 and info["steps"] == 6 and info["return_max"] == 10.0
    assert info["length_min"] == 1 and "normalized_return_mean" not in info and info["has_behavior_log_probs"]


# --------------------------------------------------------------------------------------- CLI


def test_cli_info_validate_concat(tmp_path, capsys):
    a = write_dataset(pendulum(), tmp_path / "a")
    b = write_dataset(pendulum(lengths=[4], seed=2), tmp_path / "b")
    assert main(["dataset", "info", str(a)]) == 0
    out = capsys.readouterr().out
    assert "episodes: 3, steps: 15" in out and "Pendulum-v1" in out and "normalized return" in out
    assert main(["dataset", "info", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["episodes"] == 3 and info["checksum"] == sha256_file(a / "data" / "main_data.hdf5")
    assert main(["dataset", "validate", str(a)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 3 episodes, 15 steps"
    assert main(["dataset", "concat", str(a), str(b), "--out", str(tmp_path / "ab")]) == 0
    assert load_dataset(tmp_path / "ab").metadata == {"concat_of": [str(a), str(b)]}
    assert main(["dataset", "concat", str(a), str(b), "--out", str(tmp_path / "ab")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["dataset", "concat", str(a), str(b), "--out", str(tmp_path / "ab"), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["dataset", "filter", str(tmp_path / "ab"), "--top", "0.5", "--out", str(tmp_path / "best")]) == 0
    best = load_dataset(tmp_path / "best")
    returns = np.sort(load_dataset(tmp_path / "ab").episode_returns())[::-1]
    np.testing.assert_allclose(np.sort(best.episode_returns())[::-1], returns[:2])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'best'}: the best 2 of 4 episodes")
    assert best.metadata["best_episodes_of"] == str(tmp_path / "ab")


def test_cli_validate_bad_dataset_exits_2(tmp_path, capsys):
    path = write_dataset(pendulum(), tmp_path / "ds")
    with h5py.File(path / "data" / "main_data.hdf5", "r+") as f:
        f["episode_0/actions"][1] = 7.0
    assert main(["dataset", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "episode 0: action [7.0] at step 1" in err and "Traceback" not in err


def test_a_dataset_prints_as_one_short_line_and_info_shows_no_negative_zero(tmp_path):
    ds = pendulum()
    text = repr(ds)
    assert "\n" not in text and len(text) < 400 and "array" not in text
    assert text.startswith("Dataset(env='Pendulum-v1', episodes=3, steps=15, return ") and "Box(-2.0, 2.0" in text
    zero = pendulum(ref_min_score=0.0, ref_max_score=1.0)
    zero.rewards = np.full(15, -1e-6, np.float32)  # returns and normalized returns round to -0.0
    lines = format_info(zero.info())
    assert "-0.0" not in lines and "return: 0.00 +/- 0.00" in lines and "normalized return: 0.0 +/- 0.0" in lines


def test_dataset_info_into_a_closed_pipe_exits_quietly(tmp_path):
    """`policylab dataset info D | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    path = write_dataset(pendulum(), tmp_path / "ds")
    proc = subprocess.Popen([sys.executable, "-m", "policylab.cli", "dataset", "info", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before the command has loaded the dataset and printed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
