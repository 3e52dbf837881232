"""Is policylab's GRPO update TRL's? Both sides train on the same completions, in the same order, and are compared
step by step.

`llm.py --algo grpo` compares the two over seeds, where each side samples its own completions from its own random
stream, so a difference in accuracy there mixes the updates with the samplers. Here the sampling is taken out:
`--steps` batches of `--prompts-per-step` prompts (the prompts file's rows in order) with `--group-size`
completions each are sampled once, by policylab's sampler from the starting model (llm.py's: a tiny Llama after
SFT), and both sides train on exactly these token ids: TRL's GRPOTrainer with its generation replaced by a lookup
of them (`_generate_single_turn`; the prompts' token ids it passes are checked against policylab's) and its dataset
unshuffled (`shuffle_dataset=False`: each step's prompts are the file's next ones), policylab's `rl_step` with its
sampling replaced by the same rollout. Settings as llm.py's grpo (one optimizer step per batch, epsilon 0.2, no
KL term, loss_type grpo = seq-mean-token-mean, lr 3e-4, Adam(W) without weight decay, gradient-norm clip 1,
float32, 1 thread).

    .venv/bin/python benchmarks/grpo_equivalence.py                   # 40 steps of 8 prompts x 8, tiny-llama
    .venv/bin/python benchmarks/grpo_equivalence.py --steps 200 --loss dr_grpo

`--loss`: policylab's loss / advantage pair for a TRL loss_type: grpo (default), dr_grpo, dapo, bnpo.
`--advantage grpo_batch`: TRL's scale_rewards="batch" against policylab's advantage=grpo_batch; `--advantage gdpo`:
its multi_objective_aggregation="normalize_then_sum" against policylab's of the same name. `--rewards`: the reward
functions on both sides, with weights (TRL's reward_weights): exact_match, all_digits (a format reward) and
odd_sums_only (exact match where the answer is odd, None elsewhere: TRL's "does not apply").

    .venv/bin/python benchmarks/grpo_equivalence.py --advantage gdpo --rewards exact_match,all_digits=0.5,odd_sums_only

Compared at every step: the mean reward (both sides score the same completions, so this checks they read the
same text), the gradient norm before clipping (the whole update's scale: the advantages, the aggregation and the
loss together), and the mean token entropy; after the first step and the last, every parameter (a tensor's
largest |ours - TRL| over its largest |value|), and both final models' exact match by the same evaluation.
The completions are the starting model's, so later steps train off the current policy; with one update per
batch the importance ratio is 1 on both sides (each takes its behaviour log-probs from its own forward), so
the update is the same function of the same tokens. The sampling is checked apart (`sampler_distances`): the
distributions of policylab's sampler and of transformers' `generate`, which TRL's trainer samples with.
Output: a table and JSON in benchmarks/results/grpo_equivalence-<date>.json.
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

LOSSES = {
    "grpo": {"advantage": "grpo", "aggregation": "seq-mean-token-mean"},
    "dr_grpo": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"advantage": "grpo", "aggregation": "token-mean"},
    "bnpo": {"advantage": "grpo", "aggregation": "token-mean"},
}
"""TRL loss_type -> policylab's grpo settings for it (bnpo and dapo are both token-mean on one process)."""


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [float(c.strip() == str(x).strip()) for c, x in zip(completions, answer)]


