"""Built-in tasks that show learning on a CPU in minutes: prompts and answers generated from a seed, a
character-level tokenizer (a real `PreTrainedTokenizerFast` built with the `tokenizers` library) and the
task's verifiable reward.

    addition:   "37+85=" -> "122", "07+05=" -> "012"   (reward 1 for the exact answer, else 0)
    countdown:  "3,7,9>30:" -> "3*7+9"            (reward 1 if the expression uses each number once and hits
                                                   the target, 0.1 for a well-formed expression, else 0)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from policylab.errors import ConfigError, suggest
from policylab.llm.rewards import exact_match
from policylab.llm.tools import ToolFormat, integer_value

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "0123456789+-*/=,>:() "


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    make: Callable[[int, int], list[dict[str, Any]]]
    """(n, seed) -> rows {"prompt", "answer"}, the same rows for the same seed."""
    reward: Callable[..., list[float]]
    """(prompts, completions, **rows) -> one float per completion."""
    max_new_tokens: int
    tools: tuple[str, ...] = ()
    """Built-in tools (llm/tools.BUILTIN_TOOLS) the task's completions call."""
    tool_format: ToolFormat | None = None
    """The tags of its tool calls and results (None: the Hermes tags, ToolFormat's defaults)."""
    characters: str = CHARACTERS
    """The tiny models' character vocabulary for this task."""


def addition_rows(n: int, seed: int, digits: int = 2) -> list[dict[str, str]]:
    """Fixed-width rows, "07+85=" -> "092": every prompt and answer has the same length, so that a tiny model
    spends its capacity on the arithmetic (the carries), not on where the digits are."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 10**digits, size=(2, n))
    width = digits + 1
    return [
        {"prompt": f"{x:0{digits}d}+{y:0{digits}d}=", "answer": f"{x + y:0{width}d}"}
        for x, y in zip(a.tolist(), b.tolist())
    ]


def countdown_rows(n: int, seed: int, count: int = 3) -> list[dict[str, str]]:
    """Targets reachable with +, -, * from `count` numbers in 1..9 (each used once, left to right)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        numbers = rng.integers(1, 10, size=count).tolist()
        ops = rng.choice(["+", "-", "*"], size=count - 1).tolist()
        expression = str(numbers[0]) + "".join(op + str(x) for op, x in zip(ops, numbers[1:]))
        target = integer_value(expression)
        if target is None or target < 0:
            continue
        rows.append({"prompt": f"{','.join(map(str, numbers))}>{target}:", "answer": expression})
    return rows


def countdown_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 if the completion uses the prompt's numbers once each and evaluates to the target; 0.1 for any other
    well-formed expression; 0.0 otherwise."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        numbers_text, _sep, target_text = prompt.rstrip(":").partition(">")
        expression = completion.strip()
        value = integer_value(expression)
        if value is None:
            rewards.append(0.0)
            continue
        used = sorted(re.findall(r"\d+", expression))
        wanted = sorted(numbers_text.split(","))
        rewards.append(1.0 if used == wanted and str(value) == target_text else 0.1)
    return rewards


CALCULATOR_FORMAT = ToolFormat("[", "]", "{", "}")


def multiplication_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Two 2-digit numbers multiplied, "37*48=" -> "1776", with the completion that calls the calculator on them
    and copies its result: "[37*48]{1776}1776" ({1776} is the tool's, appended by the run)."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(10, 100, size=(2, n))
    return [
        {"prompt": f"{x}*{y}=", "answer": str(x * y), "completion": f"[{x}*{y}]{{{x * y}}}{x * y}"}
        for x, y in zip(a.tolist(), b.tolist())
    ]


TASKS: dict[str, Task] = {
    "addition": Task("addition", "two 2-digit numbers: 37+85= -> 122, 07+05= -> 012", addition_rows, exact_match, 4),
    "small-addition": Task(
        "small-addition",
        "two 1-digit numbers: 3+5= -> 08 (learnable from scratch in a minute)",
        lambda n, seed: addition_rows(n, seed, digits=1),
        exact_match,
        3,
    ),
    "countdown": Task(
        "countdown", "reach the target with each number once: 3,7,9>30: -> 3*7+9", countdown_rows, countdown_reward, 8
    ),
    "calculator": Task(
        "calculator",
        "two 2-digit numbers multiplied with a calculator tool: 37*48= -> [37*48]{1776}1776 ({1776} the tool's)",
        multiplication_rows,
        exact_match,
        20,
        tools=("calculator",),
        tool_format=CALCULATOR_FORMAT,
        characters=CHARACTERS + "[]{}",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}.{suggest(name, TASKS)}", f"choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def char_tokenizer(characters: str = CHARACTERS) -> Any:
    """A character-level `PreTrainedTokenizerFast`: one token per character, <pad>=0, <bos>=1, <eos>=2, left
    padding (what batched generation needs); `save_pretrained` writes it beside the model."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = character_backend([PAD, BOS, EOS, *dict.fromkeys(characters)], unknown=PAD)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def digit_pair_tokenizer(characters: str = CHARACTERS) -> Any:
    """Another tokenizer of the same text as `char_tokenizer`: every two-digit number one token ("12", "07"), the
    rest one character each, so "123+4=" is "12", "3", "+", "4", "=" (a teacher with its own tokens, for
    distillation across tokenizers: gold's ULD)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pairs = [f"{a}{b}" for a in "0123456789" for b in "0123456789"]
    tokenizer = character_backend([PAD, BOS, EOS, *dict.fromkeys(characters), *pairs], unknown=PAD)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def character_backend(tokens: list[str], unknown: str) -> Any:
    """A `tokenizers` backend with `tokens` as its vocabulary in order, that splits text into single characters
    (multi-character tokens enter as added or special tokens of the tokenizer around it)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unknown))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend
