"""Is policylab's DPO the same algorithm as TRL's DPOTrainer? Checked on the same batches, in the same order, for
every preference loss (TRL's DPO loss types, its CPO and ORPO trainers for the reference-free cpo, simpo, orpo, and
its KTOTrainer for kto's two loss types, `--losses kto,apo_zero_unpaired`, on the pairs written as labelled rows).

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
    .venv/bin/python benchmarks/dpo_equivalence.py --losses all --steps 10   # each loss in turn, a table
    .venv/bin/python benchmarks/dpo_equivalence.py --losses ipo,robust --label-smoothing 0.1 --ld-alpha 0.5

`--use-weighting` (WPO), `--ref-sync-steps N` (TR-DPO, `--ref-mixup-alpha`) and `--precompute`
(precompute_ref_log_probs) set the options of the same names on both sides (TRL's DPOTrainer only).

`--losses` takes policylab's `preference_loss` values (comma-separated; `all`: each of PREFERENCE_LOSSES alone
but sft, plus the CPO and ORPO algorithms' sums cpo+sft and sft+orpo); the TRL side gets the same loss: its
DPOTrainer's `loss_type` list and `loss_weights`, or its CPOTrainer (cpo: loss_type sigmoid, simpo: loss_type
simpo, with `cpo_alpha` the weight of sft) or ORPOTrainer (sft+orpo). `--beta` defaults to policylab's for the
loss (2.0 for simpo, else 0.1). With `--uneven` (the default) every other rejected completion gets one more
digit, so the pairs' lengths differ and the length-normalized losses and LD-DPO's weights are exercised. The CPO
and ORPO trainers put the tokenizer's BOS before every prompt, which policylab's runs (and TRL's DPOTrainer) do
not: the TRL worker clears the BOS token there, so both sides see the same token sequences. TRL's ORPOTrainer
also adds the prompt's tokens to its NLL term (as ORPO's own code does; the paper's L_SFT is over the response,
as policylab's `sft` term): for sft+orpo the prompts are cut to their first character (the rest of the prompt goes
before both completions), which no NLL predicts, so the two NLLs are the same quantity.

The scale to compare a difference with: float32 rounding differs between any two implementations and Adam
amplifies it over steps, so after one step the parameters should agree to about 1e-6 relative (the step itself is
lr = 1e-4 per parameter), and the losses of the first steps to about 1e-6. Output: a table and JSON in
benchmarks/results/dpo_equivalence-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import (
    ONE_THREAD,
    TRL_PY,
    HelpFormatter,
    parameter_gap,
    positive_int,
    print_table,
    provenance,
    run_worker,
    start_equivalence_run,
    write_results,
)

UNPAIRED = ("kto", "apo_zero_unpaired")
"""`--losses` names of policylab's kto algorithm's `unpaired_loss` (TRL's KTOTrainer's loss types)."""
TPO = ("tpo:sigmoid", "tpo:hinge", "tpo:ipo", "tpo:simpo")
"""`--losses` names of policylab's tpo algorithm with each `preference_loss` it takes (TRL's TPOTrainer's loss types
sigmoid, hinge, ipo and tpo-l)."""


def trl_loss(a: argparse.Namespace, loss: str) -> dict[str, Any]:
    """{"trainer": dpo | cpo | orpo | kto, "config": its config's loss settings} for policylab's `preference_loss`
    (or kto's `unpaired_loss`)."""
    from policylab.objectives.preference import PREFERENCE_LOSSES, parse_preference_loss

    if loss in UNPAIRED:
        return {"trainer": "kto", "config": {"loss_type": loss, "desirable_weight": 1.0, "undesirable_weight": 1.0}}
    if loss in TPO:
        name = loss.removeprefix("tpo:")
        smoothing = {"label_smoothing": a.label_smoothing} if PREFERENCE_LOSSES[name].smoothing else {}
        return {"trainer": "tpo", "config": {"loss_type": "tpo-l" if name == "simpo" else name, "tpo_alpha": 1.0,
                                             "tpo_l_gamma": a.simpo_gamma, **smoothing}}  # fmt: skip
    terms = dict(parse_preference_loss(loss))
    if not terms.keys() & {"cpo", "simpo", "orpo"}:
        config = {"loss_type": list(terms), "loss_weights": list(terms.values()), "ld_alpha": a.ld_alpha,
                  "f_divergence_type": a.f_divergence, "f_alpha_divergence_coef": a.f_alpha,
                  "discopop_tau": a.discopop_tau, "use_weighting": a.use_weighting,
                  "precompute_ref_log_probs": a.precompute}  # fmt: skip
        if a.ref_sync_steps:
            config |= {"sync_ref_model": True, "ref_model_sync_steps": a.ref_sync_steps,
                       "ref_model_mixup_alpha": a.ref_mixup_alpha}  # fmt: skip
        if any(PREFERENCE_LOSSES[name].smoothing for name in terms):
            config["label_smoothing"] = a.label_smoothing
        return {"trainer": "dpo", "config": config}
    if a.ld_alpha is not None or a.use_weighting or a.ref_sync_steps or a.precompute:
        raise SystemExit(f"{loss}: TRL's CPO and ORPO trainers have no ld_alpha, WPO or TR-DPO")
    rest = {name: weight for name, weight in terms.items() if name != "sft"}
    if len(rest) == 1 and rest.get("cpo", rest.get("simpo")) == 1.0:
        config = {"loss_type": "sigmoid" if "cpo" in rest else "simpo", "cpo_alpha": terms.get("sft", 0.0),
                  "label_smoothing": a.label_smoothing}  # fmt: skip
        return {"trainer": "cpo", "config": {**config, **({"simpo_gamma": a.simpo_gamma} if "simpo" in rest else {})}}
    if terms == {"sft": 1.0, "orpo": 1.0}:
        return {"trainer": "orpo", "config": {}}
    raise SystemExit(f"{loss}: TRL has no trainer for this sum (cpo / simpo with sft, or sft+orpo, or DPO's types)")


def worker_trl(a: argparse.Namespace) -> None:
    """TRL's trainer for the loss (`--trl`, trl_loss's JSON) over the rows in file order: per-step losses, the model
    after `--steps` steps."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    rows = [json.loads(line) for line in Path(a.pairs).read_text().splitlines()]
    setup = json.loads(a.trl)
    trainers = {"dpo": (DPOConfig, DPOTrainer), "cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer),
                "kto": (KTOConfig, KTOTrainer), "tpo": (TPOConfig, TPOTrainer)}  # fmt: skip
    config_class, trainer_class = trainers[setup["trainer"]]
    if setup["trainer"] in ("cpo", "orpo"):
        tokenizer.bos_token = None  # CPO and ORPO would put it before every prompt (the module docstring)

    class InOrder(trainer_class):  # type: ignore[misc,valid-type]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    config = config_class(
        output_dir=str(Path(a.work) / "trl"), learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, dataloader_num_workers=0, gradient_checkpointing=False, bf16=False, fp16=False,
        per_device_train_batch_size=a.pairs_per_step, beta=a.beta, **setup["config"],
    )  # fmt: skip
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    out = Path(a.work) / "trl-model"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    Path(a.out).write_text(json.dumps({"losses": losses, "model": str(out)}))


def our_settings(a: argparse.Namespace, loss: str) -> dict[str, Any]:
    """The dpo algorithm's settings for `loss` and the command line's loss options (those the loss reads)."""
    from policylab.objectives.preference import PREFERENCE_LOSSES, parse_preference_loss

    if loss in UNPAIRED:
        return {"unpaired_loss": loss, "beta": a.beta}
    if loss in TPO:
        name = loss.removeprefix("tpo:")
        settings = {"preference_loss": name, "beta": a.beta, "tpo_alpha": 1.0}
        settings |= {"simpo_gamma": a.simpo_gamma} if name == "simpo" else {}
        return settings | ({"label_smoothing": a.label_smoothing} if PREFERENCE_LOSSES[name].smoothing else {})
    names = [name for name, _ in parse_preference_loss(loss)]
    settings: dict[str, Any] = {"preference_loss": loss, "beta": a.beta, "ld_alpha": a.ld_alpha,
                                "f_divergence": a.f_divergence}  # fmt: skip
    if any(PREFERENCE_LOSSES[name].smoothing for name in names):
        settings["label_smoothing"] = a.label_smoothing
    settings |= {"simpo_gamma": a.simpo_gamma} if "simpo" in names else {}
    settings |= {"discopop_tau": a.discopop_tau} if "discopop" in names else {}
    settings |= {"f_alpha": a.f_alpha} if a.f_divergence == "alpha_divergence" else {}
    settings |= {"use_weighting": True} if a.use_weighting else {}
    settings |= {"precompute_ref_log_probs": True} if a.precompute else {}
    if a.ref_sync_steps:
        settings |= {"sync_ref_model": True, "ref_model_sync_steps": a.ref_sync_steps,
                     "ref_model_mixup_alpha": a.ref_mixup_alpha}  # fmt: skip
    return settings


def ours(a: argparse.Namespace, loss: str, model_dir: Path, pairs: Path, steps: int, out: Path) -> list[float]:
    """policylab's preference update on the same batches: per-step losses; the model saved to `out`."""
    from policylab.llm.trainer import LLMTrainer, make_config

    algo = "kto" if loss in UNPAIRED else "tpo" if loss in TPO else "dpo"
    cfg = make_config(algo, {"model": str(model_dir), "pairs": str(pairs), "prompts": None, "lr": a.lr,
                             "batch_size": a.pairs_per_step, "threads": 1, **our_settings(a, loss)})  # fmt: skip
    trainer = LLMTrainer(cfg)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    losses = []
    for step in range(steps):
        trainer.step = step + 1  # as train_llm's loop sets it (TR-DPO's syncs follow it)
        batch = rows[step * a.pairs_per_step : (step + 1) * a.pairs_per_step]
        if algo in ("kto", "tpo"):  # their steps draw their rows: these, in file order
            trainer.draw_rows = lambda kind, n, batch=batch: batch  # type: ignore[method-assign]
            losses.append((trainer.kto_step if algo == "kto" else trainer.tpo_step)()["loss"])
            continue
        ref_sums = None
        if trainer.reference_sums is not None:  # precomputed: this batch's rows, chosen then rejected
            ref_sums = trainer.reference_sums[step * a.pairs_per_step : (step + 1) * a.pairs_per_step].T.reshape(-1)
        prompt_ids, prompt_mask = trainer.encode_prompts([r["prompt"] for r in batch] * 2)
        ids, mask = trainer.encode_prompts.answers([r["chosen"] for r in batch] + [r["rejected"] for r in batch])
        losses.append(trainer.preference_update(prompt_ids, prompt_mask, ids, mask, ref_sums)["loss"])
    trainer.model.save_pretrained(out)
    trainer.tokenizer.save_pretrained(out)
    return losses


class TrlFailed(Exception):
    """TRL's trainer raised on this loss (its last error line)."""


def side_by_side(
    a: argparse.Namespace, loss: str, work: Path, model_dir: Path, pairs: Path, steps: int
) -> dict[str, Any]:
    setup = trl_loss(a, loss)
    work = work / f"{loss}-{steps}"
    args = ["--worker", "--model-dir", str(model_dir), "--pairs", str(pairs), "--work", str(work / "trl")]
    args += ["--steps", str(steps), "--pairs-per-step", str(a.pairs_per_step), "--lr", str(a.lr)]
    args += ["--beta", str(a.beta), "--trl", json.dumps(setup)]
    env = {**ONE_THREAD, "PYTHONPATH": ""}
    res = run_worker(Path(__file__).resolve(), args, work / "trl.json", python=str(TRL_PY), env=env)
    if res.record is None:  # TRL's own error (e.g. WPO on the hinge loss): the table says so and goes on
        lines = [line for line in res.stderr_tail.splitlines() if "Error" in line]
        raise TrlFailed(lines[-1] if lines else f"exit code {res.returncode}")
    trl = res.record
    our_dir = work / "ours"
    losses = ours(a, loss, model_dir, pairs, steps, our_dir)
    return {"steps": steps, "ours_losses": losses, "trl_losses": trl["losses"], "ours_model": str(our_dir),
            "trl_model": trl["model"], "parameters": parameter_gap(our_dir, trl["model"])}  # fmt: skip


def uneven(pairs: Path, out: Path) -> Path:
    """The pairs with one more digit on every other rejected completion (so lengths differ within pairs)."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["rejected"] += str(i % 10) if i % 2 else ""
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def with_gold(pairs: Path, out: Path) -> Path:
    """TPO's rows: each pair with its chosen completion, the addition's answer, as the gold one (`reference`)."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    out.write_text("".join(json.dumps({**row, "reference": row["chosen"]}) + "\n" for row in rows))
    return out


def labelled(pairs: Path, out: Path) -> Path:
    """KTO's rows from the pairs: each pair's chosen completion (label true), then its rejected one (false)."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in rows for key in ("chosen", "rejected")]  # fmt: skip
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def one_token_prompts(pairs: Path, out: Path) -> Path:
    """The pairs with each prompt cut to its first character, the rest put before both completions."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows = [{"prompt": r["prompt"][0], "chosen": r["prompt"][1:] + r["chosen"],
             "rejected": r["prompt"][1:] + r["rejected"]} for r in rows]  # fmt: skip
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def compare(a: argparse.Namespace, loss: str, work: Path, model_dir: Path, pairs: Path) -> dict[str, Any]:
    """One loss on both sides: after 1 step and after `--steps`, and both final models' exact match."""
    from policylab.llm.trainer import evaluate_llm

    smoothing = a.label_smoothing if a.label_smoothing is not None else DEFAULT_SMOOTHING.get(loss, 0.0)
    a = argparse.Namespace(
        **{
            **vars(a),
            "beta": a.beta or (0.01 if loss in TPO else 2.0 if "simpo" in loss else 0.1),
            "label_smoothing": smoothing,
            "simpo_gamma": a.simpo_gamma if a.simpo_gamma is not None else 0.5 if loss in TPO else 1.0,
        }
    )
    if trl_loss(a, loss)["trainer"] == "orpo":
        pairs = one_token_prompts(pairs, work / "one-token-prompts.jsonl")
    if loss in UNPAIRED:
        pairs = labelled(pairs, work / "labelled.jsonl")
    if loss in TPO:
        pairs = with_gold(pairs, work / "gold.jsonl")
    try:
        first = side_by_side(a, loss, work, model_dir, pairs, 1)
        last = side_by_side(a, loss, work, model_dir, pairs, a.steps)
    except TrlFailed as failure:
        our_dir = work / f"{loss}-ours-alone"
        losses = ours(a, loss, model_dir, pairs, a.steps, our_dir)
        accuracy = evaluate_llm(str(our_dir), "addition", eval_size=200)["accuracy"]
        return {"loss": loss, "beta": a.beta, "trl": trl_loss(a, loss), "trl_error": str(failure),
                "ours_losses": losses, "accuracy": {"ours": accuracy}}  # fmt: skip
    accuracy = {side: evaluate_llm(last[f"{side}_model"], "addition", eval_size=200)["accuracy"]
                for side in ("ours", "trl")}  # fmt: skip
    for run in (first, last):
        del run["ours_model"], run["trl_model"]
    gaps = [abs(o - t) / max(abs(t), 1e-12) for o, t in zip(last["ours_losses"], last["trl_losses"])]
    return {"loss": loss, "beta": a.beta, "trl": trl_loss(a, loss), "accuracy": accuracy, "first_step": first,
            "run": last, "largest_loss_gap": max(gaps)}  # fmt: skip


