"""Off-policy evaluation estimators against values known exactly: a bandit, and a tabular MDP solved by
backward induction. Many small data sets are drawn at once, so statements about bias and coverage are
checked over repetitions, not on one lucky draw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from policylab.errors import ConfigError, DatasetError, PolicylabError
from policylab.ope import (
    ESTIMATORS,
    Trajectories,
    bootstrap_estimates,
    dr,
    estimate,
    is_,
    kish_ess,
    log_ratios,
    pad_episodes,
    pdis,
    step_weights,
    wdr,
    wis,
)

GAMMA = 0.9
H = 5


@dataclass(frozen=True)
class MDP:
    """Tabular, finite horizon H: P [S, A, S], R [S, A] (mean reward), d0 [S]."""

    P: np.ndarray
    R: np.ndarray
    d0: np.ndarray
    reward_noise: float = 0.0


STOCHASTIC = MDP(
    P=np.array(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
            [[0.3, 0.4, 0.3], [0.0, 0.2, 0.8]],
            [[0.5, 0.0, 0.5], [0.9, 0.1, 0.0]],
        ]
    ),
    R=np.array([[1.0, 0.0], [0.5, 2.0], [-1.0, 0.3]]),
    d0=np.array([0.5, 0.3, 0.2]),
    reward_noise=0.2,
)
# The same rewards; each (s, a) leads to one state; every episode starts in state 0.
DETERMINISTIC = MDP(P=np.eye(3)[np.array([[1, 2], [2, 0], [0, 1]])], R=STOCHASTIC.R, d0=np.array([1.0, 0.0, 0.0]))
PI = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
MU = np.array([[0.5, 0.5], [0.5, 0.5], [0.4, 0.6]])


def backward_induction(mdp: MDP, pi: np.ndarray, gamma: float = GAMMA) -> tuple[np.ndarray, np.ndarray, float]:
    """Time-dependent Q [H, S, A], V [H, S] of pi, and its true value E_{s0~d0} V_0(s0)."""
    S, A = mdp.R.shape
    Q, V = np.zeros((H, S, A)), np.zeros((H + 1, S))
    for t in reversed(range(H)):
        Q[t] = mdp.R + gamma * mdp.P @ V[t + 1]
        V[t] = (pi * Q[t]).sum(axis=1)
    return Q, V[:H], float(mdp.d0 @ V[0])


def sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of a [n, k] probability matrix (inverse CDF)."""
    drawn = (rng.random((len(probs), 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return np.minimum(drawn, probs.shape[1] - 1)


def logged(mdp: MDP, mu: np.ndarray, n: int, rng: np.random.Generator, pi: np.ndarray = PI) -> Trajectories:
    """n episodes of mu in mdp, with pi's log-probs and pi's true Q and V as the critic."""
    Q, V, _ = backward_induction(mdp, pi)
    states, actions = np.zeros((n, H), dtype=int), np.zeros((n, H), dtype=int)
    s = sample_rows(np.broadcast_to(mdp.d0, (n, len(mdp.d0))), rng)
    for t in range(H):  # simulation is sequential in t; the estimators are not
        a = sample_rows(mu[s], rng)
        states[:, t], actions[:, t] = s, a
        s = sample_rows(mdp.P[s, a], rng)
    steps = np.arange(H)
    rewards = mdp.R[states, actions] + mdp.reward_noise * rng.standard_normal((n, H))
    return Trajectories(
        rewards,
        np.log(mu[states, actions]),
        np.log(pi[states, actions]),
        q_values=Q[steps, states, actions],
        v_values=V[steps, states],
    )


def per_dataset(estimator, data: Trajectories, n_datasets: int) -> np.ndarray:
    """Estimates of an unnormalized estimator on n_datasets equal slices of the episodes (one call for all)."""
    return estimator(data, gamma=GAMMA).per_episode().reshape(n_datasets, -1).mean(axis=1)


def within_standard_errors(estimates: np.ndarray, truth: float, k: float = 4.0) -> bool:
    return abs(estimates.mean() - truth) < k * estimates.std(ddof=1) / np.sqrt(len(estimates))


# ---------------------------------------------------------------------------------------------------- bandit


def bandit(n_datasets: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rewards and behaviour / target log-probs, each [n_datasets, n, 1], of a one-step bandit with two actions:
    mu = (0.9, 0.1), pi = (0.1, 0.9), reward a + N(0, 0.1^2); the true value is 0.9."""
    actions = (rng.random((n_datasets, n, 1)) < 0.1).astype(int)
    rewards = actions + 0.1 * rng.standard_normal(actions.shape)
    return [rewards, np.log(np.array([0.9, 0.1])[actions]), np.log(np.array([0.1, 0.9])[actions])]


def test_is_is_unbiased_and_wis_bias_shrinks_with_n_on_a_bandit():
    rng = np.random.default_rng(0)
    all_at_once = Trajectories(*(a.reshape(-1, 1) for a in bandit(2000, 10, rng)))
    assert within_standard_errors(per_dataset(is_, all_at_once, 2000), 0.9)

    def wis_bias(n: int) -> tuple[float, float]:
        arrays = bandit(2000, n, rng)
        estimates = np.array([wis(Trajectories(*(a[i] for a in arrays)), gamma=1.0).value() for i in range(2000)])
        return abs(estimates.mean() - 0.9), estimates.std(ddof=1) / np.sqrt(len(estimates))

    small_bias, small_se = wis_bias(10)
    large_bias, _ = wis_bias(1000)
    assert small_bias > 4 * small_se  # a real bias at n = 10 (35% of data sets never see the good action)
    assert large_bias < small_bias / 10


def test_continuous_actions_use_densities():
    """mu = N(0, 1), pi = N(0.5, 0.3^2), reward = a: the true value is 0.5; pi's log-density exceeds 0 near 0.5."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20_000, 1))
    log_mu = -0.5 * a**2 - 0.5 * np.log(2 * np.pi)
    log_pi = -0.5 * ((a - 0.5) / 0.3) ** 2 - np.log(0.3) - 0.5 * np.log(2 * np.pi)
    assert log_pi.max() > 0
    results = estimate(["is", "wis"], Trajectories(a, log_mu, log_pi), gamma=1.0, bootstrap=200)
    for result in results.values():
        assert abs(result.value - 0.5) < 4 * result.std_error
        assert result.ci_low < 0.5 < result.ci_high


# ---------------------------------------------------------------------------------------------------- tabular MDP


def test_is_pdis_and_dr_are_unbiased_and_dr_with_true_q_has_far_less_variance():
    rng = np.random.default_rng(2)
    _, _, truth = backward_induction(STOCHASTIC, PI)
    data = logged(STOCHASTIC, MU, 1000 * 20, rng)
    by_name = {name: per_dataset(f, data, 1000) for name, f in (("is", is_), ("pdis", pdis), ("dr", dr))}
    for estimates in by_name.values():
        assert within_standard_errors(estimates, truth)
    assert by_name["dr"].var() < 0.25 * by_name["pdis"].var()


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_dr_and_wdr_with_true_q_are_exact_on_every_dataset_of_deterministic_dynamics(seed):
    """With deterministic transitions and rewards, r_t + gamma V_{t+1}(s_{t+1}) = Q_t(s_t, a_t) on every step, so
    the corrections vanish and DR (and WDR, whose normalized weights telescope alike) returns V_0(s_0) exactly,
    whatever the behaviour policy."""
    rng = np.random.default_rng(seed)
    mu = rng.dirichlet(np.ones(2), size=3)
    _, _, truth = backward_induction(DETERMINISTIC, PI)
    pdis_errors = []
    for _ in range(20):
        data = logged(DETERMINISTIC, mu, 30, rng)
        assert dr(data, gamma=GAMMA).value() == pytest.approx(truth, abs=1e-9)
        assert wdr(data, gamma=GAMMA).value() == pytest.approx(truth, abs=1e-9)
        pdis_errors.append(abs(pdis(data, gamma=GAMMA).value() - truth))
    assert max(pdis_errors) > 1e-2  # the data sets are not trivial: importance sampling alone does err


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(6)
    mu = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])  # near pi, so 200 episodes make a fair interval
    _, _, truth = backward_induction(STOCHASTIC, PI)
    covered = {"is": 0, "pdis": 0}
    for i in range(400):
        results = estimate(list(covered), logged(STOCHASTIC, mu, 200, rng), gamma=GAMMA, bootstrap=200, seed=i)
        for name, result in results.items():
            covered[name] += result.ci_low <= truth <= result.ci_high
    for name, count in covered.items():
        assert 0.88 <= count / 400 <= 0.99, (name, count)


def test_self_normalized_bootstrap_renormalizes_each_resample():
    """WIS is a weighted average of returns, so each resample's WIS lies between the smallest and largest return
    (normalizing once on the full data and resampling the normalized values would not stay inside)."""
    data = Trajectories(*(a[0] for a in bandit(1, 50, np.random.default_rng(7))))  # weights 9 and 1/9
    returns = data.rewards[:, 0]
    draws = bootstrap_estimates([wis(data, gamma=1.0)], 500, seed=0)[0]
    assert returns.min() - 1e-9 <= draws.min() and draws.max() <= returns.max() + 1e-9
    assert draws.std() > 0


# ---------------------------------------------------------------------------------------------------- clipping


def test_clip_caps_every_per_step_ratio():
    rng = np.random.default_rng(8)
    data = logged(STOCHASTIC, np.array([[0.95, 0.05], [0.9, 0.1], [0.97, 0.03]]), 200, rng)
    assert np.exp(log_ratios(data)).max() > 3.0
    ratios = np.exp(log_ratios(data, clip=3.0))
    assert ratios.max() <= 3.0 * (1 + 1e-12)
    weights = step_weights(data, clip=3.0)
    assert (weights[:, 1:] / weights[:, :-1]).max() <= 3.0 * (1 + 1e-12)
    assert weights[:, 0].max() <= 3.0 * (1 + 1e-12)


# Two episodes of two steps. mu: (0.5, 0.25), (0.5, 0.5); pi: (0.75, 1.0), (0.25, 0.5).
# Per-step ratios (1.5, 4 -> clipped to 2), (0.5, 1); cumulative w_{0:t}: (1.5, 3), (0.5, 0.5).
HAND = dict(
    rewards=np.array([[1.0, 2.0], [3.0, 4.0]]),
    behavior_log_probs=np.log([[0.5, 0.25], [0.5, 0.5]]),
    target_log_probs=np.log([[0.75, 1.0], [0.25, 0.5]]),
    q_values=np.array([[0.5, 1.0], [2.0, 3.0]]),
    v_values=np.array([[1.0, 1.5], [2.5, 2.0]]),
)
HAND_VALUES = {
    "dm": (1.0 + 2.5) / 2,
    # returns 1 + 0.9 * 2 = 2.8 and 3 + 0.9 * 4 = 6.6
    "is": (3 * 2.8 + 0.5 * 6.6) / 2,
    "pdis": ((1.5 * 1 + 0.9 * 3 * 2) + (0.5 * 3 + 0.9 * 0.5 * 4)) / 2,
    "wis": (3 * 2.8 + 0.5 * 6.6) / (3 + 0.5),
    "wpdis": (1.5 * 1 + 0.5 * 3) / (1.5 + 0.5) + 0.9 * (3 * 2 + 0.5 * 4) / (3 + 0.5),
    # sum_t 0.9^t [w_{0:t} (r - q) + w_{0:t-1} v]
    "dr": ((1.5 * 0.5 + 1.0 + 0.9 * (3 * 1.0 + 1.5 * 1.5)) + (0.5 * 1.0 + 2.5 + 0.9 * (0.5 * 1.0 + 0.5 * 2.0))) / 2,
    # the same with weights normalized over the two episodes step by step
    "wdr": (1.5 * 0.5 + 0.5 * 1.0) / 2.0
    + (1.0 + 2.5) / 2
    + 0.9 * ((3 * 1.0 + 0.5 * 1.0) / 3.5 + (1.5 * 1.5 + 0.5 * 2.0) / 2.0),
}


@pytest.mark.parametrize("name", list(HAND_VALUES))
def test_hand_computed_example_with_clip(name):
    value = ESTIMATORS[name](Trajectories(**HAND), gamma=0.9, clip=2.0).value()
    assert value == pytest.approx(HAND_VALUES[name], rel=1e-9)


def test_hand_computed_example_without_clip():
    assert is_(Trajectories(**HAND), gamma=0.9).value() == pytest.approx((6 * 2.8 + 0.5 * 6.6) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- padding


def test_padding_acts_as_an_absorbing_state_for_every_estimator():
    """Padded episodes give the estimates of the same episodes continued to the horizon with reward 0, Q = V = 0
    and equal log-probs: finished episodes keep their last weight in the self-normalizing means."""
    rng = np.random.default_rng(9)
    lengths = rng.integers(1, 7, size=50)
    steps = int(lengths.sum())
    flat = [rng.standard_normal(steps), np.log(rng.uniform(0.2, 1, steps)), np.log(rng.uniform(0.2, 1, steps))]
    flat += [rng.standard_normal(steps), rng.standard_normal(steps)]
    *arrays, mask = pad_episodes(lengths, *flat)
    names = ["rewards", "behavior_log_probs", "target_log_probs", "q_values", "v_values"]
    padded = Trajectories(**dict(zip(names, [np.where(mask, a, np.nan) for a in arrays])), mask=mask)
    absorbing = Trajectories(**dict(zip(names, arrays)))  # zeros after the end, every step "real"
    for name, estimator in ESTIMATORS.items():
        assert estimator(padded, gamma=GAMMA).value() == pytest.approx(
            estimator(absorbing, gamma=GAMMA).value(), rel=1e-12
        ), name


def test_pad_episodes_round_trip():
    rng = np.random.default_rng(10)
    lengths = np.array([3, 1, 4, 2])
    rewards, observations = rng.standard_normal(10), rng.standard_normal((10, 3))
    padded_rewards, padded_obs, mask = pad_episodes(lengths, rewards, observations)
    assert padded_rewards.shape == (4, 4) and padded_obs.shape == (4, 4, 3) and mask.shape == (4, 4)
    assert mask.sum(axis=1).tolist() == lengths.tolist()
    np.testing.assert_array_equal(padded_rewards[mask], rewards)
    np.testing.assert_array_equal(padded_obs[mask], observations)
    assert (padded_rewards[~mask] == 0).all()
    by_starts = pad_episodes(np.array([0, 3, 4, 8]), rewards, observations, kind="starts", horizon=6)
    np.testing.assert_array_equal(by_starts[0][:, :4], padded_rewards)
    assert by_starts[2].shape == (4, 6) and not by_starts[2][:, 4:].any()
    with pytest.raises(DatasetError, match="add up to 10"):
        pad_episodes(lengths, rewards[:9])


# ---------------------------------------------------------------------------------------------------- ESS


def test_ess_counts_the_episodes_that_carry_the_estimate():
    assert kish_ess(np.zeros(40)) == pytest.approx(40)
    assert kish_ess(np.log([1000.0, 1e-3, 1e-3, 1e-3])) == pytest.approx(1.0, abs=0.01)
    assert kish_ess(np.array([800.0, 800.0])) == pytest.approx(2.0)  # exp(800) overflows; the ESS does not
    data = Trajectories(**HAND)
    result = estimate("is", data, gamma=0.9, clip=2.0, bootstrap=0)
    assert result.ess == pytest.approx((3 + 0.5) ** 2 / (3**2 + 0.5**2))
    assert np.isnan(result.std_error) and np.isnan(result.ci_low)


# ---------------------------------------------------------------------------------------------------- bad input


def hand(**changes) -> dict:
    return {**HAND, **changes}


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Trajectories(**hand(target_log_probs=np.zeros((2, 3)))), DatasetError, "target_log_probs has shape"),
        (lambda: Trajectories(**hand(rewards=np.array([[1.0, np.nan], [3.0, 4.0]]))), DatasetError, "rewards is nan"),
        (
            lambda: Trajectories(**hand(behavior_log_probs=np.log(0.5) - np.array([[0.0, np.inf], [0.0, 0.0]]))),
            DatasetError,
            r"behavior_log_probs is -inf \(probability 0\) at episode 0 step 1",
        ),
        (lambda: is_(Trajectories(**HAND), gamma=0.0), ConfigError, r"gamma must be in \(0, 1\]"),
        (lambda: pdis(Trajectories(**HAND), gamma=1.5), ConfigError, r"gamma must be in \(0, 1\]"),
        (lambda: estimate("wis", Trajectories(**HAND), gamma=float("nan")), ConfigError, r"gamma must be in"),
        (lambda: estimate("dm", Trajectories(**hand(v_values=None)), gamma=0.9), DatasetError, "'dm' needs a critic"),
        (lambda: dr(Trajectories(**hand(q_values=None)), gamma=0.9), DatasetError, "but q_values were not given"),
        (
            lambda: estimate(["is", "wdr"], Trajectories(**hand(q_values=None, v_values=None)), gamma=0.9),
            DatasetError,
            "'wdr' needs a critic's values, but q_values and v_values",
        ),  # fmt: skip
        (lambda: estimate("pdiss", Trajectories(**HAND), gamma=0.9), ConfigError, "Did you mean: pdis"),
        (lambda: is_(Trajectories(**HAND), gamma=0.9, clip=0.0), ConfigError, "clip must be a positive number"),
        (lambda: Trajectories(**hand(mask=np.array([[1, 0], [0, 1]]))), DatasetError, "episode 1 has no real step"),
        (
            lambda: is_(Trajectories(np.ones((1, 2)), np.full((1, 2), -400.0), np.zeros((1, 2))), gamma=1.0),
            PolicylabError,
            "importance weights overflow float64: log w reaches 800.0 at episode 0 step 1",
        ),
    ],
)
def test_bad_input_names_the_problem(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        estimate("magic", Trajectories(**HAND), gamma=0.9)
    assert "dm, is, pdis, wis, wpdis, dr, wdr" in str(info.value)


def test_clip_tames_weights_that_would_overflow():
    data = Trajectories(np.ones((1, 2)), np.full((1, 2), -400.0), np.zeros((1, 2)))
    assert is_(data, gamma=1.0, clip=100.0).value() == pytest.approx(2 * 100.0**2)


def test_gamma_must_be_stated():
    with pytest.raises(TypeError, match="gamma"):
        estimate("is", Trajectories(**HAND))  # type: ignore[call-overload]
