"""The one policy-gradient surrogate: REINFORCE, A2C, PPO-clip, clip-higher, dual-clip, truncated IS, SPO, and the
KL-penalized trust-region family (MDPO, FixPO).

    ratio = exp(logp - old_logp)
    loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)   (no clipping: -ratio * A)
    SPO (Xie et al. 2024), instead of the clip:  loss = -(ratio * A - |A| / (2 spo_eps) (ratio - 1)^2)
    dual-clip (Ye et al. 2020), where A < 0:  loss = min(loss, -dual_clip * A)
    truncated IS: loss *= min(exp(old_logp - behaviour_logp), tis_cap)    (stale or foreign data)
    KL penalty:   loss += kl_coef * k(ratio), a per-sample estimate from the old policy's samples of
        kl="reverse": KL(pi || pi_old),  k = ratio log ratio - ratio + 1   (MDPO; d k/d logp = ratio log ratio)
        kl="forward": KL(pi_old || pi),  k = ratio - 1 - log ratio         (FixPO; d k/d logp = ratio - 1)
      both >= 0 per sample and unbiased (E_old[ratio] = 1).

With `old_logp = logp.detach()` the ratio is 1 and the gradient is the
REINFORCE / A2C gradient grad(logp) * A. The loss is reduced over `mask` by an
aggregation mode (token-mean, seq-mean-token-mean, seq-mean-token-sum), so the
same function serves steps of a control task and tokens of a language model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.objectives.aggregation import aggregate, token_mean


def pg_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    clip_low: float | None = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    behaviour_logp: Tensor | None = None,
    tis_cap: float | None = None,
    spo_eps: float | None = None,
    kl_coef: float | Tensor = 0.0,
    kl: str = "reverse",
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss and detached metrics (approx_kl, clip_frac, ratio_mean)."""
    loss, clipped_mask, ratio, log_ratio = pg_token_losses(
        logp,
        old_logp,
        advantages,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        behaviour_logp=behaviour_logp,
        tis_cap=tis_cap,
        spo_eps=spo_eps,
        kl_coef=kl_coef,
        kl=kl,
    )
    return aggregate(loss, mask, aggregation), surrogate_metrics(ratio, log_ratio, clipped_mask, mask)


def surrogate_metrics(ratio: Tensor, log_ratio: Tensor, clipped: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """Detached approx_kl (k3 of the ratio), clip_frac and ratio_mean over the mask."""
    with torch.no_grad():
        return {
            "approx_kl": token_mean((ratio - 1.0) - log_ratio, mask),
            "clip_frac": token_mean(clipped.to(ratio.dtype), mask),
            "ratio_mean": token_mean(ratio, mask),
        }


def pg_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float | None = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    behaviour_logp: Tensor | None = None,
    tis_cap: float | None = None,
    spo_eps: float | None = None,
    kl_coef: float | Tensor = 0.0,
    kl: str = "reverse",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The surrogate per element before aggregation: (loss, where it was clipped, ratio, log ratio). With
    `spo_eps` the "clipped" mask marks the samples outside SPO's trust region |ratio - 1| > spo_eps."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    if spo_eps is not None:
        _check_spo(spo_eps, clip_low)
        loss = unclipped + advantages.abs() / (2.0 * spo_eps) * (ratio - 1.0) ** 2
        clipped_mask = (ratio - 1.0).abs() > spo_eps
    elif clip_low is None:
        loss = unclipped
        clipped_mask = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        high = clip_low if clip_high is None else clip_high
        clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + high) * advantages
        loss = torch.maximum(unclipped, clipped)
        clipped_mask = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    if tis_cap is not None:
        if behaviour_logp is None:
            raise ValueError("tis_cap needs behaviour_logp (the log-probs of the policy that generated the data)")
        weights = torch.exp(old_logp - behaviour_logp).clamp(max=tis_cap).detach()
        loss = loss * weights
    if isinstance(kl_coef, Tensor) or kl_coef != 0.0:
        loss = loss + kl_coef * kl_estimate(ratio, log_ratio, kl)
    return loss, clipped_mask, ratio, log_ratio


