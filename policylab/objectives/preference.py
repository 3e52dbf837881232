"""Preference losses over sequence log-probabilities (language models): every loss type of TRL's DPOTrainer and
the reference-free losses of its CPO and ORPO trainers (CPO, SimPO, ORPO), one function per loss; and, at the end,
KTO's losses on unpaired completions (`unpaired_loss`, `kto_kl`).

A batch holds P pairs: the chosen completion y_w and the rejected y_l of one prompt. Per completion: log pi(y), the
sum of its token log-probs under the policy (`ld_alpha` < 1: the tokens past the shorter completion of the pair
weighted by it, LD-DPO, Liu et al. 2024), the reference's log pi_ref(y) likewise, and its token count |y|. With
c = log pi(y_w) - log pi_ref(y_w), r = log pi(y_l) - log pi_ref(y_l), f the f-divergence's score (the identity
for the reverse KL, DPO's; `f_divergence` picks forward_kl 1 - e^-u, js_divergence log 2 + log s(u) or
alpha_divergence (e^((a-1) u) - 1) / (a - 1), f-DPO, Wang et al. 2024), D = f(c) - f(r), s the sigmoid,
b = beta and e = label_smoothing, the loss of a pair is:

    sigmoid       -(1-e) log s(bD) - e log s(-bD)        DPO (Rafailov et al. 2023); e > 0: conservative DPO
    hinge         max(0, 1 - bD)                          SLiC (Zhao et al. 2023)
    ipo           (f(c)/|y_w| - f(r)/|y_l| - 1/(2b))^2    IPO (Azar et al. 2023), length-normalized as TRL's
    exo_pair      q log(q/(1-e)) + (1-q) log((1-q)/e),    EXO (Ji et al. 2024), q = s(bD), e > 0
    nca_pair      -log s(bc) - log s(-bc)/2 - log s(-br)/2                     NCA (Chen et al. 2024)
    robust        ((1-e)(-log s(bD)) - e(-log s(-bD))) / (1-2e)                rDPO (Chowdhury et al. 2024)
    bco_pair      -log s(bc) - log s(-br)                                      BCO (Jung et al. 2024)
    sppo_hard     (c - 1/(2b))^2 + (r + 1/(2b))^2                              SPPO (Wu et al. 2024), hard labels
    aot           sigmoid on sort(log pi(y_w) - log pi(y_l)) - sort(the reference's), over the batch (AOT,
                  Melnyk et al. 2024); aot_unpaired: on sort(c) - sort(r)
    apo_zero      1 - s(bc) + s(br)                       APO (D'Oosterlinck et al. 2024)
    apo_down      s(bc) + 1 - s(b(c - r))
    discopop      -log s(bD)(1 - m) + e^(-bD) m, m = s(bD / discopop_tau)      DiscoPOP (Lu et al. 2024)
    sigmoid_norm  -log s(b(f(c)/|y_w| - f(r)/|y_l|))
    sft           the chosen completions' token-mean negative log-likelihood (the batch's, on every pair)

and without a reference model:

    cpo           -(1-e) log s(bL) - e log s(-bL), L = log pi(y_w) - log pi(y_l)       CPO (Xu et al. 2024)
    simpo         -(1-e) log s(x) - e log s(-x), x = b(log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - simpo_gamma
                                                                                        SimPO (Meng et al. 2024)
    orpo          -b log s(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p), p = exp(log pi(y)/|y|)
                                                                                        ORPO (Hong et al. 2024)

A run's loss is a weighted sum of these, each the mean over the pairs: `0.8*sigmoid+0.2*bco_pair+sft` (MPO's),
`cpo+sft` (CPO, TRL's cpo_alpha 1), `sft+orpo` (ORPO: beta is its lambda). With WPO's weights (`pair_logps`'s
`square_mass`), every loss of a pair is multiplied by its weight. The formulas are TRL 1.16's
(benchmarks/dpo_equivalence.py runs its trainers against these), except that `sigmoid` keeps label smoothing
(conservative DPO, which TRL's DPOTrainer dropped). The implicit rewards b c and b r (without a reference:
b log pi(y) / |y|, SimPO's) are returned as metrics, with their accuracy (the share of pairs whose chosen one's is
higher).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.errors import ConfigError, suggest


@dataclass(frozen=True)
class PreferenceSettings:
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    simpo_gamma: float = 1.0
    discopop_tau: float = 0.05


@dataclass(frozen=True)
class PairLogps:
    """The sequence log-probs of P pairs, [P] each (`pair_logps` builds them from token log-probs)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_nll: Tensor
    """The chosen completions' token-mean negative log-likelihood over the batch (a scalar)."""
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    weights: Tensor | None = None
    """WPO's weight of each pair (no gradient), which multiplies its every loss; None: 1."""

    def ratios(self) -> tuple[Tensor, Tensor]:
        """(c, r): log pi(y) - log pi_ref(y) of the chosen and the rejected completions."""
        assert self.ref_chosen is not None and self.ref_rejected is not None
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected


