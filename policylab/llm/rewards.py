"""Reward functions `(prompts, completions, **columns) -> list[float]`: built-in verifiable ones, user functions
loaded from `module:function`, weighted sums of several; and prompt files (JSONL)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policylab.imports import import_user_module
from policylab.llm import LLMError
from policylab.llm.chat import COMPLETION_FIELDS, check_messages, normalized_row

RewardFn = Callable[..., list[float]]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(
    prompts: list[str], completions: list[str], answer: list[str], final: list[str] | None = None, **_: Any
) -> list[float]:
    """1.0 where the completion (stripped) is the answer, else 0.0. In a run with tools, `final`: the text after
    each completion's last tool result, which is what is compared."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(final or completions, answer)]


def numeric_match(
    prompts: list[str], completions: list[str], answer: list[str], final: list[str] | None = None, **_: Any
) -> list[float]:
    """1.0 where the last number in the completion (with tools: in `final`, after its last tool result) equals the
    answer as a number ("042" and "42.0" match 42)."""
    out = []
    for completion, expected in zip(final or completions, answer):
        found = _NUMBER.findall(completion)
        out.append(float(bool(found) and float(found[-1]) == float(expected)))
    return out


def format_reward(pattern: str) -> RewardFn:
    """1.0 where the whole completion (stripped) matches the regular expression `pattern`."""
    compiled = re.compile(pattern)

    def matches(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(bool(compiled.fullmatch(c.strip()))) for c in completions]

    matches.__name__ = f"format({pattern})"
    return matches


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "numeric_match": numeric_match}


def reward_model(path: str) -> RewardFn:
    """A sequence-classification model (one output; a local `save_pretrained` directory) as a reward: its score
    of prompt + completion + EOS (at the EOS, where TRL's RewardTrainer and policylab's reward_model train it), in
    batches, without gradients."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from policylab.llm.rollout import positions

    if not (Path(path) / "config.json").is_file():
        raise LLMError(f"no reward model at {path} (no config.json)", "pass model:DIR with a save_pretrained model")
    from policylab.llm.models import without_progress_bars

    with without_progress_bars():
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.num_labels != 1:
        raise LLMError(f"the reward model at {path} has {model.config.num_labels} outputs", "use a 1-output model")

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = [p + c + (tokenizer.eos_token or "") for p, c in zip(prompts, completions)]
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, 0].float().tolist()

    score.__name__ = f"reward model {path}"
    return score


def process_reward_model(path: str) -> RewardFn:
    """A process reward model (a two-label token classifier; a `prm` run's model, a local `save_pretrained`
    directory) as a reward: each completion split into steps at the model's step separator (its config's
    `step_separator`, else a newline), read as the PRM trained on them (BOS where the tokenizer has one, the
    prompt, each step followed by the separator), and the smallest of its steps' probabilities of being right (at
    each step's last separator token): a solution is as good as its worst step. Without gradients."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from policylab.llm.models import without_progress_bars
    from policylab.llm.rollout import tokenize

    if not (Path(path) / "config.json").is_file():
        raise LLMError(f"no process reward model at {path} (no config.json)", "pass prm:DIR with a prm run's model")
    with without_progress_bars():
        model = AutoModelForTokenClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.num_labels != 2:
        raise LLMError(f"the model at {path} has {model.config.num_labels} labels", "use a prm run's model (2)")
    separator = getattr(model.config, "step_separator", "\n")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id or 0

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        steps = [[step for step in c.split(separator) if step] or [""] for c in completions]
        pieces = tokenize(tokenizer, [separator, *prompts, *(step for row in steps for step in row)])
        separator_ids, step_ids = pieces[0], iter(pieces[len(prompts) + 1 :])
        sequences: list[list[int]] = []
        places: list[list[int]] = []
        for prompt_ids, row in zip(pieces[1 : len(prompts) + 1], steps):
            tokens = ([bos] if bos is not None else []) + prompt_ids
            ends = []
            for _step in row:
                tokens += next(step_ids) + separator_ids
                ends.append(len(tokens) - 1)
            sequences.append(tokens)
            places.append(ends)
        width = max(map(len, sequences))
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in sequences])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in sequences])
        right = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., 1]
        return [min(float(right[i, end]) for end in ends) for i, ends in enumerate(places)]

    score.__name__ = f"process reward model {path}"
    return score


