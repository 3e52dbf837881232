"""Batch and RolloutBuffer."""

from __future__ import annotations

import pytest
import torch

from policylab.data import Batch, RolloutBuffer


def make_batch() -> Batch:
    # T=3 steps x N=2 envs
    return Batch(
        obs=torch.arange(12.0).reshape(3, 2, 2),
        rewards=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    )


def test_batch_attribute_access_and_len():
    b = make_batch()
    assert len(b) == 3
    assert torch.equal(b.rewards, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert "obs" in b and "values" not in b
    assert b.keys() == ["obs", "rewards"]
    assert list(b) == ["obs", "rewards"]
    assert b.get("values") is None
    b.values = torch.zeros(3, 2)
    assert "values" in b and b.keys() == ["obs", "rewards", "values"]


def test_batch_missing_field_error_names_field_and_fields():
    with pytest.raises(AttributeError) as info:
        make_batch().advantages  # noqa: B018 - the attribute access is what raises
    msg = str(info.value)
    assert "'advantages'" in msg and "obs, rewards" in msg


def test_batch_flatten_merges_time_and_envs():
    flat = make_batch().flatten()
    assert len(flat) == 6
    assert flat.obs.shape == (6, 2)
    # row-major: (t=0, env 0), (t=0, env 1), (t=1, env 0), ...
    assert flat.rewards.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert flat.obs[3].tolist() == [6.0, 7.0]  # t=1, env 1 -> obs index (1, 1) -> 2*(1*2+1) = 6


def test_batch_select_rows():
    flat = make_batch().flatten()
    mb = flat.select(torch.tensor([4, 0]))
    assert mb.rewards.tolist() == [5.0, 1.0]
    assert mb.obs.tolist() == [[8.0, 9.0], [0.0, 1.0]]
    sl = flat.select(slice(1, 3))
    assert sl.rewards.tolist() == [2.0, 3.0]
    assert len(sl) == 2


def test_rollout_finish_assembles_next_values():
    # 3 steps x 2 envs. V(obs): env 0 -> 1, 2, 3; env 1 -> 10, 20, 30; V(last obs) = 4, 40.
    # env 0 terminates at t=1 (next value 0); env 1 is truncated at t=0 with V(final obs) = 15.
    buf = RolloutBuffer(3, 2, (4,), (), torch.long)
    values = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]
    terminated = [[False, False], [True, False], [False, False]]
    episode_end = [[False, True], [True, False], [False, False]]
    for step in range(3):
        obs = torch.full((2, 4), float(step))
        buf.add_policy_step(step, obs, torch.tensor([0, 1]), torch.tensor([-0.5, -0.7]), torch.tensor(values[step]))
        buf.add_env_step(step, torch.ones(2), torch.tensor(terminated[step]), torch.tensor(episode_end[step]))
        if step == 0:
            buf.set_bootstrap(0, torch.tensor([1]), torch.tensor([15.0]))  # env 1's V(final obs)
    batch = buf.finish(torch.tensor([4.0, 40.0]))
    # next_values:
    #   t=0: env 0 V(obs[1]) = 2;  env 1 truncated -> V(final obs) = 15 (not V(obs[1]) = 20)
    #   t=1: env 0 terminated -> 0 (not V(obs[2]) = 3);  env 1 V(obs[2]) = 30
    #   t=2: last_values 4, 40
    assert batch.next_values.tolist() == [[2.0, 15.0], [0.0, 30.0], [4.0, 40.0]]
    assert batch.terminated.tolist() == terminated
    assert batch.episode_end.tolist() == episode_end
    assert batch.obs.shape == (3, 2, 4) and batch.actions.dtype == torch.long
    assert batch.values.tolist() == values


def test_rollout_bootstrap_does_not_leak_into_next_rollout():
    buf = RolloutBuffer(1, 2, (1,), (), torch.long)
    no_actions = torch.zeros(2, dtype=torch.long)
    buf.add_policy_step(0, torch.zeros(2, 1), no_actions, torch.zeros(2), torch.tensor([1.0, 2.0]))
    buf.add_env_step(0, torch.ones(2), torch.tensor([False, False]), torch.tensor([True, True]))
    buf.set_bootstrap(0, torch.tensor([0, 1]), torch.tensor([7.0, 8.0]))
    assert buf.finish(torch.tensor([5.0, 6.0])).next_values.tolist() == [[7.0, 8.0]]
    # second rollout into the same storage: both envs terminate at t=0, nothing bootstraps
    buf.add_policy_step(0, torch.zeros(2, 1), no_actions, torch.zeros(2), torch.tensor([1.0, 2.0]))
    buf.add_env_step(0, torch.ones(2), torch.tensor([True, True]), torch.tensor([True, True]))
    assert buf.finish(torch.tensor([5.0, 6.0])).next_values.tolist() == [[0.0, 0.0]]
