"""policylab's SFT, GRPO, GMPO, RLOO, DPO, CPO, SimPO, ORPO, KTO, reward models, on-policy distillation, GOLD, SDFT
and SDPO against TRL's SFTTrainer, GRPOTrainer, GMPOTrainer, RLOOTrainer, DPOTrainer, CPOTrainer, ORPOTrainer,
KTOTrainer, RewardTrainer, DistillationTrainer, GOLDTrainer, SDFTTrainer and SDPOTrainer: the
same model, prompts (or preference pairs), group size, lengths, optimizer settings and number of steps, alternating
runs, 1 thread each.

    .venv/bin/python benchmarks/llm.py --setup                # once: TRL's own venv (benchmarks/.venv-trl)
    .venv/bin/python benchmarks/llm.py --seeds 3 --steps 40
    .venv/bin/python benchmarks/llm.py --algo rloo --seeds 3 --steps 40 --model tiny-llama --prompts-per-step 8
    .venv/bin/python benchmarks/llm.py --algo dpo --seeds 3 --steps 40 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --algo orpo --seeds 3 --steps 40 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --training --model tiny-llama --prompts-per-step 8 --profile
    .venv/bin/python benchmarks/llm.py --algo distill --seeds 10 --steps 300 --model tiny-llama --prompts-per-step 64
    .venv/bin/python benchmarks/llm.py --algo gmpo --seeds 3 --steps 40 --model tiny-llama --prompts-per-step 8
    .venv/bin/python benchmarks/llm.py --algo tpo --seeds 10 --steps 40 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --algo sft --seeds 10 --steps 200 --model tiny-llama --prompts-per-step 64
    .venv/bin/python benchmarks/llm.py --algo sdft --seeds 10 --steps 100 --model tiny-llama --prompts-per-step 8 \
        --group-size 4 --lr 1e-3
    .venv/bin/python benchmarks/llm.py --algo sdpo --seeds 10 --steps 60 --model tiny-llama --prompts-per-step 8
    .venv/bin/python benchmarks/llm.py --algo gold --seeds 10 --steps 60 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --tools --seeds 3 --steps 20 --model tiny-llama --prompts-per-step 4 \
        --max-new-tokens 96 --sft-steps 200
    .venv/bin/python benchmarks/llm.py --setup-main           # once: TRL 1.10's venv (benchmarks/.venv-trl-main)
    .venv/bin/python benchmarks/llm.py --algo prm --seeds 5 --steps 100 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --algo bco --seeds 5 --steps 40 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --algo ssd --seeds 5 --steps 40 --model tiny-llama --prompts-per-step 16
    .venv/bin/python benchmarks/llm.py --algo xpo --seeds 5 --steps 40 --model tiny-llama --prompts-per-step 16

What is shared: a tiny Llama is built once (`--model`, policylab's config and character tokenizer) and, for
`--sft-steps` > 0, supervised on the addition task by policylab, then saved with `save_pretrained`; both sides
load that directory. The prompts are the addition task's rows (seeded), written as a JSONL / `datasets.Dataset`;
the reward is exact match of the stripped completion. Both sides sample `--group-size` completions of at most
`--max-new-tokens` tokens for `--prompts-per-step` prompts per step at temperature 1, one optimizer step per
batch (Adam(W) without weight decay, constant learning rate, gradient-norm clip 1), GRPO's group-normalized
advantages and clipped surrogate (epsilon 0.2), no KL term, the sequence-mean-token-mean aggregation (TRL's
loss_type "grpo"). After training, each side's model is evaluated by the same code (policylab's greedy exact
match on the task's held-out rows).

`--algo rloo`: the same rollouts with RLOO's leave-one-out advantages and no KL term on both sides. TRL's
RLOOTrainer clips a sequence-level ratio (the sum of the token log-probs) and averages over sequences; policylab's
rloo runs with `aggregation=seq-mean-token-sum`, whose token-level clipped surrogate has the same gradient at the
one update per batch both sides make (every ratio is 1 there). `--algo dpo`: offline DPO (sigmoid loss, beta 0.1,
the starting model as the reference) on one preference file both sides read: for each addition prompt its answer
(chosen) against a copy with one character changed (rejected), policylab's default pairs written out;
`--prompts-per-step` pairs per step. Both sides walk the file in shuffled epochs, each in its own seeded order.
`--algo dpo --precompute`: both sides compute the reference's log-probs of every pair before training
(precompute_ref_log_probs) and make no reference pass in their steps (the precomputation is outside the timed steps
on both sides).
`--algo cpo|simpo|orpo`: the same pairs, no reference model on either side, with policylab's defaults for the
algorithm on both: CPO (TRL's CPOTrainer, loss_type sigmoid, beta 0.1, cpo_alpha 1), SimPO (CPOTrainer, loss_type
simpo, beta 2.0, simpo_gamma 1.0, cpo_alpha 0) and ORPO (ORPOTrainer, beta 0.1). The CPO and ORPO trainers put the
tokenizer's BOS before every prompt: their worker clears it, as dpo_equivalence.py's does. TRL's ORPOTrainer
also trains its NLL term on the prompt's tokens (policylab's, as the paper's, only on the completion's), so
ORPO's accuracies compare two variants of the algorithm; the step's work is the same forward and backward.
`--algo reward_model`: the same pairs, a reward model trained on them (Bradley-Terry loss, lr 1e-3, policylab's
default): TRL's RewardTrainer on transformers' sequence classifier made from the starting model (its score head
initialized by transformers, policylab's at zero), both scoring at the EOS after the completion; its accuracy is
the share of 200 held-out pairs ranked right by each saved model through `--reward model:DIR`.
`--algo tpo`: the same pairs with the answer (the chosen completion) as each row's gold completion (`reference`),
TRL's experimental TPOTrainer against policylab's tpo at TPO's defaults on both sides (loss_type sigmoid, beta 0.01,
tpo_alpha 1: the reference-free sigmoid loss plus the gold completions' NLL, three completions a row).
`--algo gmpo`: GRPO's rollouts and advantages with GMPO's loss on both sides (TRL's experimental GMPOTrainer,
epsilon 0.4 in log space; policylab's gmpo, the same clip).
`--algo distill`: on-policy distillation against TRL's DistillationTrainer. The teacher is the model after
`--sft-steps` of SFT; the student, the same architecture with random weights (saved once, both sides load it);
`--prompts-per-step` prompts with one sampled completion each (DistillationTrainer samples one; `--group-size`
is ignored), the reverse KL (beta 1) between the student's and the teacher's next-token distributions at every
completion position, temperature 1, token-mean, lr 3e-3 (policylab's distill default).
`--algo sft`: supervised fine-tuning against TRL's SFTTrainer from the random starting model (`--sft-steps` is
ignored): the addition rows as prompt-completion pairs (the answer the completion, EOS after it on both sides),
`--prompts-per-step` examples per step, the loss on the completion's tokens only (TRL's completion_only_loss
default for such rows), token-mean over the batch, lr 3e-3 (policylab's SFT default); TRL's trainer pads each
batch to its longest example, policylab's puts each prompt left of its completion. With `--text`, the rows are
plain text instead, {"text": prompt + answer} (TRL's language-modeling rows): the loss on every token after the
first and on the EOS appended on both sides; the evaluation is the same exact match on the addition prompts.
`--algo sdft`: self-distillation against TRL's experimental SDFTTrainer. The starting model is the tiny Llama after
`--sft-steps` of policylab's SFT on addition rows half of which carry the answer before the question
("032:26+06="): it copies the answer when given it and gets part of the plain prompts right. Each training row's
`privileged_context` is its answer and the teacher's prompt "{privileged_context}:{prompt}"; the teacher is the
starting model (teacher_model_kind base); `--group-size` completions of each of `--prompts-per-step` prompts, the
generalized JSD (alpha 0.5) on the student's top 16 tokens (of 24: SDFTConfig's default 100 is more than the
vocabulary, which TRL refuses), sequence-mean token-mean, SDFTConfig's other defaults, on both sides.
`--algo sdpo`: SDPO against TRL's experimental SDPOTrainer, from the same starting model as `--algo sdft` on the
plain addition prompts (exact-match reward): `--group-size` completions of `--prompts-per-step` prompts; a failed
completion whose group holds a success learns the starting model's EMA teacher's distributions given the prompt
reprompted with it ("{successful_previous_attempt}:" before the question, as the starting model read answers), the
sampled tokens' reverse KL, self-distillation alone (distillation_weight 1): SDPOConfig's defaults otherwise.
`--algo gold`: distillation across tokenizers against TRL's experimental GOLDTrainer with use_uld_loss. The teacher
is `--model` after `--sft-steps` of SFT (the character tokenizer); the student, policylab's tiny-llama-pairs with
random weights (every two-digit number one token); both saved with a chat template that renders the messages' text
as it is (TRL's trainer reads conversations, user prompt and assistant answer). `--prompts-per-step` prompts, one
sampled completion each, GOLDConfig's defaults (temperature 0.9, top_p 0.95, beta 0.5, the uld_* settings) but
lmbda 1 (every step on the student's samples: the step whose time is compared, where GOLD's 0.5 would mix two
kinds of steps into the median) and use_extended_uld false (positional alignment: TRL's byte alignment takes
byte-level BPE tokenizers only), lr 3e-3. The losses are TRL's on the same logits (`gold_equivalence.py`).
`--tools` (GRPO): tool calling against GRPOTrainer(tools=...). Both sides use one tokenizer: characters plus
Qwen2.5's special tokens and tool tags, with TRL's copy of Qwen2.5's chat template (read from TRL's venv; TRL parses
tool calls only for chat templates it knows). The prompts are conversations (a one-word system message, then a
2-digit product such as "37*48="), each rendered with the `calc` tool's description (about 600 tokens); a
completion calls `calc` in Qwen's format, gets the result in the template's tool turn and answers after it (one
call: max_tool_calling_iterations 1 on both sides); the reward is exact match of the text after the tool's result.
The starting model is the tiny Llama after `--sft-steps` of policylab's assistant-only SFT on such conversations
(TRL's training variant of the template marks the assistant's tokens). `--max-new-tokens` must hold the call,
the tool turn and the answer (about 90 tokens).
`--algo kto`: the same pairs, unpaired (each a desirable and an undesirable completion), so a step of
`--prompts-per-step` pairs trains 2x as many completions (beta 0.1). TRL's KTOTrainer walks its rows in order (it
requires that for its KL pairs), and its own unpairing puts a thousand desirable rows before their undesirable
ones (datasets' map batches), so its first steps would train on desirable completions only: its worker gives it
the rows unpaired in pair order instead (each chosen completion, then its rejected one), so each of its batches
holds 16 pairs, as policylab's (which draws the pairs in shuffled epochs).

Against TRL 1.10's experimental trainers, which the 1.16.0 wheel no longer has (their TRL side runs in
benchmarks/.venv-trl-main, made by `--setup-main` from TRL_MAIN_COMMIT: from GitHub, or `--trl-source DIR`):
`--algo bco`: BCOTrainer on kto's rows and batches (beta 0.1, no distribution matching; TRL's worker drops the
BOS it would put before every prompt). `--algo prm`:
PRMTrainer from the starting model (a new two-way head on each side: TRL's randomly initialized, ours at zero),
TRL's stepwise rows made from the addition rows as policylab's prm makes them (an answer's digits as steps, half
with one changed), step separator "," (a newline is not in the tiny models' vocabulary); the accuracy is the
held-out steps classified right by each side's saved token classifier, read by one function. `--algo ssd`:
SSDTrainer, one completion per prompt at temperature 1, filter_empty off on both sides. `--algo minillm`:
MiniLLMTrainer with MiniLLMConfig's defaults, the SFT model as the teacher of a random student (as distill);
TRL's reverse-KL advantages carry the student's gradient, ours none (README: MiniLLM), so the losses differ by
that term. `--algo grpo_replay`: GRPOWithReplayBufferTrainer against policylab's grpo, replay_buffer_size 64.
`--algo gspo_token`: the GSPO-token GRPOTrainer (importance_sampling_level "sequence_token", epsilon 3e-4 /
4e-4, loss_type grpo) against policylab's grpo with loss=gspo_token and the same clip range.
`--algo xpo`, `--algo nash_md`: XPOTrainer and NashMDTrainer from the SFT model, one policy sample and one of the
reference (Nash-MD: of the mixture, mixture_coef 0.5) per prompt, beta 0.1 (XPO: alpha 1e-5), temperature 1,
lr 1e-4 (policylab's default), both rewarded by one reward model: policylab's reward_model trained for 200 steps
on the addition pairs first, which policylab reads as `--reward model:DIR` (its score at the EOS after the
completion) and TRL as its reward model (its score at the last token before the padding). TRL's worker drops
the tokenizer's BOS, which these trainers put before every prompt (as for cpo, simpo and orpo): the SFT model
and the evaluation read prompts without it.

Measured: wall-clock per step (median over the steps after the first `--warmup`), completion tokens per second
over the same steps, and accuracy after the run. TRL is installed in its own venv (it pulls its own
transformers): `--setup` makes it with torch 2.13.0 first, then trl==1.16.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ONE_THREAD,
    REPO_ROOT,
    TRL_MAIN_COMMIT,
    TRL_MAIN_PY,
    TRL_MAIN_VENV,
    TRL_PY,
    TRL_VENV,
    HelpFormatter,
    make_peer_venv,
    pair_report,
    positive_int,
    provenance,
    require_trl_venv,
    run_worker,
    worker_record,
    write_results,
)


def setup() -> None:
    make_peer_venv(TRL_VENV, "trl==1.16.0")


def setup_main(source: str | None) -> None:
    """TRL's repository at TRL_MAIN_COMMIT (1.10.0.dev0) in its own venv: from GitHub, or from a local checkout of that
    commit (`--trl-source DIR`, where GitHub cannot be reached)."""
    trl = source or f"trl @ git+https://github.com/huggingface/trl@{TRL_MAIN_COMMIT}"
    make_peer_venv(TRL_MAIN_VENV, trl, "requests")  # its GRPOTrainer imports requests without requiring it


# --- tool calling (--tools) --------------------------------------------------------------------------------------


def calc(e: str) -> str:
    """Calculate.

    Args:
        e: an expression
    """
    left, right = e.split("*")
    return str(int(left) * int(right))


TOOL_SYSTEM = {"role": "system", "content": "Calc."}
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def trl_chat_template(name: str) -> str:
    """A chat template as TRL ships it (`trl/chat_templates/NAME.jinja` in TRL's venv)."""
    found = sorted(TRL_VENV.glob(f"lib/python*/site-packages/trl/chat_templates/{name}.jinja"))
    if not found:
        raise SystemExit(f"error: no {name}.jinja in {TRL_VENV}\n  fix: run benchmarks/llm.py --setup")
    return found[0].read_text()


def qwen_char_tokenizer(template: str) -> Any:
    """Characters (printable ASCII) plus Qwen2.5's special tokens and tool tags, with `template`; EOS <|im_end|>."""
    import string

    from transformers import PreTrainedTokenizerFast

    from policylab.llm.tasks import character_backend

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    backend = character_backend(specials + TOOL_TOKENS + characters, unknown="<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])  # fmt: skip
    tokenizer.add_tokens(TOOL_TOKENS)
    tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    return tokenizer


def tool_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """An SFT conversation: the product asked, the call, the tool's result and the answer."""
    call = {"type": "function", "function": {"name": "calc", "arguments": {"e": row["prompt"].rstrip("=")}}}
    return {"messages": [TOOL_SYSTEM, {"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "calc", "content": row["answer"]},
                         {"role": "assistant", "content": row["answer"]}]}  # fmt: skip


def tool_prompt(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": [TOOL_SYSTEM, {"role": "user", "content": row["prompt"]}], "answer": row["answer"]}


def prepare_tools(a: argparse.Namespace, where: Path) -> tuple[Path, Path]:
    """The SFT'd starting model (saved with the plain Qwen2.5 template) and the conversational prompts."""
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm.models import build_tiny_model
    from policylab.llm.tasks import multiplication_rows
    from policylab.llm.trainer import train_llm

    tokenizer = qwen_char_tokenizer(trl_chat_template("qwen2_5_training"))
    model = build_tiny_model(a.model, tokenizer, 0, max_positions=1024)
    held_out = [tool_prompt(row) for row in multiplication_rows(32, 9)]
    settings = {"steps": a.sft_steps, "batch_size": 16, "lr": 3e-3, "assistant_only_loss": True,
                "max_new_tokens": a.max_new_tokens, "eval_every": a.sft_steps, "eval_size": 32}  # fmt: skip
    train = [tool_conversation(row) for row in multiplication_rows(2000, 1)]
    run = train_llm("sft", settings, where / "sft", verbose=False, prompts=train, eval_prompts=held_out,
                    tokenizer=tokenizer, model=model, tools=[calc])  # fmt: skip
    model_dir = run.dir / "model"
    tokenizer.chat_template = trl_chat_template("qwen2_5")
    tokenizer.save_pretrained(model_dir)
    prompts = where / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(tool_prompt(row)) + "\n" for row in multiplication_rows(5_000, 0)))
    return model_dir, prompts


SDFT_TEMPLATE = "{privileged_context}:{prompt}"
"""`--algo sdft`'s teacher prompt: the answer, a colon, the question (characters the tokenizer has)."""
SDPO_TEMPLATES = {"reprompt_template": "{solution}{prompt}", "solution_template": "{successful_previous_attempt}:"}
"""`--algo sdpo`'s reprompt: the successful sibling's answer, a colon, the question (as `SDFT_TEMPLATE`)."""
SDFT_TOPK = 16
"""`--algo sdft`'s top-k support: SDFTConfig's default 100 is more than the tiny model's vocabulary of 24, which
TRL's torch.topk refuses."""


def prepare_sdft(a: argparse.Namespace, where: Path) -> tuple[Path, Path]:
    """The SFT'd starting model (addition rows, half with the answer before the question) and the training rows
    with their answer as the privileged context."""
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm.tasks import get_task
    from policylab.llm.trainer import train_llm

    rows = get_task("addition").make(5_000, 0)
    mixed = [r if i % 2 else {**r, "prompt": SDFT_TEMPLATE.format(privileged_context=r["answer"], prompt=r["prompt"])}
             for i, r in enumerate(rows)]  # fmt: skip
    settings = {"model": a.model, "steps": a.sft_steps, "batch_size": 64, "eval_every": a.sft_steps}
    run = train_llm("sft", settings, where / "sft", verbose=False, prompts=mixed)
    prompts = where / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "privileged_context": r["answer"]}) + "\n" for r in rows))
    return run.dir / "model", prompts


