"""Objectives against hand-computed values: GAE, MC returns, the PG surrogate, aggregation, value loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from policylab.errors import ConfigError
from policylab.objectives import (
    ADVANTAGES,
    AGGREGATIONS,
    aggregate,
    entropy_bonus,
    gae,
    mc_returns,
    pg_surrogate,
    value_loss,
)
from policylab.objectives.registry import Registry

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# --- advantages -------------------------------------------------------------------------------
#
# One rollout, T=4 steps x N=2 envs, gamma = 0.5.
#   env 0: terminates at t=1 (no bootstrap, recursion cut); t=2..3 is a new episode that runs
#          past the end of the rollout and bootstraps from next_values[-1] = 3.
#   env 1: truncated at t=2 (bootstrap from V(final obs) = 5, recursion cut); t=3 is a new
#          episode bootstrapping from next_values[-1] = 6.
# next_values[t] = V(obs[t+1]) inside an episode; 9 at env 0's termination is junk that must be ignored.

GAMMA = 0.5


def rollout():
    rewards = t([[1, 1], [2, 1], [3, 1], [4, 2]])
    values = t([[0.5, 1], [1, 2], [1.5, 3], [2, 4]])
    next_values = t([[1, 2], [9, 3], [2, 5], [3, 6]])
    terminated = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    episode_end = torch.tensor([[False, False], [True, False], [False, True], [False, False]])
    return rewards, values, next_values, terminated, episode_end


# One-step TD errors delta_t = r_t + gamma * (1 - term_t) * nv_t - V_t:
#   env 0: t0: 1 + .5*1 - .5 = 1      t1: 2 + 0 - 1 = 1 (terminated)
#          t2: 3 + .5*2 - 1.5 = 2.5   t3: 4 + .5*3 - 2 = 3.5
#   env 1: t0: 1 + .5*2 - 1 = 1       t1: 1 + .5*3 - 2 = 0.5
#          t2: 1 + .5*5 - 3 = 0.5 (truncated: bootstraps from V(final)=5)   t3: 2 + .5*6 - 4 = 1
DELTAS = [[1.0, 1.0], [1.0, 0.5], [2.5, 0.5], [3.5, 1.0]]


def test_gae_by_hand_with_termination_truncation_and_rollout_end():
    # gamma * lam = 0.25; A_t = delta_t + 0.25 * (1 - end_t) * A_{t+1}
    #   env 0: A3 = 3.5; A2 = 2.5 + .25*3.5 = 3.375; A1 = 1 (cut); A0 = 1 + .25*1 = 1.25
    #   env 1: A3 = 1; A2 = 0.5 (cut: 0.75 if A3 leaked across the truncation);
    #          A1 = 0.5 + .25*0.5 = 0.625; A0 = 1 + .25*0.625 = 1.15625
    adv, ret = gae(*rollout(), gamma=GAMMA, lam=0.5)
    expected = t([[1.25, 1.15625], [1.0, 0.625], [3.375, 0.5], [3.5, 1.0]])
    assert_close(adv, expected)
    # returns = A + V
    assert_close(ret, t([[1.75, 2.15625], [2.0, 2.625], [4.875, 3.5], [5.5, 5.0]]))


def test_gae_ignores_next_value_at_termination():
    r, v, nv, term, end = rollout()
    nv2 = nv.clone()
    nv2[1, 0] = -1000.0  # env 0 terminated at t=1: its next value must not matter
    assert_close(gae(r, v, nv2, term, end, GAMMA, 0.5)[0], gae(r, v, nv, term, end, GAMMA, 0.5)[0])
    # ...but at env 1's truncation (t=2) it does: delta changes by 0.5 * (1 - 5) = -2
    nv3 = nv.clone()
    nv3[2, 1] = 1.0
    adv3, _ = gae(r, v, nv3, term, end, GAMMA, 0.5)
    assert adv3[2, 1].item() == pytest.approx(0.5 - 2.0)


def test_gae_lambda_zero_is_one_step_td_error():
    adv, ret = gae(*rollout(), gamma=GAMMA, lam=0.0)
    assert_close(adv, t(DELTAS))
    _, values, *_ = rollout()
    assert_close(ret, t(DELTAS) + values)


def test_mc_returns_by_hand():
    # G_t = r_t + gamma * G_{t+1} inside an episode; at an end: r_t + gamma * (1 - term) * nv_t;
    # at the rollout end: r_T + gamma * nv_T.
    #   env 0: G3 = 4 + .5*3 = 5.5; G2 = 3 + .5*5.5 = 5.75; G1 = 2 (terminated); G0 = 1 + .5*2 = 2
    #   env 1: G3 = 2 + .5*6 = 5; G2 = 1 + .5*5 = 3.5 (truncated); G1 = 1 + .5*3.5 = 2.75;
    #          G0 = 1 + .5*2.75 = 2.375
    adv, ret = mc_returns(*rollout(), gamma=GAMMA)
    expected_returns = t([[2.0, 2.375], [2.0, 2.75], [5.75, 3.5], [5.5, 5.0]])
    assert_close(ret, expected_returns)
    # advantages = G - V
    assert_close(adv, t([[1.5, 1.375], [1.0, 0.75], [4.25, 0.5], [3.5, 1.0]]))


def test_mc_returns_ignore_next_values_inside_episodes():
    r, v, nv, term, end = rollout()
    nv2 = nv.clone()
    nv2[0] = -1000.0  # t=0 is inside an episode for both envs: MC does not bootstrap there
    nv2[1, 0] = -1000.0  # terminated
    assert_close(mc_returns(r, v, nv2, term, end, GAMMA)[1], mc_returns(r, v, nv, term, end, GAMMA)[1])


def test_gae_lambda_one_plus_values_equals_mc_returns():
    # With next_values consistent (nv_t = V_{t+1} inside episodes), lambda = 1 telescopes to MC.
    adv, ret = gae(*rollout(), gamma=GAMMA, lam=1.0)
    mc_adv, mc_ret = mc_returns(*rollout(), gamma=GAMMA)
    assert_close(ret, mc_ret)
    assert_close(adv, mc_adv)
    # and the numbers themselves (env 0, t=2): A = 2.5 + .5 * 3.5 = 4.25
    assert adv[2, 0].item() == pytest.approx(4.25)


def test_advantage_registry():
    assert ADVANTAGES.get("gae") is gae
    assert ADVANTAGES.get("mc") is mc_returns
    with pytest.raises(ConfigError) as info:
        ADVANTAGES.get("gea")
    msg = str(info.value)
    assert "gea" in msg and "Did you mean: gae" in msg
    assert "gae, mc" in msg


def test_registry_rejects_double_registration():
    reg = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(lambda: 2)
    assert reg.names() == ["a"]


# --- aggregation ------------------------------------------------------------------------------

LOSS_2D = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK_2D = [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize(
    "mode, masked, unmasked",
    [
        # masked:   (1 + 2 + 4) / 3 = 7/3         unmasked: 21 / 6 = 3.5
        ("token-mean", 7 / 3, 3.5),
        # masked:   rows (1+2)/2 = 1.5 and 4/1 = 4 -> 2.75     unmasked: rows 2 and 5 -> 3.5
        ("seq-mean-token-mean", 2.75, 3.5),
        # masked:   rows 1+2 = 3 and 4 -> 3.5                  unmasked: rows 6 and 15 -> 10.5
        ("seq-mean-token-sum", 3.5, 10.5),
    ],
)
def test_aggregation_modes_2d(mode, masked, unmasked):
    loss = t(LOSS_2D)
    assert aggregate(loss, t(MASK_2D), mode).item() == pytest.approx(masked)
    assert aggregate(loss, torch.tensor(MASK_2D, dtype=torch.bool), mode).item() == pytest.approx(masked)
    assert aggregate(loss, None, mode).item() == pytest.approx(unmasked)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_modes_1d_are_step_means(mode):
    loss = t([1.0, 2.0, 3.0, 6.0])
    assert aggregate(loss, None, mode).item() == pytest.approx(3.0)  # 12 / 4
    assert aggregate(loss, t([1, 1, 0, 0]), mode).item() == pytest.approx(1.5)  # (1 + 2) / 2


def test_aggregation_unknown_mode_lists_choices():
    assert AGGREGATIONS.names() == [
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]
    with pytest.raises(ConfigError) as info:
        aggregate(t([1.0]), None, "token_mean")
    msg = str(info.value)
    assert "token_mean" in msg
    assert "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-mean" in msg
    assert "Did you mean: token-mean" in msg


# --- policy-gradient surrogate ----------------------------------------------------------------


def surrogate(ratios, advantages, **kwargs):
    """pg_surrogate with old_logp = 0 and logp = log(ratio)."""
    logp = torch.log(t(ratios))
    return pg_surrogate(logp, torch.zeros_like(logp), t(advantages), **kwargs)


def test_unclipped_is_minus_mean_ratio_times_advantage():
    # -(0.5*1 + 1*(-2) + 2*3) / 3 = -(0.5 - 2 + 6) / 3 = -1.5
    loss, metrics = surrogate([0.5, 1.0, 2.0], [1.0, -2.0, 3.0], clip_low=None)
    assert loss.item() == pytest.approx(-1.5)
    assert metrics["clip_frac"].item() == 0.0
    # the same data with PPO clipping (eps 0.2) differs: r=2, A=3 -> clipped to 1.2*3
    # -(max(-0.5, -0.8) + max(2, 2) + max(-6, -3.6)) / 3 = -(0.5 - 2 + 3.6)/3 = -0.7
    clipped, _ = surrogate([0.5, 1.0, 2.0], [1.0, -2.0, 3.0])
    assert clipped.item() == pytest.approx(-0.7)


@pytest.mark.parametrize(
    "ratio, adv, expected, clipped",
    [
        (1.5, 1.0, -1.2, True),  # A>0, r above 1+eps: max(-1.5, -1.2) = -1.2, clipped
        (0.5, 1.0, -0.5, False),  # A>0, r below 1-eps: max(-0.5, -0.8) = -0.5, not clipped
        (1.5, -1.0, 1.5, False),  # A<0, r above 1+eps: max(1.5, 1.2) = 1.5, not clipped
        (0.5, -1.0, 0.8, True),  # A<0, r below 1-eps: max(0.5, 0.8) = 0.8, clipped
        (1.1, 2.0, -2.2, False),  # inside the range: -1.1 * 2
        (0.9, -2.0, 1.8, False),  # inside the range: 0.9 * 2
    ],
)
def test_ppo_clip_single_elements(ratio, adv, expected, clipped):
    loss, metrics = surrogate([ratio], [adv], clip_low=0.2)
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_frac"].item() == (1.0 if clipped else 0.0)


def test_ppo_clip_batch_and_metrics():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    advs = [1.0, 1.0, -1.0, -1.0, 2.0]
    loss, m = surrogate(ratios, advs, clip_low=0.2)
    # (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5
    assert loss.item() == pytest.approx(-0.32)
    assert m["clip_frac"].item() == pytest.approx(0.4)  # 2 of 5 clipped
    assert m["ratio_mean"].item() == pytest.approx(1.02)  # 5.1 / 5
    # (r - 1) - log r per element, averaged
    kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2.0)) + (0.1 - math.log(1.1))) / 5
    assert m["approx_kl"].item() == pytest.approx(kl)
    assert m["approx_kl"].item() == pytest.approx(0.1160108, abs=1e-6)
    assert all(not v.requires_grad for v in m.values())


def test_asymmetric_clip():
    # clip_low 0.1, clip_high 0.5: ratio range [0.9, 1.5]
    ratios = [1.4, 2.0, 0.5, 0.95]
    advs = [1.0, 1.0, -1.0, -1.0]
    # r=1.4, A=1: inside [0.9, 1.5] -> -1.4 (a symmetric 0.1 clip would give -1.1)
    # r=2.0, A=1: clipped at 1.5 -> -1.5
    # r=0.5, A=-1: clipped at 0.9 -> max(0.5, 0.9) = 0.9
    # r=0.95, A=-1: inside -> 0.95
    # mean: (-1.4 - 1.5 + 0.9 + 0.95) / 4 = -1.05 / 4
    loss, m = surrogate(ratios, advs, clip_low=0.1, clip_high=0.5)
    assert loss.item() == pytest.approx(-0.2625)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    sym, _ = surrogate(ratios, advs, clip_low=0.1)
    # symmetric: (-1.1 - 1.1 + 0.9 + 0.95) / 4 = -0.35 / 4
    assert sym.item() == pytest.approx(-0.0875)


def test_dual_clip_bounds_negative_advantage_loss():
    # A=-1, r=5: PPO loss max(5, 1.2) = 5; dual clip c=3 bounds it at -c*A = 3
    # A=-1, r=2: PPO loss 2 < 3, untouched
    # A=+1, r=5: dual clip does not apply: -1.2
    ratios, advs = [5.0, 2.0, 5.0], [-1.0, -1.0, 1.0]
    plain, _ = surrogate(ratios, advs, clip_low=0.2)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)
    dual, _ = surrogate(ratios, advs, clip_low=0.2, dual_clip=3.0)
    assert dual.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_must_exceed_one(c):
    with pytest.raises(ValueError, match="dual_clip"):
        surrogate([1.0], [-1.0], dual_clip=c)


def test_truncated_importance_sampling():
    # ratio 1 (logp = old_logp = 0); weights min(exp(old - behaviour), cap=1.5):
    #   behaviour log 0.5 -> exp(log 2) = 2 -> capped 1.5;  behaviour log 2 -> 0.5;  behaviour 0 -> 1
    logp = torch.zeros(3, dtype=F64, requires_grad=True)
    behaviour = torch.log(t([0.5, 2.0, 1.0]))
    advs = t([1.0, 2.0, 4.0])
    loss, _ = pg_surrogate(logp, logp.detach(), advs, behaviour_logp=behaviour, tis_cap=1.5)
    # -(1.5*1 + 0.5*2 + 1*4) / 3 = -6.5 / 3
    assert loss.item() == pytest.approx(-6.5 / 3)
    loss.backward()
    # d/dlogp of -w * r * A / 3 at r = 1: -w * A / 3
    assert_close(logp.grad, t([-1.5, -1.0, -4.0]) / 3)


def test_tis_cap_needs_behaviour_logp():
    with pytest.raises(ValueError, match="behaviour_logp"):
        surrogate([1.0], [1.0], tis_cap=2.0)


@pytest.mark.parametrize("clip_low", [None, 0.2])
def test_on_policy_gradient_is_reinforce(clip_low):
    logp = t([-0.3, -1.2, -0.7, -2.0]).requires_grad_()
    advs = t([1.0, -2.0, 3.0, 0.5])
    loss, m = pg_surrogate(logp, logp.detach(), advs, clip_low=clip_low)
    # ratio 1: loss = -mean(A) = -(1 - 2 + 3 + 0.5) / 4 = -0.625
    assert loss.item() == pytest.approx(-0.625)
    loss.backward()
    # gradient = -A / B
    assert_close(logp.grad, t([-0.25, 0.5, -0.75, -0.125]))
    assert m["approx_kl"].item() == 0.0
    assert m["ratio_mean"].item() == 1.0


def test_surrogate_mask_and_aggregation():
    # ratios [[1.5, 100], [0.5, 1]], the 100 is masked out; A = 1 everywhere; no clipping
    ratios = [[1.5, 100.0], [0.5, 1.0]]
    mask = torch.tensor([[True, False], [True, True]])
    loss, m = surrogate(ratios, [[1.0, 1.0], [1.0, 1.0]], clip_low=None, mask=mask)
    assert loss.item() == pytest.approx(-1.0)  # -(1.5 + 0.5 + 1) / 3
    assert m["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 0.5 + 1) / 3
    seq, _ = surrogate(ratios, [[1.0, 1.0], [1.0, 1.0]], clip_low=None, mask=mask, aggregation="seq-mean-token-mean")
    assert seq.item() == pytest.approx(-1.125)  # rows -1.5 and -(0.5 + 1)/2 = -0.75


def test_entropy_bonus():
    ent = t([[1.0, 2.0], [3.0, 4.0]])
    mask = t([[1, 1], [1, 0]])
    assert entropy_bonus(ent).item() == pytest.approx(2.5)  # 10 / 4
    assert entropy_bonus(ent, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert entropy_bonus(ent, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)  # (1.5 + 3) / 2


# --- value loss -------------------------------------------------------------------------------


def test_value_loss_unclipped_has_no_half_factor():
    # (1-2)^2 + (2-2)^2 + (3-0)^2 = 1 + 0 + 9 = 10; mean 10/3
    assert value_loss(t([1.0, 2.0, 3.0]), t([2.0, 2.0, 0.0])).item() == pytest.approx(10 / 3)


def test_value_loss_clipped():
    values, returns, old = t([1.0, 2.0, 3.0]), t([2.0, 2.0, 0.0]), t([1.5, 0.0, 3.5])
    # clip 0.2: V_clip = old + clamp(V - old, -0.2, 0.2)
    #   0: 1.5 - 0.2 = 1.3 -> (1.3-2)^2 = 0.49 vs (1-2)^2 = 1      -> 1
    #   1: 0 + 0.2 = 0.2   -> (0.2-2)^2 = 3.24 vs (2-2)^2 = 0      -> 3.24
    #   2: 3.5 - 0.2 = 3.3 -> (3.3-0)^2 = 10.89 vs (3-0)^2 = 9     -> 10.89
    # mean (1 + 3.24 + 10.89) / 3 = 15.13 / 3
    loss = value_loss(values, returns, old_values=old, clip=0.2)
    assert loss.item() == pytest.approx(15.13 / 3)
    # inside the clip range the clipped term equals the unclipped one
    same = value_loss(t([1.0]), t([2.0]), old_values=t([1.1]), clip=0.2)
    assert same.item() == pytest.approx(1.0)


def test_value_loss_clip_needs_old_values():
    with pytest.raises(ValueError, match="old_values"):
        value_loss(t([1.0]), t([2.0]), clip=0.2)
