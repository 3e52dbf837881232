"""SFT and reinforcement learning of a causal LM on a task: the same run directory, progress line, CSV logs and
objectives as the control side.

SFT: mean over answer tokens (and EOS) of -log pi(token | prompt, previous tokens).
RL, per step: `batch_size` prompts, `group_size` sampled completions each (rollout.generate), rewards from the
task's reward function, sequence advantages from objectives.advantages.GROUP_ADVANTAGES, then
`updates_per_batch` gradient steps on the policy loss (`loss`: "ppo", objectives.policy.pg_surrogate at token
level, the ratio to the behaviour log-probs clipped at 1 - clip_low / 1 + clip_high; "gspo", the same at
sequence level; "cispo", REINFORCE with a clipped, constant IS weight), reduced by the aggregation mode, plus
kl_coef times a k1/k2/k3 KL estimate to the initial model and minus entropy_coef times the entropy. With
`mix=chord`, (1 - mu) times that plus mu times the negative log-likelihood of expert completions
(objectives.imitation.mixed_policy_loss: the function the control side's PPO-with-demonstrations uses).

    algo          advantage     aggregation                 other defaults (paper)
    grpo          grpo          seq-mean-token-mean         (Shao et al. 2024)
    dr_grpo       dr_grpo       seq-mean-token-sum-norm     (Liu et al. 2025)
    dapo          grpo          token-mean                  clip_high 0.28, dynamic_sampling (Yu et al. 2025)
    gspo          grpo          (per sequence)              loss gspo, clip 3e-4 / 4e-4 (Zheng et al. 2025)
    cispo         grpo          token-mean                  loss cispo, no lower clip, clip_high 0.28 (MiniMax 2025)
    sapo          grpo          token-mean                  loss sapo, soft gate tau 1.0 / 1.05 (Gao et al. 2025)
    gmpo          grpo          (per sequence)              loss gmpo, log-space clip 0.4 / 0.4 (Zhao et al. 2025)
    rloo          rloo          seq-mean-token-mean         (Ahmadian et al. 2024)
    reinforce++   reinforce++   token-mean                  (Hu et al. 2025)
    ppo           GAE over tokens with a value head (gamma 1, lambda 0.95), token-mean, one sample per prompt
    dpo           DPO's sigmoid loss on (chosen, rejected) pairs, beta 0.1 (Rafailov et al. 2023); `preference_loss`
                  takes every loss type of TRL's DPOTrainer (ipo, hinge, robust, ...) or a weighted sum of them
    online_dpo    DPO on the best and worst of `group_size` own samples by reward (Guo et al. 2024)
    xpo           XPO: DPO on a policy sample against a reference sample of each prompt, plus alpha (1e-5) times
                  the reference samples' log pi (Xie et al. 2024; TRL's XPOTrainer)
    nash_md       Nash-MD: REINFORCE on P(y > y') = s(r(y) - r(y')), y' from the geometric mixture of the policy
                  and the reference (mixture_coef 0.5), baseline 1/2, plus beta (0.1) times KL(pi || pi_ref)'s
                  REINFORCE gradient (Munos et al. 2024; TRL's NashMDTrainer)
    cpo           CPO's reference-free sigmoid loss plus the chosen completions' NLL (Xu et al. 2024)
    simpo         SimPO: the length-normalized log-prob margin over a target margin, beta 2.0, no reference
                  (Meng et al. 2024)
    orpo          ORPO: the chosen completions' NLL plus beta times the log odds-ratio loss, no reference
                  (Hong et al. 2024)
    tpo           TPO: a reference-free preference loss on (chosen, rejected) pairs (`preference_loss` sigmoid, hinge,
                  ipo or simpo, TRL's TPO loss types sigmoid, hinge, ipo and tpo-l), beta 0.01, plus tpo_alpha times
                  the NLL of a third, gold completion (the pairs row's `reference`; the task's answer) (Saeidi et
                  al. 2024; TRL's TPOTrainer)
    kto           KTO on completions labelled desirable or not, unpaired; beta 0.1 (Ethayarajh et al. 2024)
    bco           BCO on the same rows: each completion's reward beta log(pi / pi_ref) classified desirable or not
                  against delta, the running mean of the rewards (Jung et al. 2024; TRL 1.10's
                  BCOTrainer, without its embedding-based distribution matching)
    prm           a process reward model: a two-way linear classifier on the last hidden state at the separator
                  ending each step of a completion, trained with cross-entropy on the steps' labels (Lightman et
                  al. 2023; TRL 1.10's PRMTrainer); saved as a token classifier, `--reward prm:DIR`
    reward_model  a reward model: a linear score on the last hidden state, trained on pairs with the
                  Bradley-Terry loss -log s(r(y_w) - r(y_l) - margin); saved as a sequence classifier
    distill       on-policy distillation: the student samples, and learns the `teacher`'s next-token
                  distribution at every position of its own completions, reverse KL (beta 1; Agarwal et al.
                  2024; TRL's DistillationTrainer)
    gkd           GKD: the same with the generalized JSD (beta 0.5), on the student's samples at a share lmbda
                  0.5 of the steps and on the rows' answers (or, seq_kd, the teacher's samples) at the others,
                  temperature 0.9 (Agarwal et al. 2024; TRL's GKDTrainer)
    gold          GOLD: GKD's steps with GOLD's defaults (top_p 0.95); use_uld_loss: a teacher with another
                  tokenizer, Universal Logit Distillation on the byte-aligned positions (Boizard et al. 2024;
                  TRL's GOLDTrainer; llm/cross_tokenizer.py)
    sdft          SDFT, self-distillation: the model samples from the prompt, and learns at every position of its
                  completion the next-token distribution of a teacher, itself (its initial weights, its current
                  ones or their moving average), given the prompt with the row's `privileged_context` (e.g. a
                  demonstration); the generalized JSD (0.5) on the student's top 100 tokens, sequence-mean
                  token-mean (Shenfeld et al. 2026; TRL's SDFTTrainer)
    sdpo          SDPO: GRPO's rollouts and rewards; each completion whose group holds another that succeeded
                  (reward >= 1) learns the next-token distributions of the model (an EMA teacher) reprompted with
                  that successful attempt as a solution: the sampled tokens' reverse KL, weight
                  `distillation_weight` 1 against the policy loss (token-mean) (Hubotter et al. 2026; TRL's
                  SDPOTrainer)
    ssd           SSD, simple self-distillation: the model samples one completion per prompt at the run's sampling
                  settings (temperature, top_k, top_p), and is fine-tuned on those raw, unverified samples with
                  the token-mean NLL at temperature 1 (Zhang et al. 2026; TRL 1.10's SSDTrainer)
    minillm       MiniLLM: GRPO's groups, rewards and loss, each token's advantage plus its reverse-KL advantage
                  (the `teacher`'s log-prob of the token minus the model's), plus the token-mean KL(pi || p_teacher)
                  of the whole next-token distributions (Gu et al. 2024; TRL 1.10's MiniLLMTrainer)
    a2po          A*-PO: before training, V*(x) = beta1 log mean exp(r / beta1) of num_value_samples reference
                  samples per training prompt (prompts where all score 0 dropped); then one sample per prompt,
                  beta2 log(pi / pi_ref) regressed onto r - V*(x) (Brantley et al. 2025; TRL's A2POTrainer)

Prompts, SFT examples, expert completions and DPO pairs are drawn in shuffled epochs (llm/epochs.py), as TRL's
trainers walk their datasets; `epoch` in train.csv counts the passes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_module_state,
    optimizer_from_flat,
    optimizer_to_flat,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from policylab.config import apply_values
from policylab.errors import ConfigError, for_reader, suggest
from policylab.llm import LLMError, fast_train, require_llm
from policylab.llm.chat import (
    ToolsOf,
    WithTemplateOptions,
    conversation_key,
    conversation_tokens,
    conversational_prompts,
    has_conversations,
    render,
    rendered_rows,
    require_template,
)
from policylab.llm.cross_tokenizer import CrossTokenizer, ULDSettings
from policylab.llm.epochs import ShuffledEpochs
from policylab.llm.models import check_model, load_model, prepare_tokenizer, without_progress_bars
from policylab.llm.replay import GroupReplay
from policylab.llm.rewards import (
    BUILTIN_REWARDS,
    RewardFn,
    RewardSpec,
    checked_call,
    combine_rewards,
    import_callable,
    is_text_row,
    prompt_rows,
    resolve_reward,
    reward_name,
)
from policylab.llm.rollout import (
    Rollout,
    completion_logits,
    concat_rollouts,
    decode,
    decode_lists,
    generate,
    token_logprobs,
    tokenize,
)
from policylab.llm.tasks import CHARACTERS, Task, get_task
from policylab.llm.tools import (
    Environments,
    Tool,
    ToolFormat,
    ToolRunner,
    ToolStats,
    Turn,
    environment_reward,
    left_padded,
    load_environment,
    padded_turns,
    tool_table,
    trace_tokens,
    turns_of,
)
from policylab.llm.workers import GenerationWorkers
from policylab.logging import CONFIG_YAML, JsonlLog, Progress, RunLog, new_run_dir
from policylab.objectives.advantages import GROUP_ADVANTAGES, decoupled_group_advantages, gae
from policylab.objectives.aggregation import aggregate
from policylab.objectives.imitation import (
    generalized_jsd,
    generalized_jsd_of_log_probs,
    imitation_weights,
    mixed_policy_loss,
    parse_schedule,
    reverse_kl_advantages,
    sampled_distillation_advantages,
    topk_generalized_jsd,
)
from policylab.objectives.policy import (
    SAMPLER_CORRECTIONS,
    a2po_loss,
    cispo_loss,
    gmpo_surrogate,
    gspo_surrogate,
    gspo_token_surrogate,
    kl_penalty,
    luspo_surrogate,
    optimal_values,
    pg_surrogate,
    pg_token_losses,
    policy_shaping_loss,
    sampler_correction_weights,
    sapo_loss,
    surrogate_metrics,
    vespo_loss,
)
from policylab.objectives.preference import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    PreferenceSettings,
    check_preference_settings,
    kto_kl,
    nash_md_loss,
    needs_reference,
    pair_logps,
    parse_preference_loss,
    preference_loss,
    unpaired_loss,
    xpo_exploration,
)
from policylab.objectives.value import value_loss
from policylab.optim import Adam
from policylab.runtime import limit_numpy_blas

ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"lr": 3e-3},
    "grpo": {},
    "dr_grpo": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"aggregation": "token-mean", "clip_high": 0.28, "dynamic_sampling": True},
    "gspo": {"loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4},
    "cispo": {"loss": "cispo", "aggregation": "token-mean", "clip_low": None, "clip_high": 0.28},
    "sapo": {"loss": "sapo", "aggregation": "token-mean"},
    "gmpo": {"loss": "gmpo", "clip_low": 0.4, "clip_high": 0.4},
    "rloo": {"advantage": "rloo"},
    "reinforce++": {"advantage": "reinforce++", "aggregation": "token-mean"},
    "ppo": {"group_size": 1, "batch_size": 64, "aggregation": "token-mean", "updates_per_batch": 2},
    "dpo": {"lr": 1e-4, "disable_dropout": True},
    "online_dpo": {"group_size": 4, "lr": 1e-4, "disable_dropout": True},
    "xpo": {"group_size": 1, "batch_size": 64, "lr": 1e-4, "disable_dropout": True},
    "nash_md": {"group_size": 1, "batch_size": 64, "lr": 1e-4, "disable_dropout": True},
    "cpo": {"preference_loss": "cpo+sft", "lr": 1e-4, "disable_dropout": True},
    "simpo": {"preference_loss": "simpo", "beta": 2.0, "lr": 1e-4, "disable_dropout": True},
    "orpo": {"preference_loss": "sft+orpo", "lr": 1e-4, "disable_dropout": True},
    "tpo": {"beta": 0.01, "simpo_gamma": 0.5, "lr": 1e-4, "disable_dropout": True},
    "kto": {"lr": 1e-4, "disable_dropout": True},
    "bco": {"lr": 1e-4, "disable_dropout": True, "unpaired_loss": "bco"},
    "reward_model": {"lr": 1e-3, "disable_dropout": True},
    "prm": {"lr": 1e-3, "disable_dropout": True},
    "distill": {"beta": 1.0, "group_size": 1, "batch_size": 64, "lr": 3e-3},
    "gkd": {
        "beta": 0.5,
        "lmbda": 0.5,
        "temperature": 0.9,
        "group_size": 1,
        "batch_size": 64,
        "lr": 3e-3,
        "disable_dropout": True,
    },
    "gold": {
        "beta": 0.5,
        "lmbda": 0.5,
        "temperature": 0.9,
        "top_p": 0.95,
        "group_size": 1,
        "batch_size": 64,
        "lr": 3e-3,
        "disable_dropout": True,
    },
    "a2po": {"group_size": 1, "batch_size": 64},
    "minillm": {"gamma": 0.0, "disable_dropout": True},
    "sdft": {"group_size": 1, "batch_size": 64},
    "ssd": {"group_size": 1, "batch_size": 64},
    "sdpo": {
        "aggregation": "token-mean",
        "distillation_mode": "sampled_token",
        "distillation_alpha": 1.0,
        "teacher_model_kind": "ema",
    },
}
"""Each algorithm is GRPO's config with these values (the table in the module docstring)."""
ALGOS = tuple(ALGO_DEFAULTS)
TRAINING_STEPS = {
    "sft": "sft_step",
    "ppo": "ppo_step",
    "online_dpo": "online_dpo_step",
    "xpo": "xpo_step",
    "nash_md": "nash_md_step",
    **dict.fromkeys(("dpo", "cpo", "simpo", "orpo"), "dpo_step"),
    "tpo": "tpo_step",
    **dict.fromkeys(("kto", "bco"), "kto_step"),
    "reward_model": "reward_step",
    "prm": "prm_step",
    **dict.fromkeys(("distill", "gkd", "gold"), "distill_step"),
    "a2po": "a2po_step",
    "sdft": "sdft_step",
    "ssd": "ssd_step",
}
"""The LLMTrainer method that makes one training step of each algorithm but the group-advantage ones (rl_step)."""


def training_step(algo: str) -> str:
    """The name of the LLMTrainer method that makes one training step of `algo` (train_llm calls it)."""
    return TRAINING_STEPS.get(algo, "rl_step")


GROUP_SAMPLING_STEPS = ("rl_step", "ppo_step", "online_dpo_step")
"""The steps that sample `group_size` completions per prompt and reward them (LLMTrainer.sample_groups)."""
PAIRED_SAMPLING_STEPS = ("xpo_step", "nash_md_step")
"""The steps that sample `group_size` completions per prompt from the policy and as many from another sampler
(the reference model; Nash-MD's mixture of the policy and it), and reward both (LLMTrainer.sample_beside)."""
REWARDED_STEPS = (*GROUP_SAMPLING_STEPS, *PAIRED_SAMPLING_STEPS)
SAMPLING_STEPS = (*REWARDED_STEPS, "distill_step", "a2po_step", "sdft_step", "ssd_step")
"""The steps that sample completions (distill_step: the student's, without rewards, on its on-policy steps;
a2po_step, sdft_step and ssd_step: one per prompt, without sample_groups' filters)."""
POLICY_LOSS_STEPS = ("rl_step", "ppo_step")
"""The steps that train the policy-gradient loss (LLMTrainer.policy_loss through accumulate), `updates_per_batch`
times per batch."""
PREFERENCE_STEPS = ("dpo_step", "online_dpo_step", "xpo_step")
"""The steps that train a pairwise preference loss (LLMTrainer.preference_update), once per batch."""
ROW_PAIR_STEPS = ("dpo_step", "tpo_step", "kto_step", "reward_step", "prm_step")
"""The steps that draw rows of the pairs file (or the task's answers with corruptions), not prompts to sample."""
SCORING_ALGOS = ("reward_model", "prm")
"""The algorithms that train a scorer (a sequence or token classifier), evaluated on held-out labels, not by
decoding."""


def samples_completions(algo: str) -> bool:
    """Whether the algorithm's training steps sample completions (the trainer starts generation workers only
    then)."""
    return training_step(algo) in SAMPLING_STEPS


OFFLINE_ALGOS = tuple(algo for algo in ALGOS if not samples_completions(algo))
"""The algorithms that train on given completions (the rows' answers, DPO's pairs) and sample none: their steps
(LLMTrainer.sft_step, dpo_step) draw rows; every other algorithm's step samples `group_size` completions per
prompt (LLMTrainer.sample_groups). All of them decode greedily to evaluate, in the learner."""
SAMPLING_ALGOS = tuple(algo for algo in ALGOS if samples_completions(algo))
SAMPLING_SETTINGS = (
    "generation_workers",
    "generation_backend",
    "group_size",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "updates_per_batch",
    "dynamic_sampling",
    "max_sampling_rounds",
    "overlong_filter",
    "overlong_buffer",
    "overlong_penalty",
)
"""Settings that only act on sampled completions (how they are sampled, filtered, rewarded and reused), so an
algorithm that samples none refuses a value other than its default. Not max_new_tokens: the evaluation's greedy
decoding uses it."""
PREFERENCE_SETTINGS = (
    "label_smoothing",
    "preference_loss",
    "f_divergence",
    "f_alpha",
    "ld_alpha",
    "simpo_gamma",
    "discopop_tau",
    "use_weighting",
    "sync_ref_model",
    "ref_model_sync_steps",
    "ref_model_mixup_alpha",
)
"""The settings of the pairwise preference losses (objectives.preference.PreferenceSettings, which losses, LD-DPO,
WPO, TR-DPO); beta is KTO's too."""
REFERENCE_SYNC_SETTINGS = ("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha")
"""TR-DPO's moving reference (TRL's DPOConfig and GRPOConfig settings): the preference losses' reference, or the
policy-gradient losses' KL reference."""
TPO_SETTINGS = ("preference_loss", "label_smoothing", "simpo_gamma")
"""The preference settings TPO's step reads too (its losses have no reference, no f-divergence and no weights)."""
TPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
"""TPO's pair losses: TRL's TPO loss types sigmoid, hinge, ipo and tpo-l, each with the reference's log-probs 0."""
UNPAIRED_SETTINGS = ("unpaired_loss", "desirable_weight", "undesirable_weight")
"""KTO's settings (objectives.preference.unpaired_loss)."""
VESPO_SETTINGS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
A2PO_SETTINGS = ("num_value_samples", "beta1", "beta2", "filter_all_incorrect")
ULD_SETTINGS = (
    "use_extended_uld",
    "uld_token_merge_strategy",
    "uld_use_hybrid_loss",
    "uld_crossentropy_weight",
    "uld_distillation_weight",
    "uld_student_temperature",
    "uld_teacher_temperature",
    "uld_skip_student_eos",
    "uld_skip_teacher_eos",
    "teacher_tokenizer",
)
"""GOLD's settings of the ULD loss (TRL's GOLDConfig), read only with use_uld_loss."""
HYBRID_ULD_WEIGHTS = ("uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight")
ULD_MERGE_STRATEGIES = ("observed", "bayesian")
SELF_DISTILLATION_SETTINGS = (
    "distillation_mode",
    "distillation_alpha",
    "distillation_topk",
    "distillation_add_tail",
    "teacher_model_kind",
    "teacher_update_rate",
    "teacher_sync_steps",
)
"""The settings of SDFT's and SDPO's self-distillation."""
MINILLM_SETTINGS = ("rkl_advantage", "single_step_decomposition", "kd_temperature", "length_normalization")
"""MiniLLM's settings (LLMTrainer.minillm_terms); `gamma` too, PPO's name for a discount."""
SDFT_SETTINGS = ("num_loss_tokens_to_skip", "generate_from_teacher", "teacher_prompt_template")
SDPO_SETTINGS = (
    "distillation_weight",
    "distillation_is_clip",
    "use_successful_as_teacher",
    "success_reward_threshold",
    "dont_reprompt_on_self_success",
    "reprompt_template",
    "solution_template",
    "feedback_template",
    "include_environment_feedback",
    "environment_feedback_only_without_solution",
    "remove_thinking_from_demonstration",
)
SDFT_MODES = ("topk_logits", "full_logits", "sampled_token")
SELF_DISTILLING = ("sdft", "sdpo")
"""The algorithms whose teacher is the model itself (teacher_model_kind)."""
SDFT_TEACHERS = ("base", "live", "ema")
BEMA_SETTINGS = (
    "bema_update_ref_model",
    "bema_ref_model_update_freq",
    "bema_ref_model_update_after",
    "bema_update_freq",
    "bema_ema_power",
    "bema_bias_power",
    "bema_lag",
    "bema_update_after",
    "bema_multiplier",
    "bema_min_ema_multiplier",
)
ADAPTIVE_ENTROPY_SETTINGS = ("entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max")
GRPO_LOSS_OPTIONS = (
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "use_adaptive_entropy",
    *ADAPTIVE_ENTROPY_SETTINGS,
)
"""The options of TRL's GRPOTrainer loss beyond the loss types (LLMConfig's fields of these names)."""
EVALUATION_SEED_OFFSET = 1_000_003
"""The sampled evaluation's generator seed: the run's seed plus this plus the step (LLMTrainer.evaluation_stream)."""
IMPORTANCE_SAMPLING_SETTINGS = (
    "importance_sampling_correction",
    "importance_sampling_mode",
    "importance_sampling_clip_min",
    "importance_sampling_clip_max",
)
"""TRL's vllm_importance_sampling_* settings, for any sampler (LLMTrainer.corrected_for_sampler)."""
SETTING_READERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(SAMPLING_SETTINGS, SAMPLING_STEPS),
    **dict.fromkeys(("dynamic_sampling", "max_sampling_rounds"), GROUP_SAMPLING_STEPS),  # they refill groups
    **dict.fromkeys(("overlong_buffer", "overlong_penalty"), REWARDED_STEPS),  # they act on rewards
    "missing_eos_penalty": ("online_dpo_step", *PAIRED_SAMPLING_STEPS),
    "max_length": ("sft_step", *ROW_PAIR_STEPS, "distill_step"),
    "updates_per_batch": POLICY_LOSS_STEPS,  # online DPO makes one preference update per batch
    "steps_per_generation": ("rl_step",),
    # sdpo's self-distillation reads each group's rows, which a kept group does not carry
    "replay_buffer_size": tuple(a for a in ALGOS if training_step(a) == "rl_step" and a != "sdpo"),
    "reward_clip_range": ("rl_step",),
    "kl_in_reward": ("rl_step",),
    **dict.fromkeys(IMPORTANCE_SAMPLING_SETTINGS, ("rl_step",)),
    "normalize_advantages": ("rl_step",),
    "sft_loss": ("sft_step",),
    "assistant_only_loss": ("sft_step",),
    "dataset_text_field": ("sft_step",),
    "completion_only_loss": ("sft_step",),
    "neftune_noise_alpha": ("sft_step",),
    "filter_empty": ("ssd_step",),
    **dict.fromkeys(("log_completions", "num_completions_to_print"), REWARDED_STEPS),
    # every algorithm's evaluation decodes, but the reward model's (its held-out pairs)
    "num_generations_eval": tuple(dict.fromkeys(training_step(a) for a in ALGOS if a not in SCORING_ALGOS)),
    "overlong_filter": ("rl_step",),  # rl_step masks the cut completions; ppo_step and online_dpo_step do not
    **dict.fromkeys(
        (
            "loss",
            "clip_low",
            "clip_high",
            "dual_clip",
            "tau_pos",
            "tau_neg",
            "aggregation",
            "kl_coef",
            "kl_estimator",
            "entropy_coef",
            "micro_batch_size",
            *GRPO_LOSS_OPTIONS,
        ),
        POLICY_LOSS_STEPS,
    ),
    **dict.fromkeys(VESPO_SETTINGS, ("rl_step",)),
    **dict.fromkeys(
        (
            "advantage",
            "multi_objective_aggregation",
            "mix",
            "mix_weight",
            "mix_phi",
            "shaping_gamma",
            "expert",
            "expert_batch_size",
        ),
        ("rl_step",),
    ),
    **dict.fromkeys(("vf_coef", "gae_lambda"), ("ppo_step",)),
    "gamma": ("ppo_step", "minillm"),  # GAE's discount; MiniLLM's, of the reverse-KL rewards
    **dict.fromkeys(PREFERENCE_SETTINGS, PREFERENCE_STEPS),
    **dict.fromkeys(TPO_SETTINGS, (*PREFERENCE_STEPS, "tpo_step")),
    **dict.fromkeys(REFERENCE_SYNC_SETTINGS, (*PREFERENCE_STEPS, *POLICY_LOSS_STEPS)),
    "tpo_alpha": ("tpo_step",),
    "beta": (*PREFERENCE_STEPS, "nash_md_step", "tpo_step", "kto_step", "distill_step"),
    "alpha": ("xpo_step",),
    "mixture_coef": ("nash_md_step",),
    "teacher": ("distill_step", "minillm"),
    **dict.fromkeys(("lmbda", "seq_kd", "distill_loss", "iw_opd_gamma"), ("distill_step",)),
    **dict.fromkeys(MINILLM_SETTINGS, ("minillm",)),
    **dict.fromkeys(A2PO_SETTINGS, ("a2po_step",)),
    **dict.fromkeys(("use_uld_loss", *ULD_SETTINGS, *HYBRID_ULD_WEIGHTS), ("gold",)),
    **dict.fromkeys(SELF_DISTILLATION_SETTINGS, ("sdft_step", "sdpo")),
    **dict.fromkeys(SDFT_SETTINGS, ("sdft_step",)),
    **dict.fromkeys(SDPO_SETTINGS, ("sdpo",)),
    **dict.fromkeys(UNPAIRED_SETTINGS, ("kto_step",)),
    "pairs": ROW_PAIR_STEPS,
    "precompute_ref_log_probs": ("dpo_step",),
    "center_rewards_coefficient": ("reward_step",),
    **dict.fromkeys(("step_separator", "train_on_last_step_only"), ("prm_step",)),
}
"""The settings that only some training steps read, and which: an algorithm whose step does not read one refuses
a value of it other than the algorithm's default (LLMConfig._check_unused_settings), naming the algorithms that
read it.
Every other setting is read by every algorithm (the model, the task's rows and rewards, the optimizer, the
evaluation, ...). sft_step reads none of these (its loss is the answers' token-mean NLL, no reference model)."""
READER_NAMES = {
    SAMPLING_STEPS: "the algorithms that sample",
    REWARDED_STEPS: "the algorithms that sample and reward",
    GROUP_SAMPLING_STEPS: "the algorithms that sample and reward groups",
    ("distill_step",): "the distillation algorithms",
    POLICY_LOSS_STEPS: "the policy-gradient algorithms",
    ("rl_step",): "the group-advantage algorithms",
}
STEP_SUMMARIES = {
    "sft_step": "trains on the rows' answers and samples no completions",
    "dpo_step": "trains on (chosen, rejected) pairs and samples no completions",
    "tpo_step": "trains on (chosen, rejected) pairs and gold completions and samples no completions",
    "kto_step": "trains on completions labelled desirable or not and samples no completions",
    "reward_step": "trains a reward model on (chosen, rejected) pairs and samples no completions",
    "online_dpo_step": "makes one preference update per batch, on the best and worst of its own samples",
    "xpo_step": "makes one preference update per batch, on its own samples against the reference's",
    "nash_md_step": "trains on its own samples against samples of its mixture with the reference",
    "ppo_step": "trains on GAE advantages from a value head",
    "rl_step": "trains on group advantages",
    "distill_step": "trains toward a teacher's next-token distributions",
    "a2po_step": "regresses its implicit reward onto the optimal advantage",
    "sdft_step": "distills the model given each row's privileged context into the model without it",
    "ssd_step": "fine-tunes on its own samples, without rewards",
    "prm_step": "trains a step classifier on stepwise rows and samples no completions",
}


@functools.cache
def setting_readers(name: str) -> tuple[str, ...]:
    """The algorithms whose training step reads setting `name` (or that SETTING_READERS names themselves)."""
    steps = SETTING_READERS.get(name)
    return tuple(algo for algo in ALGOS if steps is None or training_step(algo) in steps or algo in steps)


LOSSES = ("ppo", "gspo", "gspo_token", "cispo", "sapo", "luspo", "vespo", "gmpo")
DISTILL_LOSSES = ("jsd", "sampled", "iw_opd")
SEQUENCE_LOSSES = ("gspo", "luspo", "gmpo")
"""The losses whose importance ratio is one per sequence."""
MIXES = ("none", "chord", "luffy")


