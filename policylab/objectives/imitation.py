"""Learning from demonstrations inside policy-gradient training: an imitation term on dataset (expert) samples
mixed with the RL loss, with a global coefficient that follows a schedule from imitation toward RL.

    loss = (1 - mu) L_RL + mu L_imitation,   L_imitation = aggregate(-w * log pi(a_data | s))

mu is CHORD's global coefficient (Zhang et al. 2025, arXiv:2508.11408, "harmonizing SFT and RL"): high early,
so the policy starts from the demonstrations, and decayed so that RL takes over. The per-sample weights w are

    uniform     w = 1                                  behaviour cloning (SFT at token level)
    phi         w = p (1 - p), p = pi(a_data | s)      CHORD-phi: samples the policy is already sure of (p ~ 1)
                                                        or finds implausible (p ~ 0) weigh little; needs
                                                        probabilities, so discrete actions (or tokens) only
    advantage   w = min(exp(beta (G - V(s))), w_max)   advantage-weighted (AWR, Peng et al. 2019): G the
                                                        sample's discounted return in the dataset, V the critic's

always held constant in the gradient. These are pure functions over log-probs and masks, so the language-model
objectives use the same ones at token level (steps of a control task are tokens of length-1 sequences).

Distillation imitates a teacher's whole distribution instead of its samples: `generalized_jsd` is the divergence
of on-policy distillation and GKD (Agarwal et al. 2024, arXiv:2306.13649) between the student's and the
teacher's categorical distributions at each position (next tokens, or discrete actions).
`sampled_distillation_advantages` is the cheaper signal that reads only the teacher's log-prob of each sampled
token: REINFORCE on the per-token reverse-KL sample log p_teacher - log p_student.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.errors import ConfigError
from policylab.objectives.aggregation import aggregate

WEIGHTINGS = ("uniform", "phi", "advantage")


def imitation_weights(
    logp: Tensor,
    weighting: str = "uniform",
    *,
    advantages: Tensor | None = None,
    beta: float = 1.0,
    max_weight: float = 20.0,
) -> Tensor:
    """Per-sample weights w of the imitation term (detached; see the module docstring)."""
    with torch.no_grad():
        if weighting == "uniform":
            return torch.ones_like(logp)
        if weighting == "phi":
            p = logp.exp()
            return p * (1.0 - p)
        if weighting == "advantage":
            if advantages is None:
                raise ValueError("advantage weighting needs the samples' advantages")
            return torch.exp(beta * advantages).clamp(max=max_weight)
    raise ValueError(f"unknown imitation weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def imitation_loss(
    logp: Tensor, weights: Tensor | None = None, mask: Tensor | None = None, aggregation: str = "token-mean"
) -> Tensor:
    """Weighted negative log-likelihood of the dataset's actions (or tokens): aggregate(-w log pi)."""
    nll = -logp if weights is None else -weights * logp
    return aggregate(nll, mask, aggregation)


def mixed_policy_loss(
    rl_loss: Tensor,
    imitation_logp: Tensor,
    coef: float,
    *,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """(1 - coef) rl_loss + coef imitation_loss, and the imitation loss as a metric."""
    imitation = imitation_loss(imitation_logp, weights, mask, aggregation)
    loss = (1.0 - coef) * rl_loss + coef * imitation
    return loss, {"imitation_loss": imitation.detach(), "imitation_coef": torch.tensor(coef)}


def imitation_logp_grad(weights: Tensor, coef: float) -> Tensor:
    """d(coef * imitation_loss)/d(logp) for token-mean aggregation without a mask, -coef w / n: what the fast
    (analytic-gradient) update path feeds into the head's backward for the dataset rows."""
    return weights * (-coef / weights.numel())


@dataclass(frozen=True)
class ImitationSchedule:
    """mu as a function of training progress (0 -> 1):

        constant:A         mu = A throughout (a bare number means the same)
        linear:A->B        from A to B linearly
        cosine:A->B        from A to B along a half cosine (slow at both ends)
        ...,warmup=F       (linear and cosine) first rise linearly from 0 to A over the fraction F of the run

    e.g. "cosine:0.5->0.02" or "cosine:0.9->0.05,warmup=0.05"."""

    kind: str
    start: float
    end: float
    warmup: float = 0.0

    def __call__(self, progress: float) -> float:
        t = min(max(progress, 0.0), 1.0)
        if t < self.warmup:
            return self.start * t / self.warmup
        if self.kind == "constant":
            return self.start
        frac = (t - self.warmup) / (1.0 - self.warmup) if self.warmup < 1.0 else 1.0
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * frac))

    @property
    def final(self) -> float:
        return self.start if self.kind == "constant" else self.end