GOLD_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
"""`--algo gold`'s chat template on both tokenizers (TRL's GOLDTrainer reads conversations): the messages' text as
it is, the EOS after the answer, so its rendered prompt is policylab's prompt."""


def prepare_gold(a: argparse.Namespace, where: Path) -> tuple[Path, Path]:
    """`--algo gold`: the teacher, `--model` after `--sft-steps` of SFT (the character tokenizer), and the student,
    policylab's tiny-llama-pairs with random weights (the digit-pair tokenizer), both saved with `GOLD_TEMPLATE`."""
    from policylab.llm.models import load_model
    from policylab.llm.tasks import get_task
    from policylab.llm.trainer import train_llm

    sft = {"model": a.model, "steps": a.sft_steps, "batch_size": 64, "eval_every": a.sft_steps}
    teacher_dir = train_llm("sft", sft, where / "sft", verbose=False).dir / "model"
    for directory, source in ((where / "teacher", teacher_dir), (where / "student", "tiny-llama-pairs")):
        model, tokenizer = load_model(source)
        tokenizer.chat_template = GOLD_TEMPLATE
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    a.teacher_dir = str(where / "teacher")
    prompts = where / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in get_task("addition").make(5_000, 0)))
    return where / "student", prompts


def tool_accuracy(model_dir: str, eval_size: int = 200) -> float:
    """Greedy exact match of the answer after the tool's result on held-out products (policylab's evaluation)."""
    from policylab.llm.models import load_model
    from policylab.llm.tasks import multiplication_rows
    from policylab.llm.trainer import LLMInputs, LLMTrainer, make_config

    model, tokenizer = load_model(model_dir)
    rows = [tool_prompt(row) for row in multiplication_rows(eval_size, 1_000_003)]
    inputs = LLMInputs(model=model, tokenizer=tokenizer, prompts=rows, eval_prompts=rows, tools=[calc])
    config = make_config("grpo", {"eval_size": eval_size, "max_new_tokens": 96, "max_tool_calling_iterations": 1})
    return float(LLMTrainer(config, inputs).evaluate()["accuracy"])