@dataclass
class LLMConfig:
    algo: str = "grpo"
    model: str = "tiny-llama"
    """A built-in tiny model (random weights), a run directory, or a local save_pretrained directory."""
    task: str = "addition"
    steps: int = 200
    seed: int = 0
    lr: float = 3e-4
    """3e-3 for SFT, 1e-3 for reward models, 1e-4 for the preference algorithms (at 1e-3 DPO collapsed the tiny
    models of the built-in tasks; RL at 2e-3 did too)."""
    batch_size: int = 16
    """Prompts per step (SFT: examples per step)."""
    group_size: int = 8
    """Completions sampled per prompt."""
    max_new_tokens: int | None = None
    """None: the task's."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample from the top_k most likely tokens only (0: all)."""
    min_p: float = 0.0
    """Sample only tokens of probability >= min_p times the most likely one's (0: all)."""
    repetition_penalty: float = 1.0
    """Divide the positive logits of the tokens already in the row (prompt and completion so far) by it, multiply
    the negative ones (1.0: off; transformers' and TRL's). top_k, top_p, min_p and the penalty shape what is sampled;
    the behaviour log-probs, as training's, are those of softmax(logits / temperature)."""
    advantage: str = "grpo"
    """A GROUP_ADVANTAGES name: grpo, grpo_batch (TRL's scale_rewards="batch"), dr_grpo, rloo, reinforce++."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """With several reward functions (TRL's setting of the name): sum_then_normalize, the weighted sum's
    `advantage`; normalize_then_sum, GDPO: each function's rewards normalized in its group, the weighted sum of
    those normalized over the batch (objectives.advantages.decoupled_group_advantages), in place of the algorithm's
    advantage (one set explicitly is refused)."""
    loss: str = "ppo"
    """ppo (token-level clipped surrogate), gspo (sequence-level), gspo_token (GSPO's sequence ratio at each
    token with the token's own gradient: advantages may differ per token), cispo (clipped constant IS weight), sapo (a
    soft sigmoid gate on the ratio instead of a clip), luspo (gspo with each sequence's loss times its length),
    vespo (REINFORCE weighted by a gamma function of the sequence ratio; group advantages only), gmpo (the
    geometric mean of the token ratios, each clipped in log space: clip_low / clip_high are log bounds)."""
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    """VESPO's gamma weights phi(w) = e^lambda w^k e^(-lambda w): (k, lambda) where A >= 0 and where A < 0."""
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    """SAPO's gate temperatures for positive and negative advantages."""
    aggregation: str = "seq-mean-token-mean"
    updates_per_batch: int = 1
    """Gradient steps per rollout batch (> 1: later steps see stale rollouts, corrected by the clipped ratio)."""
    kl_in_reward: bool = False
    """RLOO's KL (TRL's RLOOTrainer): kl_coef times each completion's k1 estimate sum_t (log pi_old - log pi_ref)
    subtracted from its reward before the advantages, instead of a KL term in the loss."""
    reward_clip_range: list[float] | None = None
    """Clip each completion's reward to [low, high] before its advantage (TRL's RLOOConfig option; None: off)."""
    normalize_advantages: bool = False
    """Whiten the advantages over the batch's scored completions, (A - mean) / (std + 1e-4), after the group
    estimator (TRL's RLOOConfig option)."""
    num_generations_eval: int = 1
    """Completions sampled per evaluation row at each evaluation, beside the greedy one (TRL's setting; 1: the
    greedy one only): eval.csv gains pass@k and their mean reward, sampled_reward."""
    filter_empty: bool = False
    """SSD: leave empty and one-line stub completions (shorter than 10 characters) out of the loss (the paper's
    filter for code; TRL's SSDConfig default is true, which on a one-line task such as the built-in ones would
    drop every completion)."""
    neftune_noise_alpha: float | None = None
    """SFT with NEFTune (Jain et al. 2023; transformers' TrainingArguments setting, which TRL's SFTTrainer takes):
    uniform noise in [-a, a], a = alpha / sqrt(L d) (L the batch's sequence length, d the embedding width), added
    to the input embeddings of each training pass, drawn from the run's generator. None: off. Its passes run
    through the model's own forward (the fast passes take token ids, not embeddings)."""
    completion_only_loss: bool = True
    """SFT on prompt-completion rows: train on the completion's tokens only (TRL's SFTConfig setting, whose
    default, None, means this for such rows); false: on every token of prompt and completion after the first."""
    dataset_text_field: str = "text"
    """SFT on plain text (TRL's SFTConfig setting and language-modeling rows): a row with this field and neither
    a prompt nor messages is trained on whole, every token after the first (the tokenizer's own special tokens, a
    Llama's BOS, added) and EOS; evaluation rows of plain text are scored by their token-mean NLL (eval.csv's
    loss), perplexity and mean_token_accuracy instead of exact match."""
    assistant_only_loss: bool = False
    """SFT on `messages` rows: train on the assistant's tokens only (TRL's SFTConfig setting; the chat template
    must mark them with {% generation %}), not on the whole conversation."""
    sft_loss: str = "nll"
    """SFT's loss: nll, or dft (Dynamic Fine-Tuning, Wu et al. 2025; TRL's SFTConfig loss_type): each token's NLL
    times its probability, without gradient through the weight."""
    steps_per_generation: int = 1
    """Sample steps_per_generation x batch_size prompts' groups at once, compute their advantages together, and
    make one optimizer step per slice of batch_size groups, in order (times updates_per_batch, the slices in turn):
    TRL's option of the name, except that a step here is the whole generation batch (TRL counts each optimizer
    step). The slices after the first train off-policy, through the clipped ratio."""
    clip_low: float | None = 0.2
    clip_high: float | None = None
    """None: clip_low (symmetric); DAPO's clip-higher uses 0.28."""
    dual_clip: float | None = None
    """Dual-clip PPO's bound c > 1: where A < 0 the loss is at most -c A (TRL's `delta`, INTELLECT-2's two-sided
    clipping, is the same bound)."""
    kl_coef: float = 0.0
    """Weight of the KL to the initial model (its copy is kept only when this is non-zero)."""
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    """Each token's KL estimate times its ratio pi / pi_old (differentiable), so that its gradient is the unbiased
    reverse-KL gradient (DeepSeek-V3.2; TRL's option of the name, on by default there)."""
    top_entropy_quantile: float = 1.0
    """rho of "Beyond the 80/20 rule" (Wang et al. 2025): only the batch's top-rho share of completion tokens by the
    entropy of their distribution carry the policy loss (0.2 in the paper; 1: every token). The denominator of the
    aggregation still counts every token, as TRL's."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask: sequences with a negative advantage whose mean token KL(pi_old ||
    pi) exceeds this leave the policy loss (later updates of a batch; e.g. 0.5; None: off)."""
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    """Skywork-OR1's adaptive entropy control: after each update the coefficient (from entropy_coef) moves by
    entropy_coef_delta, up while the batch's token-mean entropy is at or below entropy_target, down otherwise,
    within [entropy_coef_min, entropy_coef_max]; the bonus applies only while the last update's entropy was at or
    below the target (TRL's rule; saved in the checkpoints)."""
    entropy_target: float = 0.2
    entropy_coef_delta: float = 0.005
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    max_grad_norm: float | None = 1.0
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts, up to
    `max_sampling_rounds` generations per step, so the step has `batch_size` informative groups if it can."""
    max_sampling_rounds: int = 4
    replay_buffer_size: int = 0
    """Keep up to this many past groups whose rewards differ, each scored by the sum over its completions of
    |advantage| x its rewards' std, and train on groups drawn from them (in proportion to the scores) in place of
    a step's groups whose rewards are all equal (TRL 1.10's GRPOWithReplayBufferTrainer, whose default is
    64; 0: off). A drawn group keeps its advantages and its behaviour log-probs (the clipped ratio corrects for
    the weights since)."""
    overlong_filter: bool = False
    """DAPO: completions cut by max_new_tokens (no EOS) leave the loss."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: a completion longer than max_new_tokens - overlong_buffer loses up to
    `overlong_penalty` reward, linearly over the buffer (0: off)."""
    overlong_penalty: float = 1.0
    max_length: int | None = 1024
    """The algorithms that train on given completions (sft, the pair and unpaired preference algorithms, reward
    models, and distill's and gkd's steps on the rows' answers): each example's prompt and completion tokens beyond
    the first max_length are dropped (TRL's SFTConfig, DPOConfig, KTOConfig and RewardConfig max_length, its
    truncation_mode keep_start); a prompt that long leaves its example no completion token. None: no truncation."""
    missing_eos_penalty: float | None = None
    """online_dpo, xpo and nash_md: subtracted from the reward of every completion that ends without its EOS (cut at
    max_new_tokens), to favour completions that finish (TRL's OnlineDPOConfig option; None: off)."""
    mix: str = "none"
    """chord: SFT on expert completions mixed into the RL loss (CHORD, Zhang et al. 2025); luffy: one expert
    completion in every group, trained with policy shaping instead of a clipped ratio (LUFFY, Yan et al.
    2025); none."""
    shaping_gamma: float = 0.1
    """LUFFY's policy shaping f(p) = p / (p + gamma) on the expert's tokens."""
    mix_weight: str = "cosine:0.5->0.02"
    """mu's schedule over the run (objectives.imitation.parse_schedule)."""
    mix_phi: bool = False
    """CHORD-phi: weight each expert token by p (1 - p), p its probability under the policy."""
    expert: str | None = None
    """A JSONL file of expert rows ({"prompt", "completion"}) for `mix`; None: the training rows (the task's
    answers)."""
    expert_batch_size: int | None = None
    """Expert completions per step (None: batch_size). The expert completion of a row is its `completion`
    field, else its `answer`."""
    beta: float = 0.1
    """The preference losses' beta: DPO's inverse temperature of the implicit reward beta log(pi / pi_ref), IPO's
    tau, SimPO's scale of the length-normalized log-prob, ORPO's weight lambda of the odds-ratio loss. Distillation:
    the divergence, in [0, 1] (objectives.imitation.generalized_jsd: 0 forward KL, 1 reverse KL, 0.5 JSD). Nash-MD:
    the weight of its KL(pi || pi_ref) term."""
    alpha: float = 1e-5
    """xpo: the weight of XPO's exploration term, alpha times the policy's log-probability of the reference's
    sample in each pair, which the loss lowers (Xie et al. 2024; TRL's XPOConfig.alpha)."""
    mixture_coef: float = 0.5
    """nash_md: m, the reference's share of the geometric mixture pi^(1 - m) pi_ref^m that samples the opponent
    of each of the policy's samples (TRL's NashMDConfig.mixture_coef)."""
    teacher: str | None = None
    """distill and gkd: the teacher model (a run directory, a save_pretrained directory or a built-in tiny model),
    a causal LM of any architecture or size whose vocabulary is the student's."""
    lmbda: float = 1.0
    """distill and gkd: the share of steps that train on the student's own samples (GKD's lambda: each step draws
    it); the other steps train on the rows' answers, or with seq_kd on the teacher's samples."""
    seq_kd: bool = False
    """gkd: the steps off the student's samples train on completions the teacher samples (sequence-level KD)
    instead of the rows' answers."""
    distill_loss: str = "jsd"
    """distill and gkd: jsd (the divergence between the whole next-token distributions, `beta`), sampled
    (REINFORCE on the per-token reverse-KL sample log p_teacher(y_t) - log p_student(y_t) of the completion's own
    tokens: the teacher's log-prob of each token is all it reads), or iw_opd (sampled, each token weighted down
    after a large accumulated discrepancy, `iw_opd_gamma`)."""
    iw_opd_gamma: float = 0.5
    use_uld_loss: bool = False
    """gold: Universal Logit Distillation (Boizard et al. 2024), for a teacher with another tokenizer
    (llm/cross_tokenizer.py): the teacher reads the prompt and the completion's text in its own tokens, and the loss
    is the L1 distance between the two models' sorted next-token probabilities at aligned positions, instead of the
    generalized JSD. The uld_* settings are TRL's GOLDConfig's, with its defaults."""
    use_extended_uld: bool = True
    """gold: align the two tokenizations by the bytes of text each token spells, merging the distributions of a
    token the other side splits (byte-level or character-level tokenizers); false: position by position."""
    uld_token_merge_strategy: str = "observed"
    """gold: observed, the distributions at each completion token's own position (predicting the next one), a
    split token's first position times the probabilities of its later pieces; bayesian, the distributions that
    predict each token, its last position times the earlier pieces' probabilities (the chain rule)."""
    uld_use_hybrid_loss: bool = False
    """gold: on the tokens both vocabularies spell alike, the generalized JSD (beta) of their probabilities; the
    sorted L1 distance on the rest."""
    uld_hybrid_matched_weight: float | None = None
    """gold's hybrid loss: the weight of its matched part (None with the unmatched one: the share of the teacher's
    vocabulary both spell alike, and the rest)."""
    uld_hybrid_unmatched_weight: float | None = None
    uld_crossentropy_weight: float = 0.0
    """gold: the weight of the completion tokens' NLL added to the ULD loss."""
    uld_distillation_weight: float = 1.0
    uld_student_temperature: float = 1.0
    uld_teacher_temperature: float = 1.0
    uld_skip_student_eos: bool = True
    """gold: leave each completion's last token (its EOS) out of the student's side of the alignment."""
    uld_skip_teacher_eos: bool = True
    teacher_tokenizer: str | None = None
    """gold with use_uld_loss: the teacher's tokenizer (a save_pretrained directory); None: the teacher's own."""
    num_value_samples: int = 8
    """a2po: the reference policy's samples per training prompt behind its V* estimate (stage 1)."""
    beta1: float = 0.5
    """a2po: the KL temperature of V*(x) = beta1 log mean exp(r / beta1)."""
    beta2: float = 1e-3
    """a2po: the KL temperature of the implicit reward beta2 log(pi / pi_ref) of stage 2."""
    filter_all_incorrect: bool = True
    """a2po: drop the training prompts whose reference samples all scored 0 (no signal)."""
    distillation_mode: str = "topk_logits"
    """sdft: topk_logits (the divergence on the student's `distillation_topk` most likely tokens), full_logits (on
    the whole vocabulary) or sampled_token (REINFORCE on log p_teacher(y_t) - log p_student(y_t) of the sampled
    tokens, reverse KL: distillation_alpha 1)."""
    distillation_alpha: float = 0.5
    """sdft: the divergence, in [0, 1], as distillation's `beta` (0 forward KL, 1 reverse KL, 0.5 JSD)."""
    distillation_topk: int = 100
    """sdft: the student's top tokens topk_logits compares on (at least the vocabulary: all of it)."""
    distillation_add_tail: bool = False
    """sdft: topk_logits keeps the mass outside the top tokens as one more category, rather than renormalizing."""
    num_loss_tokens_to_skip: int = 0
    """sdft: the first completion tokens left out of the loss (where the teacher's prompt shows most)."""
    teacher_model_kind: str = "base"
    """sdft: the teacher's weights: base (the initial model's, frozen), live (the model's own, without gradient)
    or ema (a moving average of the model's: `teacher_update_rate`, every `teacher_sync_steps` steps)."""
    teacher_update_rate: float = 0.05
    """sdft with teacher_model_kind=ema: teacher <- rate model + (1 - rate) teacher (1: a copy)."""
    teacher_sync_steps: int = 1
    """sdft with teacher_model_kind=ema: the steps between the teacher's updates."""
    generate_from_teacher: bool = False
    """sdft: the model samples its completions from the teacher's prompt (with the privileged context) instead of
    the row's own prompt."""
    teacher_prompt_template: str = "{prompt}\n\n{privileged_context}"
    """sdft: the teacher's prompt from the row's prompt and its `privileged_context` (for a conversational prompt,
    the last user message's text becomes this, as in TRL)."""
    distillation_weight: float = 1.0
    """sdpo: the loss is (1 - weight) times the policy loss plus weight times the self-distillation loss (1: the
    self-distillation alone, 0: GRPO)."""
    distillation_is_clip: float | None = 2.0
    """sdpo: each token's self-distillation loss weighted by min(pi / pi_sampler, clip) (held), the sampler's
    probability of the token its own (1 at a batch's first update; later updates and steps_per_generation's
    slices drift from it); None: no weight."""
    use_successful_as_teacher: bool = True
    """sdpo: a successful completion of the group is the teacher's demonstration for the others."""
    success_reward_threshold: float = 1.0
    """sdpo: the reward from which a completion counts as successful."""
    dont_reprompt_on_self_success: bool = True
    """sdpo: a completion's own success is not its demonstration (another of its group's must be)."""
    reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    """sdpo: the teacher's prompt from the prompt, the solution text and the feedback text."""
    solution_template: str = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
    """sdpo: the solution text from the successful completion's text."""
    feedback_template: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
    """sdpo: the feedback text from the row's `privileged_context` (include_environment_feedback)."""
    include_environment_feedback: bool = False
    """sdpo: the row's `privileged_context` also goes into the teacher's prompt, as feedback."""
    environment_feedback_only_without_solution: bool = False
    """sdpo: the feedback only where no successful completion is there to show."""
    remove_thinking_from_demonstration: bool = False
    """sdpo: the demonstration without its <think>...</think> blocks."""
    label_smoothing: float = 0.0
    """The assumed share of flipped labels of the losses that take one: sigmoid (conservative DPO), robust,
    exo_pair, aot, aot_unpaired, cpo, simpo; 0: plain DPO."""
    preference_loss: str = "sigmoid"
    """The preference algorithms' loss: one of objectives.preference.PREFERENCE_LOSSES (TRL's DPO loss types and
    the reference-free cpo, simpo, orpo) or a weighted sum, `0.8*sigmoid+0.2*bco_pair+sft`. The reference model
    is kept only when a loss of it reads one."""
    f_divergence: str = "reverse_kl"
    """f-DPO's divergence (reverse_kl: DPO's), for sigmoid, hinge, ipo, exo_pair, robust, discopop, sigmoid_norm."""
    f_alpha: float = 0.5
    """The alpha of f_divergence=alpha_divergence."""
    ld_alpha: float | None = None
    """LD-DPO: the weight of each pair's tokens past the shorter completion in the sequence log-probs (None: 1)."""
    simpo_gamma: float = 1.0
    """SimPO's target margin gamma (beta 2.0 with gamma 1.0: gamma / beta = 0.5, the paper's usual ratio)."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature."""
    use_weighting: bool = False
    """WPO: weight each pair's loss by how likely the policy is to sample its two completions
    (objectives.preference.pair_logps)."""
    unpaired_loss: str = "kto"
    """The unpaired loss type (kto's and bco's steps): kto, apo_zero_unpaired or bco
    (objectives.preference.unpaired_loss); the algorithm bco sets bco."""
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    """KTO's weights of the desirable and undesirable completions' losses."""
    precompute_ref_log_probs: bool = False
    """The pairwise algorithms with a pairs file: the reference's sequence log-probs of every pair computed once
    before the first step, and the reference model dropped (TRL's option of the same name): steps without a
    reference pass, and its memory back."""
    tpo_alpha: float = 1.0
    """TPO: the weight of the gold completions' NLL (token mean over the batch); 0 drops the term and its pass."""
    step_separator: str = "\n"
    """prm: the text after each step of a stepwise completion; the classifier reads the state at its last token
    (TRL's PRMConfig setting)."""
    train_on_last_step_only: bool = False
    """prm: train on each row's last step's label only (TRL's PRMConfig setting); evaluation reads every step."""
    center_rewards_coefficient: float = 0.0
    """reward_model: weight of mean((r(y_w) + r(y_l))^2), which keeps the rewards centred at 0 (Eisenstein et al.
    2023; TRL's option of the same name)."""
    sync_ref_model: bool = False
    """TR-DPO (Gorbatovski et al. 2024): every `ref_model_sync_steps` steps the reference becomes
    ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference (saved in the checkpoints): the
    preference losses' reference, or the policy-gradient algorithms' KL reference (kl_coef > 0; TRL's GRPOConfig
    option of the same name)."""
    ref_model_sync_steps: int = 512
    ref_model_mixup_alpha: float = 0.6
    pairs: str | None = None
    """DPO and the other pairwise algorithms: a JSONL file of {"prompt", "chosen", "rejected"} rows; None: the
    task's answers as chosen and each with one character changed as rejected. KTO: rows of {"prompt",
    "completion", "label"} (label true: desirable), or pairs (each a desirable and an undesirable row)."""
    vf_coef: float = 0.5
    """PPO: weight of the value loss (a linear value head on the policy's last hidden state)."""
    gamma: float = 1.0
    """PPO: GAE's discount. minillm: the discount of the per-token reverse-KL rewards summed into each token's
    advantage (its default 0: each token's own reward)."""
    gae_lambda: float = 0.95
    rkl_advantage: bool = True
    """minillm: add each token's reverse-KL advantage (the teacher's log-prob of the token minus the model's,
    discounted by `gamma` over the rest of the completion) to its group advantage (TRL's MiniLLMConfig setting)."""
    single_step_decomposition: bool = True
    """minillm: add the token-mean KL(pi || p_teacher) of the whole next-token distributions at each completion
    position to the loss (MiniLLM's single-step decomposition)."""
    kd_temperature: float = 1.0
    """minillm: the temperature both models' logits are divided by in its two teacher terms."""
    length_normalization: bool = True
    """minillm with gamma > 0: divide each token's discounted sum of reverse-KL rewards by its discounted count of
    tokens."""
    micro_batch_size: int | None = None
    """Completions per forward/backward pass; the gradients of the micro-batches add up to the full batch's
    (the same update, less memory). None: the whole batch at once. Only the policy-gradient algorithms (not sft,
    dpo, online_dpo, distill, gkd: their steps take the whole batch at once)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (transformers' own; less memory)."""
    lora_rank: int = 0
    """> 0: train LoRA adapters of this rank on every linear layer (peft) instead of all weights; the saved model
    has them merged in."""
    lora_alpha: int = 16
    bema: bool = False
    """Keep a bias-corrected exponential moving average of the weights (BEMA, Block and Zhang 2025; TRL's
    BEMACallback), theta' = EMA_t + alpha_t (theta_t - theta_0), updated every bema_update_freq steps after
    bema_update_after, with beta_t = max((lag + multiplier t)^-ema_power, min_ema_multiplier) and alpha_t =
    (lag + multiplier t)^-bias_power; saved as the run's model_bema/ (and in the checkpoints)."""
    bema_update_freq: int = 400
    bema_ema_power: float = 0.5
    bema_bias_power: float = 0.2
    bema_lag: int = 10
    bema_update_after: int = 0
    bema_multiplier: float = 1.0
    bema_min_ema_multiplier: float = 0.0
    bema_update_ref_model: bool = False
    """With bema: the reference model (DPO's, KTO's, the KL penalty's, A*-PO's) becomes BEMA's weights every
    bema_ref_model_update_freq steps after bema_ref_model_update_after (TRL's experimental BEMA for the reference
    model): a lagged, smoothed copy of the policy instead of the starting model."""
    bema_ref_model_update_freq: int = 400
    bema_ref_model_update_after: int = 0
    eval_every: int = 50
    eval_size: int = 200
    train_size: int = 20_000
    """Rows of the task generated for training (the evaluation rows come from another seed)."""
    prompts: str | None = None
    """A JSONL file of {"prompt": ..., other fields} rows instead of the task's; the last eval_size rows (at most
    a fifth of the file) are held out for evaluation unless `eval_prompts` is given."""
    eval_prompts: str | None = None
    """A JSONL file of evaluation rows (then every row of `prompts` trains)."""
    rewards: list[str] = field(default_factory=list)
    """Reward functions, each `name`, `module:function` or either with `=weight`, summed; empty: the task's
    (exact_match with a prompts file)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends after the first one it writes (the tokens after it are dropped)."""
    tools: list[str] = field(default_factory=list)
    """Tools the completions may call (TRL's GRPOTrainer `tools`), each a built-in (calculator) or
    `module:function`; with the task's own (the calculator task's calculator). llm/tools.py has the protocol."""
    importance_sampling_correction: bool = False
    """Correct for a sampler whose log-probs are not the trainer's (TRL's vllm_importance_sampling_correction;
    here: generation workers, a rollout_func's external sampler): the trainer's log-probs at the sampling weights
    become the ratio's old log-probs, and the loss is weighted by their ratio to the sampler's
    (objectives.policy.sampler_correction_weights). Group-advantage algorithms."""
    importance_sampling_mode: str = "sequence_mask"
    """token_truncate, token_mask, sequence_truncate or sequence_mask (TRL's default)."""
    importance_sampling_clip_min: float | None = None
    importance_sampling_clip_max: float | None = 3.0
    """The bounds of the correction's ratios (TRL's C_min, C_max): clamped to them, or 0 outside them."""
    rollout_func: str | None = None
    """`module:function` making the completions itself (TRL's GRPOTrainer `rollout_func`): called with one prompt
    per completion wanted (a group's prompt `group_size` times) and the trainer (`trainer.rollout_greedy`: the
    greedy evaluation's call), it returns {"completion_ids", "logprobs", optionally "prompt_ids" and "env_mask"
    (0 on tokens that are not the model's), any other field a reward column}, one entry per prompt."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the chat template with every rendering (TRL's setting; e.g. {enable_thinking: false})."""
    tool_results: str = "auto"
    """How a tool's result joins the completion: tags (between tool_response_start and tool_response_end, right
    after the call), template (the model's turn ends at its EOS, then what the chat template renders for a tool
    message and the next assistant turn, TRL's way; the prompts describe the tools), or auto: template for
    conversational prompts with a chat template, else tags."""
    environment: str | dict[str, str] | None = None
    """An environment class, `module:Class` (TRL's GRPOTrainer `environment_factory`): each completion gets an
    instance, reset with its row (`reset(**row)`, whose text, if any, is appended to the prompt); its public
    methods are that completion's tools, and its `get_reward()`, if defined, a reward of weight 1 (alone, without
    --reward). Several as {name: module:Class}: each row's `environment` field picks one. llm/tools.Environments."""
    max_tool_calling_iterations: int | None = None
    """The most tool calls a completion makes (TRL's name; None: as many as fit in max_new_tokens)."""
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    tool_response_start: str | None = None
    tool_response_end: str | None = None
    """The tags around a call and around its result (None: the task's, else the Hermes format's <tool_call>,
    </tool_call>, <tool_response>, </tool_response>)."""
    log_completions: bool = False
    """Write each step's sampled completions to the run's completions.jsonl (TRL's setting): step, prompt,
    completion, reward and, for the group-advantage algorithms, the advantage."""
    num_completions_to_print: int | None = None
    """With log_completions, the first this many of each step's completions (TRL's name; None: all)."""
    disable_dropout: bool = False
    """Dropout off in training too (the model's and the reference's dropout modules at 0; TRL's setting, with
    TRL's defaults: on for the preference algorithms, KTO, reward models and GKD, off for GRPO, RLOO, distill and
    SFT). Sampling and evaluation always run without dropout."""
    tensorboard: bool = False
    """Also write train.csv's and eval.csv's rows as TensorBoard scalars under the run's tb/ (as the control
    side's runs)."""
    threads: int = 1
    generation_workers: int = 0
    """Sample completions in this many workers, each a copy of the policy with its own generator, the weights
    sent before every generation (0: in the learner; llm/workers.py). Only for the algorithms that sample
    (SAMPLING_ALGOS: not sft, dpo)."""
    generation_backend: str = "ray"
    """ray (each worker a Ray actor with one CPU), or inline (the same workers in the learner's process)."""

    @property
    def preference_settings(self) -> PreferenceSettings:
        return PreferenceSettings(
            self.beta, self.label_smoothing, self.f_divergence, self.f_alpha, self.simpo_gamma, self.discopop_tau
        )

    @property
    def preference_terms(self) -> tuple[str, ...]:
        """The losses `preference_loss` names."""
        return tuple(name for name, _ in parse_preference_loss(self.preference_loss))

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown algorithm {self.algo!r}.{suggest(self.algo, ALGOS)}", f"one of {ALGOS}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} must be > 0", "set it to e.g. 16, or drop it")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank={self.lora_rank} must be >= 0", "set it to e.g. 8 (0: no LoRA)")
        if self.generation_workers < 0:
            raise ConfigError(f"generation_workers={self.generation_workers} must be >= 0", "set it to 0 or e.g. 2")
        if self.tool_results not in ("auto", "tags", "template"):
            raise ConfigError(f"tool_results={self.tool_results!r} is not one of auto, tags, template",
                              "set tool_results=auto")  # fmt: skip
        if self.importance_sampling_mode not in SAMPLER_CORRECTIONS:
            raise ConfigError(
                f"importance_sampling_mode={self.importance_sampling_mode!r} is not one of "
                f"{', '.join(SAMPLER_CORRECTIONS)}",
                "set importance_sampling_mode=sequence_mask (TRL's default)",
            )
        if self.importance_sampling_mode.startswith("token") and self.loss in SEQUENCE_LOSSES:
            raise ConfigError(
                f"importance_sampling_mode={self.importance_sampling_mode} weighs tokens, and loss={self.loss} is "
                "a sequence-level loss",
                "use importance_sampling_mode=sequence_mask or sequence_truncate",
            )
        if self.num_generations_eval < 1:
            raise ConfigError(
                f"num_generations_eval={self.num_generations_eval} must be >= 1", "set it to 1 (greedy only) or e.g. 8"
            )
        if self.generation_backend not in ("ray", "inline"):
            raise ConfigError(
                f"generation_backend={self.generation_backend!r} is not one of ray, inline",
                "set generation_backend=ray",
            )
        for name in ("steps", "batch_size", "group_size", "updates_per_batch", "steps_per_generation", "eval_size",
                     "train_size"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0", f"set {name} to a positive value")
        grouped = training_step(self.algo) == "rl_step" and self.advantage in ("rloo", "grpo", "grpo_batch", "dr_grpo")
        if (grouped or self.algo == "online_dpo") and self.group_size < 2:
            raise ConfigError(f"{self.algo} compares completions within a group", "set group_size to 2 or more")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"temperature={self.temperature} must be > 0 and top_p={self.top_p} in (0, 1]",
                "set temperature to e.g. 1.0 and top_p to 1.0",
            )
        if self.top_k < 0 or not 0 <= self.min_p < 1 or self.repetition_penalty <= 0:
            raise ConfigError(
                f"top_k={self.top_k} must be >= 0, min_p={self.min_p} in [0, 1) and repetition_penalty="
                f"{self.repetition_penalty} > 0",
                "set top_k=0, min_p=0 and repetition_penalty=1.0 (off), or e.g. top_k=20, min_p=0.05, "
                "repetition_penalty=1.1",
            )
        self._check_unused_settings()
        self._check_reward_aggregation()
        if self.sft_loss not in ("nll", "dft"):
            raise ConfigError(f"sft_loss={self.sft_loss!r} is not one of nll, dft", "set sft_loss=nll or dft")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            raise ConfigError(
                f"neftune_noise_alpha={self.neftune_noise_alpha} must be > 0", "set 5 (the paper's), or drop it: off"
            )
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ConfigError(
                f"reward_clip_range={list(clip)} must be [low, high] with low < high",
                "set e.g. reward_clip_range=[-1, 1]",
            )
        if self.algo == "tpo":
            self._check_tpo_settings()
        if self.use_uld_loss:
            self._check_uld_settings()
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length} must be >= 1", "set max_length=1024 (TRL's), or None")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(
                f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted from the reward)",
                "set missing_eos_penalty=1.0 (e.g.), or drop it",
            )
        if self.alpha < 0 or not 0 <= self.mixture_coef <= 1:
            raise ConfigError(
                f"alpha={self.alpha} must be >= 0 and mixture_coef={self.mixture_coef} in [0, 1]",
                "set alpha=1e-5 and mixture_coef=0.5 (TRL's XPO and Nash-MD defaults)",
            )
        if training_step(self.algo) == "sdft_step" or self.algo == "sdpo":
            self._check_self_distillation_settings()
        if self.algo == "sdpo":
            self._check_sdpo_settings()
        if training_step(self.algo) in POLICY_LOSS_STEPS:
            self._check_reference_sync()
        if training_step(self.algo) in PREFERENCE_STEPS:
            check_preference_settings(self.preference_loss, self.preference_settings)
            if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
                raise ConfigError(f"ld_alpha={self.ld_alpha} must be in [0, 1]", "set ld_alpha=0.5 (e.g.), or drop it")
            self._check_reference_sync()
            if self.precompute_ref_log_probs and (self.sync_ref_model or not needs_reference(self.preference_loss)):
                raise ConfigError(
                    "precompute_ref_log_probs=true computes the reference's log-probs once, and "
                    + ("sync_ref_model=true moves the reference" if self.sync_ref_model else
                       f"preference_loss={self.preference_loss} reads no reference"),
                    "drop precompute_ref_log_probs" + (" or sync_ref_model" if self.sync_ref_model else ""),
                )  # fmt: skip
            sorted_terms = [name for name in self.preference_terms if name in ("aot", "aot_unpaired")]
            if self.use_weighting and sorted_terms:
                raise ConfigError(
                    f"use_weighting=true weights each pair's losses, and {sorted_terms[0]}'s are over the batch's "
                    "sorted margins, not pairs",
                    f"drop use_weighting, or use another loss than {' and '.join(sorted_terms)}",
                )
        if training_step(self.algo) == "kto_step":
            self._check_unpaired_settings()
        if training_step(self.algo) == "distill_step":
            self._check_distillation_settings()
        if self.algo == "minillm":
            self._check_minillm_settings()
        if self.bema and (self.lora_rank > 0 or self.bema_update_freq < 1 or self.bema_lag + self.bema_multiplier <= 0):
            raise ConfigError(
                f"bema=true needs full weights (lora_rank={self.lora_rank}), bema_update_freq="
                f"{self.bema_update_freq} >= 1 and bema_lag + bema_multiplier > 0",
                "drop lora_rank (BEMA averages every weight), and keep bema_update_freq >= 1",
            )
        if self.bema_update_ref_model and (self.sync_ref_model or self.bema_ref_model_update_freq < 1):
            raise ConfigError(
                "bema_update_ref_model=true moves the reference model every bema_ref_model_update_freq="
                f"{self.bema_ref_model_update_freq} (>= 1) steps"
                + (", and sync_ref_model=true (TR-DPO) moves it too" if self.sync_ref_model else ""),
                "keep one of bema_update_ref_model and sync_ref_model, with a frequency >= 1",
            )
        if self.num_value_samples < 1 or self.beta1 <= 0 or self.beta2 <= 0:
            raise ConfigError(
                f"num_value_samples={self.num_value_samples} must be >= 1 and beta1={self.beta1}, beta2={self.beta2} "
                "> 0",
                "set num_value_samples=8, beta1=0.5 and beta2=0.001 (A*-PO's)",
            )
        if self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient={self.center_rewards_coefficient} must be >= 0",
                "set it to 0 (off) or e.g. 0.01",
            )
        self._check_dependent_settings()
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}", "choose k1, k2 or k3")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}.{suggest(self.loss, LOSSES)}", f"choose one of: {', '.join(LOSSES)}")
        if self.mix not in MIXES:
            raise ConfigError(
                f"mix={self.mix!r} is not one of {', '.join(MIXES)}.{suggest(self.mix, MIXES)}",
                "set mix=chord (expert NLL mixed into the RL loss), mix=luffy (an expert completion in each group) or "
                "mix=none",
            )
        if self.expert is not None and self.mix == "none":
            raise ConfigError(
                "expert rows were given but mix is none, so nothing would use them",
                "add --set mix=chord or --set mix=luffy (or drop --expert)",
            )
        if self.mix == "luffy" and (self.loss != "ppo" or self.group_size < 2):  # other algorithms: unused above
            raise ConfigError(
                "mix=luffy puts an expert completion into each group of a group-advantage algorithm",
                "use it with grpo / dr_grpo / dapo / rloo / reinforce++ and group_size >= 2",
            )
        if self.loss in SEQUENCE_LOSSES and (self.clip_low is None or self.clip_high is None):
            raise ConfigError(f"{self.loss} clips the sequence ratio on both sides", "set clip_low and clip_high")
        self._check_grpo_loss_options()
        self._check_replay_settings()
        GROUP_ADVANTAGES.get(self.advantage)  # unknown names: one clear error each
        aggregate(torch.zeros(1, 1), None, self.aggregation)
        try:
            parse_schedule(self.mix_weight)
        except ConfigError as exc:
            key = "mix_weight="  # parse_schedule names its value `imitation=`, the control side's key
            raise ConfigError(
                exc.problem.replace("imitation=", key), (exc.fix or "").replace("imitation=", key)
            ) from None

    def _check_replay_settings(self) -> None:
        if self.replay_buffer_size < 0:
            raise ConfigError(f"replay_buffer_size={self.replay_buffer_size} must be >= 0", "set 64 (TRL's), or 0: off")
        clashes = (  # (setting, set, why it cannot go with kept groups)
            ("dynamic_sampling", self.dynamic_sampling, "which samples more prompts in place of those groups instead"),
            ("mix=luffy", self.mix == "luffy", "whose expert completions a kept group would not carry"),
            ("importance_sampling_correction", self.importance_sampling_correction,
             "whose per-token weights a kept group's advantages would not carry"),
        )  # fmt: skip
        clash = next(((name, why) for name, on, why in clashes if on), None)
        if self.replay_buffer_size and clash is not None:
            raise ConfigError(
                f"replay_buffer_size={self.replay_buffer_size} puts past groups in place of the groups whose rewards "
                f"are all equal, and {clash[0]} is set, {clash[1]}",
                f"drop replay_buffer_size, or {clash[0].split('=')[0]}",
            )

    def _check_grpo_loss_options(self) -> None:
        if self.loss == "vespo" and training_step(self.algo) != "rl_step":
            raise ConfigError(
                f"loss=vespo weighs each sequence by its advantage's sign, and {self.algo}'s advantages are per token",
                "use vespo with a group-advantage algorithm (grpo, dr_grpo, dapo, rloo, reinforce++)",
            )
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ConfigError(
                f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1]",
                "set it to 0.2 (the paper's) or 1 (every token)",
            )
        if self.top_entropy_quantile < 1 and self.loss in SEQUENCE_LOSSES:
            raise ConfigError(
                f"top_entropy_quantile selects tokens, and loss={self.loss} has one ratio per sequence",
                "drop top_entropy_quantile, or use a token-level loss (ppo, cispo, sapo, vespo)",
            )
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold <= 0:
            raise ConfigError(
                f"off_policy_mask_threshold={self.off_policy_mask_threshold} must be > 0", "set it to e.g. 0.5"
            )
        if self.entropy_coef_delta <= 0 or not 0 <= self.entropy_coef_min <= self.entropy_coef_max:
            raise ConfigError(
                f"entropy_coef_delta={self.entropy_coef_delta} must be > 0 and 0 <= entropy_coef_min="
                f"{self.entropy_coef_min} <= entropy_coef_max={self.entropy_coef_max}",
                "set entropy_coef_delta=0.005, entropy_coef_min=0 and entropy_coef_max=1 (TRL's)",
            )

    def _check_unpaired_settings(self) -> None:
        if self.unpaired_loss not in UNPAIRED_LOSSES:
            raise ConfigError(
                f"unpaired_loss={self.unpaired_loss!r}.{suggest(self.unpaired_loss, UNPAIRED_LOSSES)}",
                f"choose one of: {', '.join(UNPAIRED_LOSSES)}",
            )
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(
                f"beta={self.beta}, desirable_weight={self.desirable_weight} and undesirable_weight="
                f"{self.undesirable_weight} must be > 0",
                "set beta=0.1 and both weights to 1.0 (KTO's)",
            )
        if self.batch_size < 2 and self.unpaired_loss == "kto":
            raise ConfigError(
                "kto estimates its KL reference point by pairing each prompt with another row's completion, which "
                "takes at least 2 rows a step",
                "set batch_size to 2 or more",
            )

    def _check_self_distillation_settings(self) -> None:
        if self.distillation_mode not in SDFT_MODES:
            raise ConfigError(
                f"distillation_mode={self.distillation_mode!r}.{suggest(self.distillation_mode, SDFT_MODES)}",
                f"choose one of: {', '.join(SDFT_MODES)}",
            )
        if not 0 <= self.distillation_alpha <= 1:
            raise ConfigError(f"distillation_alpha={self.distillation_alpha} must be in [0, 1]",
                              "set 0.5 (JSD), 1 (reverse KL) or 0 (forward KL)")  # fmt: skip
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1:
            raise ConfigError(
                "distillation_mode=sampled_token reads the teacher's log-prob of each sampled token only, which "
                f"estimates the reverse KL, not distillation_alpha={self.distillation_alpha}",
                "set distillation_alpha=1, or distillation_mode=topk_logits",
            )
        if self.teacher_model_kind not in SDFT_TEACHERS:
            raise ConfigError(
                f"teacher_model_kind={self.teacher_model_kind!r}.{suggest(self.teacher_model_kind, SDFT_TEACHERS)}",
                f"choose one of: {', '.join(SDFT_TEACHERS)}",
            )
        if (self.distillation_topk < 1 or self.num_loss_tokens_to_skip < 0 or self.teacher_sync_steps < 1
                or not 0 < self.teacher_update_rate <= 1):  # fmt: skip
            raise ConfigError(
                f"distillation_topk={self.distillation_topk} and teacher_sync_steps={self.teacher_sync_steps} must "
                f"be >= 1, num_loss_tokens_to_skip={self.num_loss_tokens_to_skip} >= 0 and teacher_update_rate="
                f"{self.teacher_update_rate} in (0, 1]",
                "set e.g. distillation_topk=100, teacher_sync_steps=1, num_loss_tokens_to_skip=0 and "
                "teacher_update_rate=0.05",
            )
        try:
            self.teacher_prompt_template.format(prompt="", privileged_context="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"teacher_prompt_template={self.teacher_prompt_template!r} cannot be filled ({exc!r})",
                "use the fields {prompt} and {privileged_context} only, e.g. '{prompt}\\n\\n{privileged_context}'",
            ) from None

    def _check_sdpo_settings(self) -> None:
        if not 0 <= self.distillation_weight <= 1:
            raise ConfigError(f"distillation_weight={self.distillation_weight} must be in [0, 1]",
                              "set 1 (self-distillation alone), 0 (GRPO) or between")  # fmt: skip
        if self.distillation_is_clip is not None and self.distillation_is_clip <= 0:
            raise ConfigError(f"distillation_is_clip={self.distillation_is_clip} must be > 0",
                              "set 2.0 (TRL's), or null (no weight)")  # fmt: skip
        fields = {
            "reprompt_template": ("prompt", "solution", "feedback"),
            "solution_template": ("successful_previous_attempt",),
            "feedback_template": ("feedback_raw",),
        }
        for name, keys in fields.items():
            try:
                getattr(self, name).format(**dict.fromkeys(keys, ""))
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} cannot be filled ({exc!r})",
                    f"use the fields {', '.join('{' + key + '}' for key in keys)} only",
                ) from None

    def _check_distillation_settings(self) -> None:
        if self.teacher is None:
            raise ConfigError(
                f"{self.algo} trains the model toward a teacher's next-token distributions, and no teacher was given",
                "pass --teacher PATH (a run directory or a save_pretrained directory whose vocabulary is the model's"
                + ("; with use_uld_loss=true, any tokenizer's)" if self.algo == "gold" else ")"),
            )
        if self.distill_loss not in DISTILL_LOSSES:
            raise ConfigError(
                f"distill_loss={self.distill_loss!r}.{suggest(self.distill_loss, DISTILL_LOSSES)}",
                f"choose one of: {', '.join(DISTILL_LOSSES)}",
            )
        if not 0 <= self.beta <= 1 or not 0 <= self.lmbda <= 1:
            raise ConfigError(
                f"beta={self.beta} and lmbda={self.lmbda} must be in [0, 1]",
                "set beta=1 (reverse KL), 0 (forward KL) or 0.5 (JSD), and lmbda=1 (only the model's own samples) or "
                "e.g. 0.5",
            )

    def _check_minillm_settings(self) -> None:
        if self.teacher is None:
            raise ConfigError(
                "minillm distills a teacher through reverse-KL advantages and its next-token distributions, and no "
                "teacher was given",
                "pass --teacher PATH (a run directory or a save_pretrained directory whose vocabulary is the model's)",
            )
        if self.kd_temperature <= 0 or not 0 <= self.gamma <= 1:
            raise ConfigError(
                f"kd_temperature={self.kd_temperature} must be > 0 and gamma={self.gamma} in [0, 1]",
                "set kd_temperature=1 and gamma=0 (MiniLLM's defaults: each token's own reward)",
            )

    def _check_reward_aggregation(self) -> None:
        aggregations = ("sum_then_normalize", "normalize_then_sum")
        if self.multi_objective_aggregation not in aggregations:
            raise ConfigError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not one of "
                f"{', '.join(aggregations)}",
                "set multi_objective_aggregation=normalize_then_sum (GDPO) or drop it",
            )
        if self.kl_in_reward:
            others = [name for name, on in (("multi_objective_aggregation", self.multi_objective_aggregation !=
                      "sum_then_normalize"), ("mix", self.mix == "luffy"), ("kl_estimator", self.kl_estimator != "k3"),
                      ("use_bias_correction_kl", self.use_bias_correction_kl)) if on]  # fmt: skip
            if others:
                raise ConfigError(
                    f"kl_in_reward=true subtracts the sequence's k1 KL from its one reward, which {_and(others)} "
                    "would not keep (GDPO's several rewards, LUFFY's expert completions, another estimator, the "
                    "loss term's correction)",
                    f"drop {_and(others)}, or kl_in_reward",
                )
        if self.multi_objective_aggregation == "sum_then_normalize":
            return
        chosen = self.advantage != ALGO_DEFAULTS[self.algo].get("advantage", "grpo")  # the algorithm's own: replaced
        if chosen or self.mix == "luffy":
            raise ConfigError(
                "multi_objective_aggregation=normalize_then_sum (GDPO) makes the advantages itself, each reward in "
                "its group and their sum over the batch"
                + (f", in place of advantage={self.advantage}" if chosen else "")
                + (", and mix=luffy's expert completions have no reward per function" if self.mix == "luffy" else ""),
                "drop "
                + _and([n for n, on in (("advantage", chosen), ("mix", self.mix == "luffy")) if on])
                + ", or multi_objective_aggregation",
            )

    def _check_tpo_settings(self) -> None:
        if self.preference_loss not in TPO_LOSSES:
            raise ConfigError(
                f"tpo takes one of the losses {', '.join(TPO_LOSSES)} (TRL's TPO loss types sigmoid, hinge, ipo and "
                f"tpo-l), not preference_loss={self.preference_loss}",
                "set preference_loss=sigmoid (or hinge, ipo, simpo), or train dpo for the losses with a reference",
            )
        check_preference_settings(self.preference_loss, self.preference_settings)
        if self.tpo_alpha < 0:
            raise ConfigError(f"tpo_alpha={self.tpo_alpha} must be >= 0", "set tpo_alpha=1.0 (TRL's), or 0")

    def _check_uld_settings(self) -> None:
        """GOLD's ULD settings: a merge strategy it knows, both hybrid weights or neither, positive temperatures,
        and the divergence it replaces left at its default."""
        if self.uld_token_merge_strategy not in ULD_MERGE_STRATEGIES:
            raise ConfigError(
                f"unknown uld_token_merge_strategy {self.uld_token_merge_strategy!r}",
                f"choose one of {', '.join(ULD_MERGE_STRATEGIES)}",
            )
        if (self.uld_hybrid_matched_weight is None) != (self.uld_hybrid_unmatched_weight is None):
            raise ConfigError(
                "uld_hybrid_matched_weight and uld_hybrid_unmatched_weight go together",
                "set both, or neither (the vocabulary overlap's weights)",
            )
        if min(self.uld_student_temperature, self.uld_teacher_temperature) <= 0:
            raise ConfigError(
                f"uld_student_temperature={self.uld_student_temperature} and uld_teacher_temperature="
                f"{self.uld_teacher_temperature} must be > 0",
                "set them to 1.0 (TRL's default)",
            )
        if self.distill_loss != "jsd":
            raise ConfigError(
                f"use_uld_loss=true replaces the divergence, and distill_loss={self.distill_loss} names another",
                "drop distill_loss, or use_uld_loss",
            )

    def _check_reference_sync(self) -> None:
        """TR-DPO moves a reference model: the loss must read one (a preference loss with a reference, or the
        policy-gradient losses' KL term), and it must have the policy's parameters."""
        if not self.sync_ref_model:
            return
        if training_step(self.algo) in POLICY_LOSS_STEPS and self.kl_coef == 0:
            raise ConfigError(
                "sync_ref_model=true moves the KL term's reference model, and kl_coef=0 keeps none",
                "drop sync_ref_model, or set kl_coef (e.g. 0.05)",
            )
        if training_step(self.algo) in PREFERENCE_STEPS and not needs_reference(self.preference_loss):
            raise ConfigError(
                f"sync_ref_model=true moves the reference model, which preference_loss={self.preference_loss} "
                "does not read (so the run keeps none)",
                "drop sync_ref_model, or use a loss with a reference (e.g. preference_loss=sigmoid)",
            )
        if self.lora_rank > 0:
            raise ConfigError(
                "sync_ref_model=true mixes the policy's weights into the reference, and LoRA trains adapters instead",
                "drop sync_ref_model or lora_rank",
            )
        if self.ref_model_sync_steps <= 0 or not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError(
                f"ref_model_sync_steps={self.ref_model_sync_steps} must be > 0 and ref_model_mixup_alpha="
                f"{self.ref_model_mixup_alpha} in (0, 1]",
                "set ref_model_sync_steps=512 and ref_model_mixup_alpha=0.6 (TR-DPO's)",
            )

    def _check_dependent_settings(self) -> None:
        """A setting read only under another one (DEPENDENT_SETTINGS: SAPO's temperatures under loss=sapo, ...),
        given a value other than the algorithm's default while that other setting is off, would do nothing."""
        defaults = LLMConfig(algo=self.algo, **ALGO_DEFAULTS[self.algo])
        for names, read, what, switch in DEPENDENT_SETTINGS:
            given = [name for name in names if getattr(self, name) != getattr(defaults, name)]
            if given and not read(self):
                shown = ", ".join(f"{name}={getattr(self, name)}" for name in given)
                raise ConfigError(
                    f"{shown} would do nothing: {'they are' if len(given) > 1 else 'it is'} {what}, off in this run",
                    f"drop {_and(given)}, or turn it on ({switch})",
                )

    def _check_unused_settings(self) -> None:
        """An algorithm refuses the settings its training step never reads (SETTING_READERS) set to anything but
        its defaults, naming the algorithms that read them (generation workers would start Ray, or copy the
        model, for nothing; a KL coefficient or a clip range would change nothing). Compared with the algorithm's
        defaults, not GRPO's: a resume passes every key of the saved config."""
        defaults = LLMConfig(algo=self.algo, **ALGO_DEFAULTS[self.algo])
        unused = [name for name in SETTING_READERS if self.algo not in setting_readers(name)]
        given = [name for name in unused if getattr(self, name) != getattr(defaults, name)]
        if not given:
            return
        groups: dict[tuple[str, ...], list[str]] = {}
        for name in given:
            groups.setdefault(SETTING_READERS[name], []).append(name)
        clauses = []
        for steps, names in groups.items():
            readers = ", ".join(setting_readers(names[0]))
            label = f"{READER_NAMES[steps]}: {readers}" if steps in READER_NAMES else readers
            clauses.append(f"{_and(names)} {'apply' if len(names) > 1 else 'applies'} to {label}")
        shown = ", ".join(f"{name}={getattr(self, name)}" for name in given)
        step = training_step(self.algo)
        raise ConfigError(
            f"{self.algo} does not use {shown}: it {STEP_SUMMARIES[step]}, so "
            f"{'they' if len(given) > 1 else 'it'} would do nothing; {'; '.join(clauses)}",
            f"drop {_and(given)}, or train one of those algorithms"
            + (
                " (online_dpo: the preference loss on the best and worst of its own samples)"
                if step == "dpo_step" and SAMPLING_STEPS in groups
                else ""
            ),
        )


