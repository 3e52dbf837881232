"""SFT on plain-text rows (TRL's language-modeling datasets, `dataset_text_field`), on whole prompt-completion
rows (`completion_only_loss=false`) and with NEFTune: the tokens it trains on, its loss and held-out evaluation
against hand computations, learning, and the errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from policylab.cli import main
from policylab.errors import ConfigError
from policylab.llm import LLMError
from policylab.llm.models import build_tiny_model
from policylab.llm.tasks import BOS, char_tokenizer
from policylab.llm.trainer import LLMInputs, LLMTrainer, evaluate_llm, make_config, train_llm


def sums(n: int, seed: int, field: str = "text") -> list[dict[str, str]]:
    """Plain-text rows "a+b=c" (no prompt: the model learns the whole line)."""
    rng = random.Random(seed)
    return [{field: f"{a}+{b}={a + b}"} for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(n))]


def with_bos(tokenizer):
    """The tokenizer with a Llama's habit: its call puts BOS before the text."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.bos_token_id)]
    )
    return tokenizer


def trainer_on(rows, settings=None, tokenizer=None, eval_rows=None):
    tok = tokenizer or char_tokenizer()
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=eval_rows)
    return LLMTrainer(make_config("sft", {"batch_size": 4, **(settings or {})}), inputs)


def whole_nll(model, sequences, starts=None):
    """The hand computation: each sequence through the model unpadded, the NLL of every token from its start on
    (default: every token after the first)."""
    losses, hits = [], []
    for ids, start in zip(sequences, starts or [1] * len(sequences)):
        logits = model(torch.tensor([ids])).logits[0, start - 1 : -1]
        target = torch.tensor(ids[start:])
        losses.append(F.cross_entropy(logits, target, reduction="none"))
        hits.append(logits.argmax(-1) == target)
    return torch.cat(losses), torch.cat(hits)


def step_and_hand_nll(trainer, drawn, batch):
    """An SFT step's metrics on `drawn` (the weights put back after it), and the hand computation of its token
    NLLs from `batch` (sft_batch's tensors of those rows): every token after each row's prompt."""
    p, pm, ids, mask = batch
    trainer.sample_rows = lambda n: drawn
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.sft_step()
    trainer.model.load_state_dict(before)
    sequences = [p[i][pm[i].bool()].tolist() + ids[i][mask[i].bool()].tolist() for i in range(len(drawn))]
    with torch.no_grad():
        nll, _ = whole_nll(trainer.model, sequences, pm.sum(1).tolist())
    return metrics, nll