# --- shared inputs ----------------------------------------------------------------------------------------------


def prepare(a: argparse.Namespace, where: Path) -> tuple[Path, Path]:
    """(model directory, prompts JSONL): the starting model and the training prompts (DPO: preference pairs) both
    sides use. distill: the student, randomly initialized; the SFT model, the teacher, goes to `a.teacher_dir`. `a`
    needs model, sft_steps and algo; tools and text default to off (grpo_ and dpo_equivalence.py pass no more)."""
    tools, text = getattr(a, "tools", False), getattr(a, "text", False)
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm.models import load_model
    from policylab.llm.tasks import get_task
    from policylab.llm.trainer import train_llm

    if tools:
        return prepare_tools(a, where)
    if a.algo in ("sdft", "sdpo"):
        return prepare_sdft(a, where)
    if a.algo == "gold":
        return prepare_gold(a, where)
    model_dir = where / "start"
    if a.sft_steps > 0 and a.algo != "sft":
        run = train_llm(
            "sft",
            {"model": a.model, "steps": a.sft_steps, "batch_size": 64, "eval_every": a.sft_steps},
            where / "sft",
            verbose=False,
        )
        model_dir = run.dir / "model"
    if a.algo in ("distill", "minillm"):
        a.teacher_dir, model_dir = str(model_dir), where / "student"
    if a.algo in ("xpo", "nash_md"):  # both sides' reward: one reward model (a sequence classifier) of ours
        rm = {"model": a.model, "steps": 200, "batch_size": 64, "eval_every": 200}
        a.reward_dir = str(train_llm("reward_model", rm, where / "rm", verbose=False).dir / "model")
    if a.sft_steps <= 0 or a.algo in ("distill", "minillm", "sft"):
        model, tokenizer = load_model(a.model)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    rows = get_task("addition").make(5_000, 0)
    prompts = where / "prompts.jsonl"
    if a.algo in PAIR_ALGOS:
        import numpy as np

        from policylab.llm.trainer import preference_pair

        rng = np.random.default_rng(0)
        pairs = [preference_pair(row, rng) for row in rows]
        rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
        if a.algo == "tpo":  # the gold completion: the answer (the chosen one)
            rows = [{**row, "reference": row["chosen"]} for row in rows]
        if a.algo == "prm":  # TRL's stepwise rows: the answer's digits, half with one changed (policylab's rule)
            from policylab.llm.trainer import stepwise_example

            stepwise = [stepwise_example(row, rng) for row in get_task("addition").make(5_000, 0)]
            rows = [{"prompt": p, "completions": c, "labels": labels} for p, c, labels in stepwise]
    elif a.algo == "sft" and text:  # TRL's language-modeling rows
        rows = [{"text": row["prompt"] + row["answer"]} for row in rows]
    elif a.algo == "sft":  # TRL's prompt-completion rows (policylab's evaluation reads the answer)
        rows = [{"prompt": row["prompt"], "completion": row["answer"], "answer": row["answer"]} for row in rows]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, prompts