def load_reward(spec: str) -> tuple[RewardFn, float]:
    """`name`, `module:function`, `model:DIR` (a reward model), `prm:DIR` (a process reward model) or any of them
    with `=weight`: the function and its weight (1 by default)."""
    target, _, weight_text = spec.partition("=")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise LLMError(f"reward {spec!r}: the weight {weight_text!r} is not a number", "e.g. mod:fn=0.2") from None
    if target in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[target], weight
    if target.startswith("model:"):
        return reward_model(target[len("model:") :]), weight
    if target.startswith("prm:"):
        return process_reward_model(target[len("prm:") :]), weight
    return import_callable(target, "reward", BUILTIN_REWARDS, "--reward mypkg.rewards:exact_match"), weight


def import_callable(spec: str, what: str, builtins: dict[str, Any], example: str) -> Any:
    """The callable `module:attr` names (a reward, a tool, an environment class), found as `python -m` finds
    modules; one error naming the spec and the fix when it is not one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        listed = f"a built-in ({', '.join(builtins)}) nor " if builtins else ""
        raise LLMError(f"{what} {spec!r} is neither {listed}module:name", f"write e.g. {example}")
    try:
        found = getattr(import_user_module(module_name), attr)
    except ImportError as exc:
        raise LLMError(
            f"{what} {spec!r}: cannot import {module_name} ({exc})",
            f"check the module path: it was looked for in the current directory ({Path.cwd()}) and on sys.path "
            "(add its parent directory to PYTHONPATH, or run from the directory that holds it)",
        ) from None
    except AttributeError:
        raise LLMError(f"{what} {spec!r}: {module_name} has no {attr}", "check the name after the colon") from None
    if not callable(found):
        raise LLMError(f"{what} {spec!r} is not callable", "point at a function or class")
    return found


RewardSpec = str | RewardFn | tuple[str | RewardFn, float]
"""A reward as `load_reward` reads it (a string), a function, or either with a weight."""


def reward_name(spec: RewardSpec) -> str:
    """How a reward is written in the run's config.yaml: its string, or python:<function name> for a function."""
    target, weight = spec if isinstance(spec, tuple) else (spec, None)
    name = target if isinstance(target, str) else f"python:{getattr(target, '__name__', type(target).__name__)}"
    return name if weight is None else f"{name}={weight}"


def resolve_reward(spec: RewardSpec) -> tuple[RewardFn, float]:
    """(function, weight) of a reward string, a function or a (reward, weight) pair."""
    target, weight = spec if isinstance(spec, tuple) else (spec, None)
    if isinstance(target, str):
        fn, parsed = load_reward(target)
        return fn, parsed if weight is None else float(weight)
    if not callable(target):
        raise LLMError(f"reward {target!r} is not callable", "pass functions (prompts, completions, **columns)")
    return target, 1.0 if weight is None else float(weight)


def combine_rewards(specs: list[RewardSpec]) -> RewardFn:
    """The weighted sum of the rewards in `specs` (one function as it is when there is one with weight 1)."""
    loaded = [resolve_reward(spec) for spec in specs]
    if len(loaded) == 1 and loaded[0][1] == 1.0:
        return loaded[0][0]

    def combined(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """The weighted sum over the functions that apply (None: does not), NaN where none does."""
        total = [UNSCORED] * len(completions)
        for fn, weight in loaded:
            values = checked_call(fn, prompts, completions, columns)
            total = [t if v != v else (weight * v if t != t else t + weight * v) for t, v in zip(total, values)]
        return total

    combined.__name__ = " + ".join(reward_name(spec) for spec in specs)
    return combined


def checked_call(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, Any]) -> list[float]:
    """fn's rewards as floats, or one clear error naming the function: it raised, returned the wrong number of
    values, or something that is not a finite number. None, as in TRL, means "this function does not apply to
    this completion" (a multi-task dataset's reward for one kind of row): NaN here (`UNSCORED`)."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        values = list(fn(prompts, completions, **columns))
    except LLMError:
        raise
    except Exception as exc:
        fix = "fix the function"
        if isinstance(exc, TypeError) and "required" in str(exc) and "argument" in str(exc):
            fix = (
                f"give every row the fields the function takes (the rows have: {', '.join(columns) or 'only prompt'})"
                ", or pass another reward (--reward)"
            )
        raise LLMError(f"the reward function {name} raised {type(exc).__name__}: {exc}", fix) from exc
    if len(values) != len(completions):
        raise LLMError(
            f"the reward function {name} returned {len(values)} values for {len(completions)} completions",
            "return one float per completion",
        )
    try:
        floats = [UNSCORED if v is None else float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise LLMError(f"the reward function {name} returned a non-number: {exc}", "return floats") from exc
    if any((f != f and v is not None) or f in (float("inf"), float("-inf")) for f, v in zip(floats, values)):
        raise LLMError(
            f"the reward function {name} returned NaN or inf", "return finite floats (None where it does not apply)"
        )
    return floats


UNSCORED = float("nan")
"""The reward of a completion no reward function applies to (each returned None): such a completion leaves its
group's baseline and gets advantage 0 (the group-advantage algorithms, as TRL's GRPOTrainer)."""


def load_prompts(
    path: str | Path, require: tuple[str, ...] = (), fix: str = "", text_field: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each an object with a "prompt" string (other fields reach the reward functions) and
    the fields in `require` (an error naming the line and the field otherwise, with `fix`), or with `text_field`
    a plain-text row (`_check_row`)."""
    path = Path(path)
    if not path.is_file():
        raise LLMError(f"no prompts file {path}", 'pass a JSONL file with one {"prompt": ...} object per line')
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LLMError(f"{path}, line {number}: not JSON ({exc.msg})", "one JSON object per line") from None
        _check_row(row, f"{path}, line {number}", require, fix, text_field)
        rows.append(normalized_row(row))
    if not rows:
        raise LLMError(f"{path} has no prompts", 'add lines like {"prompt": "2+2=", "answer": "4"}')
    return rows


