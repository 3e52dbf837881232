"""Is policylab's GOLD loss TRL's? `llm.cross_tokenizer.CrossTokenizer.loss` (what `policylab llm train gold --set
use_uld_loss=true` minimizes) against TRL 1.16's `trl.experimental.gold.gold_trainer.ULDLoss`, on the same inputs.

    .venv/bin/python benchmarks/gold_equivalence.py          # after `benchmarks/llm.py --setup` (TRL's venv)

The inputs are fixed (seeded): six addition answers of 1 to 6 digits as completions, spelled by the student in
policylab's character tokenizer and by the teacher in its digit-pair tokenizer (`tasks.digit_pair_tokenizer`:
"1234" is "12", "34"), each followed by its EOS, after left-padded prompts of different lengths; random logits
over each model's vocabulary (24 and 124 tokens) at every position; each token's bytes of the completion as the
byte offsets TRL's collator would give. TRL's loss reads the whole sequences' logits and labels; policylab's reads
the logits at the completion positions (one column more, the position after the last token), which the script
slices out of the same tensors. Compared, for each merge strategy (observed, bayesian), alignment (byte groups
with use_extended_uld, positional without), the hybrid loss (off, TRL's adaptive weights, fixed weights) and the EOS
skipping: the loss, and its gradient with respect to the student's logits, as the largest difference relative to
the largest entry. float32, 1 thread. Output: a table and benchmarks/results/gold_equivalence-<date>.json.
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

ANSWERS = ["1234", "57", "990", "1", "102030", "66"]
PROMPT_LENGTHS = [6, 9, 7, 5, 8, 6]
CASES = [
    {"strategy": strategy, "extended": extended, "hybrid": hybrid, "skip_eos": skip}
    for strategy in ("observed", "bayesian")
    for extended in (True, False)
    for hybrid in ("off", "adaptive", "fixed")
    for skip in (True, False)
]
"""The settings compared: uld_token_merge_strategy, use_extended_uld, uld_use_hybrid_loss (and its weights: TRL's
adaptive ones, or 0.3 / 0.7) and uld_skip_student_eos = uld_skip_teacher_eos."""


def inputs(directory: Path, seed: int = 0) -> None:
    """The tokenizers (saved), and the sequences, labels, byte offsets and logits of both models (safetensors)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm.tasks import char_tokenizer, digit_pair_tokenizer

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for side, tokenizer in (("student", char_tokenizer()), ("teacher", digit_pair_tokenizer())):
        tokenizer.save_pretrained(directory / side)
        completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ANSWERS]
        prompt_width, width = max(PROMPT_LENGTHS), max(len(ids) for ids in completions) + 1
        ids = torch.full((len(ANSWERS), prompt_width + width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        offsets = torch.zeros(*ids.shape, 2, dtype=torch.long)
        for i, (completion, length) in enumerate(zip(completions, PROMPT_LENGTHS, strict=True)):
            ids[i, prompt_width - length : prompt_width] = 3  # a prompt of `length` tokens (one character)
            row = [*completion, tokenizer.eos_token_id]
            ids[i, prompt_width : prompt_width + len(row)] = torch.tensor(row)
            labels[i, prompt_width : prompt_width + len(row)] = torch.tensor(row)
            end = 0
            for k, token in enumerate(completion):
                start, end = end, end + len(tokenizer.decode([token]).encode())
                offsets[i, prompt_width + k] = torch.tensor([start, end])
            offsets[i, prompt_width + len(completion)] = torch.tensor([end, end])  # the EOS: no bytes
        tensors[f"{side}_ids"], tensors[f"{side}_labels"], tensors[f"{side}_offsets"] = ids, labels, offsets
        tensors[f"{side}_logits"] = 2.0 * torch.randn(*ids.shape, len(tokenizer), generator=g)
        tensors[f"{side}_prompt_width"] = torch.tensor(prompt_width)
    save_file(tensors, str(directory / "inputs.safetensors"))


def losses_and_gradients(a: argparse.Namespace, side: str) -> dict[str, Any]:
    """Per case: the loss and its gradient with respect to the student's logits (a list), on `side`'s function."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    directory = Path(a.inputs)
    t = load_file(str(directory / "inputs.safetensors"))
    student_tok = AutoTokenizer.from_pretrained(directory / "student")
    teacher_tok = AutoTokenizer.from_pretrained(directory / "teacher")
    out: dict[str, Any] = {}
    for case in CASES:
        logits = t["student_logits"].clone().requires_grad_(True)
        weights = (0.3, 0.7) if case["hybrid"] == "fixed" else None
        if side == "trl":
            from types import SimpleNamespace

            from trl.experimental.gold.gold_trainer import ULDLoss

            config = SimpleNamespace(
                uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                uld_teacher_temperature=1.0, uld_skip_student_eos=case["skip_eos"],
                uld_skip_teacher_eos=case["skip_eos"], use_extended_uld=case["extended"],
                uld_token_merge_strategy=case["strategy"], uld_use_hybrid_loss=case["hybrid"] != "off",
                uld_hybrid_matched_weight=None if weights is None else weights[0],
                uld_hybrid_unmatched_weight=None if weights is None else weights[1], beta=0.5,
            )  # fmt: skip
            uld = ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
            loss = uld(logits, t["teacher_logits"], t["student_labels"], t["teacher_labels"], t["student_ids"],
                       t["teacher_ids"], t["student_offsets"], t["teacher_offsets"])  # fmt: skip
        else:
            sys.path.insert(0, str(REPO_ROOT))
            from policylab.llm.cross_tokenizer import CrossTokenizer, ULDSettings

            settings = ULDSettings(
                extended=case["extended"], strategy=case["strategy"], skip_student_eos=case["skip_eos"],
                skip_teacher_eos=case["skip_eos"], hybrid=case["hybrid"] != "off", beta=0.5, hybrid_weights=weights,
            )  # fmt: skip
            views = []
            for name, full in (("student", logits), ("teacher", t["teacher_logits"])):
                width = int(t[f"{name}_prompt_width"])
                ids, mask = t[f"{name}_ids"][:, width:], t[f"{name}_labels"][:, width:] != -100
                # the logits that predict each completion token, and one column more (the last position's)
                views.append((full[:, width - 1 :], ids, mask))
            (student, s_ids, s_mask), (teacher, t_ids, t_mask) = views
            cross = CrossTokenizer(student_tok, teacher_tok, settings)
            loss, _ = cross.loss(student, s_ids, s_mask, teacher, t_ids, t_mask, ANSWERS)
        loss.backward()
        key = "/".join(str(v) for v in case.values())
        out[key] = {"loss": float(loss.detach()), "grad": logits.grad.tolist()}  # type: ignore[union-attr]
    return out


def main() -> None:
    both = trl_and_ours(__doc__, Path(__file__).resolve(), inputs, losses_and_gradients)
    if both is None:
        return
    trl, ours = both
    cases = []
    for case in CASES:
        key = "/".join(str(v) for v in case.values())
        cases.append({
            **case,
            "ours_loss": ours[key]["loss"],
            "trl_loss": trl[key]["loss"],
            "loss_gap": abs(ours[key]["loss"] - trl[key]["loss"]) / max(abs(trl[key]["loss"]), 1e-30),
            "grad_gap": relative_gap(ours[key]["grad"], trl[key]["grad"]),
        })  # fmt: skip
    print_table(
        ["strategy", "extended", "hybrid", "skip EOS", "ours loss", "TRL loss", "relative gap", "grad gap"],
        [[c["strategy"], str(c["extended"]), c["hybrid"], str(c["skip_eos"]), f"{c['ours_loss']:.7f}",
          f"{c['trl_loss']:.7f}", f"{c['loss_gap']:.1e}", f"{c['grad_gap']:.1e}"] for c in cases],
    )  # fmt: skip
    payload = {"provenance": provenance(["torch", "policylab"]), "answers": ANSWERS, "cases": cases}
    print(f"results: {write_results('gold_equivalence', payload)}")


if __name__ == "__main__":
    main()