def pair_logps(
    token_logps: Tensor,
    mask: Tensor,
    ref_token_logps: Tensor | None = None,
    ld_alpha: float | None = None,
    square_mass: Tensor | None = None,
    ref_sums: Tensor | None = None,
) -> PairLogps:
    """PairLogps from token log-probs [2P, L] (0 off the mask) of the P chosen completions, then the P rejected
    ones of the same prompts, and the reference's (or None). `ld_alpha`: each pair's tokens past the shorter
    completion's length count with this weight in the sequence log-probs (LD-DPO; None: all with weight 1).
    `square_mass` [2P, L], log sum_v p_v^2 of the policy's distribution at each token: WPO's pair weights (Zhou et
    al. 2024), w(y_w) w(y_l) with w(y) = exp(mean over y's tokens of log p(token) - log sum_v p_v^2), the
    probability of the completion relative to the policy's own sampling, per token. `ref_sums` [2P]: the
    reference's sequence log-probs already summed (precomputed), instead of `ref_token_logps`."""
    mask = mask.to(token_logps.dtype)
    n = len(mask) // 2
    tokens = mask.sum(-1)
    weights = mask
    if ld_alpha is not None:
        shared = torch.minimum(tokens[:n], tokens[n:]).repeat(2)
        weights = torch.where(mask.cumsum(-1) > shared[:, None], ld_alpha * mask, mask)
    sums = (token_logps * weights).sum(-1)
    refs = (ref_token_logps * weights).sum(-1) if ref_token_logps is not None else ref_sums
    nll = -(token_logps[:n] * mask[:n]).sum() / mask[:n].sum().clamp_min(1.0)
    pair_weights = None
    if square_mass is not None:
        with torch.no_grad():
            per_completion = torch.exp(((token_logps - square_mass) * mask).sum(-1) / tokens.clamp_min(1.0))
            pair_weights = per_completion[:n] * per_completion[n:]
    return PairLogps(
        sums[:n],
        sums[n:],
        tokens[:n].clamp_min(1.0),
        tokens[n:].clamp_min(1.0),
        nll,
        refs[:n] if refs is not None else None,
        refs[n:] if refs is not None else None,
        pair_weights,
    )


def _f_score(ratio: Tensor, s: PreferenceSettings) -> Tensor:
    """f'(pi / pi_ref) of the f-divergence, from the log-ratio."""
    if s.f_divergence == "forward_kl":
        return 1.0 - torch.exp(-ratio)
    if s.f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(ratio)
    if s.f_divergence == "alpha_divergence" and abs(s.f_alpha - 1.0) > 1e-6:
        exponent = ((s.f_alpha - 1.0) * ratio).clamp(max=80.0)  # e^80 still fits a float32
        return (torch.exp(exponent) - 1.0) / (s.f_alpha - 1.0)
    return ratio


def _scores(p: PairLogps, s: PreferenceSettings) -> tuple[Tensor, Tensor]:
    c, r = p.ratios()
    return _f_score(c, s), _f_score(r, s)


def _delta(p: PairLogps, s: PreferenceSettings) -> Tensor:
    chosen, rejected = _scores(p, s)
    return chosen - rejected