# --- workers ------------------------------------------------------------------------------------------------

OURS_EXTRA: dict[str, Any] = {
    "grpo": lambda a: {},
    "distill": lambda a: {"teacher": a.teacher_dir, "beta": 1.0, "temperature": 1.0},
    "minillm": lambda a: {"teacher": a.teacher_dir},  # MiniLLMConfig's defaults on both sides
    "grpo_replay": lambda a: {"replay_buffer_size": 64},
    "gspo_token": lambda a: {"loss": "gspo_token", "clip_low": 3e-4, "clip_high": 4e-4},  # GSPO's clip range
    **dict.fromkeys(("xpo", "nash_md"), lambda a: {"rewards": [f"model:{a.reward_dir}"]}),
    # GOLD's defaults but lmbda (every step on the student's samples) and positional alignment (TRL's byte alignment
    # takes byte-level BPE tokenizers only)
    "gold": lambda a: {"teacher": a.teacher_dir, "use_uld_loss": True, "use_extended_uld": False, "lmbda": 1.0},
    "sft": lambda a: {},
    "sdft": lambda a: {"teacher_prompt_template": SDFT_TEMPLATE, "distillation_topk": SDFT_TOPK},
    "sdpo": lambda a: SDPO_TEMPLATES,
    "gmpo": lambda a: {},  # policylab's gmpo defaults: log-space clip 0.4 / 0.4, as GMPOConfig's epsilon
    "rloo": lambda a: {"aggregation": "seq-mean-token-sum"},  # TRL's sequence-level surrogate, see the docstring
    "dpo": lambda a: {"pairs": a.prompts, "prompts": None, "beta": 0.1, "precompute_ref_log_probs": a.precompute},
    **dict.fromkeys(
        ("cpo", "simpo", "orpo", "tpo", "kto", "bco", "reward_model"), lambda a: {"pairs": a.prompts, "prompts": None}
    ),
    "prm": lambda a: {"pairs": a.prompts, "prompts": None, "step_separator": PRM_SEPARATOR},
    "ssd": lambda a: {},
}
PAIR_ALGOS = ("dpo", "cpo", "simpo", "orpo", "tpo", "kto", "bco", "reward_model", "prm")
"""The algorithms that train on preference pairs (prepare writes pairs for them) and sample nothing."""
SAMPLING_ALGOS = ("grpo", "gmpo", "rloo", "distill", "gold", "sdft", "sdpo", "ssd", "minillm", "grpo_replay", "xpo",
                  "nash_md", "gspo_token")  # fmt: skip
MAIN_ONLY = ("ssd", "bco", "prm", "minillm", "grpo_replay", "xpo", "nash_md", "gspo_token")
"""The algorithms of TRL 1.10's that the 1.16.0 wheel no longer has: their TRL side runs in TRL_MAIN_VENV."""
PRM_SEPARATOR = ","
"""The PRM's step separator on both sides: a character of the tiny models' vocabulary (a newline is not)."""
"""The algorithms that sample completions (the others, SFT and the pair algorithms, train on given ones)."""


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from policylab.llm.trainer import train_llm

    torch.set_num_threads(1)
    marks: list[tuple[float, float]] = []
    rewards: list[float] = []
    calls: list[float] = []  # tool calls per completion, each step's (--tools)

    def callback(step: int, metrics: dict[str, float]) -> bool:
        marks.append((time.perf_counter(), metrics["tokens"]))
        if "reward" in metrics:
            rewards.append(metrics["reward"])
        if "tool_calls" in metrics:
            calls.append(metrics["tool_calls"])
        return True

    settings = {
        "model": a.model_dir,
        "prompts": a.prompts,
        "steps": a.steps,
        "seed": a.seed,
        "batch_size": a.prompts_per_step,
        "group_size": a.group_size,
        "max_new_tokens": a.max_new_tokens,
        "lr": a.lr,
        "eval_every": a.steps + 1,
        "eval_size": 1,
        **OURS_EXTRA[a.algo](a),
        **({"max_tool_calling_iterations": 1} if a.tools else {}),
    }
    algo = {"grpo_replay": "grpo", "gspo_token": "grpo"}.get(a.algo, a.algo)  # (settings of ours)
    run = train_llm(algo, settings, a.work, verbose=False, callback=callback, tools=[calc] if a.tools else None)
    return _record(a, marks, str(run.dir / "model"), "policylab", rewards, calls)


