"""SFT and reinforcement learning of a causal LM on a task: the same run directory, progress line, CSV logs and
objectives as the control side.

SFT: mean over answer tokens (and EOS) of -log pi(token | prompt, previous tokens).
RL, per step: `batch_size` prompts, `group_size` sampled completions each (rollout.generate), rewards from the
task's reward function, sequence advantages from objectives.advantages.GROUP_ADVANTAGES, then
`updates_per_batch` gradient steps on objectives.policy.pg_surrogate at token level (ratio to the behaviour
log-probs, clipped at 1 - clip_low / 1 + clip_high), reduced by the aggregation mode, plus kl_coef times a
k1/k2/k3 KL estimate to the initial model and minus entropy_coef times the entropy.

    algo          advantage     aggregation (default)       other defaults
    grpo          grpo          seq-mean-token-mean         (Shao et al. 2024)
    dr_grpo       dr_grpo       seq-mean-token-sum-norm     (Liu et al. 2025)
    dapo          grpo          token-mean                  clip_high 0.28 (Yu et al. 2025; no dynamic sampling yet)
    rloo          rloo          seq-mean-token-mean         (Ahmadian et al. 2024)
    reinforce++   reinforce++   token-mean                  (Hu et al. 2025)
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.config import apply_values
from policylab.errors import ConfigError, suggest
from policylab.llm import LLMError, require_llm
from policylab.llm.models import load_model
from policylab.llm.rollout import Rollout, decode, generate, token_logprobs
from policylab.llm.tasks import Task, get_task
from policylab.logging import CONFIG_YAML, Progress, RunLog, new_run_dir
from policylab.objectives.advantages import GROUP_ADVANTAGES
from policylab.objectives.aggregation import aggregate
from policylab.objectives.policy import kl_penalty, pg_surrogate
from policylab.optim import Adam

RL_ALGOS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": "grpo", "aggregation": "seq-mean-token-mean"},
    "dr_grpo": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"advantage": "grpo", "aggregation": "token-mean", "clip_high": 0.28},
    "rloo": {"advantage": "rloo", "aggregation": "seq-mean-token-mean"},
    "reinforce++": {"advantage": "reinforce++", "aggregation": "token-mean"},
}
ALGOS = ("sft", *RL_ALGOS)


@dataclass
class LLMConfig:
    algo: str = "grpo"
    model: str = "tiny-llama"
    """A built-in tiny model (random weights), a run directory, or a local save_pretrained directory."""
    task: str = "addition"
    steps: int = 200
    seed: int = 0
    lr: float | None = None
    """None: 3e-3 for SFT, 3e-4 for RL (the tiny models of the built-in tasks; RL at 2e-3 collapsed there)."""
    batch_size: int = 16
    """Prompts per step (SFT: examples per step)."""
    group_size: int = 8
    """Completions sampled per prompt."""
    max_new_tokens: int | None = None
    """None: the task's."""
    temperature: float = 1.0
    top_p: float = 1.0
    updates_per_batch: int = 1
    """Gradient steps per rollout batch (> 1: later steps see stale rollouts, corrected by the clipped ratio)."""
    clip_low: float | None = 0.2
    clip_high: float | None = None
    """None: clip_low (symmetric); DAPO's clip-higher uses 0.28."""
    dual_clip: float | None = None
    aggregation: str | None = None
    """None: the algorithm's (table in the module docstring)."""
    advantage: str | None = None
    """None: the algorithm's."""
    kl_coef: float = 0.0
    """Weight of the KL to the initial model (its copy is kept only when this is non-zero)."""
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    eval_size: int = 200
    train_size: int = 20_000
    """Rows of the task generated for training (the evaluation rows come from another seed)."""
    threads: int = 1

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown algorithm {self.algo!r}.{suggest(self.algo, ALGOS)}", f"one of {ALGOS}")
        for name in ("steps", "batch_size", "group_size", "updates_per_batch", "eval_size", "train_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0", f"set {name} to a positive value")
        if self.algo in ("rloo", "grpo", "dr_grpo", "dapo") and self.group_size < 2:
            raise ConfigError(f"{self.algo} compares completions within a group", "set group_size to 2 or more")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"temperature={self.temperature} must be > 0 and top_p={self.top_p} in (0, 1]",
                "set temperature to e.g. 1.0 and top_p to 1.0",
            )
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}", "choose k1, k2 or k3")
        if self.algo != "sft":
            GROUP_ADVANTAGES.get(self.resolved("advantage"))  # unknown names: one clear error each
            aggregate(torch.zeros(1, 1), None, self.resolved("aggregation"))

    def resolved(self, name: str) -> Any:
        """A field's value, or the algorithm's default where it is None."""
        value = getattr(self, name)
        return RL_ALGOS.get(self.algo, {}).get(name) if value is None else value


