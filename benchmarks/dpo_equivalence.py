"""Is policylab's DPO the same algorithm as TRL's DPOTrainer? Checked on the same batches, in the same order.

`llm.py --algo dpo` compares the two over seeds, where each side draws its own batches (both walk the pairs in
shuffled epochs, each in its own seeded order), so a difference in accuracy there mixes the algorithms with their
random streams. Here both sides take the same `--steps` batches of `--pairs-per-step` pairs, the pairs file's rows in
order (TRL's random sampler replaced by a sequential one; policylab's `preference_update` called on each batch),
from the same starting model (llm.py's: a tiny Llama after SFT), with the same settings (beta, lr, Adam without
weight decay, gradient-norm clip 1, constant learning rate, float32, 1 thread). Compared: the loss at every step,
every parameter after the first step and after the last, and the exact match of both final models (the same
evaluation).

    .venv/bin/python benchmarks/dpo_equivalence.py                    # 40 steps of 16 pairs, tiny-llama
    .venv/bin/python benchmarks/dpo_equivalence.py --steps 200

The scale to compare a difference with: float32 rounding differs between any two implementations and Adam
amplifies it over steps, so after one step the parameters should agree to about 1e-6 relative (the step itself is
lr = 1e-4 per parameter), and the losses of the first steps to about 1e-6. Output: a table and JSON in
benchmarks/results/dpo_equivalence-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    ONE_THREAD,
    REPO_ROOT,
    HelpFormatter,
    positive_int,
    print_table,
    provenance,
    run_worker,
    worker_record,
    write_results,
)

TRL_PY = REPO_ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"


def worker_trl(a: argparse.Namespace) -> None:
    """TRL's DPOTrainer over the rows in file order: per-step losses, the model after `--steps` steps."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    rows = [json.loads(line) for line in Path(a.pairs).read_text().splitlines()]

    class InOrder(DPOTrainer):  # type: ignore[misc]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    config = DPOConfig(
        output_dir=str(Path(a.work) / "trl"), learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, dataloader_num_workers=0, gradient_checkpointing=False, bf16=False, fp16=False,
        per_device_train_batch_size=a.pairs_per_step, beta=a.beta, loss_type=["sigmoid"],
    )  # fmt: skip
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    out = Path(a.work) / "trl-model"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    Path(a.out).write_text(json.dumps({"losses": losses, "model": str(out)}))


def ours(a: argparse.Namespace, model_dir: Path, pairs: Path, steps: int, out: Path) -> list[float]:
    """policylab's DPO update on the same batches: per-step losses; the model saved to `out`."""
    from policylab.llm.trainer import LLMTrainer, make_config

    cfg = make_config("dpo", {"model": str(model_dir), "pairs": str(pairs), "prompts": None, "beta": a.beta,
                              "lr": a.lr, "batch_size": a.pairs_per_step, "threads": 1})  # fmt: skip
    trainer = LLMTrainer(cfg)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    losses = []
    for step in range(steps):
        batch = rows[step * a.pairs_per_step : (step + 1) * a.pairs_per_step]
        prompt_ids, prompt_mask = trainer.encode_prompts([r["prompt"] for r in batch] * 2)
        ids, mask = trainer.encode_prompts.answers([r["chosen"] for r in batch] + [r["rejected"] for r in batch])
        losses.append(trainer.preference_update(prompt_ids, prompt_mask, ids, mask)["loss"])
    trainer.model.save_pretrained(out)
    trainer.tokenizer.save_pretrained(out)
    return losses


def parameter_gap(a_dir: str | Path, b_dir: str | Path) -> dict[str, float]:
    """Max |a - b| / max |b| over each parameter tensor, and its largest value over all of them."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(a_dir) / "model.safetensors")), load_file(str(Path(b_dir) / "model.safetensors"))
    gaps = {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b if k in a}
    return {"max": max(gaps.values()), "worst": max(gaps, key=lambda k: gaps[k]), "tensors": len(gaps)}


def side_by_side(a: argparse.Namespace, work: Path, model_dir: Path, pairs: Path, steps: int) -> dict[str, Any]:
    args = ["--worker", "--model-dir", str(model_dir), "--pairs", str(pairs), "--work", str(work / f"trl-{steps}")]
    args += ["--steps", str(steps), "--pairs-per-step", str(a.pairs_per_step), "--lr", str(a.lr)]
    args += ["--beta", str(a.beta)]
    env = {**ONE_THREAD, "PYTHONPATH": ""}
    trl = worker_record(run_worker(Path(__file__).resolve(), args, work / f"trl-{steps}.json", python=str(TRL_PY),
                                   env=env), "TRL's DPO")  # fmt: skip
    our_dir = work / f"ours-{steps}"
    losses = ours(a, model_dir, pairs, steps, our_dir)
    return {"steps": steps, "ours_losses": losses, "trl_losses": trl["losses"], "ours_model": str(our_dir),
            "trl_model": trl["model"], "parameters": parameter_gap(our_dir, trl["model"])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=positive_int, default=40, help="DPO steps on both sides")
    p.add_argument("--pairs-per-step", type=positive_int, default=16, help="preference pairs per step")
    p.add_argument("--model", default="tiny-llama", help="a policylab tiny model (tiny-llama, small-llama)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT of the starting model (as llm.py's)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate, both sides")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, both sides")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_trl(a)
        return
    if not TRL_PY.exists():
        raise SystemExit("TRL's venv is missing: run `.venv/bin/python benchmarks/llm.py --setup` first")
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO_ROOT))
    from llm import prepare

    from policylab.llm.trainer import evaluate_llm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = argparse.Namespace(model=a.model, sft_steps=a.sft_steps, algo="dpo")
        model_dir, pairs = prepare(setup, work)
        first = side_by_side(a, work, model_dir, pairs, 1)
        last = side_by_side(a, work, model_dir, pairs, a.steps)
        accuracy = {side: evaluate_llm(last[f"{side}_model"], "addition", eval_size=200)["accuracy"]
                    for side in ("ours", "trl")}  # fmt: skip
        start = evaluate_llm(str(model_dir), "addition", eval_size=200)["accuracy"]
    rows = [[str(i + 1), f"{o:.6f}", f"{t:.6f}", f"{abs(o - t):.2e}"]
            for i, (o, t) in enumerate(zip(last["ours_losses"], last["trl_losses"]))]  # fmt: skip
    print_table(["step", "ours loss", "TRL loss", "|difference|"], rows)
    for run in (first, last):
        gap = run["parameters"]
        print(f"after {run['steps']} step(s): largest parameter difference {gap['max']:.2e} of the tensor's largest "
              f"value ({gap['worst']}; {gap['tensors']} tensors)")  # fmt: skip
    ours_acc, trl_acc = accuracy["ours"], accuracy["trl"]
    print(f"exact match: start {start:.3f}; after {a.steps} steps ours {ours_acc:.3f}, TRL {trl_acc:.3f}")
    for run in (first, last):
        del run["ours_model"], run["trl_model"]
    payload = {"provenance": provenance(["torch", "transformers", "policylab"]), "settings": vars(a),
               "start_accuracy": start, "accuracy": accuracy, "first_step": first, "run": last}  # fmt: skip
    print(f"\nresults: {write_results('dpo_equivalence', payload)}")


if __name__ == "__main__":
    main()