def worker_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines()]
    dataset = Dataset.from_list(rows)

    def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(c.strip() == str(x).strip()) for c, x in zip(completions, answer)]

    marks: list[tuple[float, float]] = []
    rewards: list[float] = []
    calls: list[float] = []  # tool calls per completion, each step's (--tools)

    class Marks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tokens = state.log_history[-1].get("completions/mean_length", 0.0) if state.log_history else 0.0
            marks.append((time.perf_counter(), float(tokens) * a.prompts_per_step * a.group_size))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
            if logs and "tools/call_frequency" in logs:
                calls.append(float(logs["tools/call_frequency"]))

    common = {
        "output_dir": str(Path(a.work) / "trl"),
        "learning_rate": a.lr,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_steps": a.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": a.seed,
        "dataloader_num_workers": 0,
        # float32 without gradient checkpointing, as policylab's runs; TRL's defaults turn both on (its bfloat16
        # autocast is emulated on an AVX2 CPU): --trl-defaults keeps them
        **({} if a.trl_defaults else {"gradient_checkpointing": False, "bf16": False, "fp16": False}),
    }
    rollouts = {
        "per_device_train_batch_size": a.prompts_per_step * a.group_size,
        "num_generations": a.group_size,
        "max_completion_length": a.max_new_tokens,
        "temperature": 1.0,
        "beta": 0.0,
        "epsilon": 0.2,
        "num_iterations": 1,
    }
    if a.algo == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, per_device_train_batch_size=a.prompts_per_step)
        rows_given = dataset.remove_columns("answer") if "answer" in dataset.column_names else dataset  # --text: none
        trainer = SFTTrainer(model=model, args=config, train_dataset=rows_given, processing_class=tokenizer)
    elif a.algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        config: Any = DPOConfig(**common, per_device_train_batch_size=a.prompts_per_step, beta=0.1,
                                loss_type=["sigmoid"], precompute_ref_log_probs=a.precompute)  # fmt: skip
        trainer: Any = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "reward_model":
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        classifier = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=1)
        classifier.config.pad_token_id = tokenizer.pad_token_id
        config = RewardConfig(**common, per_device_train_batch_size=a.prompts_per_step)
        trainer = RewardTrainer(model=classifier, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "kto":  # 2 completions a pair, as policylab's kto step; see the module docstring for the order
        from trl import KTOConfig, KTOTrainer

        unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                    for r in rows for key in ("chosen", "rejected")]  # fmt: skip
        config = KTOConfig(**common, per_device_train_batch_size=2 * a.prompts_per_step, beta=0.1)
        trainer = KTOTrainer(model=model, args=config, train_dataset=Dataset.from_list(unpaired),
                             processing_class=tokenizer)  # fmt: skip
    elif a.algo == "bco":  # KTO's rows: 2 completions a pair
        from trl.experimental.bco import BCOConfig, BCOTrainer

        unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                    for r in rows for key in ("chosen", "rejected")]  # fmt: skip
        tokenizer.bos_token = None  # BCOTrainer puts it before every prompt; policylab's runs do not
        config = BCOConfig(**common, per_device_train_batch_size=2 * a.prompts_per_step, beta=0.1)
        trainer = BCOTrainer(model=model, args=config, train_dataset=Dataset.from_list(unpaired),
                             processing_class=tokenizer)  # fmt: skip
    elif a.algo == "prm":
        from transformers import AutoModelForTokenClassification
        from trl.experimental.prm import PRMConfig, PRMTrainer

        classifier = AutoModelForTokenClassification.from_pretrained(a.model_dir, num_labels=2)
        config = PRMConfig(**common, per_device_train_batch_size=a.prompts_per_step, step_separator=PRM_SEPARATOR)
        trainer = PRMTrainer(model=classifier, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "ssd":
        from trl.experimental.ssd import SSDConfig, SSDTrainer

        config = SSDConfig(**common, per_device_train_batch_size=a.prompts_per_step, temperature=1.0,
                           max_completion_length=a.max_new_tokens, filter_empty=False)  # fmt: skip
        trainer = SSDTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo in ("cpo", "simpo", "orpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        tokenizer.bos_token = None  # these trainers put it before every prompt; policylab's runs do not
        pairs = {"per_device_train_batch_size": a.prompts_per_step}
        if a.algo == "orpo":
            config = ORPOConfig(**common, **pairs, beta=0.1)
            trainer = ORPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        else:
            loss = {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0} if a.algo == "cpo" else {
                "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}  # fmt: skip
            config = CPOConfig(**common, **pairs, **loss)
            trainer = CPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "tpo":
        from trl.experimental.tpo import TPOConfig, TPOTrainer

        config = TPOConfig(**common, per_device_train_batch_size=a.prompts_per_step, beta=0.01, loss_type="sigmoid",
                           tpo_alpha=1.0)  # fmt: skip
        trainer = TPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "distill":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, per_device_train_batch_size=a.prompts_per_step, beta=1.0,
                                    max_completion_length=a.max_new_tokens, temperature=1.0)  # fmt: skip
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher_dir)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer)  # fmt: skip
    elif a.algo == "gold":
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        conversations = [{"messages": [{"role": "user", "content": r["prompt"]},
                                       {"role": "assistant", "content": r["answer"]}]} for r in rows]  # fmt: skip
        config = GOLDConfig(**common, per_device_train_batch_size=a.prompts_per_step,
                            max_completion_length=a.max_new_tokens, temperature=0.9, top_p=0.95, lmbda=1.0, beta=0.5,
                            use_uld_loss=True, use_extended_uld=False,
                            teacher_tokenizer_name_or_path=a.teacher_dir)  # fmt: skip
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher_dir)
        trainer = GOLDTrainer(model=model, teacher_model=teacher, args=config,
                              train_dataset=Dataset.from_list(conversations), processing_class=tokenizer)  # fmt: skip
    elif a.algo == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        config = SDFTConfig(**common, per_device_train_batch_size=a.prompts_per_step * a.group_size,
                            num_generations=a.group_size, max_completion_length=a.max_new_tokens, temperature=1.0,
                            teacher_prompt_template=SDFT_TEMPLATE, distillation_topk=SDFT_TOPK)  # fmt: skip
        trainer = SDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif a.algo == "sdpo":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        config = SDPOConfig(**common, **rollouts, **SDPO_TEMPLATES)
        trainer = SDPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
    elif a.algo == "gmpo":
        from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

        config = GMPOConfig(**common, **{**rollouts, "epsilon": 0.4})
        trainer = GMPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
    elif a.algo == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(**common, **rollouts, normalize_advantages=False)
        trainer = RLOOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
    elif a.tools:
        from trl import GRPOConfig, GRPOTrainer

        def final_exact_match(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float]:
            """The last assistant message's text against the answer (policylab's exact match reads the text after
            the tool's result)."""
            return [float(c[-1].get("content", "").strip() == str(x).strip()) for c, x in zip(completions, answer)]

        config = GRPOConfig(**common, **rollouts, loss_type="grpo", max_tool_calling_iterations=1)
        trainer = GRPOTrainer(model=model, reward_funcs=final_exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer, tools=[calc])  # fmt: skip
    elif a.algo == "minillm":  # the SFT model as the teacher of a random student, as distill
        from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

        config = MiniLLMConfig(**common, **rollouts, loss_type="grpo")
        trainer = MiniLLMTrainer(model=model, teacher_model=a.teacher_dir, reward_funcs=exact_match, args=config,
                                 train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    elif a.algo in ("xpo", "nash_md"):  # one policy sample and one of the reference (or the mixture) per prompt
        from transformers import AutoModelForSequenceClassification
        from trl.experimental.nash_md import NashMDConfig, NashMDTrainer
        from trl.experimental.xpo import XPOConfig, XPOTrainer

        scorer = AutoModelForSequenceClassification.from_pretrained(a.reward_dir)
        tokenizer.bos_token = None  # OnlineDPOTrainer's family puts it before every prompt; policylab's runs do not
        online = {"per_device_train_batch_size": a.prompts_per_step, "max_new_tokens": a.max_new_tokens,
                  "temperature": 1.0, "beta": [0.1]}  # fmt: skip
        config = XPOConfig(**common, **online, alpha=[1e-5]) if a.algo == "xpo" else NashMDConfig(**common, **online)
        kind = XPOTrainer if a.algo == "xpo" else NashMDTrainer
        trainer = kind(model=model, reward_funcs=scorer, args=config, train_dataset=dataset.remove_columns("answer"),
                       processing_class=tokenizer)  # fmt: skip
    elif a.algo == "gspo_token":  # the sequence ratio at each token, GSPO's clip range, loss_type grpo
        from trl import GRPOConfig
        from trl.experimental.gspo_token import GRPOTrainer as GSPOTokenTrainer

        config = GRPOConfig(**common, **{**rollouts, "epsilon": 3e-4}, epsilon_high=4e-4, loss_type="grpo",
                            importance_sampling_level="sequence_token")  # fmt: skip
        trainer = GSPOTokenTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                                   processing_class=tokenizer)  # fmt: skip
    elif a.algo == "grpo_replay":
        from trl.experimental.grpo_with_replay_buffer import GRPOWithReplayBufferConfig, GRPOWithReplayBufferTrainer

        config = GRPOWithReplayBufferConfig(**common, **rollouts, loss_type="grpo", replay_buffer_size=64)
        trainer = GRPOWithReplayBufferTrainer(model=model, reward_funcs=exact_match, args=config,
                                              train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, **rollouts, loss_type="grpo")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
    trainer.add_callback(Marks())
    trainer.train()
    out = Path(a.work) / "trl-model"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    return _record(a, marks, str(out), "trl", rewards, calls)


