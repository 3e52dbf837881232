"""Tool calling inside completions (TRL's GRPOTrainer `tools` and `environment_factory`): the model writes a call
between two tags, the run calls the Python function and appends its result, and sampling goes on from there, for
at most `max_tool_calling_iterations` calls. The result goes between two other tags right after the call, or, with
a chat model (`ToolRunner(template=True)`), after the model's turn has ended at its EOS, as the chat template
renders a tool message and the next assistant turn. The result's tokens are in the context of everything after
them but in no loss (`Rollout.tool_mask`); rewards read the whole text. An environment (`Environments`) gives each
completion its own instance, whose methods are that completion's tools.

A call's body is JSON {"name": ..., "arguments": {...}} (the Hermes format Qwen's and Llama's chat templates
render), or `name(arg, key=value)` with literal arguments, or, with one tool, any text: that tool's one argument.
A call that cannot be parsed, names no tool, or raises gets "error: ..." as its result (the model sees it, as in
TRL) and counts as a failure in train.csv.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.llm import LLMError
from policylab.llm.rewards import import_callable
from policylab.llm.rollout import decode_lists, tokenize

Tool = Callable[..., Any]
_CALL = re.compile(r"([A-Za-z_]\w*)\((.*)\)", re.DOTALL)


@dataclass(frozen=True)
class ToolFormat:
    """The tags around a call the model writes and around the result the run appends."""

    call_start: str = "<tool_call>"
    call_end: str = "</tool_call>"
    response_start: str = "<tool_response>"
    response_end: str = "</tool_response>"

    def response(self, result: str) -> str:
        return f"{self.response_start}{result}{self.response_end}"

    def final(self, texts: list[str]) -> list[str]:
        """Each text after its last result (what a reward compares with the answer)."""
        return [text.rsplit(self.response_end, 1)[-1] for text in texts]

    def responses(self) -> re.Pattern[str]:
        """The results in a text (what SFT leaves out of its loss)."""
        return re.compile(re.escape(self.response_start) + ".*?" + re.escape(self.response_end), re.DOTALL)


_EXPRESSION = re.compile(r"^[0-9+\-*()]+$")


def integer_value(expression: str) -> int | None:
    """The value of an expression of digits, + - * and parentheses, or None if it is not one."""
    if not _EXPRESSION.fullmatch(expression) or "**" in expression:  # no powers: 9**9**9 would not finish
        return None
    try:
        value = eval(expression, {"__builtins__": {}}, {})  # noqa: S307 - only digits, + - * ( ) reach here
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None
    return value if isinstance(value, int) else None


def calculator(expression: str) -> str:
    """The value of an integer expression of digits, + - * and parentheses (the `calculator` task's tool).

    Args:
        expression: the expression, e.g. 37*48
    """
    value = integer_value(str(expression).replace(" ", ""))
    if value is None:
        raise ValueError(f"not an expression of digits, + - * and parentheses: {str(expression)[:40]!r}")
    return str(value)


BUILTIN_TOOLS: dict[str, Tool] = {"calculator": calculator}


def load_tool(spec: str | Tool) -> tuple[str, Tool]:
    """(name, function) of a tool: a function (its `__name__`), a built-in name, or `module:function`."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if spec in BUILTIN_TOOLS:
        return spec, BUILTIN_TOOLS[spec]
    return spec.partition(":")[2], import_callable(spec, "tool", BUILTIN_TOOLS, "--tool mypkg.tools:search")


def tool_table(specs: list[Any]) -> dict[str, Tool]:
    """The tools by the name a call uses; two of one name are an error."""
    table: dict[str, Tool] = {}
    for spec in specs:
        name, fn = load_tool(spec)
        if name in table:
            raise LLMError(f"two tools are named {name!r}", "give each tool function its own name")
        table[name] = fn
    return table


def parse_call(body: str, tools: dict[str, Tool]) -> tuple[Tool, list[Any], dict[str, Any]]:
    """(function, positional arguments, keyword arguments) of a call's body; ValueError says what is wrong."""
    text = body.strip()
    if text.startswith("{"):
        try:
            call = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the call is not valid JSON ({exc.msg})") from None
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError('a JSON call is {"name": "...", "arguments": {...}}')
        return _named(call["name"], tools), [], arguments
    match = _CALL.fullmatch(text)
    if match and match.group(1) in tools:
        try:
            node = ast.parse(text, mode="eval").body
            if not isinstance(node, ast.Call):
                raise ValueError("not a call")
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        except (SyntaxError, ValueError):
            raise ValueError("the call's arguments are not Python literals") from None
        return tools[match.group(1)], args, kwargs
    if len(tools) == 1:
        return next(iter(tools.values())), [text], {}
    name = match.group(1) if match else text[:20]
    return _named(name, tools), [], {}


def _named(name: str, tools: dict[str, Tool]) -> Tool:
    if name not in tools:
        raise ValueError(f"no tool named {name!r} (the tools: {', '.join(tools)})")
    return tools[name]


def call_tool(body: str, tools: dict[str, Tool]) -> tuple[str, bool, str]:
    """(the result as text, whether the call failed, the tool's name): a failure's result is "error: ..." for the
    model to read."""
    name = "unknown"
    try:
        fn, args, kwargs = parse_call(body, tools)
        name = next((n for n, f in tools.items() if f == fn), name)
        return str(fn(*args, **kwargs)), False, name
    except Exception as exc:  # a tool's own error is the model's to see, as in TRL
        return f"error: {exc}", True, name


@dataclass
class Turn:
    """One row's completion as it grows: token ids, whether each is the model's (trained) and its log-prob."""

    ids: list[int]
    trained: list[bool]
    logprobs: list[float]


def first_marker(decode: Callable[[list[int]], str], ids: list[int], markers: list[str]) -> tuple[int, str] | None:
    """(the fewest leading tokens whose text holds one of `markers`, the text of those tokens), or None. Binary
    search over prefixes: a prefix holding a marker stays holding it as it grows."""
    text = decode(ids)
    if not any(m in text for m in markers):
        return None
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if any(m in decode(ids[:middle]) for m in markers):
            high = middle
        else:
            low = middle + 1
    return low, decode(ids[:low])


@dataclass
class ToolStats:
    calls: int = 0
    failures: int = 0


class ToolRunner:
    """Runs the tool calls of a batch of completions, each row with its own tools (an environment's methods are
    its instance's), and samples on after each (`sample(ids, mask, width)`: one completion of each left-padded
    context, at most `width` tokens; the trainer's sampler), cutting every completion at its first stop string.
    `calls`: whether completions call tools at all (else only the stop strings cut)."""

    def __init__(
        self, tokenizer: Any, fmt: ToolFormat, stop: list[str], max_iterations: int, calls: bool, template: bool = False
    ) -> None:
        self.tokenizer, self.fmt, self.stop, self.calls = tokenizer, fmt, list(stop), calls
        self.max_iterations, self.template = max_iterations, template
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens dropped), through a fast tokenizer's Rust backend (rollout's)."""
        return str(decode_lists(self.tokenizer, [ids])[0])

    def encode(self, text: str) -> list[int]:
        return tokenize(self.tokenizer, [text])[0]

    def markers(self) -> list[str]:
        return self.stop + ([self.fmt.call_end] if self.calls and not self.template else [])

    def _cut(self, turn: Turn, start: int) -> str | None:
        """Cut the tokens from `start` on (the latest sampling) after the first stop string or call end: the
        call's body if it was a call (the row goes on), else None (the row ends here or at its EOS). With
        `template`, a turn is not cut at a call: one that ends at EOS calls the last call it wrote."""
        found = first_marker(self.decode, turn.ids[start:], self.markers())
        if found is None:
            return self._template_call(turn, start) if self.template else None
        length, text = found
        del turn.ids[start + length :], turn.trained[start + length :], turn.logprobs[start + length :]
        ended_by = min((m for m in self.markers() if m in text), key=text.index)
        before = text[: text.index(ended_by)]
        if ended_by != self.fmt.call_end or self.fmt.call_start not in before:
            return None  # a stop string, or a call's end without its start: the row ends
        return before.rsplit(self.fmt.call_start, 1)[1]

    def _template_call(self, turn: Turn, start: int) -> str | None:
        """The body of the last complete call of a turn that ended at EOS (the chat model's turn), else None."""
        if not self.calls or len(turn.ids) == start or turn.ids[-1] != self.eos:
            return None
        text = self.decode(turn.ids[start:])
        if self.fmt.call_end not in text:
            return None
        before = text.rsplit(self.fmt.call_end, 1)[0]
        return before.rsplit(self.fmt.call_start, 1)[1] if self.fmt.call_start in before else None

    def result_tokens(self, name: str, result: str) -> list[int]:
        """The tokens appended after a call: the result between the response tags, or with `template` what the
        chat template renders after an assistant turn that called `name`: the tool's message and the
        generation prompt of the next assistant turn (TRL's tool suffix)."""
        if not self.template:
            return self.encode(self.fmt.response(result))
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": {}}}]}  # fmt: skip
        before = [{"role": "user", "content": "x"}, call]
        prefix = list(self.tokenizer.apply_chat_template(before, tokenize=True, return_dict=False))
        ends = [i for i, token in enumerate(prefix) if token == self.eos]
        prefix = prefix[: ends[-1] + 1] if ends else prefix  # the turn ends at its EOS (Qwen's adds a newline)
        message = {"role": "tool", "name": name, "content": result}
        full = list(self.tokenizer.apply_chat_template(before + [message], tokenize=True, return_dict=False,
                                                       add_generation_prompt=True))  # fmt: skip
        if full[: len(prefix)] != prefix:
            raise LLMError(
                "the chat template renders a conversation's start differently once a tool message follows it, so "
                "a tool's result cannot be appended to a completion",
                "set tool_results=tags (the result between tool_response_start and tool_response_end)",
            )
        return full[len(prefix) :]

    def run(
        self,
        prompts: list[list[int]],
        first: list[Turn],
        sample: Callable[[Tensor, Tensor, Tensor, Tensor, int], list[Turn]],
        width: int,
        tools: list[dict[str, Tool]],
    ) -> tuple[list[Turn], ToolStats]:
        """Each row's completion after its calls: `first` are the sampled completions of `prompts`, `tools`
        each row's tools by name. `sample(prompt ids, mask, context ids, mask, room)` continues each row after its
        context (its completion so far, the result last), prompts and contexts left-padded apart: a group's rows
        share their prompt, which the sampler then prefills once."""
        stats, turns = ToolStats(), first
        bodies = {i: self._cut(turn, 0) for i, turn in enumerate(turns)}
        pending = [i for i, body in bodies.items() if body is not None]
        for _ in range(self.max_iterations):
            if not pending:
                break
            going: list[int] = []
            for i in pending:
                result, failed, name = call_tool(str(bodies[i]), tools[i])
                stats.calls, stats.failures = stats.calls + 1, stats.failures + failed
                response = self.result_tokens(name, result)
                if len(turns[i].ids) + len(response) >= width:  # no room to answer: end here, as TRL does
                    continue
                turns[i].ids += response
                turns[i].trained += [False] * len(response)
                turns[i].logprobs += [0.0] * len(response)
                going.append(i)
            if not going:
                break
            ids, mask = left_padded([prompts[i] for i in going], self.pad)
            own, own_mask = left_padded([turns[i].ids for i in going], self.pad)
            room = width - min(len(turns[i].ids) for i in going)
            continued = sample(ids, mask, own, own_mask, room)
            pending = []
            for i, more in zip(going, continued):
                start, keep = len(turns[i].ids), width - len(turns[i].ids)
                turns[i].ids += more.ids[:keep]
                turns[i].trained += more.trained[:keep]
                turns[i].logprobs += more.logprobs[:keep]
                bodies[i] = self._cut(turns[i], start)
                if bodies[i] is not None:
                    pending.append(i)
        return turns, stats


def left_padded(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def turns_of(completion_ids: Tensor, completion_mask: Tensor, logprobs: Tensor) -> list[Turn]:
    """The sampled completions as `Turn`s (the tokens in the mask)."""
    lengths = completion_mask.sum(-1).tolist()
    ids, logps = completion_ids.tolist(), logprobs.tolist()
    return [Turn(ids[i][:n], [True] * n, logps[i][:n]) for i, n in enumerate(lengths)]


def padded_turns(turns: list[Turn], width: int, pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(completion ids, completion mask (the model's tokens), log-probs, tool mask (the tools' tokens)), [N, width]."""
    n = len(turns)
    ids = np.full((n, width), pad, np.int64)
    trained = np.zeros((n, width), bool)
    tool = np.zeros((n, width), bool)
    logprobs = np.zeros((n, width), np.float32)
    for i, turn in enumerate(turns):
        length = len(turn.ids)
        ids[i, :length] = turn.ids
        trained[i, :length] = turn.trained
        tool[i, :length] = ~np.asarray(turn.trained, bool)
        logprobs[i, :length] = turn.logprobs
    return torch.from_numpy(ids), torch.from_numpy(trained), torch.from_numpy(logprobs), torch.from_numpy(tool)


def trace_tokens(
    tokenize: Callable[[list[str]], list[list[int]]], text: str, fmt: ToolFormat
) -> tuple[list[int], list[bool]]:
    """An expert completion with tool results in it as tokens, and which are the model's: each result (between
    the response tags) is tokenized apart, as the sampler appends it, and left out of SFT's loss. `tokenize`:
    texts to token ids (the trainer's cached PromptEncoder.token_lists)."""
    cursor = 0
    pieces: list[tuple[str, bool]] = []
    for match in fmt.responses().finditer(text):
        pieces += [(text[cursor : match.start()], True), (match.group(0), False)]
        cursor = match.end()
    pieces = [(piece, own) for piece, own in [*pieces, (text[cursor:], True)] if piece]
    ids: list[int] = []
    trained: list[bool] = []
    for tokens, (_, model_written) in zip(tokenize([piece for piece, _ in pieces]), pieces):
        ids += tokens
        trained += [model_written] * len(tokens)
    return ids, trained


class EnvironmentKind:
    """One environment class or factory: its probe instance, its tools' names, whether it owns a reward, and the
    pool of its instances."""

    def __init__(self, factory: Callable[[], Any], name: str) -> None:
        self.factory, self.name = factory, name
        probe = self.make()
        if not callable(getattr(probe, "reset", None)):
            raise LLMError(f"environment {name}: its instances have no reset method", "define reset(self, **row)")
        self.methods = [m for m, _ in inspect.getmembers(type(probe), inspect.isfunction) if _is_tool_method(m)]
        if not self.methods:
            raise LLMError(
                f"environment {name}: its instances have no public method for completions to call",
                "define the tools as methods (not starting with _)",
            )
        self.rewarded = callable(getattr(probe, "get_reward", None))
        self.pool: list[Any] = [probe]

    def make(self) -> Any:
        try:
            return self.factory()
        except Exception as exc:
            raise LLMError(f"environment {self.name} could not be made: {type(exc).__name__}: {exc}",
                           "its factory (or class) must take no arguments") from exc  # fmt: skip

    def instances(self, count: int) -> list[Any]:
        while len(self.pool) < count:
            self.pool.append(self.make())
        return self.pool[:count]


def _is_tool_method(name: str) -> bool:
    return name not in ("reset", "get_reward") and not name.startswith("_")


class Environments:
    """Instances of an environment (TRL's GRPOTrainer `environment_factory`): a class or factory whose instances
    have `reset(**row)` (returning None or text appended to the prompt), public methods (the tools of the
    completion the instance serves) and, optionally, `get_reward()` (that completion's reward, read after its
    rollout). One instance per completion of a batch, made once and reset before every rollout (pooled, as TRL
    does), so completions never share state. Several, by name (`kinds`): each row's `environment` field picks
    its own, and is not passed to `reset`."""

    def __init__(self, kinds: dict[str | None, EnvironmentKind]) -> None:
        self.kinds = kinds
        self.rewarded = any(kind.rewarded for kind in kinds.values())

    def kind_of(self, row: dict[str, Any]) -> EnvironmentKind:
        if None in self.kinds:
            return self.kinds[None]
        name = row.get("environment")
        if name not in self.kinds:
            raise LLMError(
                f"a row's environment is {name!r}, not one of {', '.join(map(str, self.kinds))}: {str(row)[:80]}",
                'give every row an "environment" field naming one of the environments',
            )
        return self.kinds[name]

    def reset(self, rows: list[dict[str, Any]]) -> tuple[list[Any], list[str], list[dict[str, Tool]]]:
        """(an instance per row, reset with the row's fields; the text each appends to its prompt; its tools)."""
        kinds = [self.kind_of(row) for row in rows]
        counts = Counter(id(kind) for kind in kinds)
        unused = {id(kind): iter(kind.instances(counts[id(kind)])) for kind in kinds}  # each kind's pool in turn
        instances, observations, tools = [], [], []
        for kind, row in zip(kinds, rows):
            instance = next(unused[id(kind)])
            fields = row if None in self.kinds else {k: v for k, v in row.items() if k != "environment"}
            observation = instance.reset(**fields)
            if observation is not None and not isinstance(observation, str):
                raise LLMError(
                    f"environment {kind.name}: reset returned a {type(observation).__name__}",
                    "return None, or the text to append to the prompt",
                )
            instances.append(instance)
            observations.append(observation or "")
            tools.append({m: getattr(instance, m) for m in kind.methods})
        return instances, observations, tools

    def described(self, row: dict[str, Any]) -> list[Tool]:
        """The tools of the row's kind (its first instance's methods): what the chat template describes in that
        row's prompt (as TRL renders each prompt with its own environment's tools)."""
        kind = self.kind_of(row)
        return [getattr(kind.pool[0], m) for m in kind.methods]


def load_environment(spec: Any) -> Environments:
    """An environment from a class or factory or `module:Name`, or several as {name: any of those}."""
    if isinstance(spec, dict):
        if not spec:
            raise LLMError("environment is an empty mapping", "give {name: module:Class, ...}, or one class")
        return Environments({str(name): _environment_kind(one) for name, one in spec.items()})
    return Environments({None: _environment_kind(spec)})


def _environment_kind(spec: str | Callable[[], Any]) -> EnvironmentKind:
    if callable(spec):
        return EnvironmentKind(spec, getattr(spec, "__name__", type(spec).__name__))
    factory = import_callable(spec, "environment", {}, "--set environment=mypkg.envs:Wordle")
    return EnvironmentKind(factory, spec.partition(":")[2])


def environment_reward(
    prompts: list[str], completions: list[str], environments: list[Any], **_: Any
) -> list[float | None]:
    """Each completion's environment's get_reward() (the reward an environment owns; None, "does not apply",
    for an environment without one)."""
    return [float(e.get_reward()) if callable(getattr(e, "get_reward", None)) else None for e in environments]