def prompt_rows(
    source: Any, what: str = "prompts", require: tuple[str, ...] = (), fix: str = "", text_field: str | None = None
) -> list[dict[str, Any]]:
    """Rows from a JSONL path, a `datasets.Dataset` or a list of dicts, each with a "prompt" string and the
    fields in `require`, or with `text_field` a plain-text row (`_check_row`)."""
    if isinstance(source, str | Path):
        return load_prompts(source, require, fix, text_field)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # a datasets.Dataset
        rows = source.to_list()
    elif isinstance(source, list | tuple):
        rows = list(source)
    else:
        raise LLMError(
            f"{what} is a {type(source).__name__}",
            'pass a JSONL path, a datasets.Dataset or a list of dicts like {"prompt": "2+2=", "answer": "4"}',
        )
    if not rows:
        raise LLMError(f"{what} has no rows", 'add rows like {"prompt": "2+2=", "answer": "4"}')
    for number, row in enumerate(rows):
        _check_row(row, f"{what}, row {number}", require, fix, text_field)
    return [normalized_row(dict(row)) for row in rows]


def is_text_row(row: dict[str, Any], text_field: str | None) -> bool:
    """Whether a row is plain text (SFT's language-modeling rows, TRL's dataset_text_field): it has `text_field`
    and neither a "prompt" nor "messages"."""
    return text_field is not None and text_field in row and "prompt" not in row and "messages" not in row


def _check_row(
    row: Any, where: str, require: tuple[str, ...] = (), fix: str = "", text_field: str | None = None
) -> None:
    """A row has a "prompt" (a string, or a list of messages) or "messages" (a whole conversation; llm/chat.py),
    not both, and the fields in `require`; or, with `text_field`, it is plain text: a non-empty string in that
    field and no prompt (no field required of it: only SFT takes such rows, whole)."""
    if isinstance(row, dict) and is_text_row(row, text_field):
        if not isinstance(row[text_field], str) or not row[text_field]:
            raise LLMError(
                f'{where}: "{text_field}" is not a non-empty string',
                f'give each plain-text row its text as "{text_field}"',
            )
        return
    if isinstance(row, dict) and "messages" in row:
        if "prompt" in row:
            raise LLMError(
                f'{where}: both "prompt" and "messages"',
                'give a conversation as "messages", or a prompt (a string or messages) with its "completion"',
            )
        check_messages(row["messages"], where, "messages")
        row = {**row, "answer": row.get("answer", row["messages"][-1].get("content") or "")}
    elif not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("prompt"), list)):
        hint = f', or for SFT plain text as "{text_field}": dataset_text_field' if text_field else ""
        raise LLMError(f'{where}: no "prompt" string', f'give every row a "prompt" field (or "messages"{hint})')
    elif isinstance(row["prompt"], list):
        check_messages(row["prompt"], where, "prompt")
    for field in COMPLETION_FIELDS:
        if isinstance(row.get(field), list):
            check_messages(row[field], where, field)
    for key in require:
        if row.get(key) is None:
            raise LLMError(f'{where}: no "{key}" field', fix or f'give every row a "{key}" field')