DEFAULT_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}
"""label_smoothing without --label-smoothing: EXO's and rDPO's recommended values (both need one)."""


def all_losses(a: argparse.Namespace) -> list[str]:
    """Each loss alone but sft (cpo and orpo as their algorithms' sums); with an f-divergence or LD-DPO's weight,
    the losses that read it and TRL's DPOTrainer takes."""
    from policylab.objectives.preference import PREFERENCE_LOSSES

    if a.f_divergence != "reverse_kl":
        return [name for name, spec in PREFERENCE_LOSSES.items() if spec.f_divergence]
    names = [name for name, spec in PREFERENCE_LOSSES.items() if spec.reference]
    if a.use_weighting:  # policylab refuses WPO on the sorted-margin losses (TRL raises NotImplementedError)
        names = [name for name in names if name not in ("aot", "aot_unpaired")]
    dpo_only = a.ld_alpha is not None or a.use_weighting or a.ref_sync_steps or a.precompute
    return names if dpo_only else [*names, "simpo", "cpo+sft", "sft+orpo", *UNPAIRED, *TPO]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=positive_int, default=40, help="update steps on both sides")
    p.add_argument("--pairs-per-step", type=positive_int, default=16, help="preference pairs per step")
    p.add_argument("--model", default="tiny-llama", help="a policylab tiny model (tiny-llama, small-llama)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT of the starting model (as llm.py's)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate, both sides")
    p.add_argument("--losses", default="sigmoid", help="preference_loss values, comma-separated, or all")
    p.add_argument("--beta", type=float, help="beta, both sides (default: 2.0 for simpo, else 0.1)")
    p.add_argument(
        "--label-smoothing", type=float, help="for the losses that read it (default: 0, exo_pair 1e-3, robust 0.1)"
    )
    p.add_argument("--f-divergence", default="reverse_kl", help="f-DPO's divergence (DPO's loss types)")
    p.add_argument("--f-alpha", type=float, default=0.5, help="alpha of f-divergence alpha_divergence")
    p.add_argument("--ld-alpha", type=float, help="LD-DPO's weight of the tokens past the shorter completion")
    p.add_argument("--simpo-gamma", type=float, help="SimPO's target margin (default: 1.0; tpo:simpo, TPO-L's, 0.5)")
    p.add_argument("--discopop-tau", type=float, default=0.05, help="DiscoPOP's temperature")
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs on both sides")
    p.add_argument("--use-weighting", action="store_true", help="WPO's pair weights (DPO's loss types)")
    p.add_argument("--ref-sync-steps", type=int, default=0, help="TR-DPO: mix the policy into the reference every N")
    p.add_argument("--ref-mixup-alpha", type=float, default=0.6, help="TR-DPO's alpha")
    p.add_argument("--even", action="store_true", help="keep every pair's two completions the same length")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--trl", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_trl(a)
        return
    start_equivalence_run()
    from llm import prepare

    from policylab.llm.trainer import evaluate_llm

    losses = all_losses(a) if a.losses == "all" else a.losses.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = argparse.Namespace(model=a.model, sft_steps=a.sft_steps, algo="dpo")
        model_dir, pairs = prepare(setup, work)
        pairs = pairs if a.even else uneven(pairs, work / "uneven.jsonl")
        start = evaluate_llm(str(model_dir), "addition", eval_size=200)["accuracy"]
        results = [compare(a, loss, work, model_dir, pairs) for loss in losses]
    if len(results) == 1:
        last = results[0]["run"]
        rows = [[str(i + 1), f"{o:.6f}", f"{t:.6f}", f"{abs(o - t):.2e}"]
                for i, (o, t) in enumerate(zip(last["ours_losses"], last["trl_losses"]))]  # fmt: skip
        print_table(["step", "ours loss", "TRL loss", "|difference|"], rows)
    rows = []
    for r in results:
        trainer = f"{r['trl']['trainer'].upper()}Trainer {r['trl']['config'].get('loss_type', '')}".strip()
        if "trl_error" in r:
            rows.append([r["loss"], trainer, f"{r['beta']:g}", f"TRL raised: {r['trl_error'][:60]}", "", "",
                         f"{r['accuracy']['ours']:.3f} / -"])  # fmt: skip
            continue
        rows.append([r["loss"], trainer, f"{r['beta']:g}", f"{r['largest_loss_gap']:.1e}",
                     f"{r['first_step']['parameters']['max']:.1e}", f"{r['run']['parameters']['max']:.1e}",
                     f"{r['accuracy']['ours']:.3f} / {r['accuracy']['trl']:.3f}"])  # fmt: skip
    print_table(["loss", "TRL", "beta", "largest relative loss gap", "params after 1 step", f"after {a.steps}",
                 "exact match ours / TRL"], rows)  # fmt: skip
    print(f"(parameter gaps: a tensor's largest |ours - TRL| over its largest |value|; start exact match {start:.3f})")
    payload = {"provenance": provenance(["torch", "transformers", "policylab"]), "settings": vars(a),
               "start_accuracy": start, "results": results}  # fmt: skip
    print(f"\nresults: {write_results('dpo_equivalence', payload)}")


if __name__ == "__main__":
    main()
