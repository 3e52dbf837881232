"""GRPO's replay of past groups (`replay_buffer_size`; TRL 1.10's GRPOWithReplayBufferTrainer): which
groups are kept and with what score, what replaces a group whose rewards are all equal, and the errors."""

from __future__ import annotations

import pytest
import torch

from policylab.errors import ConfigError
from policylab.llm.replay import GroupReplay
from policylab.llm.rollout import Rollout
from policylab.llm.trainer import make_config


def batch(prompt_width: int, completion_width: int, offset: int) -> Rollout:
    """4 completions (2 groups of 2) with recognizable ids: row i's tokens are offset + i."""
    ids = torch.arange(4)[:, None] + offset
    return Rollout(
        ids.expand(4, prompt_width).clone(),
        torch.ones(4, prompt_width, dtype=torch.long),
        ids.expand(4, completion_width).clone(),
        torch.ones(4, completion_width, dtype=torch.bool),
        torch.full((4, completion_width), -0.5),
    )


def test_groups_with_differing_rewards_are_kept_and_replace_those_without():
    replay = GroupReplay(size=2, group_size=2, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    metrics: dict[str, float] = {}
    advantages = torch.tensor([0.7, -0.7, 0.0, 0.0])
    first, adv = replay.exchange(batch(3, 2, 10), advantages, torch.tensor([1.0, 0.0, 1.0, 1.0]), metrics)
    # group 0 differs: kept, score (|0.7| + |-0.7|) x std([1, 0]) = 1.4 x 0.5; group 1 (all 1) gives way to it
    assert replay.state() == [pytest.approx(0.7)]
    assert first.completion_ids[:, 0].tolist() == [10, 11, 10, 11] and adv.tolist() == pytest.approx([0.7, -0.7] * 2)
    assert metrics == {"replayed_groups": 1.0, "replay_size": 1.0}
    # a later batch with wider prompts and completions: the kept group is padded to them, left and right
    later, adv = replay.exchange(batch(5, 4, 20), torch.zeros(4), torch.tensor([0.0, 0.0, 2.0, 2.0]), metrics)
    assert later.prompt_ids.shape == (4, 5) and later.completion_ids.shape == (4, 4)
    assert later.prompt_mask[2:].tolist() == [[0, 0, 1, 1, 1]] * 2 and later.completion_mask[2:, 2:].sum() == 0
    assert later.completion_ids[:2, 0].tolist() == [10, 11] and later.completion_ids[2:, 0].tolist() == [10, 11]
    assert later.logprobs[2:, 2:].abs().sum() == 0 and adv.tolist() == pytest.approx([0.7, -0.7] * 2)
    # full: a higher score replaces the lowest, a lower one is left out
    replay.keep(0.9, first.select(torch.arange(2)), torch.ones(2))
    replay.keep(0.2, first.select(torch.arange(2)), torch.ones(2))
    assert sorted(replay.state()) == pytest.approx([0.7, 0.9])
    replay.keep(1.5, first.select(torch.arange(2)), torch.ones(2))
    assert sorted(replay.state()) == pytest.approx([0.9, 1.5])


def test_draws_follow_the_scores_and_a_batch_without_kept_groups_is_left_as_it_is():
    replay = GroupReplay(size=2, group_size=2, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    metrics: dict[str, float] = {}
    same = batch(2, 2, 0)
    out, adv = replay.exchange(same, torch.zeros(4), torch.ones(4), metrics)
    assert out is same and metrics["replayed_groups"] == 0.0
    replay.keep(3.0, same.select(torch.arange(2)), torch.ones(2))
    replay.keep(1.0, same.select(torch.arange(2, 4)), -torch.ones(2))
    picks = [float(group[2][0]) for group in replay.draw(4000)]
    assert picks.count(1.0) / len(picks) == pytest.approx(0.75, abs=0.03)  # 3 : 1


def test_replay_refuses_the_settings_it_cannot_go_with():
    for settings, clash in [
        ({"dynamic_sampling": True}, "dynamic_sampling is set"),
        ({"mix": "luffy"}, "mix=luffy is set"),
        ({"importance_sampling_correction": True}, "importance_sampling_correction is set"),
    ]:
        with pytest.raises(ConfigError, match=clash):
            make_config("grpo", {"replay_buffer_size": 8, **settings})
    with pytest.raises(ConfigError, match="must be >= 0"):
        make_config("grpo", {"replay_buffer_size": -1})
    with pytest.raises(ConfigError, match="sft does not use replay_buffer_size"):
        make_config("sft", {"replay_buffer_size": 8})