def kl_estimate(ratio: Tensor, log_ratio: Tensor, kl: str = "reverse") -> Tensor:
    """Per-sample KL estimate from a sample of the old policy (ratio = pi / pi_old there): "reverse",
    KL(pi || pi_old) ~ ratio log ratio - ratio + 1; "forward", KL(pi_old || pi) ~ ratio - 1 - log ratio."""
    if kl == "reverse":
        return ratio * log_ratio - ratio + 1.0
    if kl == "forward":
        return ratio - 1.0 - log_ratio
    raise ValueError(f"unknown KL direction {kl!r}: choose reverse (KL(pi || pi_old)) or forward (KL(pi_old || pi))")


def kl_estimate_grad(ratio: Tensor, log_ratio: Tensor, kl: str = "reverse") -> Tensor:
    """d kl_estimate / d logp (d ratio / d logp = ratio)."""
    if kl == "reverse":
        return ratio * log_ratio
    if kl == "forward":
        return ratio - 1.0
    raise ValueError(f"unknown KL direction {kl!r}: choose reverse (KL(pi || pi_old)) or forward (KL(pi_old || pi))")


def _check_spo(spo_eps: float, clip_low: float | None) -> None:
    if spo_eps <= 0:
        raise ValueError(f"spo_eps must be > 0, got {spo_eps}")
    if clip_low is not None:
        raise ValueError("spo_eps replaces the clip: pass clip_low=None with it")


def policy_shaping_loss(logp: Tensor, advantages: Tensor, gamma: float = 0.1) -> Tensor:
    """LUFFY's loss on off-policy (expert) tokens, per element: -f(p) A with f(p) = p / (p + gamma), p the token's
    probability under the policy (the expert's taken as 1, so no ratio and no clipping). f' = gamma / (p + gamma)^2
    keeps a large gradient on tokens the policy finds unlikely, which plain p A would neglect."""
    p = logp.exp()
    return -(p / (p + gamma)) * advantages


def entropy_bonus(entropy: Tensor, mask: Tensor | None = None, aggregation: str = "token-mean") -> Tensor:
    """Mean entropy under the aggregation mode (to be subtracted, times a coefficient, from the loss)."""
    return aggregate(entropy, mask, aggregation)


def pg_surrogate_grad(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float | None = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    spo_eps: float | None = None,
    kl_coef: float | Tensor = 0.0,
    kl: str = "reverse",
    scale: float = 1.0,
    with_metrics: bool = True,
) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """`pg_surrogate` (token-mean, no mask) with its gradient d(scale * loss)/d(logp), without autograd.

    For the fast update path of small networks. d(-r A)/d(logp) = -r A, so the
    gradient of each element is the unclipped surrogate where that branch is
    the active one and 0 where clipping (or dual-clip) holds the loss constant;
    SPO's is -ratio (A - |A| / spo_eps (ratio - 1)), the KL term's kl_coef * kl_estimate_grad.
    Returns (loss or None, gradient, metrics); `with_metrics=False` skips the
    loss value and the metrics. Tests check it against autograd of `pg_surrogate`.
    """
    with torch.no_grad():
        n = logp.numel()
        log_ratio = logp - old_logp
        ratio = torch.exp(log_ratio)
        unclipped = ratio * advantages
        unclipped.neg_()
        loss: Tensor | None
        if spo_eps is not None:
            _check_spo(spo_eps, clip_low)
            penalty = advantages.abs().mul_(1.0 / spo_eps)  # |A| / eps: d/dr of |A| / (2 eps) (r - 1)^2 / (r - 1)
            excess = ratio - 1.0
            grad = unclipped + penalty * excess * ratio
            loss = unclipped + 0.5 * penalty * excess * excess if with_metrics or dual_clip is not None else None
            clipped_mask = excess.abs() > spo_eps
        elif clip_low is None:
            loss, grad = unclipped, unclipped
            clipped_mask = None
        else:
            high = clip_low if clip_high is None else clip_high
            clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + high).mul_(advantages).neg_()
            clipped_mask = clipped > unclipped
            loss = torch.where(clipped_mask, clipped, unclipped) if with_metrics or dual_clip is not None else None
            grad = torch.where(clipped_mask, 0.0, unclipped)
        if dual_clip is not None:
            if dual_clip <= 1.0:
                raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
            bound = -dual_clip * advantages
            bounded = (advantages < 0) & (loss > bound)  # type: ignore[operator]
            loss = torch.where(bounded, bound, loss)  # type: ignore[arg-type]
            grad = torch.where(bounded, 0.0, grad)
        if isinstance(kl_coef, Tensor) or kl_coef != 0.0:
            grad = grad + kl_coef * kl_estimate_grad(ratio, log_ratio, kl)
            if loss is not None:
                loss = loss + kl_coef * kl_estimate(ratio, log_ratio, kl)
        grad = grad * (scale / n)
        if not with_metrics:
            return None, grad, {}
        metrics = {
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_frac": torch.zeros(()) if clipped_mask is None else clipped_mask.float().mean(),
            "ratio_mean": ratio.mean(),
        }
        return loss.mean(), grad, metrics  # type: ignore[union-attr]


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimates of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3), r = pi_ref / pi:
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, >= 0)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: choose k1, k2 or k3")


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalized sequence log-ratio, mean over each row's tokens of (logp - old_logp) [N]: its exp
    is (pi(y|x) / pi_old(y|x)) ^ (1 / |y|)."""
    mask = mask.to(logp.dtype)
    return ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def gspo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): the clipped surrogate on the sequence ratio s = exp(sequence_log_ratio) with one
    advantage per sequence [N], averaged over sequences. The same `pg_surrogate`, at sequence level (its
    clip range is the paper's, far narrower than a token ratio's)."""
    seq = sequence_log_ratio(logp, old_logp, mask)
    return pg_surrogate(seq, torch.zeros_like(seq), advantages, clip_low=clip_low, clip_high=clip_high)


