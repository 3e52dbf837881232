"""Generation workers: copies of the policy that sample completions, as Ray actors or inline (`generation_workers`).

Each worker holds a copy of the model made when the run starts and its own sampling generator (seeded from the
run's seed and the worker's index). Before every generation the learner sends the trainable weights (all of
them, or LoRA's adapters: what the optimizer changes) through Ray's object store, so each worker samples from
the policy of the moment; the learner splits the prompts into contiguous chunks of whole groups, one per
worker, and puts the completions back together in order. The learner is otherwise unchanged: rewards,
advantages and updates run where they did. For a fixed seed and worker count the Ray and inline backends compute
the same run; it is not the run without workers (other sampling generators). A worker whose actor dies is
started again (the model it starts from is kept in the object store) and its chunk generated again.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.cluster import WorkerPool, one_thread_if_actor
from policylab.llm.rollout import Rollout, generate

SEED_STRIDE = 7919
"""Worker i samples from a generator seeded with seed + this x (i + 1) (+ RESTART_STRIDE x restarts)."""
RESTART_STRIDE = 1000


class GenerationWorker:
    """One copy of the policy model and its sampling generator."""

    def __init__(self, model: Any, seed: int) -> None:
        one_thread_if_actor()
        self.model = model.eval()
        self.generator = torch.Generator().manual_seed(seed)

    def generate(
        self, weights: dict[str, np.ndarray], prompt_ids: np.ndarray, prompt_mask: np.ndarray, **options: Any
    ) -> dict[str, np.ndarray]:
        """Completions of the prompt rows with `weights` loaded; `options` are `rollout.generate`'s."""
        if len(prompt_ids) == 0:  # more workers than rows
            empty = np.zeros((0, options["max_new_tokens"]), np.int64)
            return {"completion_ids": empty, "completion_mask": empty != 0, "logprobs": empty.astype(np.float32)}
        self.model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=False)
        out = generate(
            self.model, torch.tensor(prompt_ids), torch.tensor(prompt_mask), generator=self.generator, **options
        )
        return {
            "completion_ids": out.completion_ids.numpy(),
            "completion_mask": out.completion_mask.numpy(),
            "logprobs": out.logprobs.numpy(),
        }

    def get_state(self) -> np.ndarray:
        return self.generator.get_state().numpy()

    def set_state(self, state: np.ndarray) -> None:
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))

    def close(self) -> None:
        pass


def chunks(rows: int, workers: int, group: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, one per worker, of whole groups when the rows are groups."""
    unit = group if group > 1 and rows % group == 0 else 1
    units = rows // unit
    size, extra = divmod(units, workers)
    bounds = np.cumsum([0] + [(size + (i < extra)) * unit for i in range(workers)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class GenerationWorkers(WorkerPool):
    """`generation_workers` copies of the model sampling completions for the learner."""

    def __init__(self, model: Any, seed: int, count: int, backend: str) -> None:
        self._source: Any = None

        def arguments(i: int, restarts: int) -> tuple[Any, ...]:
            if self.ray is None:
                source = copy.deepcopy(model)
            else:
                if self._source is None:  # the model the workers start from, put once
                    self._source = self.ray.put(model)
                source = self._source
            return source, seed + SEED_STRIDE * (i + 1) + RESTART_STRIDE * restarts

        super().__init__(GenerationWorker, arguments, count, backend, "generation_workers")

    def generate(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, group: int, **options: Any) -> Rollout:
        """The rollout of the prompt rows, each worker sampling a chunk with the learner's current weights."""
        weights = {n: p.detach().cpu().numpy() for n, p in model.named_parameters() if p.requires_grad}
        spans = chunks(len(prompt_ids), len(self.handles), group)
        ids, mask = prompt_ids.numpy(), prompt_mask.numpy()
        per_worker = [{"prompt_ids": ids[a:b], "prompt_mask": mask[a:b]} for a, b in spans]
        parts = self.map("generate", weights, per_worker, **options)
        joined = {key: torch.cat([torch.tensor(p[key]) for p in parts]) for key in parts[0]}
        return Rollout(prompt_ids, prompt_mask, joined["completion_ids"], joined["completion_mask"], joined["logprobs"])

    def get_state(self) -> list[np.ndarray]:
        return self.call("get_state")

    def set_state(self, states: list[np.ndarray]) -> None:
        self.call_each("set_state", states)