def make_config(algo: str, overrides: dict[str, Any] | None = None) -> LLMConfig:
    """The algorithm's config with `overrides` (values or --set strings, checked against the field types)."""
    if algo not in ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r}.{suggest(algo, ALGOS)}", f"choose one of: {', '.join(ALGOS)}")
    cfg = apply_values(LLMConfig(algo=algo), dict(overrides or {}), "the settings")
    if cfg.clip_high is None and "clip_high" in RL_ALGOS.get(algo, {}):
        cfg.clip_high = RL_ALGOS[algo]["clip_high"]
    if cfg.lr is None:
        cfg.lr = 3e-3 if algo == "sft" else 3e-4
    cfg.validate()
    return cfg


# --- batches ---------------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def encode_answers(tokenizer: Any, answers: list[str]) -> tuple[Tensor, Tensor]:
    """Answer tokens + EOS, right-padded, and their mask."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    width = max(len(row) for row in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return out, mask


def _columns(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def call_reward(task: Task, prompts: list[str], completions: list[str], rows: list[dict[str, str]]) -> Tensor:
    """The task's rewards as a tensor, with one clear error for a reward function that misbehaves."""
    columns = {k: v for k, v in _columns(rows).items() if k != "prompt"}
    name = getattr(task.reward, "__name__", "reward")
    try:
        values = task.reward(prompts, completions, **columns)
    except Exception as exc:
        raise LLMError(f"the reward function {name} raised {type(exc).__name__}: {exc}", "fix the function") from exc
    if len(values) != len(completions):
        raise LLMError(
            f"the reward function {name} returned {len(values)} values for {len(completions)} completions",
            "return one float per completion",
        )
    try:
        rewards = torch.tensor([float(v) for v in values])
    except (TypeError, ValueError) as exc:
        raise LLMError(f"the reward function {name} returned a non-number: {exc}", "return floats") from exc
    if not torch.isfinite(rewards).all():
        raise LLMError(f"the reward function {name} returned NaN or inf", "return finite floats")
    return rewards


# --- the trainer -----------------------------------------------------------------------------------------------