def gspo_token_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None = 3e-4,
    clip_high: float | None = 4e-4,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (Zheng et al. 2025, section 4.3): each token's ratio is sg[s] pi(y_t) / sg[pi(y_t)], in value the
    sequence ratio s = exp(sequence_log_ratio) at every token, in gradient the token's own, so that advantages may
    differ per token [N, T]; the clipped surrogate at each token, aggregated by `aggregation` (TRL's experimental
    GSPO-token trainer). With one advantage per sequence its gradient is GSPO's under seq-mean-token-mean."""
    seq = sequence_log_ratio(logp, old_logp, mask).detach()
    token_log_ratio = logp - logp.detach() + seq[:, None]
    return pg_surrogate(
        token_log_ratio,
        torch.zeros_like(logp),
        advantages,
        mask=mask,
        clip_low=clip_low,
        clip_high=clip_high,
        aggregation=aggregation,
    )


def luspo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """LUSPO (arXiv:2602.05261): GSPO's clipped surrogate on the sequence ratio with each sequence's loss scaled by
    its length |y|, averaged over sequences (TRL's loss_type "luspo")."""
    seq = sequence_log_ratio(logp, old_logp, mask)
    losses, clipped, ratio, _ = pg_token_losses(
        seq, torch.zeros_like(seq), advantages, clip_low=clip_low, clip_high=clip_high
    )
    loss = (losses * mask.to(logp.dtype).sum(-1)).mean()
    return loss, surrogate_metrics(ratio, seq, clipped, None)