def _smoothed(x: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log s(x) - eps log s(-x): the logistic loss with eps of the labels taken as flipped."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0 else (1.0 - eps) * loss - eps * F.logsigmoid(-x)


def _sigmoid(p: PairLogps, s: PreferenceSettings) -> Tensor:
    return _smoothed(s.beta * _delta(p, s), s.label_smoothing)


def _hinge(p: PairLogps, s: PreferenceSettings) -> Tensor:
    return torch.relu(1.0 - s.beta * _delta(p, s))


def _ipo(p: PairLogps, s: PreferenceSettings) -> Tensor:
    chosen, rejected = _scores(p, s)
    return (chosen / p.chosen_tokens - rejected / p.rejected_tokens - 1.0 / (2.0 * s.beta)) ** 2


def _exo_pair(p: PairLogps, s: PreferenceSettings) -> Tensor:
    x, eps = s.beta * _delta(p, s), s.label_smoothing
    kept = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
    flipped = torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
    return kept + flipped


def _nca_pair(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return -F.logsigmoid(s.beta * c) - 0.5 * F.logsigmoid(-s.beta * c) - 0.5 * F.logsigmoid(-s.beta * r)


def _robust(p: PairLogps, s: PreferenceSettings) -> Tensor:
    x, eps = s.beta * _delta(p, s), s.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def _bco_pair(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return -F.logsigmoid(s.beta * c) - F.logsigmoid(-s.beta * r)


def _sppo_hard(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return (c - 0.5 / s.beta) ** 2 + (r + 0.5 / s.beta) ** 2


def _aot(p: PairLogps, s: PreferenceSettings) -> Tensor:
    assert p.ref_chosen is not None and p.ref_rejected is not None
    policy = torch.sort(p.chosen - p.rejected).values
    reference = torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed(s.beta * (policy - reference), s.label_smoothing)


def _aot_unpaired(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return _smoothed(s.beta * (torch.sort(c).values - torch.sort(r).values), s.label_smoothing)


def _apo_zero(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return 1.0 - torch.sigmoid(s.beta * c) + torch.sigmoid(s.beta * r)


def _apo_down(p: PairLogps, s: PreferenceSettings) -> Tensor:
    c, r = p.ratios()
    return torch.sigmoid(s.beta * c) + 1.0 - torch.sigmoid(s.beta * (c - r))


def _discopop(p: PairLogps, s: PreferenceSettings) -> Tensor:
    x = s.beta * _delta(p, s)
    blend = torch.sigmoid(x / s.discopop_tau)
    return -F.logsigmoid(x) * (1.0 - blend) + torch.exp(-x) * blend


def _sigmoid_norm(p: PairLogps, s: PreferenceSettings) -> Tensor:
    chosen, rejected = _scores(p, s)
    return -F.logsigmoid(s.beta * (chosen / p.chosen_tokens - rejected / p.rejected_tokens))


def _sft(p: PairLogps, s: PreferenceSettings) -> Tensor:
    return p.chosen_nll.expand(len(p.chosen))


def _cpo(p: PairLogps, s: PreferenceSettings) -> Tensor:
    return _smoothed(s.beta * (p.chosen - p.rejected), s.label_smoothing)


def _simpo(p: PairLogps, s: PreferenceSettings) -> Tensor:
    margin = p.chosen / p.chosen_tokens - p.rejected / p.rejected_tokens
    return _smoothed(s.beta * margin - s.simpo_gamma, s.label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo(p: PairLogps, s: PreferenceSettings) -> Tensor:
    chosen, rejected = p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -s.beta * F.logsigmoid(log_odds)


@dataclass(frozen=True)
class PreferenceLoss:
    loss: Callable[[PairLogps, PreferenceSettings], Tensor]
    reference: bool = True
    """Whether it reads the reference model's log-probs."""
    f_divergence: bool = False
    """Whether it reads D (so `f_divergence` changes it)."""
    smoothing: bool = False
    """Whether it reads label_smoothing."""


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(_sigmoid, f_divergence=True, smoothing=True),
    "hinge": PreferenceLoss(_hinge, f_divergence=True),
    "ipo": PreferenceLoss(_ipo, f_divergence=True),
    "exo_pair": PreferenceLoss(_exo_pair, f_divergence=True, smoothing=True),
    "nca_pair": PreferenceLoss(_nca_pair),
    "robust": PreferenceLoss(_robust, f_divergence=True, smoothing=True),
    "bco_pair": PreferenceLoss(_bco_pair),
    "sppo_hard": PreferenceLoss(_sppo_hard),
    "aot": PreferenceLoss(_aot, smoothing=True),
    "aot_unpaired": PreferenceLoss(_aot_unpaired, smoothing=True),
    "apo_zero": PreferenceLoss(_apo_zero),
    "apo_down": PreferenceLoss(_apo_down),
    "discopop": PreferenceLoss(_discopop, f_divergence=True),
    "sigmoid_norm": PreferenceLoss(_sigmoid_norm, f_divergence=True),
    "sft": PreferenceLoss(_sft, reference=False),
    "cpo": PreferenceLoss(_cpo, reference=False, smoothing=True),
    "simpo": PreferenceLoss(_simpo, reference=False, smoothing=True),
    "orpo": PreferenceLoss(_orpo, reference=False),
}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LOSS_FIX = "e.g. preference_loss=sigmoid, ipo, simpo, or a weighted sum such as 0.8*sigmoid+0.2*bco_pair+sft"


def parse_preference_loss(text: str) -> tuple[tuple[str, float], ...]:
    """`0.8*sigmoid+0.2*bco_pair+sft` -> (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))."""
    terms: list[tuple[str, float]] = []
    for part in text.replace(" ", "").split("+"):
        weight_text, _, name = part.rpartition("*")
        if name not in PREFERENCE_LOSSES:
            raise ConfigError(
                f"preference_loss={text!r}: {name!r} is not a preference loss.{suggest(name, PREFERENCE_LOSSES)} "
                f"The losses: {', '.join(PREFERENCE_LOSSES)}",
                LOSS_FIX,
            )
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ConfigError(
                f"preference_loss={text!r}: the weight {weight_text!r} is not a number", LOSS_FIX
            ) from None
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"preference_loss={text!r}: the weight of {name} must be > 0", LOSS_FIX)
        if name in dict(terms):
            raise ConfigError(f"preference_loss={text!r} names {name} twice", f"give {name} once, with one weight")
        terms.append((name, weight))
    return tuple(terms)


def needs_reference(text: str) -> bool:
    """Whether any loss of `preference_loss` reads the reference model (else none is kept)."""
    return any(PREFERENCE_LOSSES[name].reference for name, _ in parse_preference_loss(text))


def check_preference_settings(text: str, s: PreferenceSettings) -> None:
    """One ConfigError for settings that the losses cannot take or that none of them would read."""
    names = [name for name, _ in parse_preference_loss(text)]
    if s.beta <= 0:
        raise ConfigError(f"beta={s.beta} must be > 0", "set beta to e.g. 0.1")
    if s.f_divergence not in F_DIVERGENCES:
        raise ConfigError(
            f"f_divergence={s.f_divergence!r}.{suggest(s.f_divergence, F_DIVERGENCES)}",
            f"choose one of: {', '.join(F_DIVERGENCES)}",
        )
    takers = [name for name, spec in PREFERENCE_LOSSES.items() if spec.f_divergence]
    if s.f_divergence != "reverse_kl" and not all(PREFERENCE_LOSSES[name].f_divergence for name in names):
        raise ConfigError(
            f"f_divergence={s.f_divergence} has no form for {', '.join(n for n in names if n not in takers)}",
            f"use it with {', '.join(takers)}, or set f_divergence=reverse_kl",
        )
    eps = s.label_smoothing
    if "robust" in names and not 0 <= eps < 0.5:
        raise ConfigError(f"robust takes label_smoothing in [0, 0.5), not {eps}", "set label_smoothing=0.1 (rDPO's)")
    if "exo_pair" in names and not 0 < eps < 1:
        raise ConfigError(f"exo_pair takes label_smoothing in (0, 1), not {eps}", "set label_smoothing=0.001 (EXO's)")
    if not 0 <= eps < 1:
        raise ConfigError(f"label_smoothing={eps} must be in [0, 1)", "set it to 0, or e.g. 0.1")
    if s.discopop_tau <= 0:
        raise ConfigError(f"discopop_tau={s.discopop_tau} must be > 0", "set discopop_tau=0.05 (DiscoPOP's)")


def preference_loss(text: str, p: PairLogps, s: PreferenceSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of `text`'s losses (parse_preference_loss), each the mean over pairs (times WPO's pair
    weights where `p` has them), and the metrics."""
    pair_weights = p.weights if p.weights is not None else 1.0
    loss = sum(
        weight * (PREFERENCE_LOSSES[name].loss(p, s) * pair_weights).mean()
        for name, weight in parse_preference_loss(text)
    )
    assert isinstance(loss, Tensor)
    with torch.no_grad():
        if p.ref_chosen is not None:
            chosen, rejected = (s.beta * ratio for ratio in p.ratios())
        else:
            chosen, rejected = s.beta * p.chosen / p.chosen_tokens, s.beta * p.rejected / p.rejected_tokens
        metrics = {
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "nll": p.chosen_nll.detach(),
        }
    return loss, metrics


UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco")


def unpaired_loss(
    logratios: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Losses on unpaired completions, each labelled desirable or not, as TRL's KTOTrainer's loss types and its
    BCOTrainer's. With u = log pi(y) - log pi_ref(y) [N], `desirable` [N] bool and the reference point z (KTO's:
    the batch's KL estimate, `kto_kl`; BCO's: delta, the running mean of every reward bu seen so far, this batch's
    included; none for apo_zero_unpaired), per completion:

        kto                 desirable: 1 - s(b(u - z));  undesirable: 1 - s(b(z - u))   KTO (Ethayarajh et al. 2024)
        apo_zero_unpaired   desirable: 1 - s(bu);        undesirable: s(bu)            APO-zero, unpaired
        bco                 desirable: -log s(bu - z);   undesirable: -log s(z - bu)   BCO (Jung et al. 2024)

    times `desirable_weight` or `undesirable_weight`, averaged over the N completions."""
    z = reference_point
    if loss_type == "kto":
        kept, dropped = 1.0 - torch.sigmoid(beta * (logratios - z)), 1.0 - torch.sigmoid(beta * (z - logratios))
    elif loss_type == "bco":
        kept, dropped = -F.logsigmoid(beta * logratios - z), -F.logsigmoid(z - beta * logratios)
    else:
        kept, dropped = 1.0 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * kept, undesirable_weight * dropped)
    with torch.no_grad():
        rewards = beta * logratios
        zero = rewards.new_zeros(())
        metrics = {
            "reward_desirable": rewards[desirable].mean() if desirable.any() else zero,
            "reward_undesirable": rewards[~desirable].mean() if (~desirable).any() else zero,
        }
        if loss_type != "apo_zero_unpaired":  # it has no reference point
            metrics["delta" if loss_type == "bco" else "kl"] = z.detach()
    return losses.mean(), metrics


def kto_kl(mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z: the batch's mean log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs (each
    prompt with another row's completion), clamped at 0, without gradient."""
    return (mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0.0)


def xpo_exploration(token_logps: Tensor, mask: Tensor, from_reference: Tensor, alpha: float) -> Tensor:
    """XPO's exploration term (Xie et al. 2024; TRL's XPOTrainer): alpha times the mean over the P pairs of
    log pi(y_ref), the policy's sequence log-prob of the pair's completion sampled by the reference. `token_logps`
    [2P, L] (0 off `mask`), `from_reference` [2P] bool, one row of each pair. Added to the DPO loss, it lowers what
    the reference would say and so pushes the policy to explore away from it."""
    sums = (token_logps * mask.to(token_logps.dtype)).sum(-1)
    return alpha * sums[from_reference].sum() / (len(sums) // 2)


def nash_md_loss(
    token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor, preference: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Nash-MD's loss (Munos et al. 2024; TRL's NashMDTrainer) on the policy's own samples y [N, L], each against
    an opponent y' drawn from the geometric mixture of the policy and the reference, `preference` [N] = P(y > y')
    (sigmoid of the reward difference). Per sequence, with l = sum_t log pi(y_t):

        beta sum_t sg(log pi(y_t) - log pi_ref(y_t)) log pi(y_t)  -  (P - 1/2) l

    REINFORCE on the preference with 1/2 as its baseline, and REINFORCE's estimate of the gradient of
    KL(pi || pi_ref) (per token, as TRL's); the mean over sequences."""
    weights = mask.to(token_logps.dtype)
    logp = token_logps * weights
    log_ratio = ((token_logps - ref_token_logps) * weights).detach()
    score = (preference - 0.5) * logp.sum(-1)
    loss = (beta * (log_ratio * logp).sum(-1) - score).mean()
    metrics = {"kl": log_ratio.sum(-1).mean(), "score": score.detach().mean(), "preference": preference.mean()}
    return loss, metrics