DEPENDENT_SETTINGS: tuple[tuple[tuple[str, ...], Callable[[LLMConfig], bool], str, str], ...] = (
    (("tau_pos", "tau_neg"), lambda c: c.loss == "sapo", "SAPO's gate temperatures", "--set loss=sapo"),
    (("mix_weight", "mix_phi", "expert_batch_size"), lambda c: c.mix == "chord", "CHORD's mixing", "--set mix=chord"),
    (("shaping_gamma",), lambda c: c.mix == "luffy", "LUFFY's policy shaping", "--set mix=luffy"),
    (
        ("kl_estimator", "use_bias_correction_kl", "kl_in_reward"),
        lambda c: c.kl_coef != 0,
        "the KL penalty's",
        "--set kl_coef=0.05 (e.g.)",
    ),
    (VESPO_SETTINGS, lambda c: c.loss == "vespo", "VESPO's", "--set loss=vespo"),
    (
        ADAPTIVE_ENTROPY_SETTINGS,
        lambda c: c.use_adaptive_entropy,
        "adaptive entropy control's",
        "--set use_adaptive_entropy=true",
    ),
    (("lora_alpha",), lambda c: c.lora_rank > 0, "LoRA's scale", "--set lora_rank=8 (e.g.)"),
    (
        IMPORTANCE_SAMPLING_SETTINGS[1:],
        lambda c: c.importance_sampling_correction,
        "the sampler correction's",
        "--set importance_sampling_correction=true",
    ),
    (
        ("num_completions_to_print",),
        lambda c: c.log_completions,
        "the completions.jsonl limit",
        "--set log_completions=true",
    ),
    (BEMA_SETTINGS, lambda c: c.bema, "BEMA's", "--set bema=true"),
    (
        ("bema_ref_model_update_freq", "bema_ref_model_update_after"),
        lambda c: c.bema_update_ref_model,
        "the BEMA reference's schedule",
        "--set bema_update_ref_model=true",
    ),
    (("seq_kd",), lambda c: c.lmbda < 1, "the source of the steps off the model's samples", "--set lmbda=0.5 (e.g.)"),
    (ULD_SETTINGS, lambda c: c.use_uld_loss, "ULD's", "--set use_uld_loss=true"),
    (
        HYBRID_ULD_WEIGHTS,
        lambda c: c.use_uld_loss and c.uld_use_hybrid_loss,
        "the hybrid ULD loss's weights",
        "--set use_uld_loss=true --set uld_use_hybrid_loss=true",
    ),  # fmt: skip
    (("iw_opd_gamma",), lambda c: c.distill_loss == "iw_opd", "IW-OPD's weight", "--set distill_loss=iw_opd"),
    (
        ("teacher_update_rate", "teacher_sync_steps"),
        lambda c: c.teacher_model_kind == "ema",
        "the EMA teacher's schedule",
        "--set teacher_model_kind=ema",
    ),
    (
        ("distillation_topk", "distillation_add_tail"),
        lambda c: c.distillation_mode == "topk_logits",
        "the top-k divergence's",
        "--set distillation_mode=topk_logits",
    ),
    (
        ("beta",),
        lambda c: training_step(c.algo) != "distill_step" or c.distill_loss == "jsd",
        "the divergence of distill_loss=jsd",
        "--set distill_loss=jsd",
    ),
    (
        ("label_smoothing",),
        lambda c: any(PREFERENCE_LOSSES[name].smoothing for name in c.preference_terms),
        "the share of flipped labels",
        "--set preference_loss=sigmoid, robust, exo_pair, aot, cpo or simpo",
    ),
    (("simpo_gamma",), lambda c: "simpo" in c.preference_terms, "SimPO's margin", "--set preference_loss=simpo"),
    (
        ("ref_model_sync_steps", "ref_model_mixup_alpha"),
        lambda c: c.sync_ref_model,
        "TR-DPO's reference updates",
        "--set sync_ref_model=true",
    ),
    (
        ("discopop_tau",),
        lambda c: "discopop" in c.preference_terms,
        "DiscoPOP's temperature",
        "--set preference_loss=discopop",
    ),
    (
        ("f_alpha",),
        lambda c: c.f_divergence == "alpha_divergence",
        "the alpha-divergence's alpha",
        "--set f_divergence=alpha_divergence",
    ),
)
"""Settings read only under another setting: (names, whether they are read, what they are, what turns them on)."""


def _and(names: list[str]) -> str:
    """a, b and c."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def make_config(algo: str, overrides: dict[str, Any] | None = None) -> LLMConfig:
    """The algorithm's config with `overrides` (values or --set strings, checked against the field types)."""
    if algo not in ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r}.{suggest(algo, ALGOS)}", f"choose one of: {', '.join(ALGOS)}")
    cfg = apply_values(LLMConfig(algo=algo), ALGO_DEFAULTS[algo], f"the {algo} defaults")
    cfg = apply_values(cfg, dict(overrides or {}), "the settings")
    cfg.validate()
    return cfg


# --- batches ---------------------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts to left-padded token ids and attention mask, equal to the tokenizer's batch call (no special
    tokens added; tests/test_llm.py), with each distinct prompt tokenized once: a run draws the same prompts
    again and again, and a tokenizer call costs more than its few prompts' lookups. `answers`: the same for
    answers (right-padded, with EOS)."""

    MAX_CACHED = 200_000

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: dict[str, list[int]] = {}

    def token_lists(self, texts: list[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.tokens]
        if missing:
            if len(self.tokens) + len(missing) > self.MAX_CACHED:
                self.tokens.clear()
            self.tokens.update(zip(missing, tokenize(self.tokenizer, missing)))
        return [self.tokens[t] for t in texts]

    def answers(self, answers: list[str]) -> tuple[Tensor, Tensor]:
        """`encode_answers` through the same cache (DPO and SFT draw the same answers again and again)."""
        return _right_padded(self.token_lists(answers), self.tokenizer)

    def warm(self, texts: list[str]) -> None:
        """Tokenize these texts in one call ahead of the steps (as TRL's trainers map their datasets before
        training), where the cache holds them all; a step then only looks its rows up."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.tokens]
        if missing and len(self.tokens) + len(missing) <= self.MAX_CACHED:
            self.tokens.update(zip(missing, tokenize(self.tokenizer, missing)))

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        rows = self.token_lists(prompts)
        ids, mask = _padded(rows, self.tokenizer.pad_token_id, left=True)
        return ids, mask.long()


def has_dropout(model: Any) -> bool:
    """Whether train and eval mode differ for this model: a dropout module with p > 0, or a dropout rate in its
    config (Llama's attention dropout is applied functionally)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    fields = to_dict() if callable(to_dict) else {}
    rates = [v for k, v in fields.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, int | float)]
    return any(v > 0 for v in rates)


def without_dropout(model: Any) -> None:
    """Every dropout of the model at 0 (TRL's disable_dropout_in_model, and attention's functional dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def encode_answers(tokenizer: Any, answers: list[str]) -> tuple[Tensor, Tensor]:
    """Answer tokens + EOS, right-padded, and their mask."""
    return _right_padded(tokenize(tokenizer, answers), tokenizer)


def _right_padded(answers: list[list[int]], tokenizer: Any) -> tuple[Tensor, Tensor]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # once: each read goes through transformers' getattr
    return _padded([row + [eos] for row in answers], pad, left=False)


def _padded(rows: list[list[int]], pad: int, left: bool) -> tuple[Tensor, Tensor]:
    """(ids [N, width] padded with `pad` on the left or the right, the boolean mask of the real tokens), filled in
    numpy rather than through `torch.tensor` on nested lists, which walks every element in Python."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    width = int(lengths.max())
    columns = np.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    ids = np.full((len(rows), width), pad, np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def call_reward(
    task: Task, prompts: list[str], completions: list[str], rows: list[dict[str, Any]], rollout: Rollout | None = None
) -> Tensor:
    """The task's rewards as a tensor, with one clear error for a reward function that misbehaves (NaN where no
    function applies: `rewards.UNSCORED`)."""
    return torch.tensor(reward_values(task, prompts, completions, rows, rollout))


def self_distillation_loss(
    student: Tensor,
    teacher: Tensor,
    ids: Tensor,
    mask: Tensor,
    *,
    mode: str,
    alpha: float,
    topk: int,
    tail: bool,
    temperature: float,
    sampler_logp: Tensor | None = None,
    is_clip: float | None = None,
) -> Tensor:
    """SDFT's and SDPO's loss from the student's and the teacher's logits at the completion positions (TRL's
    SDFTTrainer and SDPOTrainer loss functions): per token the generalized JSD (alpha) on the student's top k
    tokens (`mode` topk_logits, renormalized or with the tail), on the whole vocabulary (full_logits), or the
    sampled token's held log p_student - log p_teacher times log p_student (sampled_token), all at `temperature`;
    with the sampler's log-probs of the tokens and `is_clip`, each token's loss times the clipped ratio
    min(pi / pi_sampler, is_clip) (held); the sequence-mean token-mean over `mask`'s tokens (every row counts in
    the mean, as TRL's)."""
    if mode == "topk_logits":
        per_token = topk_generalized_jsd(student, teacher, alpha, topk, tail, temperature)
    elif mode == "full_logits":
        per_token = generalized_jsd(student, teacher, alpha, temperature)
    else:  # sampled_token: log p_student - log p_teacher of each sampled token, held, times log p_student
        student_logp = _chosen_logprobs(student, ids, temperature)
        gap = (student_logp - _chosen_logprobs(teacher, ids, temperature)).detach()
        per_token = gap * student_logp
    if sampler_logp is not None and is_clip is not None:
        log_ratio = (_chosen_logprobs(student, ids, temperature) - sampler_logp).detach().clamp(-20.0, 20.0)
        per_token = per_token * log_ratio.exp().clamp(max=is_clip)
    return aggregate(per_token, mask, "seq-mean-token-mean")


