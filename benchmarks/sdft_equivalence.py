"""Is policylab's SDFT and SDPO loss TRL's? `llm.trainer.self_distillation_loss` (what `policylab llm train sdft`
and `sdpo` minimize) against TRL 1.16's SDFTTrainer and SDPOTrainer loss functions
(`trl.experimental.sdft.loss_utils` / `trl.experimental.sdpo.loss_utils`, then the trainers' sequence-mean
token-mean), on the same inputs.

    .venv/bin/python benchmarks/sdft_equivalence.py          # after `benchmarks/llm.py --setup` (TRL's venv)

The inputs are random and fixed (seeded): a student's and a teacher's logits at 9 completion positions of 6 rows
over 37 tokens, the completion tokens, a completion mask with padding (one row with a single token), and the
sampler's log-probs of the tokens (the student's own, moved by noise: what `distillation_is_clip` weighs). TRL's
trainers divide the logits by the temperature before the loss functions; policylab's function takes the
temperature. Compared, for each distillation mode (topk_logits with k 4 and 16, renormalized or with the tail;
full_logits; sampled_token), alpha (0, 0.5, 1; sampled_token takes 1 only), temperature (1, 0.7) and
importance-sampling clip (off, 2), with TRL's SDFT and SDPO functions: the loss, and its gradient with respect to
the student's logits, as the largest difference relative to the largest entry. float32, 1 thread. Output: a
table and benchmarks/results/sdft_equivalence-<date>.json.
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

CASES = [
    {"mode": mode, "topk": topk, "tail": tail, "alpha": alpha, "temperature": temperature, "clip": clip}
    for mode, topk, tail in [
        ("topk_logits", 4, False),
        ("topk_logits", 4, True),
        ("topk_logits", 16, True),
        ("full_logits", 0, False),
        ("sampled_token", 0, False),
    ]
    for alpha in ((1.0,) if mode == "sampled_token" else (0.0, 0.5, 1.0))
    for temperature in (1.0, 0.7)
    for clip in (None, 2.0)
]
"""The settings compared: distillation_mode, distillation_topk, distillation_add_tail, distillation_alpha, the
temperature and distillation_is_clip."""
NAMES = ("student", "teacher", "ids", "mask", "sampler_logp")


def inputs(path: Path, seed: int = 0) -> None:
    """The fixed inputs, as safetensors."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rows, positions, vocab = 6, 9, 37
    student = 2.0 * torch.randn(rows, positions, vocab, generator=g)
    ids = torch.randint(0, vocab, (rows, positions), generator=g)
    lengths = torch.tensor([9, 7, 4, 9, 1, 6])
    own = torch.log_softmax(student / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
    tensors = {
        "student": student,
        "teacher": 2.0 * torch.randn(rows, positions, vocab, generator=g),
        "ids": ids,
        "mask": (torch.arange(positions)[None, :] < lengths[:, None]).to(torch.int64),
        "sampler_logp": own + 0.5 * torch.randn(rows, positions, generator=g),
    }
    save_file(tensors, str(path))


def losses_and_gradients(a: argparse.Namespace, side: str) -> dict[str, Any]:
    """Per case (and, on TRL's side, per trainer): the loss and its gradient with respect to the student's logits."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    t = load_file(a.inputs)
    mask = t["mask"].bool()
    out: dict[str, Any] = {}
    for case in CASES:
        key = "/".join(str(v) for v in case.values())
        for trainer in ("sdft", "sdpo") if side == "trl" else ("policylab",):
            student = t["student"].clone().requires_grad_(True)
            if side == "trl":
                loss = _trl_loss(trainer, case, student, t, mask)
            else:
                sys.path.insert(0, str(REPO_ROOT))
                from policylab.llm.trainer import self_distillation_loss

                loss = self_distillation_loss(
                    student, t["teacher"], t["ids"], mask, mode=case["mode"], alpha=case["alpha"],
                    topk=case["topk"], tail=case["tail"], temperature=case["temperature"],
                    sampler_logp=t["sampler_logp"], is_clip=case["clip"],
                )  # fmt: skip
            loss.backward()
            out[f"{trainer}/{key}"] = {"loss": float(loss.detach()), "grad": student.grad.tolist()}  # type: ignore[union-attr]
    return out


def _trl_loss(trainer: str, case: dict[str, Any], student: Any, t: dict[str, Any], mask: Any) -> Any:
    """TRL's trainer's loss: its loss function on the logits divided by the temperature, the clipped ratio to the
    sampler where on, then the mean over rows of each row's token mean."""
    import importlib

    from trl.trainer.utils import selective_log_softmax

    functions = importlib.import_module(f"trl.experimental.{trainer}.loss_utils")
    s, q = student / case["temperature"], t["teacher"] / case["temperature"]
    if case["mode"] == "topk_logits":
        per_token = functions.compute_topk_self_distillation_loss(
            s, q, distillation_topk=case["topk"], distillation_alpha=case["alpha"],
            distillation_add_tail=case["tail"],
        )  # fmt: skip
    elif case["mode"] == "full_logits":
        per_token = functions.compute_full_logit_self_distillation_loss(s, q, distillation_alpha=case["alpha"])
    else:
        per_token = functions.compute_sampled_token_self_distillation_loss(
            s, q, t["ids"], distillation_alpha=case["alpha"]
        )
    if case["clip"] is not None:
        student_logps = selective_log_softmax(s, t["ids"])
        per_token = functions.apply_importance_sampling_clipping(per_token, student_logps, t["sampler_logp"],
                                                                 case["clip"])  # fmt: skip
    weights = mask.to(per_token.dtype)
    return ((per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).mean()


def main() -> None:
    both = trl_and_ours(__doc__, Path(__file__).resolve(), inputs, losses_and_gradients, "inputs.safetensors")
    if both is None:
        return
    trl, ours = both
    cases = []
    for case in CASES:
        key = "/".join(str(v) for v in case.values())
        mine = ours[f"policylab/{key}"]
        row: dict[str, Any] = {**case, "ours_loss": mine["loss"]}
        for trainer in ("sdft", "sdpo"):
            theirs = trl[f"{trainer}/{key}"]
            row[f"{trainer}_loss"] = theirs["loss"]
            row[f"{trainer}_loss_gap"] = abs(mine["loss"] - theirs["loss"]) / max(abs(theirs["loss"]), 1e-30)
            row[f"{trainer}_grad_gap"] = relative_gap(mine["grad"], theirs["grad"])
        cases.append(row)
    print_table(
        ["mode", "k", "tail", "alpha", "T", "clip", "ours loss", "SDFT loss", "gap", "grad gap", "SDPO gap",
         "grad gap"],
        [[c["mode"], str(c["topk"] or "-"), str(c["tail"]), f"{c['alpha']}", f"{c['temperature']}", str(c["clip"]),
          f"{c['ours_loss']:.7f}", f"{c['sdft_loss']:.7f}", f"{c['sdft_loss_gap']:.1e}",
          f"{c['sdft_grad_gap']:.1e}", f"{c['sdpo_loss_gap']:.1e}", f"{c['sdpo_grad_gap']:.1e}"] for c in cases],
    )  # fmt: skip
    payload = {"provenance": provenance(["torch", "policylab"]), "cases": cases}
    print(f"results: {write_results('sdft_equivalence', payload)}")


if __name__ == "__main__":
    main()
