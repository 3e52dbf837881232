"""Stacked-frame replay: each frame stored once, stacks rebuilt equal to the full stacks across episode starts,
ends, truncations and the ring's wrap, for n = 1 and n = 3; both paddings; the padding check; DQN training bit for
bit as with the full stacks; exact resume."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.data import ReplayBuffer
from policylab.data.replay import StackedFrameReplay
from policylab.envs import make_vec_env
from tests.envs_for_tests import CounterFrames
from tests.helpers import assert_same_params, params_of, resumed_and_full_runs


def _filled(padding: str, n_step: int, capacity: int, steps: int = 120) -> tuple[ReplayBuffer, StackedFrameReplay]:
    """The same 3 envs' transitions in a full-stack buffer and a stacked-frame one."""
    envs = [gym.wrappers.FrameStackObservation(CounterFrames(), 4, padding_type=padding) for _ in range(3)]
    obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)])
    plain = ReplayBuffer(capacity, 3, (4, 4, 4), (), torch.long, n_step=n_step, obs_dtype=torch.uint8)
    stacked = StackedFrameReplay(capacity, 3, (4, 4, 4), (), torch.long, n_step=n_step, obs_dtype=torch.uint8)
    for _ in range(steps):
        results = [e.step(0) for e in envs]
        final = np.stack([r[0] for r in results])
        term, trunc = np.array([r[2] for r in results]), np.array([r[3] for r in results])
        nxt = np.stack([e.reset()[0] if te or tr else r[0] for e, r, te, tr in zip(envs, results, term, trunc)])
        for buffer in (plain, stacked):
            buffer.add(obs, np.zeros(3, np.int64), np.ones(3), nxt, term, trunc, final)
        obs = nxt
    return plain, stacked


@pytest.mark.parametrize(("padding", "n_step"), [("reset", 1), ("zero", 1), ("reset", 3)])
@pytest.mark.parametrize("capacity", [3000, 120])  # no wrap; the ring wrapped several times
def test_rebuilt_stacks_equal_the_full_stacks(padding, n_step, capacity):
    plain, stacked = _filled(padding, n_step, capacity)
    drawable = torch.nonzero(stacked.valid.view(-1)).view(-1)
    assert len(drawable) > 60 and bool(plain.valid.view(-1)[drawable].all())
    if capacity < 3000:  # only the k - 1 oldest slots per env are held back
        assert len(drawable) >= int(plain.valid.sum()) - 3 * 3
    full, rebuilt = plain.gather(drawable), stacked.gather(drawable)
    for field in ("obs", "next_obs", "rewards", "terminated", "discounts"):
        assert torch.equal(getattr(full, field), getattr(rebuilt, field)), field
    assert stacked.padding == padding
    assert stacked.obs.shape[2:] == (4, 4) and plain.obs.shape[2:] == (4, 4, 4)  # one frame a slot, not four


def test_stacks_that_are_not_padded_frames_are_an_error():
    stacked = StackedFrameReplay(100, 1, (2, 4, 4), (), torch.long, obs_dtype=torch.uint8)
    padded = np.zeros((1, 2, 4, 4), np.uint8)
    padded[0, 1] = 7
    stacked.add(padded, np.zeros(1, np.int64), np.ones(1), padded, np.array([True]), np.array([False]), padded)
    other = np.random.default_rng(0).integers(0, 255, (1, 2, 4, 4)).astype(np.uint8)
    with pytest.raises(ValueError, match="frame_stack_replay=false"):
        stacked.add(other, np.zeros(1, np.int64), np.ones(1), other, np.array([False]), np.array([False]))


STACKED_GRID = "tests.envs_for_tests:stacked_pixel_grid"
DQN = {
    "learning_starts": 200, "lr": 5e-4, "buffer_size": 5000, "batch_size": 32, "hidden_sizes": [64], "threads": 1,
    "target_update_interval": 200, "log_every": 250, "num_envs": 2,
}  # fmt: skip


def test_dqn_trains_the_same_with_each_frame_once(tmp_path):
    runs = [
        pl.train(
            "dqn",
            env=STACKED_GRID,
            steps=1000,
            seed=4,
            preset="none",
            runs_dir=tmp_path,
            verbose=False,
            overrides={**DQN, "frame_stack_replay": compact},
        )  # fmt: skip
        for compact in (True, False)
    ]
    assert_same_params(params_of(runs[0].dir), params_of(runs[1].dir))
    env = make_vec_env(STACKED_GRID, 1)
    assert env.single_observation_space.shape == (2, 40, 40)
    env.close()


def test_a_stacked_frame_run_resumes_exactly(tmp_path):
    resumed_and_full_runs(
        "dqn", stop=500, env=STACKED_GRID, steps=1000, seed=5, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**DQN, "frame_stack_replay": True, "save_buffer": True},
    )  # fmt: skip