def truncated(
    prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor, max_length: int | None, pad: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Examples (left-padded prompts, right-padded completions) cut to their first `max_length` tokens (TRL's
    keep_start): a completion keeps max_length - its prompt's length tokens, a longer prompt its first max_length
    (and its completion none); the completions' columns past the longest kept one dropped. Unchanged (the same
    tensors) where every example fits."""
    lengths = prompt_mask.sum(-1)
    if max_length is None or int((lengths + mask.sum(-1)).max()) <= max_length:
        return prompt_ids, prompt_mask, ids, mask
    if int(lengths.max()) > max_length:
        kept = [row[keep.bool()][:max_length].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
        prompt_ids, prompt_mask = left_padded(kept, pad)
        lengths = prompt_mask.sum(-1)
    room = (max_length - lengths).clamp_min(0)
    mask = mask.bool() & (torch.arange(mask.shape[1])[None, :] < room[:, None])
    width = max(1, int(mask.sum(-1).max()))
    return prompt_ids, prompt_mask, ids[:, :width], mask[:, :width]


def _one_past(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Completions with one more column in the mask: each row's position after its last token (what a pass over
    them then also computes: the logits at that last token), the new column's token 0."""
    mask = mask.bool()
    none = torch.zeros_like(mask[:, :1])
    wide = torch.cat([mask, none], 1) | torch.cat([none, mask], 1)
    return torch.cat([ids, torch.zeros_like(ids[:, :1])], 1), wide


def xpo_pairs(rewards: Tensor, other_rewards: Tensor) -> Tensor:
    """XPO's pairs of N policy samples (rows 0..N-1) and N reference samples of the same prompts (rows N..2N-1):
    the rows of the P chosen completions (the higher reward of each prompt's two), then of the P rejected ones;
    prompts whose two rewards tie give no pair."""
    n = len(rewards)
    index = torch.arange(n)[rewards != other_rewards]
    own_chosen = rewards[index] > other_rewards[index]
    return torch.cat([torch.where(own_chosen, index, index + n), torch.where(own_chosen, index + n, index)])


def require_scored(rewards: Tensor, algo: str) -> Tensor:
    """`rewards` where every completion has one; else one error: only the group-advantage algorithms leave out a
    completion no reward function applies to (the reward functions' None)."""
    missing = int(torch.isnan(rewards).sum())
    if missing:
        raise LLMError(
            f"the reward functions returned None (does not apply) for {missing} of {rewards.numel()} completions, "
            f"and {algo} needs a reward for every completion",
            "return a number for every completion, or train a group-advantage algorithm (grpo, rloo, ...), which "
            "leaves such completions out",
        )
    return rewards


def scored_mean(rewards: Tensor) -> float:
    """The mean reward of the completions some reward function applies to (0 where none does)."""
    scored = rewards[~torch.isnan(rewards)]
    return float(scored.mean()) if scored.numel() else 0.0


def reward_values(
    task: Task, prompts: list[str], completions: list[str], rows: list[dict[str, Any]], rollout: Rollout | None = None
) -> list[float]:
    """The task's rewards as Python floats (call_reward's, before float32)."""
    return checked_call(task.reward, prompts, completions, reward_columns(task, rows, completions, rollout))


def reward_columns(
    task: Task, rows: list[dict[str, Any]], completions: list[str], rollout: Rollout | None = None
) -> dict[str, list[Any]]:
    """The keyword arguments of a reward function: the rows' fields but the prompt; in a run with tools, also
    `final`, each completion's text after its last tool result (the rollout's, else after the last response
    tag); with an environment, `environments`, each completion's instance (as TRL passes them)."""
    columns = {k: v for k, v in _columns(rows).items() if k != "prompt"}
    if task.tool_format is not None:
        given = rollout.final if rollout is not None else None
        columns["final"] = given if given is not None else task.tool_format.final(completions)
    if rollout is not None and rollout.environments is not None:
        columns["environments"] = rollout.environments
    if rollout is not None and rollout.extra:
        columns.update(rollout.extra)
    return columns


# --- the trainer -----------------------------------------------------------------------------------------------


def is_stub(text: str) -> bool:
    """SSD's filter_empty: a completion that is empty, or one line shorter than 10 characters (the paper's
    minimal syntactic filter for code; TRL's SSDTrainer's rule)."""
    stripped = text.strip()
    return not stripped or ("\n" not in stripped and len(stripped) < 10)


def has_expert_completion(row: dict[str, Any]) -> bool:
    return any(isinstance(row.get(key), str) for key in ("completion", "answer"))


def expert_completion(row: dict[str, Any]) -> str:
    """The expert completion of a row: its `completion`, else its `answer`."""
    for key in ("completion", "answer"):
        if isinstance(row.get(key), str):
            return str(row[key])
    raise LLMError(
        f'an expert row has no "completion" (or "answer") string: {str(row)[:80]}',
        'give every expert row a completion, e.g. {"prompt": "2+2=", "completion": "4"}',
    )


def luffy_experts(expert_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> dict[str, str]:
    """LUFFY puts an expert completion of the group's own prompt into each group: the expert rows' completions by
    prompt (the training rows' own answers without --expert), and an error naming a prompt that has none."""
    experts: dict[str, str] = {}
    for row in expert_rows:
        experts.setdefault(row["prompt"], expert_completion(row))
    missing = next((row["prompt"] for row in train_rows if row["prompt"] not in experts), None)
    if missing is not None:
        raise LLMError(
            f"mix=luffy needs an expert completion of every training prompt, and the expert rows have none for "
            f"{missing[:80]!r}",
            "give the --expert file a row for each prompt (the same prompt string), or drop --expert to use the "
            "prompts' own answers",
        )
    return experts


def check_text_rows(cfg: LLMConfig, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> bool:
    """Whether the evaluation rows are plain text (`is_text_row`); an error where plain-text rows meet an
    algorithm other than SFT, or the evaluation rows mix plain text and prompts (one evaluation scores them)."""
    field = cfg.dataset_text_field
    plain = [is_text_row(row, field) for row in eval_rows]
    if cfg.algo != "sft" and (any(plain) or any(is_text_row(row, field) for row in train_rows)):
        raise LLMError(
            f'the rows are plain text ("{field}" and no prompt), which only sft trains on',
            f'give {cfg.algo} rows with a "prompt" (and an "answer" for the built-in rewards), or run sft on these',
        )
    if any(plain) and not all(plain):
        raise LLMError(
            "the evaluation rows mix plain text and prompts",
            "give evaluation rows of one kind (--set eval_prompts=FILE): plain text, scored by its loss, or prompts, "
            "scored by exact match",
        )
    if all(plain) and cfg.num_generations_eval > 1:
        raise LLMError(
            f"num_generations_eval={cfg.num_generations_eval} samples completions of the evaluation prompts, and "
            "these evaluation rows are plain text",
            "drop num_generations_eval, or give prompt rows to evaluate on (--set eval_prompts=FILE)",
        )
    return bool(plain) and all(plain)


def check_expert_rows(rows: list[dict[str, Any]], what: str) -> None:
    """One error naming the first row without an expert completion (a `completion` or `answer` string)."""
    for number, row in enumerate(rows):
        if not has_expert_completion(row):
            raise LLMError(
                f'{what}, row {number}: no "completion" (or "answer") string: {str(row)[:80]}',
                f'give every {what} row a completion, e.g. {{"prompt": "2+2=", "completion": "4"}}',
            )


PAIRS_FIX = (
    'give every pairs row "prompt", "chosen" and "rejected" strings, e.g. {"prompt": "2+2=", "chosen": "4", '
    '"rejected": "5"}'
)
TPO_PAIRS_FIX = (
    'give every pairs row "prompt", "chosen", "rejected" and "reference" (the gold completion) strings, e.g. '
    '{"prompt": "2+2=", "chosen": "4", "rejected": "5", "reference": "4"}, or set tpo_alpha=0 (no gold term)'
)


def whitened(advantages: Tensor, scored: Tensor) -> Tensor:
    """(A - mean) / (std + 1e-4) over the `scored` completions (Bessel std, as TRL's), 0 on the others."""
    if int(scored.sum()) < 2:
        return torch.zeros_like(advantages)
    values = advantages[scored]
    return torch.where(scored, (advantages - values.mean()) / (values.std() + 1e-4), torch.zeros_like(advantages))


def spread(groups: Tensor) -> Tensor:
    """[G] whether each group's rewards [G, size] differ (DAPO's informative groups), over its scored ones."""
    if not torch.isnan(groups).any():
        return groups.std(1) > 0
    return torch.nan_to_num(groups, nan=-math.inf).amax(1) > torch.nan_to_num(groups, nan=math.inf).amin(1)


def ended_with_eos(rollout: Rollout, tokenizer: Any) -> Tensor:
    """[N] whether each completion ended with EOS (rather than at the length limit)."""
    last = (rollout.span.sum(-1) - 1).clamp_min(0)
    return rollout.completion_ids.gather(1, last[:, None]).squeeze(1) == tokenizer.eos_token_id


def overlong_penalty(rollout: Rollout, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment [N]: 0 up to max_new_tokens - buffer tokens, then falling linearly to
    -penalty at max_new_tokens (0 everywhere when buffer is 0)."""
    lengths = rollout.span.sum(-1).float()  # the tools' tokens too: they take from the same budget
    if buffer <= 0:
        return torch.zeros_like(lengths)
    return -penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0.0, 1.0)


def preference_pair(row: dict[str, Any], rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): a pairs row's, or the expert completion against a copy with one character
    changed (a digit to another digit, anything else to a digit)."""
    if "chosen" in row or "rejected" in row:
        if not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
            raise LLMError(
                f'a pairs row needs "chosen" and "rejected" strings: {str(row)[:80]}',
                "give every row prompt, chosen and rejected",
            )
        return row["prompt"], row["chosen"], row["rejected"]
    chosen = expert_completion(row)
    if not chosen:
        raise LLMError(
            f"an empty expert completion cannot be corrupted into a rejected one: {str(row)[:80]}",
            "pass pairs with --set pairs=FILE",
        )
    i = int(rng.integers(len(chosen)))
    digits = [d for d in "0123456789" if d != chosen[i]]
    return row["prompt"], chosen, chosen[:i] + digits[int(rng.integers(len(digits)))] + chosen[i + 1 :]


def unpaired_examples(row: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str, bool]]:
    """KTO's (prompt, completion, desirable) examples of a row: a labelled row's one, else its pair's two (the
    chosen completion desirable, the rejected one not; preference_pair)."""
    if "label" in row:
        return [(row["prompt"], row["completion"], bool(row["label"]))]
    prompt, chosen, rejected = preference_pair(row, rng)
    return [(prompt, chosen, True), (prompt, rejected, False)]


def check_unpaired_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's rows, each labelled ({"prompt", "completion", "label": true or false}) or a pair; one error naming the
    first that is neither."""
    for number, row in enumerate(rows):
        labelled = isinstance(row.get("completion"), str) and isinstance(row.get("label"), bool)
        paired = isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
        if not (labelled or paired) or ("label" in row and not labelled):
            raise LLMError(
                f'pairs, row {number}: neither "completion" with a true/false "label" nor "chosen" and "rejected" '
                f"strings: {str(row)[:80]}",
                'give KTO rows like {"prompt": "2+2=", "completion": "4", "label": true}, or pairs',
            )
    return rows


def reward_model_pairs(
    rows: list[dict[str, Any]] | None, eval_rows: list[dict[str, Any]], cfg: LLMConfig
) -> tuple[list[dict[str, Any]] | None, list[tuple[str, str, str, float]]]:
    """(training pair rows, held-out pairs) of a reward model: a pairs file's last eval_size rows (at most a
    fifth; all of them for fewer than 5 rows, which then also train), else the task's evaluation rows' answers
    against a one-character corruption each (from a seed of their own)."""
    if rows is None:
        rng = np.random.default_rng(1_000_003 + cfg.seed)
        return None, [(*preference_pair(row, rng), 0.0) for row in eval_rows]
    held_out = min(cfg.eval_size, len(rows) // 5)
    train, held = (rows[:-held_out], rows[-held_out:]) if held_out else (rows, rows)
    return train, [(r["prompt"], r["chosen"], r["rejected"], float(r.get("margin", 0.0))) for r in held]


def scorer_model(
    model: Any, head: torch.nn.Linear, tokenizer: Any, algo: str, step_separator: str | None = None
) -> Any:
    """The causal LM's body with `head` as its classifier: the reward model's a one-output sequence classifier
    (transformers' AutoModelForSequenceClassification: what `--reward model:DIR` loads), scoring the last non-pad
    token; the PRM's a two-label token classifier (AutoModelForTokenClassification: `--reward prm:DIR`)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    config = copy.deepcopy(model.config)
    config.num_labels, config.pad_token_id = head.out_features, tokenizer.pad_token_id
    config.architectures = None
    if step_separator is not None:  # what `--reward prm:DIR` splits completions at
        config.step_separator = step_separator
    kind = AutoModelForTokenClassification if algo == "prm" else AutoModelForSequenceClassification
    classifier = kind.from_config(config)
    body = getattr(classifier, classifier.base_model_prefix)
    body.load_state_dict(getattr(model, model.base_model_prefix).state_dict())
    score = getattr(classifier, "score", None)
    if not isinstance(score, torch.nn.Linear) or (score.bias is None) != (head.bias is None):
        raise LLMError(
            f"{type(classifier).__name__} has no linear `score` head to take the {algo}'s",
            "use a Llama-, GPT-2-, Qwen- or Mistral-family model",
        )
    with torch.no_grad():
        score.weight.copy_(head.weight)
        if head.bias is not None:
            score.bias.copy_(head.bias)
    return classifier


PRM_FIX = (
    'give every row "prompt", "completions" (its steps) and "labels" (one true/false per step), e.g. '
    '{"prompt": "12+34=", "completions": ["4", "6"], "labels": [true, true]}'
)


def stepwise_example(row: dict[str, Any], rng: np.random.Generator) -> tuple[str, list[str], list[bool]]:
    """(prompt, steps, labels) of a PRM row: a stepwise row's `completions` and `labels` (TRL's stepwise
    supervision format), or, from a row with an answer, the answer's characters as steps, half the time with one
    of them changed (`preference_pair`'s corruption): it and every later step labelled wrong."""
    if "completions" in row or "labels" in row:
        steps, labels = row.get("completions"), row.get("labels")
        if not (
            isinstance(steps, list)
            and isinstance(labels, list)
            and len(steps) == len(labels) > 0
            and all(isinstance(step, str) for step in steps)
            and all(isinstance(label, bool) for label in labels)
        ):
            raise LLMError(f"a stepwise row's completions and labels do not match: {str(row)[:80]}", PRM_FIX)
        return row["prompt"], list(steps), list(labels)
    prompt, chosen, rejected = preference_pair(row, rng)
    if rng.random() < 0.5:
        return prompt, list(chosen), [True] * len(chosen)
    wrong = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), len(rejected))
    return prompt, list(rejected), [i < wrong for i in range(len(rejected))]


def prm_rows(
    rows: list[dict[str, Any]] | None, eval_rows: list[dict[str, Any]], cfg: LLMConfig
) -> tuple[list[dict[str, Any]] | None, list[tuple[str, list[str], list[bool]]]]:
    """(training rows, held-out stepwise examples) of a PRM: a stepwise file's last eval_size rows (at most a
    fifth; all of them for fewer than 5 rows, which then also train), else the task's evaluation rows made
    stepwise (`stepwise_example`, from a seed of their own)."""
    rng = np.random.default_rng(1_000_003 + cfg.seed)
    if rows is None:
        return None, [stepwise_example(row, rng) for row in eval_rows]
    held_out = min(cfg.eval_size, len(rows) // 5)
    train, held = (rows[:-held_out], rows[-held_out:]) if held_out else (rows, rows)
    return train, [stepwise_example(row, rng) for row in held]


def kto_balance_note(rows: list[dict[str, Any]], cfg: LLMConfig) -> str | None:
    """A note when the labelled rows' weighted balance leaves the KTO paper's range, desirable_weight * n_D /
    (undesirable_weight * n_U) in [1, 4/3], naming the weights that bring it back (None inside it)."""
    counts = [0, 0]  # undesirable, desirable; a pair counts one of each
    for row in rows:
        if "label" in row:
            counts[bool(row["label"])] += 1
        else:
            counts = [counts[0] + 1, counts[1] + 1]
    undesirable, desirable = counts
    if not undesirable or not desirable:
        return None
    ratio = cfg.desirable_weight * desirable / (cfg.undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    lower = cfg.undesirable_weight * undesirable / desirable
    return (
        f"kto: {desirable} desirable and {undesirable} undesirable completions, weighted {ratio:.2f} to 1; KTO's "
        f"paper keeps desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3]: e.g. --set "
        f"desirable_weight={lower * 7 / 6:.3g}"
    )


class EntropyControl:
    """Skywork-OR1's adaptive entropy coefficient (LLMConfig.use_adaptive_entropy), as TRL's GRPOTrainer runs it:
    after each optimizer step the coefficient moves by `delta` toward more bonus while the step's token-mean
    entropy is at or below `target`, toward less otherwise, within [low, high]; a step applies the bonus only while
    the previous step's entropy was at or below the target (none before the first measurement)."""

    def __init__(self, cfg: LLMConfig) -> None:
        self.coef, self.target, self.delta = cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_delta
        self.low, self.high = cfg.entropy_coef_min, cfg.entropy_coef_max
        self.last_entropy = math.inf

    def coefficient(self) -> float:
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        step = self.delta if entropy <= self.target else -self.delta
        self.coef = min(max(self.coef + step, self.low), self.high)
        self.last_entropy = entropy

    def state(self) -> dict[str, float | None]:
        return {"coef": self.coef, "last_entropy": None if math.isinf(self.last_entropy) else self.last_entropy}

    def load(self, state: dict[str, float | None]) -> None:
        self.coef = float(state["coef"])  # type: ignore[arg-type]
        self.last_entropy = math.inf if state["last_entropy"] is None else float(state["last_entropy"])


class WeightAverage:
    """BEMA's weights (LLMConfig.bema), as TRL's BEMACallback computes them: theta_0 and the EMA are snapshots of
    the weights at step `bema_update_after`; every `bema_update_freq` steps after it the EMA moves toward the
    weights by beta_t and the averaged weights become EMA_t + alpha_t (theta_t - theta_0). Until the first update
    they are the starting weights."""

    def __init__(self, params: list[Tensor], cfg: LLMConfig) -> None:
        self.params, self.cfg = params, cfg
        self.theta0 = [p.detach().clone() for p in params]
        self.ema = [p.detach().clone() for p in params]
        self.current = [p.detach().clone() for p in params]

    def _age(self, step: int) -> float:
        return self.cfg.bema_lag + self.cfg.bema_multiplier * step

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        cfg = self.cfg
        if step == cfg.bema_update_after:
            for theta0, ema, p in zip(self.theta0, self.ema, self.params, strict=True):
                theta0.copy_(p)
                ema.copy_(p)
        elif step > cfg.bema_update_after and (step - cfg.bema_update_after) % cfg.bema_update_freq == 0:
            beta = max(self._age(step) ** -cfg.bema_ema_power, cfg.bema_min_ema_multiplier)
            alpha = self._age(step) ** -cfg.bema_bias_power
            for theta0, ema, current, p in zip(self.theta0, self.ema, self.current, self.params, strict=True):
                ema.mul_(1.0 - beta).add_(p, alpha=beta)
                current.copy_(ema + alpha * (p - theta0))

    def tensors(self) -> dict[str, Tensor]:
        return {f"bema/{kind}/{i}": t for kind in ("theta0", "ema", "current") for i, t in
                enumerate(getattr(self, kind))}  # fmt: skip

    @torch.no_grad()
    def load(self, tensors: dict[str, Tensor]) -> None:
        for kind in ("theta0", "ema", "current"):
            for i, t in enumerate(getattr(self, kind)):
                t.copy_(tensors[f"bema/{kind}/{i}"])


def privileged_text(row: dict[str, Any]) -> str:
    """sdft: a row's privileged context as text (a list of messages: their contents, a line each, as TRL)."""
    context = row.get("privileged_context")
    if context is None:
        raise LLMError(
            f"sdft's teacher reads each row's privileged_context, and this row has none: {str(row)[:80]}",
            'give every prompt row a "privileged_context" field (e.g. a demonstration, or the solution)',
        )
    if isinstance(context, list) and all(isinstance(m, dict) for m in context):
        return "\n".join(text for text in map(message_text, context) if text)
    return str(context)


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text: its content, or the text parts of a list content."""
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return str(content)


def _chosen_logprobs(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) at the given tokens [N, T]."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)


def token_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over the tokens of each completion (objectives.advantages.gae, time = token): the sequence reward
    [N] arrives on its last token, which ends the episode. Returns (advantages, returns), [N, T], 0 off the mask.
    A mask with holes (tools' results between the model's tokens) is GAE over the model's tokens in order: each
    one's next value is the next model token's."""
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):  # holes: compact each row's tokens to its front, then back
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        packed = torch.gather(mask, 1, order)
        advantages, returns = token_gae(rewards, torch.gather(values, 1, order), packed, gamma, lam)
        return (torch.zeros_like(advantages).scatter(1, order, advantages),
                torch.zeros_like(returns).scatter(1, order, returns))  # fmt: skip
    lengths = mask.sum(-1)
    last = torch.nn.functional.one_hot((lengths - 1).clamp_min(0), mask.shape[1]).bool() & (lengths > 0)[:, None]
    token_rewards = last.float() * rewards[:, None]
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1)) * mask
    done = last | ~mask
    advantages, returns = gae(token_rewards.T, values.T, next_values.T, done.T, done.T, gamma, lam)
    return advantages.T * mask, returns.T * mask


def with_lora(model: Any, rank: int, alpha: int) -> Any:
    """The model with LoRA adapters (peft) on every linear layer but the output head; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LLMError("lora_rank needs peft (part of the llm extra)", "pip install 'policylab[llm]'") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"))


PYTHON = "python:"
"""How config.yaml records an input given as a Python object (a model, a dataset, a reward function)."""


@dataclass
class LLMInputs:
    """Inputs given as Python objects instead of the config's names and paths (None: the config's). The run's
    config.yaml records them as python:<type or function name>; resuming such a run needs them passed again."""

    model: Any = None
    """A transformers causal LM (e.g. AutoModelForCausalLM.from_config(...)), trained in place."""
    tokenizer: Any = None
    """The model's tokenizer (needed with `model`; set to left padding, EOS as padding when it has none)."""
    prompts: Any = None
    """Rows {"prompt", other fields}: a datasets.Dataset, a list of dicts or a JSONL path."""
    eval_prompts: Any = None
    rewards: list[RewardSpec] | None = None
    """Functions (prompts, completions, **columns) -> list[float], reward strings, or (either, weight) pairs."""
    expert: Any = None
    pairs: Any = None
    teacher: Any = None
    """distill and gkd: the teacher, a transformers causal LM with the model's vocabulary (kept frozen)."""
    tools: list[Any] | None = None
    """Tool functions (their `__name__` is what a call names) or tool strings, as `tools` reads them."""
    environment: Any = None
    """An environment class or factory (LLMConfig.environment)."""
    rollout_func: Any = None
    """A function making the completions (LLMConfig.rollout_func)."""

    def config_values(self) -> dict[str, Any]:
        """The config entries that record the objects given."""
        values: dict[str, Any] = {}
        for name in ("model", "prompts", "eval_prompts", "expert", "pairs", "teacher"):
            value = getattr(self, name)
            if value is not None:
                values[name] = str(value) if isinstance(value, str | Path) else PYTHON + type(value).__name__
        if self.rollout_func is not None:
            values["rollout_func"] = _recorded(self.rollout_func)
        if self.environment is not None:
            values["environment"] = (
                {str(name): _recorded(one) for name, one in self.environment.items()}
                if isinstance(self.environment, dict)
                else _recorded(self.environment)
            )
        if self.rewards is not None:
            values["rewards"] = [reward_name(spec) for spec in self.rewards]
        if self.tools is not None:
            values["tools"] = [_recorded(tool) for tool in self.tools]
        return values


def _recorded(given: Any) -> str:
    """How config.yaml records a string or a Python object (a class, a function): itself, or python:<name>."""
    return given if isinstance(given, str) else PYTHON + getattr(given, "__name__", type(given).__name__)


def _given(cfg: LLMConfig, inputs: LLMInputs, name: str) -> Any:
    """The object given for `name`, else the config's value."""
    value = getattr(inputs, name)
    return value if value is not None else getattr(cfg, name)


def _check_objects_given(cfg: LLMConfig, inputs: LLMInputs) -> None:
    """A config that records Python objects (python:..., a resumed run's) needs them passed again."""
    missing = []
    for name in ("model", "prompts", "eval_prompts", "rewards", "expert", "pairs", "teacher", "tools", "environment",
                 "rollout_func"):  # fmt: skip
        recorded = getattr(cfg, name)
        values = recorded if isinstance(recorded, list) else [recorded]
        values = list(recorded.values()) if isinstance(recorded, dict) else values
        if getattr(inputs, name) is None and any(isinstance(v, str) and v.startswith(PYTHON) for v in values):
            missing.append(name)
    if missing:
        names = ", ".join(missing)
        raise LLMError(
            f"this run was given Python objects for {names}, which config.yaml records only by name",
            f"pass them again: train_llm(resume=RUN, {', '.join(f'{n}=...' for n in missing)})",
        )


def task_of(cfg: LLMConfig, inputs: LLMInputs | None = None, environment: Environments | None = None) -> Task:
    """The built-in task, or the given prompts as a task; with rewards, their weighted sum as its reward (an
    environment's get_reward one of them)."""
    inputs = inputs or LLMInputs()
    rewards, prompts = run_rewards(cfg, inputs, environment), _given(cfg, inputs, "prompts")
    if prompts is None:
        task = get_task(cfg.task)
        task = task if not rewards else replace(task, reward=combine_rewards(rewards))
        if cfg.algo == "prm":  # its steps' separator (a tiny model would read a character it lacks as padding)
            task = replace(
                task, characters=task.characters + "".join(sorted(set(cfg.step_separator) - set(task.characters)))
            )
        return task
    rows = prompt_rows(prompts, "prompts", *answers_needed(rewards), text_field=cfg.dataset_text_field)
    reward = combine_rewards(rewards or ["exact_match"])
    where = str(prompts) if isinstance(prompts, str | Path) else f"{len(rows)} rows given in Python"
    task = Task("prompts", where, lambda n, seed: rows, reward, cfg.max_new_tokens or 32)
    extra = {name: _given(cfg, inputs, name) for name in ("eval_prompts", "expert", "pairs")}
    text_fields = {"eval_prompts": cfg.dataset_text_field}  # evaluation rows may be plain text, as SFT's rows
    others = [
        row
        for name, source in extra.items()
        if source is not None
        for row in prompt_rows(source, name, text_field=text_fields.get(name))
    ]
    return replace(task, characters=characters_of(rows + others, cfg))


def run_rewards(cfg: LLMConfig, inputs: LLMInputs, environment: Environments | None) -> list[RewardSpec] | None:
    """The reward specs given, and an environment's get_reward with weight 1 (None: the task's own)."""
    given = _given(cfg, inputs, "rewards") or None
    if environment is None or not environment.rewarded:
        return given
    return [*(given or []), (environment_reward, 1.0)]


def characters_of(rows: list[dict[str, Any]], cfg: LLMConfig) -> str:
    """A tiny model's character vocabulary for given prompts: the built-in tasks' characters, then every other
    character of the rows' text fields and lists of strings (prompts, evaluation, expert and pairs rows), of the
    tool tags set and of a PRM's step separator (without them, a tiny model would read each as padding)."""
    tags = [cfg.tool_call_start, cfg.tool_call_end, cfg.tool_response_start, cfg.tool_response_end]
    separator = [cfg.step_separator] if cfg.algo == "prm" else []
    texts = [v for row in rows for v in row.values() if isinstance(v, str)] + [t for t in tags if t] + separator
    texts += [s for row in rows for v in row.values() if isinstance(v, list) for s in v if isinstance(s, str)]
    seen = set(CHARACTERS)
    extra = sorted({c for text in texts for c in text} - seen)
    return CHARACTERS + "".join(extra)