def all_digits(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """A format reward: the completion is digits only."""
    return [float(c.strip().isdigit()) for c in completions]


def odd_sums_only(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
    """Exact match where the answer is odd; None (does not apply) where it is even."""
    return [float(c.strip() == x) if int(x) % 2 else None for c, x in zip(completions, answer)]


REWARDS = {"exact_match": exact_match, "all_digits": all_digits, "odd_sums_only": odd_sums_only}


def reward_specs(a: argparse.Namespace) -> list[tuple[str, float]]:
    """`--rewards` as (name, weight) pairs: `exact_match,all_digits=0.5`."""
    specs = []
    for text in a.rewards.split(","):
        name, _, weight = text.partition("=")
        if name not in REWARDS:
            raise SystemExit(f"--rewards: {name!r} is not one of {', '.join(REWARDS)}")
        specs.append((name, float(weight or 1.0)))
    return specs


def sample_batches(a: argparse.Namespace, model_dir: Path, prompts: Path, out: Path) -> None:
    """`--steps` batches of completions from the starting model, as JSON: per step the prompts' token ids and the
    completions' token ids up to and including EOS (the rows in group order: each prompt's completions adjacent)."""
    from policylab.llm.trainer import LLMTrainer, make_config

    trainer = LLMTrainer(make_config("grpo", our_settings(a, model_dir, prompts)))
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    steps = []
    for step in range(a.steps):
        batch = rows[step * a.prompts_per_step : (step + 1) * a.prompts_per_step]
        rollout, _ = trainer.rollout([row for row in batch for _ in range(a.group_size)])
        ids, mask = rollout.completion_ids, rollout.completion_mask.bool()
        prompt_ids = trainer.encode_prompts.token_lists([row["prompt"] for row in batch])
        steps.append({"prompt_ids": prompt_ids, "completions": [ids[i][mask[i]].tolist() for i in range(len(ids))]})
    out.write_text(json.dumps(steps))


def sampler_distances(a: argparse.Namespace, model_dir: Path, prompts: Path) -> list[dict[str, Any]]:
    """The other half of the run, the sampling: for `--sampler-prompts` prompts, `--sampler-draws` completions
    from policylab's sampler and two sets as many from transformers' `generate` (what TRL's GRPOTrainer calls:
    do_sample, temperature 1, no top-k or top-p), all from the starting model. Per prompt, the total variation
    distance between the completions' empirical distributions, policylab's against generate's, next to the
    distance between generate's two sets (the sampling noise of that many draws)."""
    from collections import Counter

    import torch

    from policylab.llm.trainer import LLMTrainer, make_config

    trainer = LLMTrainer(make_config("grpo", {**our_settings(a, model_dir, prompts), "batch_size": 1}))
    rows = [json.loads(line) for line in prompts.read_text().splitlines()][: a.sampler_prompts]
    torch.manual_seed(0)
    tok = trainer.tokenizer

    def tv(x: Counter, y: Counter) -> float:
        return 0.5 * sum(abs(x[k] - y[k]) for k in x.keys() | y.keys()) / a.sampler_draws

    out = []
    for row in rows:
        ids, mask = trainer.encode_prompts([row["prompt"]] * a.sampler_draws)
        ours = Counter(trainer.rollout([row] * a.sampler_draws)[1])
        generated = []
        for _ in range(2):
            with torch.no_grad():
                sampled = trainer.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )  # fmt: skip
            generated.append(Counter(tok.batch_decode(sampled[:, ids.shape[1] :], skip_special_tokens=True)))
        out.append({"prompt": row["prompt"], "ours_vs_generate": tv(ours, generated[0]),
                    "generate_vs_generate": tv(generated[1], generated[0]), "distinct": len(ours)})  # fmt: skip
    return out


def our_settings(a: argparse.Namespace, model_dir: Path, prompts: Path) -> dict[str, Any]:
    return {"model": str(model_dir), "prompts": str(prompts), "batch_size": a.prompts_per_step, "threads": 1,
            "group_size": a.group_size, "max_new_tokens": a.max_new_tokens, "lr": a.lr, "steps": a.steps,
            "clip_low": 0.2, "clip_high": 0.2, **LOSSES[a.loss],
            **({"advantage": "grpo_batch"} if a.advantage == "grpo_batch" else {}),
            **({"multi_objective_aggregation": "normalize_then_sum"} if a.advantage == "gdpo" else {})}  # fmt: skip


def worker_trl(a: argparse.Namespace) -> None:
    """TRL's GRPOTrainer on the sampled batches: per-step reward, gradient norm and entropy; the final model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines()]
    batches = json.loads(Path(a.batches).read_text())
    served = iter(batches)

    class SameCompletions(GRPOTrainer):  # type: ignore[misc]
        def _generate_single_turn(self, prompt_ids: list, *args: Any, **kwargs: Any) -> tuple[list, None]:
            batch = next(served)
            expected = [ids for ids in batch["prompt_ids"] for _ in range(a.group_size)]
            if [list(ids) for ids in prompt_ids] != expected:
                raise SystemExit("TRL's prompt token ids differ from policylab's")
            return batch["completions"], None

    specs = reward_specs(a)
    config = GRPOConfig(
        output_dir=str(Path(a.work) / "trl"), learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, dataloader_num_workers=0, gradient_checkpointing=False, bf16=False, fp16=False,
        per_device_train_batch_size=a.prompts_per_step * a.group_size, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, temperature=1.0, beta=0.0, epsilon=0.2, num_iterations=1,
        loss_type=a.loss, shuffle_dataset=False, reward_weights=[w for _, w in specs],
        scale_rewards="batch" if a.advantage == "grpo_batch" else "group",
        multi_objective_aggregation="normalize_then_sum" if a.advantage == "gdpo" else "sum_then_normalize",
    )  # fmt: skip
    trainer = SameCompletions(model=model, reward_funcs=[REWARDS[n] for n, _ in specs], args=config,
                              train_dataset=Dataset.from_list(rows[: a.steps * a.prompts_per_step]),
                              processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "grad_norm" in log]
    out = Path(a.work) / "trl-model"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    record = {key: [float(log[name]) for log in logs] for key, name in
              (("reward", "reward"), ("grad_norm", "grad_norm"), ("entropy", "entropy"), ("loss", "loss"))}  # fmt: skip
    Path(a.out).write_text(json.dumps({**record, "model": str(out)}))


def ours(a: argparse.Namespace, model_dir: Path, prompts: Path, batches: Path, out: Path) -> dict[str, Any]:
    """policylab's rl_step on the sampled batches: per-step reward, gradient norm and entropy; the model to `out`."""
    import torch

    from policylab.llm.rollout import Rollout, token_logprobs
    from policylab.llm.trainer import LLMInputs, LLMTrainer, _padded, make_config, scored_mean

    inputs = LLMInputs(rewards=[(REWARDS[name], weight) for name, weight in reward_specs(a)])
    trainer = LLMTrainer(make_config("grpo", our_settings(a, model_dir, prompts)), inputs)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    pad = trainer.tokenizer.pad_token_id
    record: dict[str, list[float]] = {"reward": [], "grad_norm": [], "entropy": [], "loss": []}

    def clip_and_step() -> None:  # LLMTrainer._step, with the norm before clipping recorded
        record["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(trainer.optimizer.params, 1.0)))
        trainer.optimizer.step()

    trainer._step = clip_and_step  # type: ignore[method-assign]
    for step, batch in enumerate(json.loads(batches.read_text())[: a.steps]):
        trainer.step = step + 1
        drawn = [row for row in rows[step * a.prompts_per_step : (step + 1) * a.prompts_per_step]
                 for _ in range(a.group_size)]  # fmt: skip
        prompt_ids, prompt_mask = trainer.encode_prompts([row["prompt"] for row in drawn])
        ids, mask = _padded(batch["completions"], pad, left=False)
        with torch.no_grad():
            logprobs, _ = token_logprobs(trainer.model, prompt_ids, prompt_mask, ids, mask)
        rollout = Rollout(prompt_ids, prompt_mask, ids, mask, logprobs * mask, rows=drawn)
        texts = trainer.tokenizer.batch_decode(ids.masked_fill(~mask, pad), skip_special_tokens=True)
        rewards = trainer.score(rollout, texts, drawn)
        summary = {"reward": scored_mean(trainer.total_reward(rewards))}
        trainer.sample_groups = lambda r=rollout, w=rewards, m=summary: (r, w, m)  # type: ignore
        metrics = trainer.rl_step()
        for key in ("reward", "entropy", "loss"):
            record[key].append(metrics[key])
    trainer.model.save_pretrained(out)
    trainer.tokenizer.save_pretrained(out)
    return record


def side_by_side(a: argparse.Namespace, work: Path, model_dir: Path, prompts: Path, batches: Path) -> dict:
    args = ["--worker", "--model-dir", str(model_dir), "--prompts", str(prompts), "--batches", str(batches)]
    args += ["--work", str(work / "trl"), "--steps", str(a.steps), "--prompts-per-step", str(a.prompts_per_step)]
    args += ["--group-size", str(a.group_size), "--max-new-tokens", str(a.max_new_tokens), "--lr", str(a.lr)]
    args += ["--loss", a.loss, "--advantage", a.advantage, "--rewards", a.rewards]
    res = run_worker(Path(__file__).resolve(), args, work / "trl.json", python=str(TRL_PY),
                     env={**ONE_THREAD, "PYTHONPATH": ""})  # fmt: skip
    if res.record is None:
        raise SystemExit(f"TRL's worker failed:\n{res.stderr_tail}")
    mine = ours(a, model_dir, prompts, batches, work / "ours")
    return {"ours": mine, "trl": {k: v for k, v in res.record.items() if k != "model"},
            "parameters": parameter_gap(work / "ours", res.record["model"]), "ours_model": str(work / "ours"),
            "trl_model": res.record["model"]}  # fmt: skip


def relative_gaps(ours: list[float], trl: list[float]) -> list[float]:
    return [abs(o - t) / max(abs(t), 1e-12) for o, t in zip(ours, trl)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=positive_int, default=40, help="update steps on both sides")
    p.add_argument("--prompts-per-step", type=positive_int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=positive_int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="completion length limit")
    p.add_argument("--model", default="tiny-llama", help="a policylab tiny model (tiny-llama, small-llama)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT of the starting model (as llm.py's)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate, both sides")
    p.add_argument("--loss", choices=sorted(LOSSES), default="grpo", help="TRL's loss_type (policylab's equivalent)")
    p.add_argument(
        "--advantage",
        choices=("grpo", "grpo_batch", "gdpo"),
        default="grpo",
        help="grpo_batch: TRL's scale_rewards=batch; gdpo: multi_objective_aggregation=normalize_then_sum",
    )
    p.add_argument(
        "--rewards",
        default="exact_match",
        help=f"reward functions ({', '.join(REWARDS)}) and weights: e.g. exact_match,all_digits=0.5",
    )
    p.add_argument("--sampler-prompts", type=int, default=8, help="prompts of the sampling check (0: none)")
    p.add_argument("--sampler-draws", type=positive_int, default=4096, help="completions per prompt and sampler")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_trl(a)
        return
    start_equivalence_run()
    from llm import prepare

    from policylab.llm.trainer import evaluate_llm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, prompts = prepare(argparse.Namespace(model=a.model, sft_steps=a.sft_steps, algo="grpo"), work)
        batches = work / "batches.json"
        sample_batches(a, model_dir, prompts, batches)
        start = evaluate_llm(str(model_dir), "addition", eval_size=200)["accuracy"]
        sampling = sampler_distances(a, model_dir, prompts)
        first = side_by_side(argparse.Namespace(**{**vars(a), "steps": 1}), work / "first", model_dir, prompts,
                             batches)  # fmt: skip
        run = side_by_side(a, work / "run", model_dir, prompts, batches)
        accuracy = {side: evaluate_llm(run[f"{side}_model"], "addition", eval_size=200)["accuracy"]
                    for side in ("ours", "trl")}  # fmt: skip
    o, t = run["ours"], run["trl"]
    print_table(
        ["step", "reward ours / TRL", "grad norm ours", "TRL", "entropy ours", "TRL"],
        [[str(i + 1), f"{o['reward'][i]:.3f} / {t['reward'][i]:.3f}", f"{o['grad_norm'][i]:.6f}",
          f"{t['grad_norm'][i]:.6f}", f"{o['entropy'][i]:.6f}", f"{t['entropy'][i]:.6f}"] for i in range(a.steps)],
    )  # fmt: skip
    summary = {
        "largest_reward_gap": max(abs(x - y) for x, y in zip(o["reward"], t["reward"])),
        "largest_grad_norm_gap": max(relative_gaps(o["grad_norm"], t["grad_norm"])),
        "largest_entropy_gap": max(relative_gaps(o["entropy"], t["entropy"])),
        "parameters_after_first_step": first["parameters"]["max"],
        "parameters_after_last_step": run["parameters"]["max"],
        "start_accuracy": start,
        "accuracy": accuracy,
    }
    print_table(["compared", "largest gap"], [[k, f"{v:.2e}"] for k, v in summary.items() if isinstance(v, float)])
    print(f"exact match: start {start:.3f}, ours {accuracy['ours']:.3f}, TRL {accuracy['trl']:.3f}")
    if sampling:
        print_table(["prompt", "distinct completions", "TV ours vs generate", "TV generate vs generate"],
                    [[r["prompt"], str(r["distinct"]), f"{r['ours_vs_generate']:.4f}",
                      f"{r['generate_vs_generate']:.4f}"] for r in sampling])  # fmt: skip
    for r in (first, run):
        del r["ours_model"], r["trl_model"]
    payload = {"provenance": provenance(["torch", "transformers", "policylab"]), "settings": vars(a),
               "summary": summary, "sampling": sampling, "first_step": first, "run": run}  # fmt: skip
    print(f"\nresults: {write_results('grpo_equivalence', payload)}")


if __name__ == "__main__":
    main()