SCHEDULE_KINDS: dict[str, Callable[[str], tuple[float, float]]] = {
    "constant": lambda text: (float(text), float(text)),
    "linear": lambda text: _two_values(text),
    "cosine": lambda text: _two_values(text),
}


def _two_values(text: str) -> tuple[float, float]:
    start, sep, end = text.partition("->")
    if not sep:
        raise ValueError(f"{text!r} is not START->END")
    return float(start), float(end)


def parse_schedule(spec: str | float) -> ImitationSchedule:
    """An `ImitationSchedule` from its text (see the class); a clear error names the accepted forms."""
    text = str(spec).strip()
    fix = "write e.g. imitation=cosine:0.5->0.02, imitation=linear:1.0->0.0,warmup=0.1 or imitation=0.1"
    kind, sep, rest = text.partition(":")
    if not sep:
        kind, rest = "constant", text
    values, _, option = rest.partition(",")
    try:
        start, end = SCHEDULE_KINDS[kind](values)
        warmup = 0.0
        if option:
            name, _, value = option.partition("=")
            if name.strip() != "warmup" or kind == "constant":
                raise ValueError(option)
            warmup = float(value)
    except (KeyError, ValueError):
        raise ConfigError(f"imitation={text!r} is not a schedule", fix) from None
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and 0.0 <= warmup < 1.0):
        raise ConfigError(f"imitation={text!r}: the coefficients must lie in [0, 1] and warmup in [0, 1)", fix)
    return ImitationSchedule(kind, start, end, warmup)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """The divergence at each position (the logits' shape without the last axis) between the student's and the
    teacher's distributions softmax(logits / temperature) over the last axis, with the mixture
    m = (1 - beta) p_student + beta p_teacher:

        beta = 0       KL(p_teacher || p_student)   forward KL: the student covers every teacher mode
        beta = 1       KL(p_student || p_teacher)   reverse KL: the student keeps to the teacher's modes
        otherwise      beta KL(p_teacher || m) + (1 - beta) KL(p_student || m)   (0.5: the Jensen-Shannon divergence)

    the conventions of TRL's DistillationTrainer and GKDTrainer (the mixture form tends to 0, not to a KL, at
    either end, hence the two ends by name). Tokens that a distribution gives probability 0 (logits -inf) add 0."""
    student = torch.log_softmax(student_logits.float() / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, -1)
    return generalized_jsd_of_log_probs(student, teacher, beta)


