"""Models: tiny ones built from a config (no weights are downloaded), or any local Hugging Face causal LM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from policylab.llm import LLMError, require_llm
from policylab.llm.tasks import char_tokenizer, digit_pair_tokenizer

_TINY_LLAMA = {
    "architecture": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": _TINY_LLAMA,
    "small-llama": {
        "architecture": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "tiny-gpt2": {"architecture": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "tiny-llama-pairs": {**_TINY_LLAMA, "tokenizer": "digit-pairs"},
}
"""Randomly initialized models with the character tokenizer of the built-in tasks (~0.1M / 0.8M parameters);
tiny-llama-pairs, tiny-llama's size with `digit_pair_tokenizer` (another tokenizer: gold's teachers)."""


def build_tiny_model(name: str, tokenizer: Any, seed: int = 0, max_positions: int = 64) -> Any:
    """A randomly initialized causal LM from TINY_MODELS, sized to `tokenizer`'s vocabulary."""
    require_llm()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    values = dict(TINY_MODELS[name])
    values.pop("tokenizer", None)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if values.pop("architecture") == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max_positions, **values, **ids))
    llama = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_positions, tie_word_embeddings=True, **values, **ids
    )
    return LlamaForCausalLM(llama)


def load_model(source: str | Path, seed: int = 0, characters: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a TINY_MODELS name (random weights, character tokenizer; `characters`: its
    vocabulary, None: the built-in tasks') or a local directory written by `save_pretrained` (a policylab run's
    `model/`, or any Hugging Face causal LM)."""
    require_llm()
    name = str(source)
    if name in TINY_MODELS:
        make = digit_pair_tokenizer if TINY_MODELS[name].get("tokenizer") == "digit-pairs" else char_tokenizer
        tokenizer = make() if characters is None else make(characters)
        return build_tiny_model(name, tokenizer, seed), tokenizer
    path = Path(name)
    if (path / "model" / "config.json").is_file():  # a run directory
        path = path / "model"
    if not (path / "config.json").is_file():
        raise LLMError(
            f"no model at {name}: it is neither a built-in tiny model nor a directory with a config.json "
            "(models cannot be downloaded here)",
            f"use one of {', '.join(TINY_MODELS)}, a run directory, or a local save_pretrained directory",
        )
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        raise LLMError(
            f"{name} is a sequence classifier (a reward model, e.g. a reward_model run's), not a causal LM",
            f"use it as a reward: --reward model:{path}",
        )
    if any(str(name).endswith("ForTokenClassification") for name in architectures):
        raise LLMError(
            f"{name} is a token classifier (a process reward model, e.g. a prm run's), not a causal LM",
            f"use it as a reward: --reward prm:{path}",
        )
    with without_progress_bars():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True), tokenizer


@contextmanager
def without_progress_bars() -> Iterator[None]:
    """transformers' own bars (loading and saving weights) off, as the run's progress line is its output;
    the user's setting is restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def prepare_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer set up for batched sampling: prompts padded on the left, the EOS token as padding when it
    has no padding token. It needs an EOS token (a completion ends there)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise LLMError(
            f"the tokenizer {type(tokenizer).__name__} has no EOS token, so no completion could end",
            "set tokenizer.eos_token (e.g. tokenizer.add_special_tokens({'eos_token': '</s>'}))",
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(model: Any, tokenizer: Any) -> None:
    """A model object given in Python: a causal LM on the CPU whose vocabulary covers the tokenizer's."""
    if not callable(model) or not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise LLMError(
            f"model is a {type(model).__name__}, not a transformers causal LM",
            "pass an AutoModelForCausalLM (e.g. AutoModelForCausalLM.from_config(config)) or a path",
        )
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise LLMError(
            f"the model's weights are on {', '.join(sorted(devices))}; the language-model trainer runs on the CPU",
            "pass model.cpu()",
        )
    vocabulary = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocabulary:
        raise LLMError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocabulary}",
            "call model.resize_token_embeddings(len(tokenizer)) or pass the model's own tokenizer",
        )