@pytest.mark.parametrize("bos", [False, True])
def test_a_text_row_trains_every_token_after_the_first_and_eos(bos):
    tok = with_bos(char_tokenizer()) if bos else char_tokenizer()
    rows = sums(3, 0) + [{"prompt": "1+2=", "answer": "3"}]  # plain text beside a prompt row in one batch
    trainer = trainer_on(rows, tokenizer=tok, eval_rows=sums(4, 1))
    drawn = [trainer.train_rows[i] for i in range(len(trainer.train_rows))]
    assert sum("text" in row for row in drawn) == 3
    p, pm, ids, mask = trainer.sft_batch(drawn)
    eos = tok.eos_token_id
    for i, row in enumerate(drawn):
        prompt, trained = p[i][pm[i].bool()].tolist(), ids[i][mask[i].bool()].tolist()
        if "text" in row:  # the first token is the prompt (BOS where the tokenizer adds it); the rest and EOS trained
            text_ids = tok(row["text"], add_special_tokens=False)["input_ids"]
            assert prompt + trained == ([tok.bos_token_id] if bos else []) + text_ids + [eos]
            assert len(prompt) == 1
        else:  # a prompt row as before: its prompt's tokens, then its answer and EOS
            assert tok.decode(prompt) == "1+2=" and trained == tok("3", add_special_tokens=False)["input_ids"] + [eos]
    metrics, nll = step_and_hand_nll(trainer, drawn, (p, pm, ids, mask))
    assert metrics["tokens"] == nll.numel() == int(mask.sum())
    assert metrics["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)


def test_completion_only_loss_false_trains_the_prompt_tokens_too():
    rows = [{"prompt": row["text"][:6], "answer": row["text"][6:]} for row in sums(8, 0) if len(row["text"]) > 6]
    trainer = trainer_on(rows, {"completion_only_loss": False})
    drawn = trainer.train_rows[:4]
    p, pm, ids, mask = trainer.sft_batch(drawn)
    tok = trainer.tokenizer
    for i, row in enumerate(drawn):  # the prompt's first token, then the rest of it, the answer and EOS all trained
        whole = tok(row["prompt"] + row["answer"])["input_ids"] + [tok.eos_token_id]
        assert p[i][pm[i].bool()].tolist() == whole[:1] and ids[i][mask[i].bool()].tolist() == whole[1:]
    metrics, nll = step_and_hand_nll(trainer, drawn, (p, pm, ids, mask))
    assert metrics["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert metrics["tokens"] == nll.numel() > sum(len(row["answer"]) + 1 for row in drawn)


def test_the_held_out_loss_perplexity_and_token_accuracy_equal_a_hand_computation():
    held_out = sums(7, 1)  # 7 rows in batches of 4: a partial last batch
    trainer = trainer_on(sums(8, 0), eval_rows=held_out)
    assert trainer.evaluates_text
    result = trainer.evaluate()
    eos = trainer.tokenizer.eos_token_id
    sequences = [trainer.tokenizer(row["text"])["input_ids"] + [eos] for row in held_out]
    with torch.no_grad():
        nll, hits = whole_nll(trainer.model, sequences)
    assert result["loss"] == pytest.approx(float(nll.double().mean()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["mean_token_accuracy"] == pytest.approx(float(hits.double().mean()), abs=1e-12)
    assert set(result) == {"loss", "perplexity", "mean_token_accuracy"}


def test_sft_on_prompt_rows_also_reports_the_held_out_loss_of_their_completions():
    held_out = [{"prompt": row["text"][:6], "answer": row["text"][6:]} for row in sums(7, 1)]
    trainer = trainer_on([{"prompt": "1+2=", "answer": "3"}] * 8, {"max_new_tokens": 3}, eval_rows=held_out)
    result = trainer.evaluate()
    tok = trainer.tokenizer
    prompts = [tok(row["prompt"])["input_ids"] for row in held_out]
    sequences = [p + tok(row["answer"])["input_ids"] + [tok.eos_token_id] for p, row in zip(prompts, held_out)]
    with torch.no_grad():
        nll, hits = whole_nll(trainer.model, sequences, [len(p) for p in prompts])
    assert {"accuracy", "reward"} < set(result)  # exact match as before, and SFT's loss on the answers (and EOS)
    assert result["loss"] == pytest.approx(float(nll.double().mean()), rel=1e-5)
    assert result["mean_token_accuracy"] == pytest.approx(float(hits.double().mean()), abs=1e-12)


def test_max_length_keeps_each_text_rows_first_tokens():
    trainer = trainer_on(sums(8, 0), {"max_length": 4})
    p, pm, ids, mask = trainer.sft_batch(trainer.train_rows[:4])
    assert (pm.sum(1) + mask.sum(1) <= 4).all() and int(mask.sum()) == 4 * 3


def test_sft_on_plain_text_lowers_the_held_out_loss(tmp_path, capsys):
    """From random weights (perplexity near the vocabulary's size, about 24), 100 steps at lr 3e-3 bring the
    held-out rows' perplexity under 6 (about 4.9 on this machine: the digits of a random sum stay uncertain)."""
    rows = tmp_path / "corpus.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in sums(500, 0)))
    argv = ["llm", "sft", "--prompts", rows, "--steps", 100, "--runs-dir", tmp_path / "runs", "--set", "lr=3e-3"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "sft-corpus-s0"
    assert "done: 100 steps; eval loss" in out and f"run directory: {run}" in out
    header, *lines = (run / "eval.csv").read_text().splitlines()
    assert header == "step,loss,perplexity,mean_token_accuracy"
    first, last = ({k: float(v) for k, v in zip(header.split(","), line.split(","))} for line in (lines[0], lines[-1]))
    assert first["perplexity"] > 15 and last["perplexity"] < 6 and last["loss"] < first["loss"] - 1.0
    assert last["mean_token_accuracy"] > first["mean_token_accuracy"] + 0.3
    again = evaluate_llm(str(run), prompts=str(rows))  # the saved model on every row, through the eval command's path
    assert again["perplexity"] < 6
    assert main(["llm", "eval", str(run), "--prompts", str(rows), "--k", "4"]) == 2
    assert "these rows are plain text" in capsys.readouterr().err


def test_dataset_text_field_names_the_text_column():
    rows = sums(8, 0, field="content")
    with pytest.raises(LLMError, match='(?s)no "prompt" string.*or for SFT plain text as "text": dataset_text_field'):
        trainer_on(rows)
    trainer = trainer_on(rows, {"dataset_text_field": "content"})
    trained = trainer.sft_batch(trainer.train_rows[:2])[3].sum(1).tolist()
    assert trainer.evaluates_text and trained == [len(row["content"]) for row in trainer.train_rows[:2]]  # + EOS - 1


def test_plain_text_rows_get_clear_errors():
    tok = char_tokenizer()
    model = build_tiny_model("tiny-llama", tok)
    with pytest.raises(LLMError, match="only sft trains on") as error:
        LLMTrainer(make_config("grpo", {}), LLMInputs(model=model, tokenizer=tok, prompts=sums(8, 0)))
    assert "run sft on these" in error.value.fix
    with pytest.raises(LLMError, match="mix plain text and prompts"):
        trainer_on(sums(8, 0), eval_rows=sums(2, 1) + [{"prompt": "1+2=", "answer": "3"}])
    with pytest.raises(LLMError, match='row 1: "text" is not a non-empty string'):
        trainer_on([{"text": "1+1=2"}, {"text": ""}])
    with pytest.raises(LLMError, match="num_generations_eval=4"):
        trainer_on(sums(8, 0), {"num_generations_eval": 4})
    with pytest.raises(LLMError, match="is no tokens but EOS"):
        trainer_on(sums(8, 0), eval_rows=[{"text": "<eos>"}]).evaluate()  # the text is the EOS token itself


def test_neftune_adds_its_uniform_noise_to_the_input_embeddings_of_each_training_pass():
    """The step's loss by hand: the same batch through the model with the embeddings plus noise uniform in
    [-a, a], a = alpha / sqrt(L d), drawn from a copy of the run's generator as the hook draws it."""
    from policylab.llm.rollout import positions

    rows = [{"prompt": row["text"][:6], "answer": row["text"][6:]} for row in sums(8, 0) if len(row["text"]) > 6]
    trainer = trainer_on(rows, {"neftune_noise_alpha": 0.5})
    drawn = trainer.train_rows[:4]
    trainer.sample_rows = lambda n: drawn
    p, pm, ids, mask = trainer.sft_batch(drawn)
    generator = torch.Generator().set_state(trainer.generator.get_state())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.sft_step()
    trainer.model.load_state_dict(before)
    tokens = torch.cat([p, ids], 1)
    attention = torch.cat([pm.long(), mask.long().flip(-1).cummax(-1).values.flip(-1)], 1)
    with torch.no_grad():
        embedded = trainer.model.get_input_embeddings()(tokens)
        bound = 0.5 / math.sqrt(embedded.shape[1] * embedded.shape[2])
        noisy = embedded + torch.rand(embedded.shape, generator=generator) * (2 * bound) - bound
        logits = trainer.model(inputs_embeds=noisy, attention_mask=attention, position_ids=positions(attention)).logits
        logp = torch.log_softmax(logits[:, p.shape[1] - 1 : -1].float(), -1).gather(-1, ids[..., None])[..., 0]
        plain = trainer.model(input_ids=tokens, attention_mask=attention, position_ids=positions(attention)).logits
    expected = float(-(logp * mask).sum() / mask.sum())
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    plain_logp = torch.log_softmax(plain[:, p.shape[1] - 1 : -1].float(), -1).gather(-1, ids[..., None])[..., 0]
    assert abs(metrics["loss"] - float(-(plain_logp * mask).sum() / mask.sum())) > 1e-4  # the noise is there
    with pytest.raises(ConfigError, match="neftune_noise_alpha=0.0 must be > 0"):
        make_config("sft", {"neftune_noise_alpha": 0.0})


def test_sft_with_neftune_learns(tmp_path):
    """300 steps from random weights at alpha 0.5: exact match 0.555 on this machine (0.375 without the noise;
    at alpha 5, the paper's for 4096-wide models, the tiny model's embeddings of std 0.02 drown and it reached
    0.015; scratch runs)."""
    settings = {"steps": 300, "batch_size": 64, "eval_every": 300, "eval_size": 200, "neftune_noise_alpha": 0.5}
    run = train_llm("sft", settings, tmp_path, verbose=False)
    assert run.final_eval["accuracy"] >= 0.3