class LLMTrainer:
    def __init__(self, cfg: LLMConfig) -> None:
        require_llm()
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.model, self.tokenizer = load_model(cfg.model, cfg.seed)
        self.reference = None
        if cfg.kl_coef and cfg.algo != "sft":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = Adam([p for p in self.model.parameters() if p.requires_grad], lr=float(cfg.lr or 0.0))
        self.train_rows = self.task.make(cfg.train_size, cfg.seed)
        self.eval_rows = self.task.make(cfg.eval_size, 1_000_003 + cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens
        self.step = 0

    def sample_rows(self, n: int) -> list[dict[str, str]]:
        return [self.train_rows[i] for i in self.rng.integers(0, len(self.train_rows), n)]

    def rollout(self, rows: list[dict[str, str]], greedy: bool = False) -> tuple[Rollout, list[str]]:
        ids, mask = encode_prompts(self.tokenizer, [row["prompt"] for row in rows])
        self.model.eval()
        rollout = generate(
            self.model,
            ids,
            mask,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            greedy=greedy,
            generator=self.generator,
        )
        self.model.train()
        return rollout, decode(self.tokenizer, rollout)

    def sft_step(self) -> dict[str, float]:
        rows = self.sample_rows(self.cfg.batch_size)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [row["prompt"] for row in rows])
        answer_ids, answer_mask = encode_answers(self.tokenizer, [row["answer"] for row in rows])
        logp, _ = token_logprobs(self.model, prompt_ids, prompt_mask, answer_ids, answer_mask)
        loss = -aggregate(logp, answer_mask, "token-mean")
        self._optimize(loss)
        return {"loss": float(loss.detach()), "tokens": float(answer_mask.sum())}

    def rl_step(self) -> dict[str, float]:
        cfg = self.cfg
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        rollout, completions = self.rollout(rows)
        rewards = call_reward(self.task, [row["prompt"] for row in rows], completions, rows)
        advantages = GROUP_ADVANTAGES.get(cfg.resolved("advantage"))(rewards, cfg.group_size)
        mask = rollout.completion_mask
        metrics: dict[str, float] = {"reward": float(rewards.mean()), "tokens": float(mask.sum())}
        for _ in range(cfg.updates_per_batch):
            loss, step_metrics = self.policy_loss(rollout, advantages)
            self._optimize(loss)
            metrics.update({k: float(v) for k, v in step_metrics.items()}, loss=float(loss.detach()))
        return metrics

    def policy_loss(self, rollout: Rollout, advantages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        mask, mode = rollout.completion_mask, cfg.resolved("aggregation")
        logp, entropy = token_logprobs(
            self.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask, cfg.temperature
        )
        loss, metrics = pg_surrogate(
            logp,
            rollout.logprobs,
            advantages[:, None].expand_as(logp),
            mask=mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            aggregation=mode,
        )
        if self.reference is not None:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(
                    self.reference,
                    rollout.prompt_ids,
                    rollout.prompt_mask,
                    rollout.completion_ids,
                    mask,
                    cfg.temperature,
                )
            kl = aggregate(kl_penalty(logp, ref_logp, cfg.kl_estimator), mask, mode)
            loss = loss + cfg.kl_coef * kl
            metrics["kl"] = kl.detach()
        metrics["entropy"] = aggregate(entropy, mask, "token-mean").detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * aggregate(entropy, mask, mode)
        return loss, metrics

    def _optimize(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise LLMError(f"the loss became {float(loss)} at step {self.step}", "lower lr or set max_grad_norm")
        self.optimizer.zero_grad()
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, k: int = 1) -> dict[str, float]:
        """Greedy exact-match accuracy and mean reward on the evaluation rows; with k > 1 also pass@k (at least
        one of k sampled completions is correct)."""
        rollout, completions = self.rollout(self.eval_rows, greedy=True)
        rewards = call_reward(self.task, [r["prompt"] for r in self.eval_rows], completions, self.eval_rows)
        out = {"accuracy": float((rewards >= 1.0).float().mean()), "reward": float(rewards.mean())}
        if k > 1:
            rows = [row for row in self.eval_rows for _ in range(k)]
            _, sampled = self.rollout(rows)
            hits = call_reward(self.task, [r["prompt"] for r in rows], sampled, rows) >= 1.0
            out[f"pass@{k}"] = float(hits.view(-1, k).any(1).float().mean())
        return out

    def save(self, run_dir: Path) -> None:
        """The model and tokenizer as safetensors + JSON (save_pretrained), written beside and renamed in."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the run's own output is the progress line
        target, tmp = run_dir / "model", run_dir / ".model.tmp"
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if target.exists():
            old = run_dir / ".model.old"
            target.rename(old)
            tmp.rename(target)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(target)


@dataclass
class LLMRun:
    dir: Path
    final_eval: dict[str, float]
    initial_eval: dict[str, float]


def train_llm(
    algo: str,
    overrides: dict[str, Any] | None = None,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    verbose: bool | None = None,
) -> LLMRun:
    """Train (SFT or RL) and write the run directory: config.yaml, train.csv, eval.csv, eval.json, model/."""
    cfg = make_config(algo, overrides)
    trainer = LLMTrainer(cfg)
    run_dir = new_run_dir(runs_dir, name or f"{algo}-{cfg.task}-s{cfg.seed}")
    import yaml

    (run_dir / CONFIG_YAML).write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    log = RunLog(run_dir, tensorboard=False)
    initial = trainer.evaluate()
    log.log_eval({"step": 0, **initial})
    progress = Progress(cfg.steps, f"{algo} {cfg.task}", enabled=verbose)
    step_fn = trainer.sft_step if algo == "sft" else trainer.rl_step
    started, tokens, last = time.perf_counter(), 0.0, initial
    for step in range(1, cfg.steps + 1):
        trainer.step = step
        metrics = step_fn()
        tokens += metrics["tokens"]
        elapsed = time.perf_counter() - started
        log.log_train({"step": step, "time": elapsed, **metrics, "tokens_per_s": tokens / elapsed})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last = trainer.evaluate()
            log.log_eval({"step": step, **last})
        progress.update(step, step / elapsed, last["accuracy"])
    progress.close()
    trainer.save(run_dir)
    log.write_summary({"step": cfg.steps, **last, "initial": initial})
    log.close()
    if verbose is not False:
        print(f"accuracy {initial['accuracy']:.3f} -> {last['accuracy']:.3f}; run directory {run_dir}")
    return LLMRun(run_dir, last, initial)


def evaluate_llm(model: str, task: str = "addition", k: int = 1, seed: int = 0, eval_size: int = 200) -> dict:
    """Greedy accuracy (and pass@k) of a model or run directory on a task's evaluation rows."""
    trainer = LLMTrainer(make_config("grpo", {"model": model, "task": task, "seed": seed, "eval_size": eval_size}))
    return trainer.evaluate(k)