def gmpo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al. 2025, arXiv:2507.20673): the geometric mean of the token ratios instead of their
    arithmetic mean, -exp(mean_t clip(log r_t)) A per sequence [N], averaged over sequences. Each token's
    log-ratio is clipped to [-clip_low, clip_high] in log space, sign-aware as PPO's min: where A > 0 the smaller
    of it and its clip, where A <= 0 the larger (TRL's GMPOTrainer; its default clip exp(+-0.4) is far wider than a
    token ratio's, the geometric mean being robust to outlier tokens)."""
    log_ratio = logp - old_logp
    clamped = log_ratio.clamp(-clip_low, clip_high)
    positive = (advantages > 0)[:, None]
    clipped = torch.where(positive, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    weights = mask.to(logp.dtype)
    seq = (clipped * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    loss = (-torch.exp(seq) * advantages).mean()
    ratio = torch.exp(log_ratio)
    metrics = surrogate_metrics(ratio, log_ratio, (clipped != log_ratio).detach(), mask)
    return loss, metrics


def vespo_weights(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's gamma weights phi(w) = e^lambda w^k e^(-lambda w) [N] (phi(1) = 1), w = pi(y|x) / pi_old(y|x), the
    sequence ratio (the sum of the token log-ratios, each clamped to [-20, 20], then to [log 1e-8, 20]); (k, lambda)
    = (k_pos, lambda_pos) where A >= 0, else (k_neg, lambda_neg). No gradient: they scale REINFORCE's."""
    with torch.no_grad():
        log_w = ((logp - old_logp).clamp(-20.0, 20.0) * mask.to(logp.dtype)).sum(-1).clamp(math.log(1e-8), 20.0)
        positive = advantages >= 0
        k = torch.where(positive, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
        lam = torch.where(positive, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg))
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)


def vespo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """VESPO (arXiv:2602.10693): REINFORCE, -phi(w) A log pi, with `vespo_weights` on the sequence ratio instead of
    a clip (soft, asymmetric: a sequence far off the sampling policy either way weighs little). `advantages` per
    sequence [N] or per token [N, T] (a row's sign, for its weight: the sum of its tokens'). TRL's loss_type
    "vespo" (with its token-mean normalization: aggregation token-mean)."""
    per_token = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    phi = vespo_weights(logp, old_logp, per_token.sum(-1), mask, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                        lambda_neg=lambda_neg)  # fmt: skip
    loss = aggregate(-phi[:, None] * per_token * logp, mask, aggregation)
    return loss, {"vespo_weight_mean": phi.mean(), "ratio_mean": token_mean(torch.exp(logp - old_logp), mask)}


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_high: float = 0.28,
    clip_low: float | None = None,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, 2025): REINFORCE whose importance weight is clipped and held constant,
    -sg(clip(r, 1 - clip_low, 1 + clip_high)) A log pi, so every token keeps a gradient (PPO's clip drops the
    gradient of clipped tokens). No lower clip by default, as in the paper."""
    ratio = torch.exp(logp - old_logp)
    low = 0.0 if clip_low is None else 1.0 - clip_low
    weight = ratio.clamp(low, 1.0 + clip_high).detach()
    loss = aggregate(-weight * advantages * logp, mask, aggregation)
    with torch.no_grad():
        clipped = ((ratio > 1.0 + clip_high) | (ratio < low)).to(logp.dtype)
        metrics = {"clip_frac": token_mean(clipped, mask), "ratio_mean": token_mean(ratio, mask)}
    return loss, metrics


def sapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO (Gao et al. 2025, arXiv:2511.20347): a soft gate instead of the clip, -g(r) A with
    g(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos where A > 0 and tau_neg (>= tau_pos) where A < 0. At r = 1
    the gradient is plain REINFORCE's; away from 1 it fades smoothly instead of stopping at a clip edge."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    loss = aggregate(-gate * advantages, mask, aggregation)
    return loss, surrogate_metrics(ratio, log_ratio, torch.zeros_like(ratio, dtype=torch.bool), mask)


def optimal_values(rewards: Tensor, beta: float) -> Tensor:
    """A*-PO's estimate of the optimal KL-regularized value of each prompt from N rewards of the reference policy's
    samples [P, N]: V*(x) = beta log mean_i exp(r_i / beta) [P] (stable through logsumexp)."""
    return beta * (torch.logsumexp(rewards / beta, -1) - math.log(rewards.shape[-1]))


def a2po_loss(
    logp: Tensor, ref_logp: Tensor, rewards: Tensor, values: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """A*-PO (Brantley et al. 2025, arXiv:2505.20686; TRL's A2POTrainer): the implicit reward
    beta log(pi(y|x) / pi_ref(y|x)) (sequence log-probs, the sums over the completion's tokens) regressed onto the
    optimal advantage r - V*(x), mean over sequences of the squared error."""
    weights = mask.to(logp.dtype)
    implicit = beta * ((logp - ref_logp) * weights).sum(-1)
    target = rewards - values
    loss = ((implicit - target) ** 2).mean()
    return loss, {"implicit_reward": implicit.detach().mean(), "advantage": target.mean()}


SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction_weights(
    trainer_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    mode: str,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Importance weights for a sampler whose log-probs differ from the trainer's at the same weights (another
    engine's kernels, another precision, an external sampler: TRL's vllm_importance_sampling_correction):
    rho = pi_trainer / pi_sampler per token [N, T], or per sequence [N] (the product over its tokens) for the
    sequence_* modes; *_truncate clamps rho to [clip_min, clip_max], *_mask sets rho outside them to 0. The
    policy loss is weighted by rho (it is linear in the advantage, so the advantages are)."""
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}: one of {', '.join(SAMPLER_CORRECTIONS)}")
    diff = torch.nan_to_num((trainer_logp - sampler_logp) * mask, nan=0.0)
    rho = torch.exp(diff.sum(-1) if mode.startswith("sequence") else diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return rho.clamp(low, high)
    return rho.masked_fill((rho < low) | (rho > high), 0.0)