def _record(
    a: argparse.Namespace,
    marks: list[tuple[float, float]],
    model: str,
    side: str,
    rewards: list[float],
    calls: list[float],
) -> dict[str, Any]:
    """The run's timing, its model, its mean training reward per step (`rewards`; empty where the algorithm
    samples nothing) and its tool calls per completion over the steps (`calls`; --tools)."""
    timed = marks[a.warmup :]
    durations = [t1 - t0 for (t0, _), (t1, _) in zip(timed, timed[1:])]
    tokens = sum(n for _, n in timed[1:])
    return {
        "side": side,
        "seed": a.seed,
        "ms_per_step": 1e3 * statistics.median(durations) if durations else None,
        "completion_tokens_per_s": tokens / (timed[-1][0] - timed[0][0]) if len(timed) > 1 else None,
        "model": model,
        "rewards": rewards,
        "final_reward": statistics.fmean(rewards[-10:]) if rewards else None,
        "tool_calls": statistics.fmean(calls) if calls else None,
    }


def time_sampling(a: argparse.Namespace, repeats: int = 20) -> None:
    """Median ms to sample `--group-size` x `--prompts-per-step` completions of `--max-new-tokens` tokens from
    `--model` (random weights), 1 thread, five ways, interleaved: policylab's loop with its numpy decode (and the
    same recording the training pass's tape, `fast_train.Tape`), the same loop with LlamaDecoder's torch decode
    (what non-float32 models use), the loop over transformers' forward, and transformers' `generate`."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm.models import load_model
    from policylab.llm.rollout import generate
    from policylab.llm.tasks import get_task
    from policylab.runtime import limit_numpy_blas

    torch.set_num_threads(1)
    limit_numpy_blas(1)  # as the trainer does (its numpy sampling)
    model, tok = load_model(a.model)
    model.eval()
    rows = get_task("addition").make(a.prompts_per_step, 0)
    enc = tok([r["prompt"] for r in rows for _ in range(a.group_size)], padding=True, return_tensors="pt")
    ids, mask, gen = enc["input_ids"], enc["attention_mask"], torch.Generator().manual_seed(0)
    common = {"max_new_tokens": a.max_new_tokens, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    def torch_decode() -> Any:
        from policylab.llm import fast_decode

        supports = fast_decode.NumpyDecoder.supports
        fast_decode.NumpyDecoder.supports = staticmethod(lambda decoder: False)  # type: ignore[method-assign]
        try:
            return generate(model, ids, mask, generator=gen, **common)
        finally:
            fast_decode.NumpyDecoder.supports = supports  # type: ignore[method-assign]

    def transformers_generate() -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, **common)

    ways = {
        "policylab loop, fast decode (numpy)": lambda: generate(model, ids, mask, generator=gen, **common),
        "the same, recording the tape": lambda: generate(model, ids, mask, generator=gen, record=True, **common),
        "policylab loop, torch decode": lambda: torch_decode(),
        "policylab loop, transformers forward": lambda: generate(model, ids, mask, generator=gen, fast=False, **common),
        "transformers generate": transformers_generate,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):
        for fn in ways.values():
            fn()
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    for name, values in times.items():
        print(f"  {name:<38} {statistics.median(values):6.1f} ms (median of {repeats})")


def time_training(a: argparse.Namespace, repeats: int = 20) -> None:
    """Median ms of the training forward (log-probs of the completions, `token_logprobs`) and of its backward on
    one sampled batch of `--group-size` x `--prompts-per-step` completions from `--model` (random weights), three
    ways, interleaved: the numpy pass with its written-out backward (`llm/fast_train.py`, what float32 models
    run), the same with its forward read from the sampler's tape (`fast_train.Tape`: what an RL step's first
    update at the sampled weights runs) and the torch pass under autograd (`LlamaDecoder.completion_logits`, what
    other dtypes run). With their
    floating-point work (torch's FlopCounterMode on the torch pass: products and attention; the numpy pass does
    the same arithmetic) and its rate, against the rate of one plain product of the model's largest per-token
    shape (all the batch's tokens through the MLP's gate and up projection): how close to the kernel each runs."""
    from unittest import mock

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO_ROOT))
    from policylab.llm import fast_train
    from policylab.llm.models import load_model
    from policylab.llm.rollout import generate, token_logprobs
    from policylab.llm.tasks import get_task
    from policylab.runtime import limit_numpy_blas

    torch.set_num_threads(1)
    limit_numpy_blas(1)
    model, tok = load_model(a.model)
    model.train()
    rows = get_task("addition").make(a.prompts_per_step, 0)
    enc = tok([r["prompt"] for r in rows for _ in range(a.group_size)], padding=True, return_tensors="pt")
    common = {"max_new_tokens": a.max_new_tokens, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    generator = torch.Generator().manual_seed(0)
    r = generate(model, enc["input_ids"], enc["attention_mask"], generator=generator, record=True, **common)
    ways = {  # (numpy pass, the sampler's tape)
        "numpy pass, forward from the tape": (True, r.tape),
        "numpy pass, written-out backward": (True, None),
        "torch pass, autograd": (False, None),
    }
    forward: dict[str, list[float]] = {name: [] for name in ways}
    backward: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(repeats + 3):
        for name, (in_numpy, tape) in ways.items():
            with mock.patch.object(fast_train, "supports", fast_train.supports if in_numpy else lambda model: False):
                start = time.perf_counter()
                logp, _ = token_logprobs(
                    model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, tape=tape
                )
                middle = time.perf_counter()
                logp.sum().backward()
            if i >= 3:
                forward[name].append(1e3 * (middle - start))
                backward[name].append(1e3 * (time.perf_counter() - middle))
    with mock.patch.object(fast_train, "supports", lambda model: False):
        with FlopCounterMode(display=False) as counter:
            logp, _ = token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        forward_flop = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            logp.sum().backward()
        backward_flop = counter.get_total_flops()
    for name, (_, tape) in ways.items():
        fwd_ms, bwd_ms = statistics.median(forward[name]), statistics.median(backward[name])
        rate = "its products done by the sampler" if tape else f"{forward_flop / fwd_ms / 1e6:.1f} GFLOP/s"
        backward_rate = f"{backward_flop / bwd_ms / 1e6:.1f} GFLOP/s"
        print(f"  {name:<34} forward {fwd_ms:6.1f} ms ({forward_flop / 1e6:.0f} MFLOP, {rate}), backward "
              f"{bwd_ms:6.1f} ms ({backward_flop / 1e6:.0f} MFLOP, {backward_rate})")  # fmt: skip
    tokens = int(r.completion_mask.numel() + r.prompt_mask.numel())
    x = torch.randn(tokens, model.config.hidden_size)
    w = torch.randn(model.config.hidden_size, 2 * model.config.intermediate_size)
    plain = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        x @ w
        plain.append(time.perf_counter() - start)
    rate = 2 * x.shape[0] * x.shape[1] * w.shape[1] / statistics.median(plain[3:]) / 1e9
    print(f"  plain product [{x.shape[0]}, {x.shape[1]}] x [{w.shape[0]}, {w.shape[1]}]: {rate:.1f} GFLOP/s")
    if a.profile:  # where the torch pass's time goes, operator by operator (with the profiler's own overhead)
        from torch.profiler import profile

        with profile(record_shapes=True) as prof, mock.patch.object(fast_train, "supports", lambda model: False):
            for _ in range(repeats):
                logp, _ = token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
                logp.sum().backward()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)
        print(f"  {repeats} forward and backward passes under torch.profiler:\n{table}")


# --- the parent ---------------------------------------------------------------------------------------------


def run_side(side: str, a: argparse.Namespace, seed: int, model_dir: Path, prompts: Path, work: Path) -> dict:
    python = None if side == "policylab" else str(TRL_MAIN_PY if a.algo in MAIN_ONLY else TRL_PY)
    args = ["--worker", side, "--seed", str(seed), "--model-dir", str(model_dir), "--prompts", str(prompts)]
    args += ["--work", str(work / f"{side}-{seed}"), "--steps", str(a.steps), "--lr", str(a.lr)]
    args += ["--prompts-per-step", str(a.prompts_per_step), "--group-size", str(a.group_size)]
    args += ["--max-new-tokens", str(a.max_new_tokens), "--warmup", str(a.warmup), "--algo", a.algo]
    args += ["--trl-defaults"] if a.trl_defaults else []
    args += ["--precompute"] if a.precompute else []
    args += ["--tools"] if a.tools else []
    args += ["--teacher-dir", a.teacher_dir] if a.teacher_dir else []
    args += ["--reward-dir", a.reward_dir] if a.reward_dir else []
    env = {**ONE_THREAD, "PYTHONPATH": ""} if side == "trl" else ONE_THREAD  # TRL's venv must not see ours
    res = run_worker(Path(__file__).resolve(), args, work / f"{side}-{seed}.json", python=python, env=env)
    record = worker_record(res, f"{side} seed {seed}")
    from policylab.llm.trainer import evaluate_llm

    if a.algo == "reward_model":
        record["accuracy"] = ranking_accuracy(record["model"])
    elif a.algo == "prm":
        record["accuracy"] = step_accuracy(record["model"])
    elif a.tools:
        record["accuracy"] = tool_accuracy(record["model"])
    else:
        record["accuracy"] = evaluate_llm(record["model"], "addition", eval_size=200)["accuracy"]
    return record


def accuracy_means(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side's mean accuracy over the seeds, and on how many seeds ours is at or above TRL's."""
    by_side = {side: {r["seed"]: r["accuracy"] for r in runs if r["side"] == side} for side in ("policylab", "trl")}
    seeds = sorted(by_side["policylab"].keys() & by_side["trl"].keys())
    return {
        **{side: statistics.fmean(values.values()) for side, values in by_side.items()},
        "seeds": len(seeds),
        "ours_at_or_above": sum(by_side["policylab"][s] >= by_side["trl"][s] for s in seeds),
    }