def generalized_jsd_of_log_probs(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """`generalized_jsd` of two distributions given as log-probabilities over the last axis."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta} must be in [0, 1]", "set beta=1 (reverse KL), 0 (forward KL) or 0.5 (JSD)")
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    mixture = torch.logaddexp(student + math.log(1.0 - beta), teacher + math.log(beta))
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def topk_generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, k: int, tail: bool = False, temperature: float = 1.0
) -> Tensor:
    """`generalized_jsd` on the student's k most likely tokens at each position (SDFT's top-k logit distillation,
    TRL's SDFTTrainer): both distributions restricted to that support and renormalized over it, or, with `tail`,
    kept as they are with one more category holding the mass outside it (so the divergence approximates the whole
    vocabulary's). k at least the vocabulary's size is the whole distribution."""
    student = torch.log_softmax(student_logits.float() / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, -1)
    support = student.topk(min(k, student.shape[-1]), -1).indices
    student, teacher = student.gather(-1, support), teacher.gather(-1, support)
    if tail:
        student, teacher = with_tail(student), with_tail(teacher)
    else:
        student = student - student.logsumexp(-1, keepdim=True)
        teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    return generalized_jsd_of_log_probs(student, teacher, beta)


def with_tail(log_probs: Tensor) -> Tensor:
    """Log-probabilities of a subset of the categories, with one more category holding the rest of the mass,
    log(1 - sum p) (the subset's mass capped just under 1, so that the tail's log stays finite)."""
    kept = log_probs.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([log_probs, torch.log(-torch.expm1(kept))], -1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last axis from log-probabilities (p's zero-probability entries add 0)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


def sampled_distillation_advantages(
    teacher_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, iw_gamma: float | None = None, eps: float = 1e-8
) -> Tensor:
    """Per-token advantages [N, T] of sampled-token on-policy distillation: a_t = log p_teacher(y_t) -
    log p_behaviour(y_t) at the sampled tokens (minus the per-token reverse-KL sample), no gradient; the loss is
    aggregate(-a_t log pi(y_t)). With `iw_gamma` (IW-OPD, arXiv:2606.22600; TRL's IWOPDTrainer), each a_t is
    weighted by 1 + iw_gamma (1 - sum_{s<t} |a_s| / sum_s |a_s|): tokens after a large accumulated discrepancy,
    whose supervision has drifted out of the teacher's distribution, weigh less. Masked positions are 0."""
    with torch.no_grad():
        advantages = torch.where(mask.bool(), teacher_logp - behaviour_logp, torch.zeros_like(teacher_logp))
        if iw_gamma is None:
            return advantages
        size = advantages.abs()
        before = size.cumsum(-1) - size
        total = size.sum(-1, keepdim=True).clamp_min(eps)
        return (1.0 + iw_gamma * (1.0 - before / total)) * advantages


def reverse_kl_advantages(
    teacher_logp: Tensor, student_logp: Tensor, mask: Tensor, gamma: float = 0.0, length_normalization: bool = True
) -> Tensor:
    """MiniLLM's per-token advantages [N, T] (Gu et al. 2024; TRL's MiniLLMTrainer): the reward of token t is
    r_t = log p_teacher(y_t) - log pi(y_t) (its sampled reverse KL, negated), and its advantage the discounted
    sum over the rest of the completion, A_t = sum_{i >= t} gamma^(i - t) r_i, with `length_normalization`
    divided by sum_{i >= t} gamma^(i - t) (the rewards' discounted mean). gamma 0: A_t = r_t. No gradient; masked
    positions are 0. (TRL's code weighs r_i by gamma^i rather than gamma^(i - t): the same under its default
    length normalization, where the factor gamma^t cancels.)"""
    with torch.no_grad():
        weights = mask.to(teacher_logp.dtype)
        rewards = (teacher_logp - student_logp) * weights
        if gamma == 0.0:
            return rewards
        sums, counts = torch.zeros_like(rewards), torch.zeros_like(rewards)
        running_sum = running_count = rewards.new_zeros(rewards.shape[0])
        for t in reversed(range(rewards.shape[1])):
            running_sum = rewards[:, t] + gamma * running_sum
            running_count = weights[:, t] + gamma * running_count
            sums[:, t], counts[:, t] = running_sum, running_count
        advantages = sums / counts.clamp_min(1e-8) if length_normalization else sums
        return advantages * weights


# --- Universal Logit Distillation (a teacher with another tokenizer) -----------------------------------------------


def byte_groups(student_bytes: list[int], teacher_bytes: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """The two tokenizations of one text cut where both have a token boundary: groups of consecutive student and
    teacher tokens covering the same bytes, from each token's byte length. A walk over both sequences advancing
    the side whose current token ends first; what is left when one side runs out is one last group (an empty
    side's group is dropped with its partner)."""
    student_groups, teacher_groups = [], []
    s = t = s_start = t_start = 0
    s_end, t_end = (student_bytes[0] if student_bytes else 0), (teacher_bytes[0] if teacher_bytes else 0)
    while s < len(student_bytes) and t < len(teacher_bytes):
        if s_end < t_end:
            s += 1
            s_end += student_bytes[s] if s < len(student_bytes) else 0
        elif t_end < s_end:
            t += 1
            t_end += teacher_bytes[t] if t < len(teacher_bytes) else 0
        else:
            s, t = s + 1, t + 1
            student_groups.append(list(range(s_start, s)))
            teacher_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
            s_end += student_bytes[s] if s < len(student_bytes) else 0
            t_end += teacher_bytes[t] if t < len(teacher_bytes) else 0
    if s_start < len(student_bytes) and t_start < len(teacher_bytes):
        student_groups.append(list(range(s_start, len(student_bytes))))
        teacher_groups.append(list(range(t_start, len(teacher_bytes))))
    return student_groups, teacher_groups


def merged_group_probs(
    probs: Tensor, groups: list[list[list[int]]], tokens: list[list[int]], strategy: str
) -> tuple[Tensor, Tensor]:
    """([N, G, V], valid [N, G]): one distribution per group of tokens that the other tokenizer spells as one
    piece, for each row's groups (`groups[n]`, positions into `probs[n]` [T, V]; G the most any row has, `valid`
    marking each row's own). A group of one token keeps its distribution; a longer group takes one position's full
    distribution times the probabilities of the group's actual tokens (`tokens[n]`) at its other positions, each
    clamped at 1e-8: "observed", the first position's times the later ones' (TRL's default), "bayesian", the last
    position's times the earlier ones' (the chain rule, with `probs[n, k]` predicting `tokens[n][k]`).
    Unnormalized: the relative probabilities are what matter. One gather and one scatter for the batch."""
    width, length = max(1, max((len(g) for g in groups), default=0)), probs.shape[1]
    bases, slots = [], []  # each group's base position; each position's group where it is a scalar, else a spare
    for row_groups in groups:
        base, slot = [0] * width, [width] * length
        for g, group in enumerate(row_groups):
            first, *rest = group if strategy != "bayesian" else [group[-1], *group[:-1]]
            base[g] = first
            for k in rest:
                slot[k] = g
        bases.append(base)
        slots.append(slot)
    base_index, slot_index = torch.tensor(bases), torch.tensor(slots)
    valid = torch.arange(width)[None, :] < torch.tensor([len(g) for g in groups])[:, None]
    index = torch.tensor([[*row, *[0] * (length - len(row))] for row in tokens], dtype=torch.long)
    own = probs.gather(-1, index[..., None]).squeeze(-1).clamp_min(1e-8).log()  # [N, T]
    factor = own.new_zeros(len(groups), width + 1).scatter_add(1, slot_index, own)[:, :-1].exp()
    chosen = probs.gather(1, base_index[..., None].expand(-1, -1, probs.shape[-1]))
    return chosen * factor[..., None], valid


def _per_row(values: Tensor, valid: Tensor) -> Tensor:
    """[N]: each row's sum of `values` [N, G] over its valid groups divided by their count (0 for none)."""
    return (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def sorted_l1(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """ULD's distance (Boizard et al. 2024) [N]: at each aligned position [N, G] the two distributions' probabilities
    sorted in decreasing order, the smaller vocabulary padded with zeros, the L1 distance summed over the
    vocabulary (Wasserstein-1 between them under a uniform transport cost, so no token correspondence is needed);
    averaged over each row's `valid` positions."""
    width = max(student.shape[-1], teacher.shape[-1])
    student = F.pad(student.sort(-1, descending=True).values, (0, width - student.shape[-1]))
    teacher = F.pad(teacher.sort(-1, descending=True).values, (0, width - teacher.shape[-1]))
    return _per_row((student - teacher).abs().sum(-1), valid)


def hybrid_uld_distance(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    matched: tuple[Tensor, Tensor],
    beta: float,
    weights: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's hybrid ULD, per row [N] (its total, its matched part, its unmatched part): on the tokens both
    vocabularies spell alike (`matched` (student ids, teacher ids)) the generalized JSD (beta) of the probabilities
    there (log of them clamped at 1e-8, not renormalized), summed over those tokens; on the others `sorted_l1`;
    each averaged over the row's valid positions; weights[0] x the first + weights[1] x the second."""
    student_ids, teacher_ids = matched
    matched_loss = student.new_zeros(len(student))
    if len(student_ids):
        log_student = student[..., student_ids].clamp_min(1e-8).log()
        log_teacher = teacher[..., teacher_ids].clamp_min(1e-8).log()
        matched_loss = _per_row(generalized_jsd_of_log_probs(log_student, log_teacher, beta), valid)
    keep_student = torch.ones(student.shape[-1], dtype=torch.bool)
    keep_teacher = torch.ones(teacher.shape[-1], dtype=torch.bool)
    keep_student[student_ids], keep_teacher[teacher_ids] = False, False
    unmatched_loss = student.new_zeros(len(student))
    if keep_student.any() and keep_teacher.any():
        unmatched_loss = sorted_l1(student[..., keep_student], teacher[..., keep_teacher], valid)
    return weights[0] * matched_loss + weights[1] * unmatched_loss, matched_loss, unmatched_loss
