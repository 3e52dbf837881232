"""Past groups for GRPO's steps whose groups teach nothing (TRL 1.10's GRPOWithReplayBufferTrainer): a
group whose rewards are all equal has advantage 0 everywhere; in its place the step trains on a group drawn from
the best past groups whose rewards differed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from policylab.llm.rollout import Rollout, concat_rollouts

FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs")
"""What a kept group holds of its rollout (with its advantages): what the policy loss reads."""


class GroupReplay:
    """Up to `size` groups of `group_size` completions, each with its advantages and its score, the sum over the
    group of |advantage| x the std of its rewards; when full, a new group replaces the lowest-scored one if it
    scores higher (TRL's min-heap). Draws are in proportion to the scores, from the run's generator, with
    replacement only when more are wanted than are kept."""

    def __init__(self, size: int, group_size: int, pad_token_id: int, generator: torch.Generator) -> None:
        self.size, self.group_size, self.pad, self.generator = size, group_size, pad_token_id, generator
        self.groups: list[tuple[float, Rollout, Tensor]] = []

    def exchange(
        self, rollout: Rollout, advantages: Tensor, rewards: Tensor, metrics: dict[str, float]
    ) -> tuple[Rollout, Tensor]:
        """Keep the batch's groups whose rewards differ, then put drawn groups in place of those whose rewards
        are all equal (none drawn while nothing is kept). `advantages` [N] per completion, `rewards` [N] its
        total reward (NaN: unscored); `metrics` gains replayed_groups and replay_size."""
        n = self.group_size
        grouped = rewards.view(-1, n)
        spread = torch.nan_to_num(grouped.std(1, unbiased=False) if n > 1 else torch.zeros(len(grouped)), nan=0.0)
        varied = spread > 0
        scores = (advantages.view(-1, n).abs().nan_to_num(0.0) * spread[:, None]).sum(1)
        for group in varied.nonzero().squeeze(-1).tolist():
            rows = torch.arange(group * n, (group + 1) * n)
            self.keep(float(scores[group]), trimmed(rollout.select(rows), self.pad), advantages[rows].clone())
        flat = int((~varied).sum())
        metrics.update(replayed_groups=0.0, replay_size=float(len(self.groups)))
        if not flat or not self.groups:
            return rollout, advantages
        drawn = self.draw(flat)
        kept = varied.repeat_interleave(n)  # the rows of the groups whose rewards differ
        parts = [without_extras(rollout.select(kept)), *(group for _, group, _ in drawn)]
        metrics["replayed_groups"] = float(len(drawn))
        return concat_rollouts(parts, self.pad), torch.cat([advantages[kept], *(adv for _, _, adv in drawn)])

    def keep(self, score: float, group: Rollout, advantages: Tensor) -> None:
        if len(self.groups) < self.size:
            self.groups.append((score, group, advantages))
            return
        lowest = min(range(len(self.groups)), key=lambda i: self.groups[i][0])
        if score > self.groups[lowest][0]:
            self.groups[lowest] = (score, group, advantages)

    def draw(self, count: int) -> list[tuple[float, Rollout, Tensor]]:
        weights = torch.tensor([score for score, _, _ in self.groups], dtype=torch.float64)
        picks = torch.multinomial(weights, count, replacement=count > len(self.groups), generator=self.generator)
        return [self.groups[i] for i in picks.tolist()]

    def tensors(self) -> dict[str, Tensor]:
        """The kept groups as checkpoint tensors (`replay/i/field`)."""
        out: dict[str, Tensor] = {}
        for i, (_, group, advantages) in enumerate(self.groups):
            out.update({f"replay/{i}/{name}": getattr(group, name) for name in FIELDS})
            out[f"replay/{i}/advantages"] = advantages
        return out

    def state(self) -> list[float]:
        return [score for score, _, _ in self.groups]

    def load(self, tensors: dict[str, Tensor], scores: list[float]) -> None:
        self.groups = []
        for i, score in enumerate(scores):
            fields: dict[str, Any] = {name: tensors[f"replay/{i}/{name}"] for name in FIELDS}
            self.groups.append((float(score), Rollout(**fields), tensors[f"replay/{i}/advantages"]))


def trimmed(group: Rollout, pad: int) -> Rollout:
    """A group's fields cut to its own widths (its prompts' and completions' longest), without the step's
    extras (its tape, rows, environments)."""
    prompt_width = int(group.prompt_mask.bool().any(0).sum())
    completion_width = (
        max(int(group.completion_mask.bool().any(0).nonzero().max()) + 1, 1) if group.completion_mask.any() else 1
    )
    return Rollout(
        group.prompt_ids[:, group.prompt_ids.shape[1] - prompt_width :].clone(),
        group.prompt_mask[:, group.prompt_mask.shape[1] - prompt_width :].clone(),
        group.completion_ids[:, :completion_width].clone(),
        group.completion_mask[:, :completion_width].clone(),
        group.logprobs[:, :completion_width].clone(),
    )


def without_extras(rollout: Rollout) -> Rollout:
    return Rollout(**{name: getattr(rollout, name) for name in FIELDS})