def step_accuracy(model_dir: str) -> float:
    """A process reward model's share of 200 held-out addition rows' steps (policylab's prm evaluation rows: each
    answer's digits, half with one changed) classified right by the saved token classifier, read as both sides
    train it: BOS, the prompt, each step and the separator, the label at the separator."""
    import numpy as np
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from policylab.llm.tasks import get_task
    from policylab.llm.trainer import stepwise_example

    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rng, right, count = np.random.default_rng(1_000_003), 0, 0
    for row in get_task("addition").make(200, 1_000_003):
        prompt, steps, labels = stepwise_example(row, rng)
        ids, ends = [tokenizer.bos_token_id, *encode(prompt)], []
        for step in steps:
            ids += encode(step) + encode(PRM_SEPARATOR)
            ends.append(len(ids) - 1)
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([ids])).logits[0, ends].argmax(-1).tolist()
        right += sum(int(p) == int(label) for p, label in zip(predicted, labels))
        count += len(labels)
    return right / count


def ranking_accuracy(model_dir: str) -> float:
    """A reward model's share of 200 held-out addition pairs (policylab's reward_model evaluation pairs: each
    answer against a one-character corruption) where the answer scores higher, scored by `--reward model:DIR`."""
    from policylab.llm.rewards import reward_model
    from policylab.llm.tasks import get_task
    from policylab.llm.trainer import make_config, reward_model_pairs

    _, pairs = reward_model_pairs(None, get_task("addition").make(200, 1_000_003), make_config("reward_model"))
    score = reward_model(model_dir)
    prompts = [p for p, *_ in pairs]
    chosen, rejected = score(prompts, [c for _, c, _, _ in pairs]), score(prompts, [r for _, _, r, _ in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create TRL's venv and exit")
    parser.add_argument(
        "--setup-main",
        action="store_true",
        help="create TRL 1.10's venv (ssd, bco, prm, minillm, grpo_replay) and exit",
    )
    parser.add_argument("--trl-source", help="with --setup-main: a local checkout of TRL_MAIN_COMMIT")
    parser.add_argument(
        "--algo",
        choices=(*SAMPLING_ALGOS, "sft", *PAIR_ALGOS),
        default="grpo",
        help="the algorithm on both sides",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N per side")
    parser.add_argument("--steps", type=positive_int, default=40, help="optimizer steps per run (> --warmup + 1)")
    parser.add_argument("--model", default="small-llama", help="a policylab tiny model (tiny-llama, small-llama)")
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT before RL (0: RL from random weights)")
    parser.add_argument(
        "--prompts-per-step", type=positive_int, default=2, help="prompts (dpo: pairs; sft: examples) per step"
    )
    parser.add_argument("--group-size", type=positive_int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8, help="completion length limit")
    parser.add_argument(
        "--lr", type=float, help="default 3e-4 (dpo, xpo, nash_md: 1e-4, distill and sft: 3e-3, policylab's defaults)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--precompute", action="store_true", help="dpo: precompute_ref_log_probs on both sides")
    parser.add_argument("--tools", action="store_true", help="grpo with a tool (see the docstring)")
    parser.add_argument("--text", action="store_true", help="sft on plain-text rows (see the docstring)")
    parser.add_argument("--trl-defaults", action="store_true", help="TRL's own bfloat16 / checkpointing defaults")
    parser.add_argument("--sampling", action="store_true", help="only time the samplers (see time_sampling)")
    parser.add_argument("--training", action="store_true", help="only time the training forward and backward")
    parser.add_argument("--profile", action="store_true", help="with --training: operator times (torch.profiler)")
    parser.add_argument("--worker", choices=("policylab", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    parser.add_argument("--reward-dir", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.lr is None:
        default = 1e-4 if a.algo in PAIR_ALGOS else 3e-4
        rates = {
            "reward_model": 1e-3,
            "prm": 1e-3,
            "distill": 3e-3,
            "gold": 3e-3,
            "sft": 3e-3,
            "xpo": 1e-4,
            "nash_md": 1e-4,
        }
        a.lr = rates.get(a.algo, default)
    if a.text and a.algo != "sft":
        parser.error(f"--text gives SFT plain-text rows, and {a.algo} takes prompts: drop --text or give --algo sft")
    if a.tools and a.algo != "grpo":
        parser.error(f"--tools runs GRPO with a tool, not {a.algo}: drop --algo or give --algo grpo")
    if a.algo in ("distill", "gold", "ssd", "xpo", "nash_md"):
        a.group_size = 1  # these TRL trainers sample one completion per prompt (XPO, Nash-MD: and one more)
        if a.algo != "ssd" and a.sft_steps <= 0 and not a.worker:
            parser.error("--algo distill distills the SFT model (the teacher) into a random one: give --sft-steps > 0")
    if a.worker:
        record = worker_ours(a) if a.worker == "policylab" else worker_trl(a)
        Path(a.out).write_text(json.dumps(record))
        return
    if a.setup:
        setup()
        return
    if a.setup_main:
        setup_main(a.trl_source)
        return
    if a.sampling:
        time_sampling(a)
        return
    if a.training:
        time_training(a)
        return
    if a.steps < a.warmup + 2:  # the time per step is the median of the step times after the warm-up
        parser.error(f"--steps {a.steps} leaves no step to time after --warmup {a.warmup}: give --steps "
                     f"{a.warmup + 2} or more, or a smaller --warmup")  # fmt: skip
    require_trl_venv()
    if a.algo in MAIN_ONLY and not TRL_MAIN_PY.exists():
        raise SystemExit(f"{TRL_MAIN_VENV} is missing: run `.venv/bin/python benchmarks/llm.py --setup-main` first")
    seeds = list(range(1, a.seeds + 1))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, prompts = prepare(a, work)
        from policylab.llm.trainer import evaluate_llm

        start_accuracy = (tool_accuracy(str(model_dir)) if a.tools else None if a.algo == "prm" else
                          evaluate_llm(str(model_dir), "addition", eval_size=200)["accuracy"])  # fmt: skip
        if start_accuracy is not None:  # (a PRM starts with a new head on each side)
            print(f"  the starting model: exact match {start_accuracy:.3f}")
        for seed in seeds:
            for side in ("policylab", "trl"):
                rec = run_side(side, a, seed, model_dir, prompts, work)
                print(f"  {side} seed {seed}: {rec['ms_per_step']:.1f} ms/step, accuracy {rec['accuracy']:.3f}")
                runs.append(rec)
    settings = {
        k: getattr(a, k)
        for k in ("algo", "steps", "model", "sft_steps", "prompts_per_step", "group_size", "max_new_tokens", "lr",
                  "precompute", "tools", "text", "warmup")
    }  # fmt: skip
    print(f"\n{a.algo}, {settings}, 1 thread, alternating runs")
    per_run = {
        "ms_per_step": ("ms per step (median after warm-up); ratio < 1: ours faster", ".1f", True),
        "completion_tokens_per_s": ("completion tokens/s", ".0f", True),
        "accuracy": ("exact match after the run (same evaluation)", ".3f", True),
        "final_reward": ("mean training reward, last 10 steps", ".3f", True),
    }
    if a.algo == "reward_model":
        per_run["accuracy"] = ("held-out pairs ranked right (the same scorer)", ".3f", True)
    if a.algo == "prm":
        per_run["accuracy"] = ("held-out steps classified right (the same scorer)", ".3f", True)
    if a.algo == "ssd":  # no rewards on either side
        del per_run["final_reward"]
    if a.tools:  # TRL's completion lengths count the tools' tokens too, policylab's `tokens` the model's only
        del per_run["completion_tokens_per_s"]
        per_run["tool_calls"] = ("tool calls per completion (mean over steps)", ".2f", True)
    if a.algo == "gold":  # GOLDTrainer logs neither completion lengths nor rewards
        del per_run["completion_tokens_per_s"], per_run["final_reward"]
    if a.algo not in SAMPLING_ALGOS:  # no sampling: policylab's count is its training tokens, TRL logs none
        del per_run["completion_tokens_per_s"], per_run["final_reward"]
    summary = pair_report(runs, seeds, per_run, {}, "policylab", "trl", ("ours", "trl"))
    summary["accuracy_means"] = accuracy_means(runs)
    means = summary["accuracy_means"]
    measure = "held-out step accuracy" if a.algo == "prm" else "exact match"
    print(f"{measure}, mean over seeds: ours {means['policylab']:.3f}, TRL {means['trl']:.3f}; ours at or above "
          f"TRL's on {means['ours_at_or_above']} of {means['seeds']} seeds")  # fmt: skip
    for run in runs:
        run.pop("model")
    payload = {
        "provenance": provenance(["torch", "transformers", "policylab"]),
        "settings": settings,
        "start_accuracy": start_accuracy,
        "runs": runs,
        "summary": summary,
    }
    print(f"results: {write_results('llm', payload)}")


if __name__ == "__main__":
    main()