def answers_needed(rewards: list[RewardSpec] | None) -> tuple[tuple[str, ...], str]:
    """(required fields, fix) of prompt rows under these rewards: an `answer` where a built-in reward compares
    completions with it (the default, exact_match, does)."""
    targets = [spec[0] if isinstance(spec, tuple) else spec for spec in (rewards or ["exact_match"])]
    used = [target.partition("=")[0] for target in targets if isinstance(target, str)]
    builtins = [name for name in used if name in BUILTIN_REWARDS]
    if not builtins:
        return (), ""
    default = "" if rewards else " (the default reward)"
    return ("answer",), (
        f'give every row an "answer" ({builtins[0]}{default} compares completions with it), or pass a reward '
        "that needs none (--reward module:function)"
    )


def prompts_label(prompts: Any) -> str:
    """The name a run on given prompts goes by (header, run name, config.yaml's `task`): the file's stem, or
    `prompts` for rows given in Python."""
    if isinstance(prompts, str | Path) and not str(prompts).startswith(PYTHON):
        return Path(prompts).stem or "prompts"
    return "prompts"


def rows_of(
    task: Task, cfg: LLMConfig, inputs: LLMInputs | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, evaluation rows): a built-in task's from two seeds; given prompts split at their end
    (the last eval_size rows, at most a fifth), or all of them with separate evaluation prompts."""
    inputs = inputs or LLMInputs()
    evaluation = _given(cfg, inputs, "eval_prompts")
    if evaluation is not None:
        rows = task.make(0 if task.name == "prompts" else cfg.train_size, cfg.seed)
        needed = answers_needed(_given(cfg, inputs, "rewards"))
        return rows, prompt_rows(evaluation, "eval_prompts", *needed, text_field=cfg.dataset_text_field)
    if task.name != "prompts":
        return task.make(cfg.train_size, cfg.seed), task.make(cfg.eval_size, 1_000_003 + cfg.seed)
    rows = task.make(0, cfg.seed)
    held_out = min(cfg.eval_size, len(rows) // 5)
    return (rows[:-held_out], rows[-held_out:]) if held_out else (rows, rows)


def eval_note(
    task: Task,
    cfg: LLMConfig,
    rows: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    inputs: LLMInputs | None = None,
) -> str | None:
    """What a run should say about its evaluation rows: that they are its training rows (given prompts too few
    to hold a fifth out, and no eval_prompts). `rows`: (training rows, evaluation rows), as rows_of gave them."""
    inputs = inputs or LLMInputs()
    train_rows, eval_rows = rows
    if task.name != "prompts" or _given(cfg, inputs, "eval_prompts") is not None or eval_rows is not train_rows:
        return None  # rows_of held a fifth out: its evaluation rows are not the training rows
    return (
        f"note: the prompts have {len(train_rows)} rows, too few to hold a fifth out for evaluation: evaluation uses "
        "the training rows (give separate ones with --set eval_prompts=FILE)"
    )


class LLMTrainer:
    def __init__(self, cfg: LLMConfig, inputs: LLMInputs | None = None) -> None:
        require_llm()
        torch.set_num_threads(cfg.threads)
        limit_numpy_blas(cfg.threads)  # sampling runs in numpy (fast_decode.NumpyDecoder)
        inputs = inputs or LLMInputs()
        _check_objects_given(cfg, inputs)
        self.cfg = cfg
        environment = _given(cfg, inputs, "environment")
        self.environments = load_environment(environment) if environment is not None else None
        """The environment's instances (one per completion), or None."""
        if self.environments is not None and cfg.mix == "luffy":
            raise ConfigError(
                "mix=luffy puts expert completions into the groups, and no environment ran them",
                "drop mix=luffy (CHORD's mix=chord trains on expert completions apart from the groups)",
            )
        self.task = task_of(cfg, inputs, self.environments)
        self.reward_parts: list[tuple[RewardFn, float]] | None = None
        """GDPO's reward functions and weights (multi_objective_aggregation=normalize_then_sum), else None."""
        if cfg.multi_objective_aggregation == "normalize_then_sum":
            specs = run_rewards(cfg, inputs, self.environments)
            self.reward_parts = [resolve_reward(spec) for spec in specs] if specs else [(self.task.reward, 1.0)]
        self.model, self.tokenizer = self._model(cfg, inputs, self.task.characters)
        self.model.train()  # from_pretrained gives eval mode, in which transformers skips activation checkpointing
        if cfg.disable_dropout:
            without_dropout(self.model)
        if cfg.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.other_sampler: tuple[Any, tuple[Any, float] | None] | None = None
        """While set (sampling_from): the model, and the mixture, that _sample draws from instead of the policy."""
        self.reference = None
        preference = training_step(cfg.algo) in PREFERENCE_STEPS
        needs = training_step(cfg.algo) == "kto_step" or (preference and needs_reference(cfg.preference_loss))
        if (cfg.kl_coef and cfg.algo != "sft") or needs or cfg.algo in ("a2po", "xpo", "nash_md"):
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        teacher_tokenizer: Any = None
        self.teacher: Any = None
        """distill's, gkd's and gold's frozen teacher; sdft's copy of the model (teacher_model_kind base or ema)."""
        if training_step(cfg.algo) == "distill_step" or cfg.algo == "minillm":
            self.teacher, teacher_tokenizer = self._teacher(cfg, inputs)
        self.cross = self._cross_tokenizer(cfg, teacher_tokenizer) if cfg.use_uld_loss else None
        """gold with use_uld_loss: the teacher's tokenizer and the ULD loss."""
        if cfg.algo in SELF_DISTILLING and cfg.teacher_model_kind != "live":
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.teacher_prompts: dict[tuple[str, str], str] = {}
        """sdft: each (prompt, privileged context)'s teacher prompt, rendered once."""
        self.entropy_control = (
            EntropyControl(cfg) if cfg.use_adaptive_entropy and training_step(cfg.algo) in POLICY_LOSS_STEPS else None
        )
        self.value_head: torch.nn.Linear | None = None
        """PPO's value head, the reward model's score (no bias, as a sequence classifier's), or the PRM's two-way
        step classifier."""
        if cfg.algo == "ppo":
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        elif cfg.algo == "reward_model":
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1, bias=False)
            torch.nn.init.zeros_(self.value_head.weight)
        elif cfg.algo == "prm":  # a token classifier's two-way head, with its bias
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 2)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        if cfg.lora_rank > 0:
            self.model = with_lora(self.model, cfg.lora_rank, cfg.lora_alpha)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list(self.value_head.parameters()) if self.value_head is not None else []
        self.optimizer = Adam(params, lr=cfg.lr)
        self.bema = WeightAverage(list(self.model.parameters()), cfg) if cfg.bema else None
        if cfg.bema_update_ref_model and (self.reference is None or cfg.precompute_ref_log_probs):
            raise LLMError(
                f"bema_update_ref_model=true moves the reference model, and this {cfg.algo} run keeps none"
                + (" (precompute_ref_log_probs drops it)" if cfg.precompute_ref_log_probs else ""),
                "use it with a loss that reads a reference (DPO's sigmoid, KTO, kl_coef > 0, a2po), or drop it",
            )
        self.tools = tool_table([*self.task.tools, *(_given(cfg, inputs, "tools") or [])])
        """The tools completions call, by name (the task's and the run's)."""
        rollout_func = _given(cfg, inputs, "rollout_func")
        if isinstance(rollout_func, str):
            rollout_func = import_callable(rollout_func, "rollout_func", {}, "--set rollout_func=mypkg.rollouts:play")
        self.rollout_func: Callable[[list[str], Any], dict[str, Any]] | None = rollout_func
        """The function making the completions (TRL's rollout_func), or None: the trainer's sampler."""
        self.rollout_greedy = False
        """Whether rollout_func's current call is the greedy evaluation's."""
        if self.rollout_func is not None and training_step(cfg.algo) in PAIRED_SAMPLING_STEPS:
            raise ConfigError(
                f"{cfg.algo} samples from the reference model (nash_md: mixed with the policy) beside the policy, "
                "and rollout_func makes every completion itself",
                "drop rollout_func, or train grpo or online_dpo with it",
            )
        if self.rollout_func is not None and (self.tools or self.environments is not None or cfg.stop):
            raise ConfigError(
                "rollout_func makes whole completions itself, so the run's tools, environment and stop strings "
                "would never run",
                "call the tools inside the rollout function (mark their tokens 0 in env_mask), or drop rollout_func",
            )
        self.chat = (
            WithTemplateOptions(self.tokenizer, cfg.chat_template_kwargs)
            if cfg.chat_template_kwargs
            else self.tokenizer
        )
        """The tokenizer the chat template is rendered with (with chat_template_kwargs)."""
        raw_rows = rows_of(self.task, cfg, inputs)
        self.template_results = self._template_results(raw_rows)
        """Whether a tool's result is appended as the chat template renders a tool message (tool_results)."""
        self.described: ToolsOf | None = self.described_tools if self.template_results else None
        """The tools the chat template describes in each row's conversational prompt (with template results)."""
        every_row = [row for rows in raw_rows for row in rows]
        self.prompt_messages = conversational_prompts(every_row, self.chat, self.described)
        """The messages of each conversational prompt, by its rendered text (an environment's reset text joins them)."""
        self.train_rows, self.eval_rows = (rendered_rows(rows, self.chat, self.described) for rows in raw_rows)
        self.evaluates_text = check_text_rows(cfg, self.train_rows, self.eval_rows)
        """Whether the evaluation rows are plain text (scored by their loss, not by exact match)."""
        if cfg.algo == "sdft":
            for row in self.train_rows:  # a row without one is an error now, not at the step that draws it
                privileged_text(row)
        expert, pairs = _given(cfg, inputs, "expert"), _given(cfg, inputs, "pairs")
        self.expert_rows = (
            rendered_rows(prompt_rows(expert, "expert"), self.chat, self.described)
            if expert is not None
            else self.train_rows
        )
        self.pair_rows = None
        if pairs is not None and training_step(cfg.algo) == "kto_step":
            self.pair_rows = check_unpaired_rows(rendered_rows(prompt_rows(pairs, "pairs"), self.chat))
        elif pairs is not None and cfg.algo == "prm":
            self.pair_rows = prompt_rows(pairs, "pairs", ("completions", "labels"), PRM_FIX)
            for row in self.pair_rows:  # a malformed row fails now, naming itself, not at the step that draws it
                stepwise_example(row, np.random.default_rng(0))  # (a stepwise row draws nothing)
        elif pairs is not None and cfg.algo == "tpo" and cfg.tpo_alpha:
            self.pair_rows = prompt_rows(pairs, "pairs", ("chosen", "rejected", "reference"), TPO_PAIRS_FIX)
        elif pairs is not None:
            self.pair_rows = prompt_rows(pairs, "pairs", ("chosen", "rejected"), PAIRS_FIX)
        self.pair_rows = None if self.pair_rows is None else rendered_rows(self.pair_rows, self.chat)
        self.whole_cache: dict[tuple[str, str], tuple[list[int], list[int], list[bool]]] = {}
        """SFT's tokens of each row it trains on whole (`whole_tokens`), by ("messages", the conversation) or
        ("text", the text)."""
        self.eval_pairs: list[tuple[str, str, str, float]] = []
        """The reward model's held-out pairs (prompt, chosen, rejected, margin)."""
        if cfg.algo == "reward_model":
            self.pair_rows, self.eval_pairs = reward_model_pairs(self.pair_rows, self.eval_rows, cfg)
        self.eval_steps: list[tuple[str, list[str], list[bool]]] = []
        """The PRM's held-out stepwise examples (prompt, steps, labels)."""
        if cfg.algo == "prm":
            self.pair_rows, self.eval_steps = prm_rows(self.pair_rows, self.eval_rows, cfg)
        if cfg.precompute_ref_log_probs and self.pair_rows is None:
            raise LLMError(
                "precompute_ref_log_probs=true needs fixed pairs, and without a pairs file each step corrupts the "
                "task's answers afresh",
                "give a pairs file (--set pairs=FILE), or drop precompute_ref_log_probs",
            )
        note = eval_note(self.task, cfg, (self.train_rows, self.eval_rows), inputs)
        self.notes: list[str] = [note] if note else []
        """What the run should say before it starts."""
        balance = kto_balance_note(self.pair_rows, cfg) if cfg.unpaired_loss == "kto" and self.pair_rows else None
        self.notes += [balance] if balance else []
        self.rng = np.random.default_rng(cfg.seed)  # DPO's corrupted answers
        self.bco_rewards_seen: tuple[int, float] = (0, 0.0)
        """BCO: how many rewards its steps have seen, and their sum (`bco_delta`)."""
        tables = self._row_tables().items()
        self.orders = {kind: ShuffledEpochs(len(rows), cfg.seed, kind) for kind, rows in tables if rows}
        # rows without the fields a step needs fail here, each naming the row, not mid-run
        if cfg.mix != "none":
            check_expert_rows(self.expert_rows, "expert" if expert is not None else "prompts")
        self.luffy_experts = luffy_experts(self.expert_rows, self.train_rows) if cfg.mix == "luffy" else {}
        """LUFFY's expert completion of each training prompt (from the expert rows of the same prompt)."""
        if self.trains_on_answers:
            check_expert_rows(self.prompted(self.train_rows), "prompts")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.replay = GroupReplay(cfg.replay_buffer_size, cfg.group_size, self.tokenizer.pad_token_id, self.generator)
        """replay_buffer_size: the past groups with differing rewards."""
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens
        self.tool_format = self._tool_format()
        self.task = replace(self.task, tool_format=self.tool_format if self.calls_tools else None)
        self.tool_runner = None
        if self.calls_tools or cfg.stop:
            iterations = cfg.max_tool_calling_iterations
            self.tool_runner = ToolRunner(self.chat, self.tool_format, cfg.stop,
                                          self.max_new_tokens if iterations is None else iterations,
                                          self.calls_tools, self.template_results)  # fmt: skip
        self.tool_stats = ToolStats()
        """The tool calls of the step so far, and how many failed (train.csv's tool_calls, tool_failures)."""
        self.logged_completions: list[dict[str, Any]] = []
        """The step's rows of completions.jsonl (log_completions), written and cleared after the step."""
        self.encode_prompts = PromptEncoder(self.tokenizer)
        self.encode_prompts.warm(self._texts_drawn())
        field = cfg.dataset_text_field
        self.warm_texts([row[field] for row in self.train_rows + self.eval_rows if is_text_row(row, field)])
        self.reference_sums: Tensor | None = None
        """The reference's (chosen, rejected) sequence log-probs of every pairs row [R, 2], with
        precompute_ref_log_probs (then the reference model itself is dropped)."""
        if cfg.precompute_ref_log_probs:
            self.reference_sums = self._reference_sums()
            self.reference = None
        # sampling runs in eval mode; switching modes walks every module twice a step, so only where it matters
        self.switch_modes = has_dropout(self.model) and not cfg.disable_dropout
        self.step = 0
        self.workers: GenerationWorkers | None = None
        # after LoRA: the workers' copies carry the adapters the optimizer trains
        if cfg.generation_workers and samples_completions(cfg.algo):
            self.workers = GenerationWorkers(self.model, cfg.seed, cfg.generation_workers, cfg.generation_backend)
        self.optimal_values: dict[str, float] = {}
        """a2po: V*(x) of each training prompt (stage 1, before the first step)."""
        if cfg.algo == "a2po":
            self._estimate_optimal_values()

    @staticmethod
    def _model(cfg: LLMConfig, inputs: LLMInputs, characters: str) -> tuple[Any, Any]:
        """(model, tokenizer): the objects given, or loaded from the config's model name or directory (a tiny
        model's vocabulary: the task's `characters`)."""
        model = _given(cfg, inputs, "model")
        if isinstance(model, str):
            return load_model(model, cfg.seed, characters)
        if inputs.tokenizer is None:
            raise LLMError("a model object was given without its tokenizer", "pass tokenizer=... with model=...")
        tokenizer = prepare_tokenizer(inputs.tokenizer)
        check_model(model, tokenizer)
        return model, tokenizer

    def _template_results(self, raw_rows: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> bool:
        """tool_results: template (a chat model's tool messages), tags, or auto: template where completions call
        tools after conversational prompts and the tokenizer has a chat template."""
        setting = self.cfg.tool_results
        if setting == "template":
            require_template(self.tokenizer)
            return True
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        conversational = any(has_conversations(rows) for rows in raw_rows)
        return setting == "auto" and self.calls_tools and conversational and has_template

    def described_tools(self, row: dict[str, Any]) -> list[Any]:
        """The functions a chat template describes in the row's prompt: the tools, and the methods of the row's
        environment (its first instance's: every instance of a kind has the same)."""
        methods = self.environments.described(row) if self.environments is not None else []
        return [*self.tools.values(), *methods]

    @property
    def calls_tools(self) -> bool:
        """Whether completions call tools (given ones, the task's or an environment's)."""
        return bool(self.tools) or self.environments is not None

    def _tool_format(self) -> ToolFormat:
        """The run's tags: each setting given, else the task's, else the Hermes format's. Tags without tools, or a
        limit below 1, are an error."""
        cfg, base = self.cfg, self.task.tool_format or ToolFormat()
        given = {name: getattr(cfg, f"tool_{name}") for name in ("call_start", "call_end", "response_start",
                                                                  "response_end")}  # fmt: skip
        set_names = [f"tool_{name}" for name, value in given.items() if value is not None]
        if cfg.max_tool_calling_iterations is not None:
            set_names.append("max_tool_calling_iterations")
        if cfg.tool_results != "auto":
            set_names.append("tool_results")
        if set_names and not self.calls_tools:
            raise ConfigError(
                f"{_and(set_names)} would do nothing: this run has no tools",
                "give tools (--tool calculator, --tool mypkg.tools:search, or train_llm(tools=[fn])), or drop "
                + _and(set_names),
            )
        if cfg.max_tool_calling_iterations is not None and cfg.max_tool_calling_iterations < 1:
            raise ConfigError(
                f"max_tool_calling_iterations={cfg.max_tool_calling_iterations} must be >= 1",
                "give the most calls a completion may make, or drop it (as many as fit in max_new_tokens)",
            )
        values = {name: value if value is not None else getattr(base, name) for name, value in given.items()}
        if any(not value for value in values.values()):
            raise ConfigError("a tool tag is empty", "give each of the four tool tags some text")
        return ToolFormat(**values)

    def _texts_drawn(self) -> list[str]:
        """The texts the steps and evaluations will tokenize: every prompt, the pairs' completions, and the expert
        completions where a step trains on them."""
        texts = [row.get("prompt") for row in self.train_rows + self.eval_rows]  # plain-text rows have none
        for row in self.pair_rows or []:
            texts += [row["prompt"], *(row.get(key) for key in ("chosen", "rejected", "completion", "reference"))]
        cfg = self.cfg
        if self.trains_on_answers:
            texts += [expert_completion(row) for row in self.prompted(self.train_rows)]
        elif cfg.mix != "none":
            texts += [expert_completion(row) for row in self.expert_rows]
        return [text for text in texts if isinstance(text, str)]  # a pairs row's non-string is the step's error

    @property
    def trains_on_answers(self) -> bool:
        """Whether steps train on the rows' answers (their `completion` or `answer`): SFT; DPO, KTO and reward
        models without a pairs file (against corruptions of them); GKD's steps off the model's samples."""
        cfg, step = self.cfg, training_step(self.cfg.algo)
        return (
            cfg.algo == "sft"
            or (step in ROW_PAIR_STEPS and self.pair_rows is None)
            or (step == "distill_step" and cfg.lmbda < 1 and not cfg.seq_kd)
        )

    def tpo_step(self) -> dict[str, float]:
        """TPO: the reference-free preference loss on `batch_size` pairs (the reference's log-probs taken as 0),
        plus tpo_alpha times the gold completions' token-mean NLL, all three completions of a row in one pass."""
        cfg = self.cfg
        rows = self.draw_rows("pairs" if self.pair_rows is not None else "train", cfg.batch_size)
        pairs = [preference_pair(row, self.rng) for row in rows]
        n = len(pairs)
        completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
        if cfg.tpo_alpha:  # the gold completions: a pairs row's reference, else the row's answer
            completions += [row["reference"] if "reference" in row else expert_completion(row) for row in rows]
        prompt_ids, prompt_mask, ids, mask = self.encode_examples([p for p, _, _ in pairs] * (len(completions) // n),
                                                                  completions)  # fmt: skip
        logp = token_logprobs(self.model, prompt_ids, prompt_mask, ids, mask)[0]
        pair = pair_logps(logp[: 2 * n], mask[: 2 * n], ref_sums=torch.zeros(2 * n))
        loss, metrics = preference_loss(cfg.preference_loss, pair, cfg.preference_settings)
        if cfg.tpo_alpha:
            gold_mask = mask[2 * n :]
            gold_nll = -(logp[2 * n :] * gold_mask).sum() / gold_mask.sum().clamp_min(1)
            loss = loss + cfg.tpo_alpha * gold_nll
            metrics["gold_nll"] = gold_nll.detach()
        self._optimize(loss)
        return {"loss": float(loss.detach()), "tokens": float(mask.sum()), **{k: float(v) for k, v in metrics.items()}}

    def _teacher(self, cfg: LLMConfig, inputs: LLMInputs) -> tuple[Any, Any]:
        """The frozen teacher of distill, gkd and gold, the object given or the config's model, with the model's
        vocabulary (the divergence compares their distributions token by token), or, with use_uld_loss, any; and
        its tokenizer where it was loaded from a directory (else None)."""
        given = _given(cfg, inputs, "teacher")
        if given is self.model:
            raise LLMError("the teacher given is the model being trained", "pass a copy (copy.deepcopy(model))")
        fix = "distill from a teacher that uses the model's tokenizer" + (
            ", or set use_uld_loss=true (ULD, across tokenizers)"
            if cfg.algo == "gold"
            else " (gold: across tokenizers)"
        )
        tokenizer = None
        if isinstance(given, str):
            teacher, tokenizer = load_model(given, cfg.seed)
            if not cfg.use_uld_loss and tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise LLMError(
                    f"the teacher {given} has another tokenizer than the model (vocabularies of {len(tokenizer)} "
                    f"and {len(self.tokenizer)} tokens, or the same size with other ids)",
                    fix,
                )
        else:
            teacher = given
        sizes = [m.get_output_embeddings().weight.shape[0] for m in (teacher, self.model)]
        if sizes[0] != sizes[1] and not cfg.use_uld_loss:
            raise LLMError(
                f"the teacher's output layer has {sizes[0]} tokens and the model's {sizes[1]}",
                fix,
            )
        return teacher.eval().requires_grad_(False), tokenizer

    def _cross_tokenizer(self, cfg: LLMConfig, tokenizer: Any) -> CrossTokenizer:
        """gold's ULD: the teacher's tokenizer (teacher_tokenizer's, else `tokenizer`, the teacher directory's) and
        the loss."""
        if cfg.teacher_tokenizer is not None:
            from transformers import AutoTokenizer

            with without_progress_bars():
                tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.teacher_tokenizer))
        if tokenizer is None:
            raise LLMError(
                "use_uld_loss=true reads the teacher's tokens, and the teacher was given as a model without its "
                "tokenizer",
                "set teacher_tokenizer=DIR (a save_pretrained tokenizer), or give the teacher as a directory",
            )
        if cfg.seq_kd and tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise LLMError(
                "seq_kd trains on the teacher's samples, which come in the teacher's tokens, another tokenizer's",
                "drop seq_kd (the steps off the model's samples then train on the rows' answers)",
            )
        weights = None
        if cfg.uld_hybrid_matched_weight is not None and cfg.uld_hybrid_unmatched_weight is not None:
            weights = (cfg.uld_hybrid_matched_weight, cfg.uld_hybrid_unmatched_weight)
        settings = ULDSettings(
            extended=cfg.use_extended_uld, strategy=cfg.uld_token_merge_strategy,
            student_temperature=cfg.uld_student_temperature, teacher_temperature=cfg.uld_teacher_temperature,
            skip_student_eos=cfg.uld_skip_student_eos, skip_teacher_eos=cfg.uld_skip_teacher_eos,
            hybrid=cfg.uld_use_hybrid_loss, beta=cfg.beta, hybrid_weights=weights,
        )  # fmt: skip
        return CrossTokenizer(self.tokenizer, tokenizer, settings)

    def _row_tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"train": self.train_rows, "expert": self.expert_rows, "pairs": self.pair_rows or []}

    def draw_rows(self, kind: str, n: int) -> list[dict[str, Any]]:
        """The next n rows of a table ("train", "expert" or "pairs") in its shuffled epochs."""
        table = self._row_tables()[kind]
        return [table[i] for i in self.orders[kind].draw(n)]

    def sample_rows(self, n: int) -> list[dict[str, Any]]:
        return self.draw_rows("train", n)

    @property
    def epochs_done(self) -> float:
        """Passes over the rows the steps draw from (the pairs for DPO with a pairs table, else the prompts)."""
        uses_pairs = training_step(self.cfg.algo) in ROW_PAIR_STEPS and self.pair_rows is not None
        return self.orders["pairs" if uses_pairs else "train"].epochs_done

    def rollout(self, rows: list[dict[str, str]], greedy: bool = False) -> tuple[Rollout, list[str]]:
        """One completion of each row's prompt (rows repeat for groups), cut at the stop strings, with the tools'
        calls run and sampled on from (`tool_runner`); and their text."""
        prompts = [row["prompt"] for row in rows]
        instances: list[Any] | None = None
        if self.environments is not None:
            instances, observations, own_tools = self.environments.reset(rows)
            prompts = [self.with_observation(p, o) for p, o in zip(prompts, observations)]
        if self.rollout_func is not None:
            rollout = self.custom_rollout(prompts, greedy)
            rollout.rows, rollout.environments = rows, instances
            return rollout, decode(self.tokenizer, rollout)
        ids, mask = self.encode_prompts(prompts)
        group = 1 if greedy else self.cfg.group_size
        rollout = self._sample(ids, mask, group, greedy, self.max_new_tokens)
        if self.tool_runner is not None:
            tools = [self.tools] * len(rows)
            if self.environments is not None:
                tools = [{**self.tools, **own} for own in own_tools]
            rollout = self._run_tools(rollout, greedy, tools)
        rollout.rows, rollout.environments = rows, instances
        return rollout, decode(self.tokenizer, rollout)

    def with_observation(self, prompt: str, observation: str) -> str:
        """The prompt with an environment's reset text: appended to its last message's content and rendered again
        for a conversational prompt (as TRL appends it to the last user message), else to its text."""
        if not observation:
            return prompt
        found = self.prompt_messages.get(prompt)
        if found is None:
            return prompt + observation
        messages, described = found
        last = messages[-1]
        return render(self.chat, [*messages[:-1], {**last, "content": last["content"] + observation}], described)

    def _sample(
        self,
        ids: Tensor,
        mask: Tensor,
        group: int,
        greedy: bool,
        width: int,
        context: tuple[Tensor, Tensor] | None = None,
    ) -> Rollout:
        """One completion of each left-padded prompt row, in the workers or the learner (`group`: the rows come
        in groups of that many repeats, which the workers keep whole), after each row's `context` (ids and mask,
        left-padded: `generate`'s) where given."""
        if self.other_sampler is not None:  # the reference (xpo) or its mixture with the policy (nash_md)
            model, mixture = self.other_sampler
            with self.eval_mode():
                return generate(
                    model, ids, mask, max_new_tokens=width, eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id, greedy=greedy, generator=self.generator,
                    context_ids=None if context is None else context[0],
                    context_mask=None if context is None else context[1], mixture=mixture, **self.sampling_options,
                )  # fmt: skip
        if context is not None and self.workers is not None:  # the workers take whole rows
            ids, mask, context = torch.cat([ids, context[0]], -1), torch.cat([mask, context[1]], -1), None
        if self.workers is not None:
            return self.workers.generate(
                self.model, ids, mask, group, max_new_tokens=width, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, greedy=greedy, **self.sampling_options,
            )  # fmt: skip
        with self.eval_mode():
            return generate(
                self.model,
                ids,
                mask,
                max_new_tokens=width,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                greedy=greedy,
                generator=self.generator,
                record=not greedy and self.trains_on_sampled_batch,
                context_ids=None if context is None else context[0],
                context_mask=None if context is None else context[1],
                **self.sampling_options,
            )

    @contextlib.contextmanager
    def sampling_from(self, model: Any, mixture: tuple[Any, float] | None = None) -> Iterator[None]:
        """Completions sampled inside come from `model` (with `mixture` (other, m): the geometric mixture
        model^(1 - m) other^m), in the learner, with the run's sampling settings and generator, tools included."""
        self.other_sampler = (model, mixture)
        try:
            yield
        finally:
            self.other_sampler = None

    def _run_tools(self, rollout: Rollout, greedy: bool, tools: list[dict[str, Tool]]) -> Rollout:
        """The rollout cut at its stop strings, with each tool call's result appended and sampling gone on from
        it; the step's tool_calls and tool_failures counted."""
        assert self.tool_runner is not None
        width = self.max_new_tokens

        def sample_on(ids: Tensor, mask: Tensor, own: Tensor, own_mask: Tensor, room: int) -> list[Turn]:
            more = self._sample(ids, mask, 1, greedy, room, context=(own, own_mask))
            return turns_of(more.completion_ids, more.completion_mask, more.logprobs)

        prompts = [row[row_mask.bool()].tolist() for row, row_mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
        first = turns_of(rollout.completion_ids, rollout.completion_mask, rollout.logprobs)
        turns, stats = self.tool_runner.run(prompts, first, sample_on, width, tools)
        self.tool_stats.calls += stats.calls
        self.tool_stats.failures += stats.failures
        return self.rollout_of_turns(rollout.prompt_ids, rollout.prompt_mask, turns, width)

    def rollout_of_turns(self, prompt_ids: Tensor, prompt_mask: Tensor, turns: list[Turn], width: int) -> Rollout:
        """A rollout of completions some of whose tokens are not the model's (tools' results, an environment's
        text): those in its tool_mask, and `final` each completion's text after the last of them."""
        ids, trained, logprobs, tool = padded_turns(turns, width, self.tokenizer.pad_token_id)
        after = [turn.ids[len(turn.trained) - turn.trained[::-1].index(False) :] if False in turn.trained else turn.ids
                 for turn in turns]  # fmt: skip
        final = decode_lists(self.tokenizer, after)
        return Rollout(prompt_ids, prompt_mask, ids, trained, logprobs, tool_mask=tool, final=final)

    def custom_rollout(self, prompts: list[str], greedy: bool) -> Rollout:
        """The completions `rollout_func` returns for these prompts (one per prompt: a group's prompt comes
        `group_size` times), as a rollout; one error naming what it got wrong."""
        assert self.rollout_func is not None
        self.rollout_greedy = greedy
        name = getattr(self.rollout_func, "__name__", "rollout_func")
        out = self.rollout_func(prompts, self)
        if not isinstance(out, dict) or any(k not in out for k in ("completion_ids", "logprobs")):
            raise LLMError(f"{name} returned {type(out).__name__} without completion_ids and logprobs",
                           'return {"completion_ids": [[...], ...], "logprobs": [[...], ...], ...}')  # fmt: skip
        n = len(prompts)
        for key, value in out.items():
            if not isinstance(value, list | tuple) or len(value) != n:
                raise LLMError(f"{name}'s {key} has {len(value) if isinstance(value, list | tuple) else 'no'} "
                               f"entries for {n} prompts", "return one entry per prompt it was given")  # fmt: skip
        masks = out.get("env_mask") or [[1] * len(ids) for ids in out["completion_ids"]]
        turns = []
        for i, (ids, logps, mask) in enumerate(zip(out["completion_ids"], out["logprobs"], masks)):
            if not len(ids) == len(logps) == len(mask):
                raise LLMError(f"{name}'s completion {i} has {len(ids)} tokens, {len(logps)} logprobs and "
                               f"{len(mask)} env_mask values", "give each token one of each")  # fmt: skip
            turns.append(Turn([int(t) for t in ids], [bool(m) for m in mask], [float(v) for v in logps]))
        if "prompt_ids" in out:
            prompt_ids, prompt_mask = left_padded([[int(t) for t in ids] for ids in out["prompt_ids"]],
                                                  self.tokenizer.pad_token_id)  # fmt: skip
        else:
            prompt_ids, prompt_mask = self.encode_prompts(prompts)
        width = max(1, max(len(turn.ids) for turn in turns))
        rollout = self.rollout_of_turns(prompt_ids, prompt_mask, turns, width)
        known = ("prompt_ids", "completion_ids", "logprobs", "env_mask")
        rollout.extra = {k: list(v) for k, v in out.items() if k not in known}
        return rollout

    @property
    def sampling_options(self) -> dict[str, Any]:
        """`rollout.generate`'s sampling settings of the run."""
        cfg = self.cfg
        return {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "min_p": cfg.min_p,
                "repetition_penalty": cfg.repetition_penalty}  # fmt: skip

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Dropout off for sampling and scoring, back on after (only for models that have dropout: switching modes
        walks every module twice)."""
        if self.switch_modes:
            self.model.eval()
        try:
            yield
        finally:
            if self.switch_modes:
                self.model.train()

    @property
    def trains_on_sampled_batch(self) -> bool:
        """Whether the first training pass of an RL step runs on the sampled batch as it is, at the weights it was
        sampled with: then the sampler records its activations and that pass skips its forward (fast_train.Tape).
        Not where the batch changes first (DAPO's refills, LUFFY's expert rows, online DPO's pairs, micro-batches,
        the cuts at stop strings and the tools' results)."""
        cfg = self.cfg
        return (
            cfg.algo not in ("online_dpo", "xpo")
            and not cfg.dynamic_sampling
            and cfg.steps_per_generation == 1
            and cfg.mix != "luffy"
            and not cfg.stop
            and not self.calls_tools
            and self.rollout_func is None
            and (cfg.micro_batch_size is None or cfg.micro_batch_size >= cfg.batch_size * cfg.group_size)
        )

    def encode_examples(self, prompts: list[str], completions: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids, prompt mask, completion ids + EOS, their mask) of given examples, `truncated` to
        max_length."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        ids, mask = self.encode_prompts.answers(completions)
        return truncated(prompt_ids, prompt_mask, ids, mask, self.cfg.max_length, self.tokenizer.pad_token_id)

    def encode_completions(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Given completions as (ids + EOS, right-padded; the mask of the model's tokens; the mask of the tools'
        results in them, None in a run without tools, where every token is the model's)."""
        if not self.calls_tools:
            ids, mask = self.encode_prompts.answers(texts)
            return ids, mask, None
        traces = [trace_tokens(self.encode_prompts.token_lists, text, self.tool_format) for text in texts]
        eos = self.tokenizer.eos_token_id
        turns = [Turn(ids + [eos], trained + [True], [0.0] * (len(ids) + 1)) for ids, trained in traces]
        ids, mask, _, tool = padded_turns(turns, max(len(t.ids) for t in turns), self.tokenizer.pad_token_id)
        return ids, mask, tool

    def sft_batch(self, rows: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids, prompt mask, completion ids, the mask of the trained completion tokens) of SFT rows: the
        prompt and its expert completion, or for a `messages` or plain-text row its whole tokens (`whole_tokens`)."""
        limit, pad = self.cfg.max_length, self.tokenizer.pad_token_id
        if not any(self.trained_whole(row) for row in rows):
            prompt_ids, prompt_mask = self.encode_prompts([row["prompt"] for row in rows])
            ids, mask, _ = self.encode_completions([expert_completion(row) for row in rows])
            return truncated(prompt_ids, prompt_mask, ids, mask, limit, pad)
        if all(self.trained_whole(row) for row in rows):
            whole = [self.whole_tokens(row) for row in rows]
            if all(all(trained) for _, _, trained in whole):  # plain text, whole conversations: every token trained
                prompt_ids, prompt_mask = _padded([prompt for prompt, _, _ in whole], pad, left=True)
                prompt_mask = prompt_mask.long()  # as encode_prompts gives it
                ids, mask = _padded([rest for _, rest, _ in whole], pad, left=False)
                return truncated(prompt_ids, prompt_mask, ids, mask, limit, pad)
        prompts: list[list[int]] = []
        turns: list[Turn] = []
        for row in rows:
            prompt, rest, trained = self.whole_tokens(row) if self.trained_whole(row) else self.completion_tokens(row)
            prompts.append(prompt)
            turns.append(Turn(rest, trained, [0.0] * len(rest)))
        prompt_ids, prompt_mask = left_padded(prompts, pad)
        ids, mask, _, _ = padded_turns(turns, max(len(t.ids) for t in turns), pad)
        return truncated(prompt_ids, prompt_mask, ids, mask, limit, pad)

    def prompted(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows that are not plain text."""
        return [row for row in rows if not is_text_row(row, self.cfg.dataset_text_field)]

    @contextlib.contextmanager
    def neftune(self) -> Iterator[None]:
        """With neftune_noise_alpha: NEFTune's noise added to the input embeddings' output in training mode
        (transformers' hook), from the run's generator (so a resumed run draws the same noise)."""
        alpha = self.cfg.neftune_noise_alpha
        if alpha is None:
            yield
            return
        generator = self.generator

        def noisy(module: Any, inputs: Any, output: Tensor) -> Tensor:
            if not module.training:
                return output
            bound = alpha / math.sqrt(output.shape[1] * output.shape[2])
            noise = torch.rand(output.shape, generator=generator, dtype=output.dtype) * (2 * bound) - bound
            return output + noise

        handle = self.model.get_input_embeddings().register_forward_hook(noisy)
        try:
            yield
        finally:
            handle.remove()

    def trained_whole(self, row: dict[str, Any]) -> bool:
        """Whether SFT trains on a row whole (a `messages` row's conversation, a plain-text row's text, with
        completion_only_loss=false a prompt and its completion) rather than on a prompt's completion."""
        return "messages" in row or is_text_row(row, self.cfg.dataset_text_field) or not self.cfg.completion_only_loss

    def completion_tokens(self, row: dict[str, Any]) -> tuple[list[int], list[int], list[bool]]:
        """(prompt tokens, the expert completion's tokens and EOS, which of them are the model's: not a tool's
        result) of a prompt row."""
        prompt = self.encode_prompts.token_lists([row["prompt"]])[0]
        ids, mask, _ = self.encode_completions([expert_completion(row)])
        return prompt, ids[0].tolist(), mask[0].tolist()

    def whole_tokens(self, row: dict[str, Any]) -> tuple[list[int], list[int], list[bool]]:
        """(prompt tokens, the rest's tokens, which of the rest are trained) of a row SFT trains on whole, each
        tokenized once: a `messages` row's conversation (chat.conversation_tokens), or a plain-text row's tokens as
        TRL's SFT takes them (the tokenizer's own special tokens, then EOS), every one after the first trained, or
        with completion_only_loss=false a prompt row's prompt and completion tokens, every one after the first
        trained but a tool's result."""
        if "messages" not in row and not is_text_row(row, self.cfg.dataset_text_field):
            prompt, rest, trained = self.completion_tokens(row)  # cached by the PromptEncoder
            return prompt[:1], prompt[1:] + rest, [True] * (len(prompt) - 1) + trained
        if "messages" in row:
            key = ("messages", conversation_key(row["messages"], row.get("environment")))
            if key not in self.whole_cache:
                assistant_only = self.cfg.assistant_only_loss
                described = self.described(row) if self.described is not None else None
                self.whole_cache[key] = conversation_tokens(self.chat, row["messages"], assistant_only, described)
            return self.whole_cache[key]
        text = row[self.cfg.dataset_text_field]
        if ("text", text) not in self.whole_cache:
            self.warm_texts([text])
        return self.whole_cache[("text", text)]

    def warm_texts(self, texts: list[str]) -> None:
        """Plain-text rows' tokens into `whole_cache` (`whole_tokens`), in one tokenizer call (as TRL maps its
        dataset before training): the tokenizer's own special tokens, then EOS unless the text ends with it."""
        missing = [text for text in dict.fromkeys(texts) if ("text", text) not in self.whole_cache]
        eos = self.tokenizer.eos_token_id
        for text, ids in zip(missing, tokenize(self.tokenizer, missing, special=True) if missing else []):
            ids += [eos] if not ids or ids[-1] != eos else []
            if len(ids) < 2:
                raise LLMError(
                    f"the plain-text row {text[:80]!r} is no tokens but EOS", "give each text row some text to train on"
                )
            self.whole_cache[("text", text)] = (ids[:1], ids[1:], [True] * (len(ids) - 1))

    def sft_step(self) -> dict[str, float]:
        rows = self.sample_rows(self.cfg.batch_size)
        prompt_ids, prompt_mask, answer_ids, answer_mask = self.sft_batch(rows)
        with self.neftune():
            logp, _ = token_logprobs(self.model, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                     fast=self.cfg.neftune_noise_alpha is None)  # fmt: skip
        weighted = logp * logp.detach().exp() if self.cfg.sft_loss == "dft" else logp  # DFT: NLL x p, p held
        loss = -aggregate(weighted, answer_mask, "token-mean")
        self._optimize(loss)
        return {"loss": float(loss.detach()), "tokens": float(answer_mask.sum())}

    def rl_step(self) -> dict[str, float]:
        cfg = self.cfg
        rollout, rewards, metrics = self.sample_groups()
        if cfg.mix == "luffy":
            rollout, rewards = self.with_expert_completions(rollout, rewards)
        if cfg.reward_clip_range is not None:
            rewards = rewards.clamp(*cfg.reward_clip_range)
        if cfg.kl_in_reward:  # RLOO's: the reward minus kl_coef times the sequence's k1 KL to the reference
            kl = self.sequence_kl(rollout)
            rewards = rewards - cfg.kl_coef * kl
            metrics["kl"] = float(kl.mean())
        if rewards.dim() == 2:  # GDPO: each reward function's column normalized in its group
            advantages = decoupled_group_advantages(rewards, self.reward_weights, cfg.group_size)
        else:
            advantages = GROUP_ADVANTAGES.get(cfg.advantage)(rewards, cfg.group_size)
        if cfg.normalize_advantages:
            advantages = whitened(advantages, ~torch.isnan(self.total_reward(rewards)))
        if cfg.importance_sampling_correction:
            rollout, advantages = self.corrected_for_sampler(rollout, advantages, metrics)
        if cfg.log_completions:
            self.note_completions(rollout, self.total_reward(rewards), advantages if advantages.dim() == 1 else None)
        if cfg.overlong_filter:  # completions cut by the length limit teach nothing about how to finish
            ended = ended_with_eos(rollout, self.tokenizer) | self.stopped(rollout)
            rollout = rollout.with_mask(rollout.completion_mask & ended[:, None])
        if cfg.replay_buffer_size:
            rollout, advantages = self.replay.exchange(rollout, advantages, self.total_reward(rewards), metrics)
        mu = parse_schedule(cfg.mix_weight)((self.step - 1) / cfg.steps) if cfg.mix == "chord" else 0.0
        weight = cfg.distillation_weight if cfg.algo == "sdpo" else 0.0  # SDPO's self-distillation term
        slices = self.generation_slices(len(rollout))
        for rows in [rows for _ in range(cfg.updates_per_batch) for rows in slices]:
            part = rollout if len(slices) == 1 else rollout.select(rows)
            self.optimizer.zero_grad()
            part_advantages, teacher_metrics = advantages[rows], dict[str, float]()
            if cfg.algo == "minillm":  # its teacher terms at the current weights, each update
                part_advantages, teacher_metrics = self.minillm_terms(part, part_advantages)
            policy_scale = (1.0 - mu) * (1.0 - weight)
            step_metrics = self.accumulate(part, part_advantages, scale=policy_scale) if policy_scale else {}
            step_metrics.update(teacher_metrics)
            if weight > 0:  # sdpo's self-distillation term on the slice's groups
                distill, distill_metrics = self.sdpo_term(part, rewards[rows])
                self._backward(weight * distill)
                step_metrics.update(distill_loss=float(distill.detach()), **distill_metrics)
                step_metrics.setdefault("loss", float(distill.detach()))
            if cfg.mix == "chord":  # (1 - mu) L_RL above, mu L_imitation here: CHORD's mixed loss, term by term
                expert_loss, mixed = self.with_expert_term(torch.zeros(()), mu)
                self._backward(expert_loss)
                step_metrics.update({k: float(v) for k, v in mixed.items()})
            self._step()
            metrics.update(self._controlled(step_metrics))
        return metrics

    def minillm_terms(self, rollout: Rollout, advantages: Tensor) -> tuple[Tensor, dict[str, float]]:
        """MiniLLM's teacher terms on a batch, from one pass of each model at kd_temperature: with
        single_step_decomposition, the backward of the token-mean KL(pi || p_teacher) of the whole next-token
        distributions; with rkl_advantage, the advantages per token plus each token's reverse-KL advantage
        (`objectives.imitation.reverse_kl_advantages`, without gradient)."""
        cfg = self.cfg
        ids, mask = rollout.completion_ids, rollout.completion_mask
        with torch.no_grad():
            teacher = completion_logits(self.teacher, rollout.prompt_ids, rollout.prompt_mask, ids, mask)
        with torch.set_grad_enabled(cfg.single_step_decomposition):
            student = completion_logits(self.model, rollout.prompt_ids, rollout.prompt_mask, ids, mask,
                                        tape=rollout.tape)  # fmt: skip
        student_logp = torch.log_softmax(student / cfg.kd_temperature, -1)
        teacher_logp = torch.log_softmax(teacher / cfg.kd_temperature, -1)
        metrics: dict[str, float] = {}
        if cfg.single_step_decomposition:
            kl = aggregate(generalized_jsd_of_log_probs(student_logp, teacher_logp, 1.0), mask, "token-mean")
            self._backward(kl)
            metrics["single_step_kl"] = float(kl.detach())
        if not cfg.rkl_advantage:
            return advantages, metrics
        chosen = ids[..., None]
        teacher_chosen, student_chosen = (
            logp.detach().gather(-1, chosen)[..., 0] for logp in (teacher_logp, student_logp)
        )
        rkl = reverse_kl_advantages(teacher_chosen, student_chosen, mask, cfg.gamma, cfg.length_normalization)
        metrics["rkl_advantage"] = float(aggregate(rkl, mask, "token-mean"))
        per_token = advantages[:, None] if advantages.dim() == 1 else advantages
        return per_token + rkl, metrics

    @torch.no_grad()
    def corrected_for_sampler(
        self, rollout: Rollout, advantages: Tensor, metrics: dict[str, float]
    ) -> tuple[Rollout, Tensor]:
        """The rollout with the trainer's own log-probs at these weights as its old log-probs, and the advantages
        weighted by their ratio to the sampler's (importance_sampling_correction); the ratio's mean, min and max
        over the masked tokens (or sequences) in `metrics`."""
        cfg = self.cfg
        mask = rollout.completion_mask
        with self.eval_mode():
            trainer_logp, _ = token_logprobs(
                self.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask, cfg.temperature
            )
        bounds = (cfg.importance_sampling_clip_min, cfg.importance_sampling_clip_max)
        rho = sampler_correction_weights(trainer_logp, rollout.logprobs, mask, cfg.importance_sampling_mode, *bounds)
        seen = rho[mask] if rho.dim() == 2 else rho
        mean, low, high = torch.stack([seen.mean(), seen.min(), seen.max()]).tolist()
        metrics.update(is_ratio_mean=mean, is_ratio_min=low, is_ratio_max=high)
        weighted = advantages * rho if rho.dim() == 1 else advantages[:, None] * rho * mask
        return replace(rollout, logprobs=trainer_logp * mask), weighted

    def note_completions(self, rollout: Rollout, rewards: Tensor, advantages: Tensor | None = None) -> None:
        """The step's completions for completions.jsonl (log_completions), the first num_completions_to_print."""
        assert rollout.rows is not None
        count = len(rollout) if self.cfg.num_completions_to_print is None else self.cfg.num_completions_to_print
        texts = decode(self.tokenizer, rollout.select(torch.arange(min(count, len(rollout)))))
        values = rewards[: len(texts)].tolist()
        advantage_values = None if advantages is None else advantages[: len(texts)].tolist()
        for i, (text, reward) in enumerate(zip(texts, values)):
            row: dict[str, Any] = {"step": self.step, "prompt": rollout.rows[i]["prompt"], "completion": text,
                                   "reward": None if reward != reward else reward}  # fmt: skip
            if advantage_values is not None:
                row["advantage"] = advantage_values[i]
            self.logged_completions.append(row)

    def stopped(self, rollout: Rollout) -> Tensor:
        """[N] whether each completion ended at a stop string."""
        if not self.cfg.stop:
            return torch.zeros(len(rollout), dtype=torch.bool)
        texts = rollout.final if rollout.final is not None else decode(self.tokenizer, rollout)
        return torch.tensor([any(s in text for s in self.cfg.stop) for text in texts])

    @torch.no_grad()
    def sequence_kl(self, rollout: Rollout) -> Tensor:
        """[N] sum over each completion's tokens of log pi_old - log pi_ref (the k1 estimate of KL(pi_old || pi_ref),
        from the behaviour log-probs)."""
        assert self.reference is not None
        ref, _ = token_logprobs(self.reference, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                               rollout.completion_mask, self.cfg.temperature)  # fmt: skip
        return ((rollout.logprobs - ref) * rollout.completion_mask).sum(-1)

    def generation_slices(self, rows: int) -> list[Tensor]:
        """The rows of one generation batch that each make an optimizer step: steps_per_generation slices of
        whole groups, in order (one: the batch)."""
        size = self.cfg.group_size
        groups = torch.arange(rows // size).chunk(self.cfg.steps_per_generation)
        return [(g[:, None] * size + torch.arange(size)).reshape(-1) for g in groups]

    def _controlled(self, metrics: dict[str, float]) -> dict[str, float]:
        """After an optimizer step of the policy-gradient loss: the adaptive entropy coefficient's update."""
        if self.entropy_control is not None:
            self.entropy_control.update(metrics["entropy"])
            metrics["entropy_coef"] = self.entropy_control.coef
        return metrics

    def chunks(self, rollout: Rollout) -> list[Tensor]:
        """Row indices of the micro-batches (one chunk without micro_batch_size)."""
        size = self.cfg.micro_batch_size or len(rollout)
        return list(torch.arange(len(rollout)).split(size))

    def accumulate(
        self, rollout: Rollout, advantages: Tensor, scale: float = 1.0, values: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, float]:
        """Backward of scale x the RL loss (PPO: plus vf_coef x the value loss, `values` = (old values, returns)),
        one micro-batch at a time. Each chunk's loss is weighted by its share of the full batch's denominator
        (its tokens for token-mean, its rows for the per-sequence modes), so the gradient is the full batch's."""
        cfg, mask = self.cfg, rollout.completion_mask
        by_rows = cfg.loss in SEQUENCE_LOSSES or cfg.aggregation != "token-mean"  # their losses: means over rows
        totals: dict[str, float] = {}
        for rows in self.chunks(rollout):
            part, part_mask = rollout.select(rows), mask[rows]
            share = len(rows) / len(rollout) if by_rows else float(part_mask.sum() / mask.sum().clamp_min(1))
            hidden: list[Tensor] | None = [] if values is not None else None
            loss, metrics = self.policy_loss(part, advantages[rows], hidden)
            total = scale * share * loss
            if values is not None and hidden is not None and self.value_head is not None:
                old_values, returns = values
                predicted = self.value_head(hidden[0]).squeeze(-1)
                v_loss = value_loss(predicted, returns[rows], old_values=old_values[rows], clip=0.2, mask=part_mask)
                total = total + cfg.vf_coef * float(part_mask.sum() / mask.sum().clamp_min(1)) * v_loss
                metrics["value_loss"] = v_loss.detach()
            self._backward(total)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + share * float(value)
        return totals

    def sample_groups(self) -> tuple[Rollout, Tensor, dict[str, float]]:
        """`batch_size` (times steps_per_generation) groups of `group_size` completions and their rewards. With
        dynamic_sampling (DAPO), groups whose rewards are all equal are dropped and more prompts sampled, for at most
        `max_sampling_rounds` generations; the step then trains on the informative groups it found."""
        cfg, size = self.cfg, self.cfg.group_size
        wanted = cfg.batch_size * cfg.steps_per_generation  # the generation batch's prompts
        rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
        kept: list[tuple[Rollout, Tensor]] = []
        found = sampled = 0
        metrics: dict[str, float] = {}
        self.tool_stats = ToolStats()
        for _ in range(rounds):
            rows = [row for row in self.sample_rows(wanted) for _ in range(size)]
            rollout, completions = self.rollout(rows)
            rewards = self.score(rollout, completions, rows)
            total = self.total_reward(rewards)
            sampled += wanted
            metrics.setdefault("reward", scored_mean(total))  # the policy's, before any filtering
            metrics.setdefault("tokens", float(rollout.completion_mask.sum()))
            if self.calls_tools:
                metrics.update(self.tool_metrics(sampled * size))
            if not cfg.dynamic_sampling:
                return rollout, rewards, metrics
            informative = spread(total.view(-1, size)) if size > 1 else torch.ones(wanted).bool()
            rows_kept = informative.repeat_interleave(size)
            kept.append((rollout.select(rows_kept), rewards[rows_kept]))
            found += int(informative.sum())
            if found >= wanted:
                break
        metrics.update(groups_kept=found / sampled, sampling_rounds=float(len(kept)))
        if found == 0:  # every group was uniform: advantages are zero, the step changes nothing but the KL term
            return rollout, rewards, metrics
        rollout = concat_rollouts([r for r, _ in kept], self.tokenizer.pad_token_id).select(
            torch.arange(min(found, wanted) * size)
        )
        return rollout, torch.cat([w for _, w in kept])[: len(rollout)], metrics

    def tool_metrics(self, completions: int) -> dict[str, float]:
        """TRL's tools/call_frequency (calls per completion) and tools/failure_frequency of the step so far."""
        calls, failures = self.tool_stats.calls, self.tool_stats.failures
        return {"tool_calls": calls / completions, "tool_failures": failures / max(calls, 1)}

    def score(self, rollout: Rollout, completions: list[str], rows: list[dict[str, Any]]) -> Tensor:
        """The completions' rewards: [N], the task's reward plus DAPO's overlong penalty; with GDPO's reward parts,
        [N, K], each reward function's, the penalty (when on) one more column (`reward_weights` weighs them)."""
        cfg, prompts = self.cfg, [row["prompt"] for row in rows]
        penalty = overlong_penalty(rollout, self.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        if cfg.missing_eos_penalty:  # TRL's online DPO: a completion cut before its EOS scores less
            cut = ~ended_with_eos(rollout, self.tokenizer)
            penalty = penalty - cfg.missing_eos_penalty * cut.to(penalty.dtype)
        if self.reward_parts is None:  # the penalty applies to every completion, as TRL's overlong reward function
            rewards = call_reward(self.task, prompts, completions, rows, rollout)
            return torch.where(torch.isnan(rewards) & self.penalizes, penalty, rewards + penalty)
        columns = reward_columns(self.task, rows, completions, rollout)
        parts = [torch.tensor(checked_call(fn, prompts, completions, columns)) for fn, _ in self.reward_parts]
        return torch.stack(parts + ([penalty] if self.penalizes else []), 1)

    @property
    def penalizes(self) -> bool:
        """Whether `score` adds a penalty: DAPO's overlong one or the missing EOS's."""
        return self.cfg.overlong_buffer > 0 or bool(self.cfg.missing_eos_penalty)

    @property
    def reward_weights(self) -> Tensor:
        """The weights of `score`'s columns under GDPO: the reward functions', then 1 for the penalties' column."""
        assert self.reward_parts is not None
        penalty = [1.0] if self.penalizes else []
        return torch.tensor([weight for _, weight in self.reward_parts] + penalty)

    def total_reward(self, rewards: Tensor) -> Tensor:
        """[N] the weighted sum of `score`'s rewards (themselves where they are one column) over the functions
        that apply; NaN where none does."""
        if rewards.dim() == 1:
            return rewards
        total = torch.nansum(rewards * self.reward_weights.to(rewards.dtype), 1)
        return total.masked_fill(torch.isnan(rewards).all(1), float("nan"))

    def rollout_logprobs(self, rollout: Rollout, hidden: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`token_logprobs` of the policy on a rollout's completions, reading the sampler's tape where it can."""
        return token_logprobs(
            self.model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            self.cfg.temperature,
            hidden,
            tape=rollout.tape,
        )

    def policy_loss(
        self, rollout: Rollout, advantages: Tensor, hidden: list[Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The RL loss on a rollout: `advantages` per sequence [N] or per token [N, T]; `hidden` (a list) receives
        the last hidden states (PPO's value head reads them)."""
        cfg = self.cfg
        mask, mode = rollout.completion_mask, cfg.aggregation
        logp, entropy = self.rollout_logprobs(rollout, hidden)
        advantages = self.masked_advantages(rollout, advantages, logp, entropy)
        per_token = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
        if cfg.loss in SEQUENCE_LOSSES:
            assert cfg.clip_low is not None and cfg.clip_high is not None
            surrogate = {"gspo": gspo_surrogate, "luspo": luspo_surrogate, "gmpo": gmpo_surrogate}[cfg.loss]
            loss, metrics = surrogate(
                logp, rollout.logprobs, advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high
            )
        elif cfg.loss == "gspo_token":
            loss, metrics = gspo_token_surrogate(
                logp, rollout.logprobs, per_token, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                aggregation=mode,
            )  # fmt: skip
        elif cfg.loss == "vespo":
            loss, metrics = vespo_loss(
                logp, rollout.logprobs, per_token, mask, k_pos=cfg.vespo_k_pos, lambda_pos=cfg.vespo_lambda_pos,
                k_neg=cfg.vespo_k_neg, lambda_neg=cfg.vespo_lambda_neg, aggregation=mode,
            )  # fmt: skip
        elif cfg.loss == "cispo":
            high = 0.28 if cfg.clip_high is None else cfg.clip_high
            loss, metrics = cispo_loss(
                logp, rollout.logprobs, per_token, mask, clip_high=high, clip_low=cfg.clip_low, aggregation=mode
            )
        elif cfg.loss == "sapo":
            loss, metrics = sapo_loss(
                logp, rollout.logprobs, per_token, mask, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, aggregation=mode
            )
        elif rollout.off_policy is not None:  # LUFFY: shaped, unclipped loss on the expert's tokens
            token_loss, clipped, ratio, log_ratio = pg_token_losses(
                logp,
                rollout.logprobs,
                per_token,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip,
            )
            shaped = policy_shaping_loss(logp, per_token, cfg.shaping_gamma)
            on_policy = mask & ~rollout.off_policy[:, None]
            loss = aggregate(torch.where(rollout.off_policy[:, None], shaped, token_loss), mask, mode)
            metrics = surrogate_metrics(ratio, log_ratio, clipped, on_policy)
        else:
            loss, metrics = pg_surrogate(
                logp,
                rollout.logprobs,
                per_token,
                mask=mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip,
                aggregation=mode,
            )
        if self.reference is not None and not cfg.kl_in_reward:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(
                    self.reference,
                    rollout.prompt_ids,
                    rollout.prompt_mask,
                    rollout.completion_ids,
                    mask,
                    cfg.temperature,
                )
            kl_tokens = kl_penalty(logp, ref_logp, cfg.kl_estimator)
            if cfg.use_bias_correction_kl:
                kl_tokens = kl_tokens * torch.exp(logp - rollout.logprobs)
            kl = aggregate(kl_tokens, mask, mode)
            loss = loss + cfg.kl_coef * kl
            metrics["kl"] = kl.detach()
        metrics["entropy"] = aggregate(entropy, mask, "token-mean").detach()
        coef = self.entropy_control.coefficient() if self.entropy_control is not None else cfg.entropy_coef
        if coef:
            loss = loss - coef * aggregate(entropy, mask, mode)
        return loss, metrics

    def masked_advantages(self, rollout: Rollout, advantages: Tensor, logp: Tensor, entropy: Tensor) -> Tensor:
        """The advantages with TRL's loss masks applied, as zeros (every loss here is linear in A, so a zero is the
        token left out; the aggregation's denominator still counts it, as TRL's): below the batch's
        top_entropy_quantile of token entropies, and off-policy sequences (A < 0 and a mean token
        KL(pi_old || pi) above off_policy_mask_threshold)."""
        cfg, mask = self.cfg, rollout.completion_mask
        with torch.no_grad():
            if cfg.off_policy_mask_threshold is not None:
                weights = mask.to(logp.dtype)
                kl = ((rollout.logprobs - logp.detach()) * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
                on_policy = kl <= cfg.off_policy_mask_threshold
                advantages = advantages * (
                    (advantages >= 0) | (on_policy if advantages.dim() == 1 else on_policy[:, None])
                )
            if cfg.top_entropy_quantile < 1 and mask.any():
                threshold = torch.quantile(entropy.detach()[mask].float(), 1.0 - cfg.top_entropy_quantile)
                per_token = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
                advantages = per_token * ((entropy.detach() >= threshold) & mask)
        return advantages

    def with_expert_completions(self, rollout: Rollout, rewards: Tensor) -> tuple[Rollout, Tensor]:
        """LUFFY: the last completion of every group replaced by the row's expert completion (behaviour
        log-prob 0: the expert's probability taken as 1), rewarded like the others and marked off-policy."""
        assert rollout.rows is not None
        size, width = self.cfg.group_size, rollout.completion_ids.shape[1]
        last = torch.arange(size - 1, len(rollout), size)
        rows = [rollout.rows[i] for i in last.tolist()]
        texts = [self.luffy_experts[row["prompt"]] for row in rows]
        ids, mask, tool = self.encode_completions(texts)
        ids = torch.nn.functional.pad(ids, (0, max(width - ids.shape[1], 0)), value=self.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, max(width - mask.shape[1], 0)))
        completion_ids, completion_mask = rollout.completion_ids.clone(), rollout.completion_mask.clone()
        completion_ids[last], completion_mask[last] = ids[:, :width], mask[:, :width]
        tool_mask = rollout.tool_mask
        if tool is not None and tool_mask is not None:
            tool_mask = tool_mask.clone()
            tool_mask[last] = torch.nn.functional.pad(tool, (0, max(width - tool.shape[1], 0)))[:, :width]
        logprobs = rollout.logprobs.clone()
        logprobs[last] = 0.0
        off_policy = torch.zeros(len(rollout), dtype=torch.bool)
        off_policy[last] = True
        rewards = rewards.clone()
        rewards[last] = call_reward(self.task, [row["prompt"] for row in rows], texts, rows)
        mixed = replace(
            rollout,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs,
            off_policy=off_policy,
            tool_mask=tool_mask,
            final=None,  # the expert rows' texts changed: decoded again where needed
        )
        return mixed, rewards

    def with_expert_term(self, rl_loss: Tensor, mu: float) -> tuple[Tensor, dict[str, Tensor]]:
        """CHORD: (1 - mu) rl_loss + mu mean over expert tokens of -w log pi (w = 1, or p (1 - p) with mix_phi)."""
        cfg = self.cfg
        rows = self.draw_rows("expert", cfg.expert_batch_size or cfg.batch_size)
        prompt_ids, prompt_mask = self.encode_prompts([row["prompt"] for row in rows])
        ids, mask, _ = self.encode_completions([expert_completion(row) for row in rows])
        logp, _ = token_logprobs(self.model, prompt_ids, prompt_mask, ids, mask)
        weights = imitation_weights(logp, "phi" if cfg.mix_phi else "uniform")
        return mixed_policy_loss(rl_loss, logp, mu, weights=weights, mask=mask, aggregation="token-mean")

    def ppo_step(self) -> dict[str, float]:
        """PPO with a value head: token rewards (the sequence's reward on its last token), GAE over tokens,
        advantages whitened over the batch's tokens, then the clipped surrogate plus vf_coef times the clipped
        value loss, `updates_per_batch` times."""
        cfg, head = self.cfg, self.value_head
        assert head is not None
        rollout, rewards, metrics = self.sample_groups()
        require_scored(rewards, cfg.algo)
        if cfg.log_completions:
            self.note_completions(rollout, rewards)
        mask = rollout.completion_mask
        with torch.no_grad():
            hidden: list[Tensor] = []
            self.rollout_logprobs(rollout, hidden)
            old_values = head(hidden[0]).squeeze(-1) * mask
            advantages, returns = token_gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
            valid = advantages[mask]
            advantages = (advantages - valid.mean()) / (valid.std() + 1e-8) * mask
        for _ in range(cfg.updates_per_batch):
            self.optimizer.zero_grad()
            step_metrics = self.accumulate(rollout, advantages, values=(old_values, returns))
            self._step()
            metrics.update(self._controlled(step_metrics))
        return metrics

    def dpo_step(self) -> dict[str, float]:
        """DPO on pairs: the pairs file's, or the task's answers against one-character corruptions of them."""
        if self.reference_sums is not None:  # precomputed: the rows' indices pick their reference log-probs
            assert self.pair_rows is not None
            indices = self.orders["pairs"].draw(self.cfg.batch_size)
            rows = [self.pair_rows[i] for i in indices]
            ref_sums: Tensor | None = self.reference_sums[torch.as_tensor(indices)].T.reshape(-1)
        else:
            rows = self.draw_rows("pairs" if self.pair_rows is not None else "train", self.cfg.batch_size)
            ref_sums = None
        pairs = [preference_pair(row, self.rng) for row in rows]
        prompt_ids, prompt_mask, ids, mask = self.encode_pairs(pairs)
        return self.preference_update(prompt_ids, prompt_mask, ids, mask, ref_sums)

    def encode_pairs(self, pairs: list[Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`encode_examples` of P (prompt, chosen, rejected, ...) pairs: the P chosen completions, then the P
        rejected ones."""
        completions = [pair[1] for pair in pairs] + [pair[2] for pair in pairs]
        return self.encode_examples([pair[0] for pair in pairs] * 2, completions)

    def distill_step(self) -> dict[str, float]:
        """On-policy distillation and GKD: `batch_size` prompts with `group_size` completions each, sampled by the
        model (every step with lmbda 1, else with probability lmbda), else the rows' answers or, with seq_kd, the
        teacher's samples; the loss is the token mean over the completions of the divergence between the model's
        and the teacher's next-token distributions at each of their positions (distill_loss jsd), or REINFORCE on
        the teacher's log-prob of each token minus the model's (sampled, iw_opd)."""
        cfg = self.cfg
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        on_policy = cfg.lmbda >= 1 or self.rng.random() < cfg.lmbda
        if on_policy or cfg.seq_kd:
            rollout = self.rollout(rows)[0] if on_policy else self.teacher_rollout(rows)
            prompt_ids, prompt_mask, tape = rollout.prompt_ids, rollout.prompt_mask, rollout.tape
            ids, mask = rollout.completion_ids, rollout.completion_mask
        else:
            prompts, answers = [row["prompt"] for row in rows], [expert_completion(row) for row in rows]
            prompt_ids, prompt_mask, ids, mask = self.encode_examples(prompts, answers)
            tape = None
        metrics = {"tokens": float(mask.sum()), "on_policy": float(on_policy)}
        if self.cross is not None:
            texts = decode_lists(self.tokenizer, [row[keep].tolist() for row, keep in zip(ids, mask)])
            loss, uld_metrics = self.uld_loss([row["prompt"] for row in rows], prompt_ids, prompt_mask, ids, mask,
                                              texts, tape)  # fmt: skip
            self._optimize(loss)
            return {"loss": float(loss.detach()), **metrics, **{k: float(v) for k, v in uld_metrics.items()}}
        student = completion_logits(self.model, prompt_ids, prompt_mask, ids, mask, tape=tape)
        with torch.no_grad():
            teacher = completion_logits(self.teacher, prompt_ids, prompt_mask, ids, mask)
        if cfg.distill_loss == "jsd":
            loss = aggregate(generalized_jsd(student, teacher, cfg.beta, cfg.temperature), mask, "token-mean")
        else:
            student_logp = _chosen_logprobs(student, ids, cfg.temperature)
            teacher_logp = _chosen_logprobs(teacher, ids, cfg.temperature)
            behaviour = rollout.logprobs if on_policy else student_logp.detach()  # the sampler's, as TRL's
            gamma = cfg.iw_opd_gamma if cfg.distill_loss == "iw_opd" else None
            advantages = sampled_distillation_advantages(teacher_logp, behaviour, mask, gamma)
            loss = aggregate(-advantages * student_logp, mask, "token-mean")
            metrics["reverse_kl"] = float(aggregate(student_logp.detach() - teacher_logp, mask, "token-mean"))
        self._optimize(loss)
        return {"loss": float(loss.detach()), **metrics}

    def uld_loss(
        self, prompts: list[str], prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor,
        texts: list[str], tape: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """gold's ULD loss on a batch of completions (`texts`, their text): the teacher reads the prompts and texts in
        its own tokens; uld_distillation_weight x the ULD distance + uld_crossentropy_weight x the completion
        tokens' NLL. "observed" without uld_skip_*_eos reads the position after each completion's last token too."""
        cfg, cross = self.cfg, self.cross
        assert cross is not None
        observed = cfg.uld_token_merge_strategy == "observed"
        s_ids, s_mask = _one_past(ids, mask) if observed and not cfg.uld_skip_student_eos else (ids, mask)
        student = completion_logits(self.model, prompt_ids, prompt_mask, s_ids, s_mask, tape=tape)
        t_prompt_ids, t_prompt_mask, t_ids, t_mask = cross.teacher_batch(prompts, texts)
        t_read = _one_past(t_ids, t_mask) if observed and not cfg.uld_skip_teacher_eos else (t_ids, t_mask)
        with torch.no_grad():
            teacher = completion_logits(self.teacher, t_prompt_ids, t_prompt_mask, *t_read)
        distance, metrics = cross.loss(student, ids, mask, teacher, t_ids, t_mask, texts)
        loss = cfg.uld_distillation_weight * distance
        metrics["uld_loss"] = distance.detach()
        if cfg.uld_crossentropy_weight > 0:
            nll = -aggregate(_chosen_logprobs(student[:, : ids.shape[1]], ids, 1.0), mask, "token-mean")
            loss = loss + cfg.uld_crossentropy_weight * nll
            metrics["nll"] = nll.detach()
        return loss, metrics

    def sdft_step(self) -> dict[str, float]:
        """SDFT (TRL's SDFTTrainer): `batch_size` prompts with `group_size` completions each, sampled by the model
        from the row's prompt (generate_from_teacher: from the teacher's); the loss, sequence-mean token-mean over
        the completion tokens after the first num_loss_tokens_to_skip, is the divergence at each position between
        the model's next-token distribution given the prompt and the teacher's given the teacher's prompt (the
        prompt with the row's privileged context): on the student's top tokens, on the whole vocabulary, or
        REINFORCE on the sampled tokens' log-prob gap."""
        cfg = self.cfg
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        teacher_prompts = [self.teacher_prompt(row) for row in rows]
        sampled = [{**r, "prompt": p} for r, p in zip(rows, teacher_prompts)] if cfg.generate_from_teacher else rows
        rollout = self.rollout(sampled)[0]
        ids, mask = rollout.completion_ids, rollout.completion_mask
        if cfg.generate_from_teacher:
            prompt_ids, prompt_mask, tape = *self.encode_prompts([row["prompt"] for row in rows]), None
        else:
            prompt_ids, prompt_mask, tape = rollout.prompt_ids, rollout.prompt_mask, rollout.tape
        student = completion_logits(self.model, prompt_ids, prompt_mask, ids, mask, tape=tape)
        teacher = self.self_teacher_logits(teacher_prompts, ids, mask)
        loss_mask = mask & (torch.arange(mask.shape[1]) >= cfg.num_loss_tokens_to_skip)
        loss = self.self_distillation_loss(student, teacher, ids, loss_mask)
        self._optimize(loss)
        return {"loss": float(loss.detach()), "tokens": float(loss_mask.sum())}

    @torch.no_grad()
    def self_teacher_logits(self, prompts: list[str], ids: Tensor, mask: Tensor) -> Tensor:
        """SDFT's and SDPO's teacher's logits at the completions' positions after its own prompts (its copy of the
        model, or with teacher_model_kind live the model itself)."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        teacher = self.model if self.teacher is None else self.teacher
        return completion_logits(teacher, prompt_ids, prompt_mask, ids, mask)

    def self_distillation_loss(
        self, student: Tensor, teacher: Tensor, ids: Tensor, mask: Tensor, sampler_logp: Tensor | None = None
    ) -> Tensor:
        """SDFT's and SDPO's loss with the run's settings (`self_distillation_loss`)."""
        cfg = self.cfg
        return self_distillation_loss(
            student, teacher, ids, mask, mode=cfg.distillation_mode, alpha=cfg.distillation_alpha,
            topk=cfg.distillation_topk, tail=cfg.distillation_add_tail, temperature=cfg.temperature,
            sampler_logp=sampler_logp, is_clip=cfg.distillation_is_clip,
        )  # fmt: skip

    def sdpo_term(self, rollout: Rollout, rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """SDPO's self-distillation loss on a rollout of groups (TRL's SDPOTrainer): each completion whose group
        holds a successful one (reward >= success_reward_threshold; not itself, with dont_reprompt_on_self_success)
        learns the teacher's distributions given the prompt reprompted with the first such completion as the
        solution (and with include_environment_feedback the row's `privileged_context` as feedback); the others
        are in the mean with no tokens. With (the fraction of completions reprompted, of groups with a success)."""
        cfg = self.cfg
        assert rollout.rows is not None
        total, size = self.total_reward(rewards).tolist(), cfg.group_size
        success = [r == r and r >= cfg.success_reward_threshold for r in total]
        wins = [i for i, won in enumerate(success) if won] if cfg.use_successful_as_teacher else []
        demos = dict(zip(wins, decode(self.tokenizer, rollout.select(torch.tensor(wins, dtype=torch.long)))))
        prompts, used = [], []
        for i, row in enumerate(rollout.rows):
            start, own = i // size * size, i if cfg.dont_reprompt_on_self_success else -1
            shown = [j for j in range(start, start + size) if j in demos and j != own]
            solution = ""
            if shown:
                demo = demos[shown[0]]
                if cfg.remove_thinking_from_demonstration:
                    demo = re.sub(r"<think>.*?</think>", "", demo, flags=re.DOTALL).strip()
                solution = cfg.solution_template.format(successful_previous_attempt=demo)
            raw = row.get("privileged_context") if cfg.include_environment_feedback else None
            wanted = not (solution and cfg.environment_feedback_only_without_solution)
            feedback = cfg.feedback_template.format(feedback_raw=raw) if wanted and str(raw or "").strip() else ""
            used.append(bool(solution or feedback))
            fill = partial(cfg.reprompt_template.format, solution=solution, feedback=feedback)
            prompts.append(self.rewritten(row["prompt"], fill) if used[-1] else row["prompt"])
        ids, mask = rollout.completion_ids, rollout.completion_mask
        student = completion_logits(self.model, rollout.prompt_ids, rollout.prompt_mask, ids, mask, tape=rollout.tape)
        teacher = self.self_teacher_logits(prompts, ids, mask)
        reprompted = torch.tensor(used)
        loss = self.self_distillation_loss(student, teacher, ids, mask & reprompted[:, None], rollout.logprobs)
        groups = [any(success[j] for j in range(start, start + size)) for start in range(0, len(success), size)]
        return loss, {"reprompted": float(reprompted.float().mean()), "success_groups": sum(groups) / len(groups)}

    def rewritten(self, prompt: str, fill: Callable[..., str]) -> str:
        """A rendered prompt with its text made `fill(prompt=text)`, or for a conversational prompt its last user
        message's text, the conversation rendered again with its tools (SDFT's and SDPO's teacher prompts, TRL's
        way)."""
        found = self.prompt_messages.get(prompt)
        if found is None:
            return fill(prompt=prompt)
        messages, described = found
        if messages[-1].get("role") != "user":
            raise LLMError(
                f"{self.cfg.algo}'s teacher prompt rewrites the prompt's last user message, and this prompt ends "
                f"with a {messages[-1].get('role')!r} message: {str(messages)[:80]}",
                "end each conversational prompt with the user's turn",
            )
        last = {"role": "user", "content": fill(prompt=message_text(messages[-1]))}
        return render(self.chat, [*messages[:-1], last], described)

    def teacher_prompt(self, row: dict[str, Any]) -> str:
        """sdft: the row's prompt with its privileged context, by teacher_prompt_template (`rewritten`)."""
        context = privileged_text(row)
        key = (row["prompt"], context)
        if key not in self.teacher_prompts:
            fill = partial(self.cfg.teacher_prompt_template.format, privileged_context=context)
            self.teacher_prompts[key] = self.rewritten(row["prompt"], fill)
        return self.teacher_prompts[key]

    @torch.no_grad()
    def teacher_rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """One completion per row sampled by the teacher (GKD's seq_kd), with the run's sampling settings."""
        ids, mask = self.encode_prompts([row["prompt"] for row in rows])
        with self.sampling_from(self.teacher):
            return self._sample(ids, mask, 1, False, self.max_new_tokens)

    @torch.no_grad()
    def _reference_sums(self) -> Tensor:
        """precompute_ref_log_probs: the reference's sequence log-probs (LD-DPO's weights applied) of every pairs
        row, in batches of batch_size rows in file order, [R, 2] (chosen, rejected)."""
        assert self.pair_rows is not None and self.reference is not None
        sums = []
        for start in range(0, len(self.pair_rows), self.cfg.batch_size):
            pairs = [preference_pair(row, self.rng) for row in self.pair_rows[start : start + self.cfg.batch_size]]
            prompt_ids, prompt_mask, ids, mask = self.encode_pairs(pairs)
            ref = pair_logps(token_logprobs(self.reference, prompt_ids, prompt_mask, ids, mask)[0], mask, None,
                             self.cfg.ld_alpha)  # fmt: skip
            sums.append(torch.stack([ref.chosen, ref.rejected], 1))
        return torch.cat(sums)

    def kto_step(self) -> dict[str, float]:
        """KTO (and BCO) on `batch_size` rows: a KTO file's labelled completions, or pairs unpaired (each a
        desirable and an undesirable completion), the task's answers and their corruptions without a file. KTO's
        reference point is the KL estimate over the batch's completions each paired with the previous row's prompt
        (rotated by one, as TRL's KTOTrainer does); BCO's, the running mean of the rewards (`bco_delta`)."""
        cfg = self.cfg
        rows = self.draw_rows("pairs" if self.pair_rows is not None else "train", cfg.batch_size)
        examples = [example for row in rows for example in unpaired_examples(row, self.rng)]
        prompts = [prompt for prompt, _, _ in examples]
        completions = [completion for _, completion, _ in examples]
        desirable = torch.tensor([label for _, _, label in examples])
        n, with_kl = len(examples), cfg.unpaired_loss == "kto"
        mismatched = completions[-1:] + completions[:-1] if with_kl else []
        prompt_ids, prompt_mask, ids, mask = self.encode_examples(prompts * (1 + with_kl), completions + mismatched)
        logp = token_logprobs(self.model, prompt_ids[:n], prompt_mask[:n], ids[:n], mask[:n])[0].sum(-1)
        assert self.reference is not None
        with torch.no_grad():
            ref = token_logprobs(self.reference, prompt_ids, prompt_mask, ids, mask)[0].sum(-1)
            if with_kl:
                mismatched_logp = token_logprobs(self.model, prompt_ids[n:], prompt_mask[n:], ids[n:], mask[n:])[0]
        if with_kl:
            point = kto_kl(mismatched_logp.sum(-1), ref[n:])
        elif cfg.unpaired_loss == "bco":
            point = self.bco_delta(cfg.beta * (logp.detach() - ref[:n]))
        else:
            point = logp.new_zeros(())
        loss, metrics = unpaired_loss(logp - ref[:n], desirable, point, cfg.unpaired_loss, cfg.beta,
                                      cfg.desirable_weight, cfg.undesirable_weight)  # fmt: skip
        self._optimize(loss)
        return {
            "loss": float(loss.detach()),
            "tokens": float(mask[:n].sum()),
            **{k: float(v) for k, v in metrics.items()},
        }

    def bco_delta(self, rewards: Tensor) -> Tensor:
        """BCO's reference point delta: the mean of every reward seen so far, these included (TRL's BCOTrainer's
        running mean), in float64; its count and sum go into the checkpoints."""
        count, total = self.bco_rewards_seen
        self.bco_rewards_seen = (count + len(rewards), total + float(rewards.double().sum()))
        return torch.tensor(self.bco_rewards_seen[1] / self.bco_rewards_seen[0], dtype=rewards.dtype)

    def prm_step(self) -> dict[str, float]:
        """The PRM on `batch_size` stepwise rows: cross-entropy of its two-way classifier at each step's last
        separator token (the last step's only, with train_on_last_step_only)."""
        rows = self.draw_rows("pairs" if self.pair_rows is not None else "train", self.cfg.batch_size)
        loss, metrics = self.prm_loss([stepwise_example(row, self.rng) for row in rows])
        self._optimize(loss)
        return {**metrics, "loss": float(loss.detach())}

    def stepwise_batch(
        self, examples: list[tuple[str, list[str], list[bool]]], every_step: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids, prompt mask, completion ids, completion mask, the [row, column] of each labelled step's
        last separator token, its label) of stepwise examples, as TRL's PRMTrainer tokenizes them: BOS (where the
        tokenizer has one) and the prompt, then each step followed by step_separator; max_length keeps the first
        tokens, and the labels of steps cut off. Without `every_step`, with train_on_last_step_only, the last
        step's label only."""
        cfg, lists = self.cfg, self.encode_prompts.token_lists
        bos, pad = self.tokenizer.bos_token_id, self.tokenizer.pad_token_id
        separator = lists([cfg.step_separator])[0]
        prompts: list[list[int]] = []
        completions: list[list[int]] = []
        places: list[tuple[int, int, bool]] = []
        last_only = cfg.train_on_last_step_only and not every_step
        for row, (prompt, steps, step_labels) in enumerate(examples):
            prompt_tokens = ([bos] if bos is not None else []) + lists([prompt])[0]
            limit = None if cfg.max_length is None else max(cfg.max_length - len(prompt_tokens), 0)
            tokens: list[int] = []
            for i, (step_tokens, label) in enumerate(zip(lists(steps), step_labels)):
                tokens += step_tokens + separator
                if (limit is None or len(tokens) <= limit) and (not last_only or i == len(steps) - 1):
                    places.append((row, len(tokens) - 1, label))
            prompts.append(prompt_tokens[: cfg.max_length] if cfg.max_length is not None else prompt_tokens)
            completions.append(tokens[:limit] or [pad])
        prompt_ids, prompt_mask = _padded(prompts, pad, left=True)
        ids, mask = _padded(completions, pad, left=False)
        rows, columns, labels = (
            (torch.tensor(column, dtype=torch.long) for column in zip(*places))
            if places
            else (torch.zeros(0, dtype=torch.long) for _ in range(3))
        )
        return prompt_ids, prompt_mask.long(), ids, mask, rows, columns, labels

    def prm_loss(
        self, examples: list[tuple[str, list[str], list[bool]]], every_step: bool = False
    ) -> tuple[Tensor, dict[str, float]]:
        """The PRM's mean cross-entropy over the examples' labelled steps, and its metrics: the loss and the
        share of steps classified right (`accuracy`). The training pass gives the state that predicts each
        completion token, so one more column brings the state at the last token: a step's label is read at the
        column after its separator's."""
        assert self.value_head is not None
        prompt_ids, prompt_mask, ids, mask, rows, columns, labels = self.stepwise_batch(examples, every_step)
        if not len(labels):
            raise LLMError("no labelled step is left in the batch", "raise max_length, or give shorter steps")
        ids = torch.nn.functional.pad(ids, (0, 1), value=self.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, 1))
        mask[rows, columns + 1] = True
        if fast_train.supports(self.model):
            states = fast_train.completion_states(self.model, prompt_ids, prompt_mask, ids)[rows, columns + 1]
        else:
            hidden: list[Tensor] = []
            token_logprobs(self.model, prompt_ids, prompt_mask, ids, mask, hidden=hidden)
            states = hidden[0][rows, columns + 1]
        logits = self.value_head(states)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        accuracy = int((logits.argmax(-1) == labels).sum()) / len(labels)  # an exact decimal in eval.json
        return loss, {"loss": float(loss.detach()), "accuracy": accuracy, "tokens": float(len(labels))}

    def reward_step(self) -> dict[str, float]:
        """The reward model on `batch_size` pairs: -log s(r(y_w) - r(y_l) - margin), the rows' `margin` or 0, plus
        center_rewards_coefficient times mean((r(y_w) + r(y_l))^2)."""
        rows = self.draw_rows("pairs" if self.pair_rows is not None else "train", self.cfg.batch_size)
        pairs = [(*preference_pair(row, self.rng), float(row.get("margin", 0.0))) for row in rows]
        chosen, rejected = self.pair_rewards(pairs)
        margin = torch.tensor([m for *_, m in pairs])
        loss = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
        if self.cfg.center_rewards_coefficient:
            loss = loss + self.cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        self._optimize(loss)
        with torch.no_grad():
            accuracy = float((chosen > rejected).float().mean())
            return {"loss": float(loss), "tokens": float(len(pairs)), "reward_accuracy": accuracy,
                    "reward_margin": float((chosen - rejected).mean())}  # fmt: skip

    def pair_rewards(self, pairs: list[tuple[str, str, str, float]]) -> tuple[Tensor, Tensor]:
        """The reward model's scores of the pairs' chosen and rejected completions: its head on the last hidden
        state at the completion's EOS, as TRL's RewardTrainer scores and as the saved sequence classifier scores
        prompt + completion + EOS (`rewards.reward_model`). The training pass gives the states that predict each
        token, so one more column after the EOS (a pad, its log-prob unused) brings the state at the EOS."""
        assert self.value_head is not None
        prompt_ids, prompt_mask, ids, mask = self.encode_pairs(pairs)
        eos = mask.sum(-1)  # the column after each row's EOS (or its last kept token, where max_length cut it)
        rows = torch.arange(len(ids))
        ids = torch.nn.functional.pad(ids, (0, 1), value=self.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, 1))
        mask[rows, eos] = True
        if fast_train.supports(self.model):  # the states only: no LM head product
            states = fast_train.completion_states(self.model, prompt_ids, prompt_mask, ids)[rows, eos]
        else:
            hidden: list[Tensor] = []
            token_logprobs(self.model, prompt_ids, prompt_mask, ids, mask, hidden=hidden)
            states = hidden[0][rows, eos]
        rewards = self.value_head(states).squeeze(-1)
        return rewards[: len(pairs)], rewards[len(pairs) :]

    def _estimate_optimal_values(self) -> None:
        """A*-PO's stage 1: num_value_samples completions of each training prompt from the reference policy (the
        starting model), rewarded, give V*(x); with filter_all_incorrect the prompts whose samples all scored 0
        leave the training rows (their epochs restart over the rows kept). Deterministic from the seed, so a resume
        recomputes it."""
        cfg, n = self.cfg, self.cfg.num_value_samples
        kept: list[dict[str, Any]] = []
        for start in range(0, len(self.train_rows), cfg.batch_size):
            rows = self.train_rows[start : start + cfg.batch_size]
            repeated = [row for row in rows for _ in range(n)]
            sampled, completions = self.rollout(repeated)
            prompts = [row["prompt"] for row in repeated]
            rewards = call_reward(self.task, prompts, completions, repeated, sampled).view(-1, n)
            require_scored(rewards, "a2po")
            for row, value, scores in zip(rows, optimal_values(rewards, cfg.beta1).tolist(), rewards, strict=True):
                self.optimal_values[row["prompt"]] = value
                if not cfg.filter_all_incorrect or bool((scores != 0).any()):
                    kept.append(row)
        if not kept:
            raise LLMError(
                f"every training prompt's {n} reference samples scored 0: A*-PO's regression has no signal",
                "start from a model that solves some prompts (e.g. after SFT), or set filter_all_incorrect=false",
            )
        if len(kept) < len(self.train_rows):
            self.notes.append(
                f"a2po: {len(self.train_rows) - len(kept)} of {len(self.train_rows)} training prompts dropped, their "
                f"{n} reference samples all scored 0 (filter_all_incorrect)"
            )
            self.train_rows = kept
            self.orders["train"] = ShuffledEpochs(len(kept), cfg.seed, "train")

    def ssd_step(self) -> dict[str, float]:
        """SSD: `batch_size` prompts, `group_size` (1) samples each at the run's sampling settings, and the token-mean
        NLL of those raw samples at temperature 1 (no reward, verifier or teacher); with filter_empty, the empty and
        one-line stub completions (`is_stub`) leave the loss. A batch left with no token makes no update."""
        cfg = self.cfg
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        rollout, completions = self.rollout(rows)
        mask = rollout.completion_mask
        if cfg.filter_empty:
            mask = mask & torch.tensor([not is_stub(text) for text in completions])[:, None]
        metrics = {
            "tokens": float(mask.sum()),
            "active_sample_ratio": float(mask.any(1).float().mean()),
            "completion_length": float(rollout.completion_mask.sum(1).float().mean()),
        }
        if not mask.any():
            return metrics
        logp, _ = token_logprobs(
            self.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask, tape=rollout.tape
        )
        loss = -aggregate(logp, mask, "token-mean")
        self._optimize(loss)
        return {"loss": float(loss.detach()), **metrics}

    def a2po_step(self) -> dict[str, float]:
        """A*-PO's stage 2: `batch_size` prompts, `group_size` samples each from the policy, their rewards, and the
        implicit reward beta2 log(pi / pi_ref) regressed onto r - V*(x)."""
        cfg = self.cfg
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        rollout, completions = self.rollout(rows)
        prompts = [row["prompt"] for row in rows]
        rewards = require_scored(call_reward(self.task, prompts, completions, rows, rollout), "a2po")
        values = torch.tensor([self.optimal_values[row["prompt"]] for row in rows])
        logp, _ = self.rollout_logprobs(rollout)
        assert self.reference is not None
        with torch.no_grad():
            ref, _ = token_logprobs(self.reference, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                   rollout.completion_mask, cfg.temperature)  # fmt: skip
        loss, metrics = a2po_loss(logp, ref, rewards, values, rollout.completion_mask, cfg.beta2)
        self._optimize(loss)
        summary = {"loss": loss.detach(), "reward": rewards.mean(), "v_star": values.mean(), **metrics}
        return {"tokens": float(rollout.completion_mask.sum()), **{k: float(v) for k, v in summary.items()}}

    def online_dpo_step(self) -> dict[str, float]:
        """Online DPO: `group_size` own samples per prompt, the best against the worst by reward (groups whose
        rewards are all equal give no pair)."""
        size = self.cfg.group_size
        rollout, rewards, metrics = self.sample_groups()
        groups = require_scored(rewards, "online_dpo").view(-1, size)
        if self.cfg.log_completions:
            self.note_completions(rollout, rewards)
        offsets = torch.arange(len(groups)) * size
        best, worst = groups.argmax(1) + offsets, groups.argmin(1) + offsets
        keep = groups.max(1).values > groups.min(1).values
        metrics["pairs"] = float(keep.sum())
        if not keep.any():
            return metrics
        pairs = rollout.select(torch.cat([best[keep], worst[keep]]))
        metrics.update(
            self.preference_update(pairs.prompt_ids, pairs.prompt_mask, pairs.completion_ids, pairs.completion_mask)
        )
        return metrics

    def sample_beside(self, mixture: bool) -> tuple[Rollout, Tensor, Rollout, Tensor, dict[str, float]]:
        """`batch_size` prompts, `group_size` completions of each from the policy and as many from the reference
        model (`mixture`: from Nash-MD's geometric mixture of the policy and the reference), each one's total
        reward, and the step's metrics (the policy's mean reward, the other sampler's)."""
        cfg = self.cfg
        assert self.reference is not None
        self.tool_stats = ToolStats()
        rows = [row for row in self.sample_rows(cfg.batch_size) for _ in range(cfg.group_size)]
        own, rewards = self.rewarded_rollout(rows)
        with self.sampling_from(*((self.model, (self.reference, cfg.mixture_coef)) if mixture else (self.reference,))):
            other, other_rewards = self.rewarded_rollout(rows)
        opponent = "mixture_reward" if mixture else "reference_reward"
        metrics = {"reward": float(rewards.mean()), opponent: float(other_rewards.mean()),
                   "tokens": float(own.completion_mask.sum())}  # fmt: skip
        if self.calls_tools:
            metrics.update(self.tool_metrics(2 * len(rows)))
        if cfg.log_completions:
            self.note_completions(own, rewards)
        return own, rewards, other, other_rewards, metrics

    def rewarded_rollout(self, rows: list[dict[str, Any]]) -> tuple[Rollout, Tensor]:
        """A completion of each row and its total reward (one for every completion)."""
        rollout, completions = self.rollout(rows)
        return rollout, require_scored(self.total_reward(self.score(rollout, completions, rows)), self.cfg.algo)

    def xpo_step(self) -> dict[str, float]:
        """XPO: per prompt a policy sample and a reference sample, the one of higher reward chosen, the preference
        loss on the pairs plus `xpo_exploration`. A tie gives no pair (TRL's XPOTrainer prefers the policy's
        sample on a tie, rare under a reward model's scores; under verifiable 0/1 rewards most pairs tie, and
        training on them took the tiny addition model's exact match from 0.37 to 0 in 40 steps, a scratch run)."""
        own, rewards, other, other_rewards, metrics = self.sample_beside(mixture=False)
        order = xpo_pairs(rewards, other_rewards)
        metrics.update(pairs=float(len(order) // 2), own_chosen=float((order[: len(order) // 2] < len(own)).sum()))
        if not len(order):
            return metrics
        pairs = concat_rollouts([own, other], self.tokenizer.pad_token_id).select(order)
        from_reference, alpha = order >= len(own), self.cfg.alpha

        def exploration(logp: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            term = xpo_exploration(logp, mask, from_reference, alpha)
            return term, {"xpo_loss": term.detach()}

        update = self.preference_update(
            pairs.prompt_ids, pairs.prompt_mask, pairs.completion_ids, pairs.completion_mask, extra=exploration
        )
        return {**metrics, **update}

    def nash_md_step(self) -> dict[str, float]:
        """Nash-MD: per prompt a policy sample y and an opponent y' from the mixture pi^(1 - m) pi_ref^m,
        P(y > y') = sigmoid(r(y) - r(y')), then `nash_md_loss` on y (the sampler's tape serves its forward)."""
        cfg = self.cfg
        own, rewards, _, other_rewards, metrics = self.sample_beside(mixture=True)
        mask = own.completion_mask
        logp, _ = token_logprobs(self.model, own.prompt_ids, own.prompt_mask, own.completion_ids, mask, tape=own.tape)
        assert self.reference is not None
        with torch.no_grad():
            ref, _ = token_logprobs(self.reference, own.prompt_ids, own.prompt_mask, own.completion_ids, mask)
        loss, terms = nash_md_loss(logp, ref, mask, torch.sigmoid(rewards - other_rewards), cfg.beta)
        self._optimize(loss)
        summary = {"loss": loss.detach(), **terms}
        return {**metrics, "tokens": float(mask.sum()), **{k: float(v) for k, v in summary.items()}}

    def preference_update(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        ids: Tensor,
        mask: Tensor,
        ref_sums: Tensor | None = None,
        extra: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]] | None = None,
    ) -> dict[str, float]:
        """One step of the preference loss on 2P rows: the P chosen completions, then the P rejected ones of the
        same prompts (the reference's pass only where a loss reads it and `ref_sums` [2P], its precomputed
        sequence log-probs, are not given), plus `extra`'s term of the token log-probs and the mask (XPO's)."""
        cfg = self.cfg
        square_mass: list[Tensor] | None = [] if cfg.use_weighting else None
        logp = token_logprobs(self.model, prompt_ids, prompt_mask, ids, mask, square_mass=square_mass)[0]
        ref = None
        if self.reference is not None and needs_reference(cfg.preference_loss):
            with torch.no_grad():
                ref = token_logprobs(self.reference, prompt_ids, prompt_mask, ids, mask)[0]
        pairs = pair_logps(logp, mask, ref, cfg.ld_alpha, square_mass[0] if square_mass else None, ref_sums)
        loss, metrics = preference_loss(cfg.preference_loss, pairs, cfg.preference_settings)
        if extra is not None:
            term, extra_metrics = extra(logp, mask)
            loss, metrics = loss + term, {**metrics, **extra_metrics}
        self._optimize(loss)
        if cfg.sync_ref_model and self.step % cfg.ref_model_sync_steps == 0:
            self._sync_reference()
        return {"loss": float(loss.detach()), "tokens": float(mask.sum()), **{k: float(v) for k, v in metrics.items()}}

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """TR-DPO's soft update: reference <- alpha * policy + (1 - alpha) * reference, in place."""
        assert self.reference is not None
        alpha = self.cfg.ref_model_mixup_alpha
        for ref, param in zip(self.reference.parameters(), self.model.parameters(), strict=True):
            ref.mul_(1.0 - alpha).add_(param, alpha=alpha)

    def _optimize(self, loss: Tensor) -> None:
        self.optimizer.zero_grad()
        self._backward(loss)
        self._step()

    def _backward(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise LLMError(f"the loss became {float(loss)} at step {self.step}", "lower lr or set max_grad_norm")
        loss.backward()

    def _step(self) -> None:
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.optimizer.params, self.cfg.max_grad_norm)
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, k: int | None = None) -> dict[str, float]:
        """Greedy exact-match accuracy and mean reward on the evaluation rows; with k samples per row (None: the
        run's num_generations_eval; 1 or less: none) also pass@k (at least one of k sampled completions is correct)
        and their mean reward (TRL's evaluation reward). A reward model: its accuracy on the held-out pairs (the
        share where the chosen completion scores higher) and its mean margin r(y_w) - r(y_l)."""
        k = self.cfg.num_generations_eval if k is None else k
        if self.cfg.algo == "prm":
            with self.eval_mode(), torch.no_grad():
                _, metrics = self.prm_loss(self.eval_steps, every_step=True)
            return {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
        if self.cfg.algo == "reward_model":
            with self.eval_mode(), torch.no_grad():  # dropout off, as the saved classifier scores
                chosen, rejected = self.pair_rewards(self.eval_pairs)
            ranked = int((chosen > rejected).sum())
            return {"accuracy": ranked / len(self.eval_pairs), "reward": float((chosen - rejected).mean())}
        if self.evaluates_text:
            return self.held_out_loss(self.eval_rows)
        n = len(self.eval_rows)
        greedy, completions = self.rollout(self.eval_rows, greedy=True)
        prompts = [r["prompt"] for r in self.eval_rows]
        rewards = reward_values(self.task, prompts, completions, self.eval_rows, greedy)
        # Python floats (hits / n): exact decimals in eval.json, not float32's 0.7250000238418579
        scored = [r for r in rewards if r == r]  # the completions some reward function applies to
        out = {"accuracy": sum(r >= 1.0 for r in rewards) / n, "reward": math.fsum(scored) / max(len(scored), 1)}
        if k > 1:
            rows = [row for row in self.eval_rows for _ in range(k)]
            with self.evaluation_stream():
                drawn, sampled = self.rollout(rows)
            values = reward_values(self.task, [r["prompt"] for r in rows], sampled, rows, drawn)
            hits = [r >= 1.0 for r in values]
            out[f"pass@{k}"] = sum(any(hits[i * k : (i + 1) * k]) for i in range(n)) / n
            scored = [r for r in values if r == r]
            out["sampled_reward"] = math.fsum(scored) / max(len(scored), 1)
        if self.cfg.algo == "sft" and all(map(has_expert_completion, self.eval_rows)):
            out.update(self.held_out_loss(self.eval_rows))  # SFT's own objective on them too (TRL's eval_loss)
        return out

    def held_out_loss(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """SFT's token-mean NLL of the rows over all the tokens it trains (`sft_batch`'s: a plain-text row's, a
        prompt row's completion; eval.csv's loss; TRL's eval_loss, there a mean of batches' means), its perplexity,
        and the share of those tokens the model's argmax predicts (TRL's mean_token_accuracy), in batches of
        batch_size."""
        nll, hits, count = 0.0, 0, 0
        with self.eval_mode(), torch.no_grad():
            for start in range(0, len(rows), self.cfg.batch_size):
                prompt_ids, prompt_mask, ids, mask = self.sft_batch(rows[start : start + self.cfg.batch_size])
                log_probs = torch.log_softmax(completion_logits(self.model, prompt_ids, prompt_mask, ids, mask), -1)
                trained = mask.bool()
                nll -= float(log_probs.gather(-1, ids[..., None]).squeeze(-1)[trained].double().sum())
                hits += int((log_probs.argmax(-1) == ids)[trained].sum())
                count += int(trained.sum())
        loss = nll / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "mean_token_accuracy": hits / count}

    @contextlib.contextmanager
    def evaluation_stream(self) -> Iterator[None]:
        """Sampling in the learner from a generator of its own (seeded by the run's seed and step), so an
        evaluation's samples leave the training samples, the learner's and the generation workers', as they were."""
        saved, workers = self.generator, self.workers
        self.generator = torch.Generator().manual_seed(self.cfg.seed + EVALUATION_SEED_OFFSET + self.step)
        self.workers = None  # the workers' generators are training's too: the evaluation samples in the learner
        try:
            yield
        finally:
            self.generator, self.workers = saved, workers

    def checkpoint(self, extra: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON state) for exact resume: weights, value head, Adam's moments, both RNGs, the step."""
        tensors = prefixed("model", dict(self.model.state_dict()))
        if self.value_head is not None:
            tensors.update(prefixed("value_head", dict(self.value_head.state_dict())))
        if self.moving_reference:  # TR-DPO's or BEMA's moves; otherwise the initial model
            assert self.reference is not None
            tensors.update(prefixed("reference", dict(self.reference.state_dict())))
        if self.moving_teacher:  # sdft's EMA teacher; its base teacher is the initial model
            assert self.teacher is not None
            tensors.update(prefixed("teacher", dict(self.teacher.state_dict())))
        optimizer_tensors, optimizer_meta = optimizer_to_flat("optimizer", self.optimizer)  # type: ignore[arg-type]
        tensors.update(optimizer_tensors)
        tensors["rng/torch"] = self.generator.get_state()
        tensors.update(self.replay.tensors())
        if self.bema is not None:
            tensors.update(self.bema.tensors())
        if self.workers is not None:
            for i, worker_state in enumerate(self.workers.get_state()):
                tensors[f"rng/generation_worker/{i}"] = torch.tensor(worker_state)  # Ray gives read-only arrays
        state = {
            "step": self.step,
            "optimizer": optimizer_meta,
            "numpy_rng": self.rng.bit_generator.state,
            "row_orders": {kind: order.state() for kind, order in self.orders.items()},
            **({"entropy_control": self.entropy_control.state()} if self.entropy_control is not None else {}),
            **({"bco_rewards_seen": list(self.bco_rewards_seen)} if self.cfg.unpaired_loss == "bco" else {}),
            **({"replay_scores": self.replay.state()} if self.cfg.replay_buffer_size else {}),
            **extra,
        }
        return tensors, state

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        load_module_state(self.model, unprefixed("model", tensors), "the checkpoint")
        if self.value_head is not None:
            load_module_state(self.value_head, unprefixed("value_head", tensors), "the checkpoint")
        if self.moving_reference:
            assert self.reference is not None
            load_module_state(self.reference, unprefixed("reference", tensors), "the checkpoint")
        if self.moving_teacher:
            assert self.teacher is not None
            load_module_state(self.teacher, unprefixed("teacher", tensors), "the checkpoint")
        optimizer_from_flat("optimizer", self.optimizer, tensors, state["optimizer"])  # type: ignore[arg-type]
        self.generator.set_state(tensors["rng/torch"])
        if self.bema is not None:
            self.bema.load(tensors)
        if self.workers is not None:
            saved = [tensors.get(f"rng/generation_worker/{i}") for i in range(len(self.workers.handles))]
            if any(s is None for s in saved) or f"rng/generation_worker/{len(saved)}" in tensors:
                raise LLMError(
                    "the checkpoint was written with another number of generation workers",
                    "resume with the run's own generation_workers (its config.yaml)",
                )
            self.workers.set_state([s.numpy() for s in saved if s is not None])
        self.rng.bit_generator.state = state["numpy_rng"]
        if self.entropy_control is not None:
            self.entropy_control.load(state["entropy_control"])
        if "replay_scores" in state:
            self.replay.load(tensors, state["replay_scores"])
        if "bco_rewards_seen" in state:
            count, total = state["bco_rewards_seen"]
            self.bco_rewards_seen = (int(count), float(total))
        self._restore_orders(state.get("row_orders"))
        self.step = int(state["step"])

    @property
    def moving_teacher(self) -> bool:
        """Whether sdft's teacher moves during the run (teacher_model_kind ema): checkpoints keep it."""
        return self.cfg.algo in SELF_DISTILLING and self.cfg.teacher_model_kind == "ema"

    @property
    def moving_reference(self) -> bool:
        """Whether the reference model moves during the run (TR-DPO's syncs, BEMA's updates): checkpoints keep it."""
        return self.reference is not None and (self.cfg.sync_ref_model or self.cfg.bema_update_ref_model)

    def after_step(self, step: int) -> None:
        """After a training step: the policy-gradient steps' TR-DPO sync of the KL reference (the preference steps
        sync theirs in `preference_update`); BEMA's update, and the reference's from it."""
        cfg = self.cfg
        sync = cfg.sync_ref_model and training_step(cfg.algo) in POLICY_LOSS_STEPS
        if sync and step % cfg.ref_model_sync_steps == 0:
            self._sync_reference()
        if self.moving_teacher and step % cfg.teacher_sync_steps == 0:  # sdft's EMA teacher
            assert self.teacher is not None
            with torch.no_grad():
                for teacher, weights in zip(self.teacher.parameters(), self.model.parameters(), strict=True):
                    teacher.lerp_(weights, cfg.teacher_update_rate)
        if self.bema is None:
            return
        self.bema.after_step(step)
        after, every = cfg.bema_ref_model_update_after, cfg.bema_ref_model_update_freq
        if cfg.bema_update_ref_model and step >= after and (step - after) % every == 0:
            assert self.reference is not None
            with torch.no_grad():
                for ref, weights in zip(self.reference.parameters(), self.bema.current, strict=True):
                    ref.copy_(weights)

    def _restore_orders(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            raise LLMError(
                "the checkpoint was written before policylab drew rows in shuffled epochs: its resume would not be "
                "exact",
                "start a new run from its weights (--model RUN/model), or resume with the policylab that wrote it",
            )
        if saved.keys() != self.orders.keys():
            raise LLMError(
                f"the checkpoint drew from {sorted(saved)} rows, this run from {sorted(self.orders)}",
                "resume with the run's own prompts, expert and pairs",
            )
        for kind, order in self.orders.items():
            if int(saved[kind]["size"]) != order.size:
                raise LLMError(
                    f"the checkpoint walked {saved[kind]['size']} {kind} rows, this run has {order.size}",
                    "resume with the run's own prompts, expert and pairs",
                )
            order.load(saved[kind])

    def save(self, run_dir: Path) -> None:
        """The model and tokenizer as safetensors + JSON (save_pretrained), written beside and renamed in; with
        bema, BEMA's weights as model_bema/ too."""
        model = self.model
        if self.cfg.lora_rank > 0:  # a plain model with the adapters merged in: it loads like any other
            model = copy.deepcopy(model).merge_and_unload()
        if self.cfg.algo in SCORING_ALGOS:
            assert self.value_head is not None
            model = scorer_model(model, self.value_head, self.tokenizer, self.cfg.algo, self.saved_separator)
        self._save_model(model, run_dir, "model")
        if self.bema is not None:
            averaged = copy.deepcopy(self.model)
            with torch.no_grad():
                for p, weights in zip(averaged.parameters(), self.bema.current, strict=True):
                    p.copy_(weights)
            if self.cfg.algo in SCORING_ALGOS:
                assert self.value_head is not None
                averaged = scorer_model(averaged, self.value_head, self.tokenizer, self.cfg.algo, self.saved_separator)
            self._save_model(averaged, run_dir, "model_bema")

    @property
    def saved_separator(self) -> str | None:
        """The PRM's step separator, kept in its saved config (None for other models)."""
        return self.cfg.step_separator if self.cfg.algo == "prm" else None

    def _save_model(self, model: Any, run_dir: Path, name: str) -> None:
        target, tmp = run_dir / name, run_dir / f".{name}.tmp"
        with without_progress_bars():
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        if target.exists():
            old = run_dir / f".{name}.old"
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
    steps: int = 0


def train_llm(
    algo: str | None = None,
    overrides: dict[str, Any] | None = None,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    verbose: bool | None = None,
    resume: str | Path | None = None,
    callback: Callable[[int, dict[str, float]], bool] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    prompts: Any = None,
    eval_prompts: Any = None,
    rewards: list[RewardSpec] | None = None,
    expert: Any = None,
    pairs: Any = None,
    teacher: Any = None,
    tools: list[Any] | None = None,
    environment: Any = None,
    rollout_func: Any = None,
    progress: bool | None = None,
) -> LLMRun:
    """Train (SFT or RL) and write the run directory: config.yaml, train.csv, eval.csv, eval.json, model/ and
    checkpoints/ (at every evaluation: weights, optimizer and RNG state). `resume`: a run directory to continue
    from its latest checkpoint, exactly (its config is used; only `steps` may change, through `overrides`, and
    `algo`, if given, must be the run's). `callback(step, metrics)` returning False stops the run after that
    step (a checkpoint is written first). A run that fails or is interrupted (Ctrl-C) before its first checkpoint
    leaves no directory; after it, the directory stays, to be resumed.
    `verbose=False` prints nothing; `progress=False` prints no progress lines (notes and the result still
    print); None: a live line on a terminal, a line per 10% otherwise.

    The inputs can be Python objects instead of the config's names and paths (see LLMInputs): `model` (a
    transformers causal LM, trained in place) with its `tokenizer`, `prompts` / `eval_prompts` / `expert` /
    `pairs` (a datasets.Dataset or a list of dicts), `rewards` (functions, or (function, weight) pairs), `teacher`
    (distill and gkd: a transformers causal LM), `tools` (functions completions may call; llm/tools.py),
    `environment` (a class or factory whose instances serve the completions), `rollout_func` (a function making
    the completions). Resuming a run made so needs the same objects passed again."""
    import yaml

    inputs = LLMInputs(
        model, tokenizer, prompts, eval_prompts, rewards, expert, pairs, teacher, tools, environment, rollout_func
    )
    say: Callable[..., None] = print if verbose is not False else (lambda *a, **k: None)
    notes: list[str] = []
    state: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    new_steps = False
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CONFIG_YAML).is_file():
            raise LLMError(f"{run_dir} is not a language-model run directory (no {CONFIG_YAML})", "check the path")
        saved = yaml.safe_load((run_dir / CONFIG_YAML).read_text())
        run_algo = saved.pop("algo")
        if algo is not None and algo != run_algo:
            command = "sft" if run_algo == "sft" else f"train {run_algo}"
            raise ConfigError(
                f"{run_dir} is a {run_algo} run, not {algo}", f"run `policylab llm {command} --resume {run_dir}`"
            )
        changed = sorted(set(overrides or {}) - {"steps"})
        if changed:
            raise ConfigError(
                f"--resume continues a run with its saved config ({run_dir / CONFIG_YAML}); {', '.join(changed)} "
                "cannot change",
                "drop --model/--task/--prompts/--reward/--expert/--group-size/--seed/--set (only --steps may change)",
            )
        cfg = make_config(run_algo, {**saved, **(overrides or {})})
        new_steps = cfg.steps != saved.get("steps")
        tensors, state, _ = load_checkpoint(run_dir)
        start = int(state["step"])
        if cfg.steps < start:
            raise ConfigError(
                f"{run_dir} is at step {start}, past steps={cfg.steps}",
                f"pass --steps {start} or more, or leave it out",
            )
        notes.append(f"resuming {run_dir} from step {start}")
        if start >= cfg.steps:
            notes.append(
                f"{run_dir} has already finished (step {start} of {cfg.steps}): nothing to train; "
                f"continue it with --steps N (N > {start})"
            )
    else:
        if algo is None:
            raise LLMError("no algorithm given", "pass one (e.g. grpo), or resume=RUN_DIR")
        cfg = make_config(algo, {**(overrides or {}), **inputs.config_values()})
        if cfg.prompts is not None:  # the run goes by its prompts' name, not the unused built-in task's
            cfg = replace(cfg, task=prompts_label(cfg.prompts))
        start = 0
    trainer = LLMTrainer(cfg, inputs)
    for note in notes + trainer.notes:
        say(for_reader(note))
    runs_root_existed = Path(runs_dir).exists()
    created: Path | None = None
    """The directory this call made, until its first checkpoint: removed if the run fails or is interrupted before
    then."""
    log: RunLog | None = None
    bar: Progress | None = None
    step_fn: Callable[[], dict[str, float]] = getattr(trainer, training_step(cfg.algo))
    try:
        if resume is not None:
            trainer.restore(tensors, state)
            initial: dict[str, float] = state["initial"]
            last: dict[str, float] | None = state.get("last")
            """The evaluation of the latest weights (None: a checkpoint written before it was kept)."""
            if new_steps:  # a later resume continues to the new step count
                atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(asdict(cfg), sort_keys=False))
            log = RunLog(run_dir, tensorboard=cfg.tensorboard, resume_step=start)
            completions_log = JsonlLog(run_dir / "completions.jsonl", resume_step=start)
        else:
            initial = last = trainer.evaluate()  # before the directory: a reward that fails here leaves none
            run_dir = created = new_run_dir(runs_dir, name or f"{cfg.algo}-{cfg.task}-s{cfg.seed}")
            atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(asdict(cfg), sort_keys=False))
            log = RunLog(run_dir, tensorboard=cfg.tensorboard)
            completions_log = JsonlLog(run_dir / "completions.jsonl")
            log.log_eval({"step": 0, **initial})
        enabled = False if verbose is False or progress is False else (progress if progress is not None else verbose)
        key = headline(initial)
        label = key if key == "accuracy" else f"eval {key}"
        bar = Progress(cfg.steps, f"{cfg.algo} {cfg.task}", enabled=enabled, start=start, metric=label, digits=3)
        started, tokens = time.perf_counter(), 0.0
        for step in range(start + 1, cfg.steps + 1):
            trainer.step = step
            metrics = step_fn()
            trainer.after_step(step)
            metrics["epoch"] = trainer.epochs_done
            if trainer.workers is not None:
                metrics["worker_restarts"] = float(sum(trainer.workers.restarts))
            tokens += metrics["tokens"]
            elapsed = time.perf_counter() - started
            log.log_train({"step": step, "time": elapsed, **metrics, "tokens_per_s": tokens / elapsed})
            completions_log.write(trainer.logged_completions)
            trainer.logged_completions = []
            stop = callback is not None and callback(step, metrics) is False
            if step % cfg.eval_every == 0 or step == cfg.steps or stop:
                last = trainer.evaluate()
                log.log_eval({"step": step, **last})
                save_checkpoint(run_dir / "checkpoints", step, *trainer.checkpoint({"initial": initial, "last": last}))
                created = None  # the run can resume now: its directory stays whatever happens
            bar.update(step, (step - start) / elapsed, (last or initial)[key])
            if stop:
                break
        if last is None:  # resumed at its last checkpoint, from before checkpoints kept the evaluation
            last = trainer.evaluate()
    except BaseException:  # KeyboardInterrupt too: re-raised below, the CLI exits 130
        if created is not None:
            if log is not None:
                log.close()
            shutil.rmtree(created, ignore_errors=True)
            if not runs_root_existed:
                with contextlib.suppress(OSError):  # only while empty: another run may have started in it
                    Path(runs_dir).rmdir()
        raise
    finally:
        if bar is not None:
            bar.close()
        if trainer.workers is not None:
            trainer.workers.close()
    if not (resume is not None and start >= cfg.steps and "last" in state):  # a complete run: nothing to write
        trainer.save(run_dir)
        log.write_summary({"step": trainer.step, **last, "initial": initial})
    log.close()
    say(f"done: {trainer.step} steps; {outcome(initial, last)}")
    say(f"run directory: {run_dir}")
    return LLMRun(run_dir, last, initial, trainer.step)


def headline(evaluation: dict[str, float]) -> str:
    """The evaluation's figure the progress bar and the final line show: exact-match accuracy, or for plain-text
    evaluation rows their loss."""
    return "accuracy" if "accuracy" in evaluation else "loss"


def outcome(initial: dict[str, float], last: dict[str, float]) -> str:
    """The final line's change: exact-match accuracy's, or the plain-text evaluation rows' loss and perplexity."""
    if headline(initial) == "accuracy":
        return f"accuracy {initial['accuracy']:.3f} -> {last['accuracy']:.3f}"
    return (
        f"eval loss {initial['loss']:.3f} -> {last['loss']:.3f} (perplexity {initial['perplexity']:.2f} -> "
        f"{last['perplexity']:.2f})"
    )


def evaluate_llm(
    model: str, task: str = "addition", k: int = 1, seed: int = 0, eval_size: int = 200, prompts: Any = None
) -> dict:
    """Greedy accuracy (and pass@k) of a model or run directory on a task's evaluation rows, or on `prompts` (a
    JSONL path, a datasets.Dataset or a list of dicts) instead: rows with answers, or plain-text rows (their loss,
    perplexity and mean_token_accuracy)."""
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1", "pass --k 1 (greedy accuracy only) or more (pass@k)")
    settings = {"model": model, "task": task, "seed": seed, "eval_size": eval_size}
    trainer = LLMTrainer(make_config("sft", settings), LLMInputs(eval_prompts=prompts))
    if k > 1 and trainer.evaluates_text:
        raise ConfigError(f"k={k}: pass@k samples completions of prompts, and these rows are plain text", "drop --k")
    return trainer.evaluate(k)
