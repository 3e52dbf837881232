"""Is policylab's distillation loss TRL's? `objectives.imitation.generalized_jsd`, token-mean over the completion
mask (what `policylab llm train distill|gkd` minimizes), against the loss TRL 1.16's DistillationTrainer computes,
`trl.trainer.distillation_trainer._chunked_divergence_loss`, on the same inputs.

    .venv/bin/python benchmarks/distill_equivalence.py          # after `benchmarks/llm.py --setup` (TRL's venv)

The inputs are random and fixed (seeded): a student's and a teacher's final hidden states at the completion
positions, of different widths (the teacher another size), their LM heads over one vocabulary, and a completion
mask with padding. TRL's function takes hidden states and heads and projects them in tiles; policylab's takes the
logits, so its side multiplies them out first. For each beta (0: forward KL, 1: reverse KL, between: the
generalized JSD) and temperature, compared: the loss, and its gradients with respect to the student's hidden
states and head (what training moves), each as the largest difference relative to the largest entry. float32 on
both sides, 1 thread. Output: a table and benchmarks/results/distill_equivalence-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    print_table,
    provenance,
    relative_gap,
    trl_and_ours,
    write_results,
)

CASES = [(beta, temperature) for beta in (0.0, 0.3, 0.5, 0.9, 1.0) for temperature in (1.0, 0.7)]
"""(beta, temperature) pairs compared."""
NAMES = ("student_hidden", "teacher_hidden", "student_head", "teacher_head", "mask")


def inputs(path: Path, seed: int = 0) -> None:
    """The fixed inputs, as safetensors: 6 completions of 9 positions (the later ones padding in some rows), a
    student of width 48 and a teacher of width 80 over 37 tokens."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rows, positions, vocab = 6, 9, 37
    lengths = torch.tensor([9, 7, 4, 9, 1, 6])
    tensors = {
        "student_hidden": torch.randn(rows, positions, 48, generator=g),
        "teacher_hidden": torch.randn(rows, positions, 80, generator=g),
        "student_head": 0.3 * torch.randn(vocab, 48, generator=g),
        "teacher_head": 0.3 * torch.randn(vocab, 80, generator=g),
        "mask": (torch.arange(positions)[None, :] < lengths[:, None]).to(torch.int64),
    }
    save_file(tensors, str(path))


def losses_and_gradients(a: argparse.Namespace, side: str) -> dict[str, Any]:
    """Per case: the loss and the gradients of the student's hidden states and head (as lists), on `side`'s
    function."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    t = load_file(a.inputs)
    out: dict[str, Any] = {}
    for beta, temperature in CASES:
        hidden = t["student_hidden"].clone().requires_grad_(True)
        head = t["student_head"].clone().requires_grad_(True)
        if side == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            loss = _chunked_divergence_loss(hidden, t["teacher_hidden"], head, t["teacher_head"], t["mask"], beta,
                                            temperature=temperature)[0]  # fmt: skip
        else:
            sys.path.insert(0, str(REPO_ROOT))
            from policylab.objectives.aggregation import aggregate
            from policylab.objectives.imitation import generalized_jsd

            divergence = generalized_jsd(hidden @ head.T, t["teacher_hidden"] @ t["teacher_head"].T, beta, temperature)
            loss = aggregate(divergence, t["mask"].bool(), "token-mean")
        loss.backward()
        out[f"{beta}/{temperature}"] = {
            "loss": float(loss.detach()),
            "hidden_grad": hidden.grad.tolist(),  # type: ignore[union-attr]
            "head_grad": head.grad.tolist(),  # type: ignore[union-attr]
        }
    return out


def main() -> None:
    both = trl_and_ours(__doc__, Path(__file__).resolve(), inputs, losses_and_gradients, "inputs.safetensors")
    if both is None:
        return
    trl, ours = both
    cases = []
    for key in ours:
        beta, temperature = (float(x) for x in key.split("/"))
        cases.append({
            "beta": beta,
            "temperature": temperature,
            "ours_loss": ours[key]["loss"],
            "trl_loss": trl[key]["loss"],
            "loss_gap": abs(ours[key]["loss"] - trl[key]["loss"]),
            "hidden_grad_gap": relative_gap(ours[key]["hidden_grad"], trl[key]["hidden_grad"]),
            "head_grad_gap": relative_gap(ours[key]["head_grad"], trl[key]["head_grad"]),
        })  # fmt: skip
    print_table(
        ["beta", "temperature", "ours loss", "TRL loss", "|gap|", "hidden grad gap", "head grad gap"],
        [[f"{c['beta']}", f"{c['temperature']}", f"{c['ours_loss']:.7f}", f"{c['trl_loss']:.7f}",
          f"{c['loss_gap']:.1e}", f"{c['hidden_grad_gap']:.1e}", f"{c['head_grad_gap']:.1e}"] for c in cases],
    )  # fmt: skip
    payload = {"provenance": provenance(["torch", "policylab"]), "cases": cases}
    print(f"results: {write_results('distill_equivalence', payload)}")


if __name__ == "__main__":
    main()
