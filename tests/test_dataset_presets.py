"""Presets keyed by D4RL dataset kind (CORL's per-dataset values) and the rewards' scale on the way into replay."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from policylab.algos import get_algo
from policylab.data.dataset import load_dataset, write_dataset
from policylab.errors import ConfigError
from policylab.presets import DATASET_PRESETS, dataset_preset_name
from policylab.train import OffPolicyLoop, resolve_config


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("hopper-medium-v2.hdf5", "hopper-medium"),  # D4RL's file
        ("downloads/hopper_medium_replay-v2.hdf5", "hopper-medium-replay"),
        ("datasets/halfcheetah-medium-expert", "halfcheetah-medium-expert"),  # policylab collect --out
        ("/home/u/.minari/datasets/mujoco/walker2d/expert-v0", "walker2d-expert"),  # Minari's remake
        ("datasets/my-hopper-medium", None),  # only whole names match
        ("datasets/pendulum-medium", None),
    ],
)
def test_dataset_kind_is_read_from_d4rl_minari_and_collect_names(path, kind):
    assert dataset_preset_name(path) == kind


def test_corl_tables_hold_every_locomotion_dataset_with_its_values():
    rebrac = DATASET_PRESETS["rebrac"]
    assert len(rebrac) == 18 and all(p.values["steps"] == 1_000_000 for p in rebrac.values())
    assert rebrac["hopper-medium-replay"].values["critic_bc_coef"] == 0.5
    assert "rebrac/hopper/medium_replay_v2.yaml" in rebrac["hopper-medium-replay"].source
    assert DATASET_PRESETS["sac_n"]["hopper-medium"].values["n_critics"] == 500
    assert DATASET_PRESETS["edac"]["walker2d-medium-expert"].values == {"steps": 3_000_000, "n_critics": 10, "eta": 5.0}
    iql = DATASET_PRESETS["iql"]
    assert iql["hopper-medium"].values["reward_normalization"] == "return_range"
    assert "reward_normalization" not in iql["halfcheetah-medium"].values
    dt = DATASET_PRESETS["dt"]
    assert len(dt) == 9 and dt["halfcheetah-medium-replay"].values == {"steps": 100_000, "target_return": 12000.0}
    assert "dt/walker2d/medium_expert_v2.yaml" in dt["walker2d-medium-expert"].source


def test_a_dataset_named_like_a_d4rl_kind_gets_corls_values_unless_opted_out(datasets, tmp_path):
    """The name picks the preset when the recorded env agrees (Pendulum data relabelled as Hopper-v5's here, run in
    Pendulum-v1), later layers win, and --preset none or an explicit kind chooses otherwise."""
    named = tmp_path / "hopper-medium"
    data = load_dataset(datasets["medium"])
    data.env_id = "Hopper-v5"
    write_dataset(data, named)
    spec = get_algo("rebrac")
    cfg, notes = resolve_config(spec, env="Pendulum-v1", dataset=named)
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef, cfg.steps) == (0.01, 0.01, 1_000_000)
    assert any("rebrac preset for hopper-medium datasets" in note and "CORL" in note for note in notes)
    cfg, _ = resolve_config(spec, env="Pendulum-v1", dataset=named, steps=500, overrides={"critic_bc_coef": 0.2})
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef, cfg.steps) == (0.01, 0.2, 500)
    cfg, notes = resolve_config(spec, env="Pendulum-v1", dataset=named, preset="none")
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef) == (1.0, 1.0) and not notes
    cfg, _ = resolve_config(spec, dataset=datasets["medium"], preset="hopper-medium-replay")
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef) == (0.05, 0.5)
    cfg, notes = resolve_config(get_algo("td3_bc"), env="Pendulum-v1", dataset=named)  # CORL's TD3+BC: one set
    assert cfg.bc_alpha == 2.5 and not notes


def test_a_dataset_whose_name_and_recorded_env_disagree_gets_no_dataset_preset(datasets, tmp_path):
    """A folder named hopper-medium holding Pendulum-v1 data: no hopper-medium values, a note saying why."""
    named = tmp_path / "hopper-medium"
    shutil.copytree(datasets["medium"], named)
    cfg, notes = resolve_config(get_algo("rebrac"), dataset=named)
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef) == (1.0, 1.0) and cfg.env == "Pendulum-v1"
    assert not any("preset for hopper-medium datasets (" in note for note in notes)
    assert any("named like a hopper-medium dataset but was collected in Pendulum-v1" in n for n in notes), notes
    cfg, _ = resolve_config(get_algo("rebrac"), dataset=named, preset="hopper-medium")
    assert (cfg.actor_bc_coef, cfg.critic_bc_coef) == (0.01, 0.01)


def _offline_rewards(dataset, **overrides) -> torch.Tensor:
    spec = get_algo("iql")
    cfg, _ = resolve_config(spec, steps=10, seed=0, overrides={"hidden_sizes": [8], **overrides}, dataset=dataset)
    loop = OffPolicyLoop(spec, cfg)
    rewards = loop.offline_source.offline.rewards.clone()
    loop.close()
    return rewards


def test_return_range_normalization_scales_dataset_rewards_by_1000_over_the_return_spread(datasets):
    returns = load_dataset(datasets["medium"]).episode_returns()
    scale = 1000.0 / (returns.max() - returns.min())
    plain = _offline_rewards(datasets["medium"])
    torch.testing.assert_close(_offline_rewards(datasets["medium"], reward_normalization="return_range"), plain * scale)
    both = _offline_rewards(datasets["medium"], reward_normalization="return_range", reward_scale=2.0)
    torch.testing.assert_close(both, plain * scale * 2.0)


def test_reward_scale_and_bias_apply_to_env_steps_and_leave_reported_returns_raw():
    def run(**overrides):
        spec = get_algo("sac")
        settings = {"hidden_sizes": [8], "learning_starts": 10_000, "log_every": 300, **overrides}
        cfg, _ = resolve_config(spec, env="Pendulum-v1", steps=300, seed=0, overrides=settings, preset="none")
        loop = OffPolicyLoop(spec, cfg)
        loop.iterate()
        filled = loop.buffer.rewards[: len(loop.buffer)]
        rewards = filled[loop.buffer.valid[: len(loop.buffer)]].clone()  # not the slots after episode ends
        loop.close()
        return rewards, loop.tracker.mean_return()

    plain, plain_return = run()
    assert plain_return is not None
    scaled, scaled_return = run(reward_scale=2.0, reward_bias=-1.0)
    assert len(plain) >= 298
    torch.testing.assert_close(scaled, plain * 2.0 - 1.0)
    assert scaled_return == plain_return and np.isfinite(plain_return)


def test_return_range_needs_a_dataset_and_a_spread(datasets):
    with pytest.raises(ConfigError, match="return_range takes the return range of a dataset"):
        resolve_config(get_algo("sac"), env="Pendulum-v1", overrides={"reward_normalization": "return_range"})
    with pytest.raises(ConfigError, match="is not one of none, return_range"):
        resolve_config(get_algo("iql"), dataset=datasets["medium"], overrides={"reward_normalization": "returns"})
