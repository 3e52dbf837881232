"""Policy smoothing certificates: the bound against hand-computed cases, the attack's budget and direction, the
smoothed rollouts, certify() end to end (plot and numbers), the command, and bad inputs."""

from __future__ import annotations

import argparse
import csv
import json
import math
from statistics import NormalDist

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.certify import (
    L2Attack,
    SmoothedPolicy,
    _attack_functions,
    add_certify_parser,
    attack_returns,
    certified_return_bound,
    certify,
    clopper_pearson,
    episode_horizon,
    min_samples,
    parse_thresholds,
    smoothed_returns,
)
from policylab.envs import make_single_env
from policylab.errors import CheckpointError, EnvError, PolicylabError
from policylab.nets.actor_critic import ActorCritic
from policylab.nets.critics import (
    CategoricalActor,
    DeterministicActor,
    DiscreteBCActor,
    GaussianActor,
    QNetwork,
    TanhGaussianActor,
)
from policylab.nets.population import SearchPolicy
from policylab.policy import Policy

PHI = NormalDist()
SPARSE_GOAL = "tests.envs_for_tests:SparseGoalEnv"  # 30 steps per episode; always moving right earns 16


def kappa(n: int, alpha: float) -> float:
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def shifted(p: float, eps: float, sigma: float) -> float:
    """Phi(Phi^-1(p) - eps / sigma), the adaptive Neyman-Pearson bound of one probability (0 stays 0)."""
    return 0.0 if p <= 0 else PHI.cdf(PHI.inv_cdf(p) - eps / sigma)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only waits on the shared test cores
    yield
    torch.set_num_threads(before)


def cartpole_expert() -> Policy:
    """A linear network that pushes towards where the pole falls (500 on CartPole-v1 without noise)."""
    env = gym.make("CartPole-v1")
    obs_space, act_space = env.observation_space, env.action_space
    assert isinstance(obs_space, gym.spaces.Box)
    net = ActorCritic(obs_space, act_space, hidden_sizes=(), ortho_init=False)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.body.weight(0)[0, :, 1] = torch.tensor([0.0, 0.0, 10.0, 5.0])
    return Policy(net.eval(), obs_space, act_space, env_id="CartPole-v1")


def always_right() -> Policy:
    """Ignores its observation: zero weights, a bias whose tanh is exactly 1 (action +1 on SparseGoalEnv)."""
    obs_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    net = DeterministicActor(1, torch.tensor([-1.0]), torch.tensor([1.0]), hidden_sizes=(8,))
    with torch.no_grad():
        for p in net.body.parameters():
            p.zero_()
        net.body.biases[-1].fill_(20.0)
    return Policy(net.eval(), obs_space, act_space, env_id=SPARSE_GOAL)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    small = {"n_steps": 16, "num_envs": 2, "batch_size": 32, "epochs": 1, "eval_every": 0, "eval_episodes": 2}
    return pl.train(
        "ppo",
        env="CartPole-v1",
        steps=256,
        seed=0,
        overrides=small,
        preset="none",
        runs_dir=tmp_path_factory.mktemp("runs"),
        verbose=False,
    )


# --- the bound -------------------------------------------------------------------------------------------------


def test_two_valued_returns_match_the_closed_form():
    n, k, alpha, sigma = 200, 150, 0.05, 0.5
    returns = np.array([0.0] * (n - k) + [1.0] * k)
    eps = [0.0, 0.25, 1.0, 3.0]
    result = certified_return_bound(returns, eps, sigma, alpha)
    p_low = k / n - kappa(n, alpha)
    assert p_low == pytest.approx(0.75 - 0.0960324, abs=1e-6)  # sqrt(ln(40) / 400), by hand
    np.testing.assert_allclose(result.bound, [shifted(p_low, e, sigma) for e in eps], rtol=1e-9, atol=1e-15)
    assert result.bound[0] == pytest.approx(p_low) and result.ci[0] == pytest.approx(p_low)
    assert result.mean == pytest.approx(0.75) and result.band == pytest.approx(kappa(n, alpha))


def test_three_valued_returns_match_the_formula_with_the_lower_limit():
    returns = np.repeat([0.0, 1.0, 3.0], [20, 30, 50])  # P(R >= 1) = 0.8, P(R >= 3) = 0.5
    alpha, sigma, k = 0.1, 0.3, kappa(100, 0.1)
    for e in (0.0, 0.2, 0.6):
        expected = 1 * shifted(0.8 - k, e, sigma) + 2 * shifted(0.5 - k, e, sigma)
        assert certified_return_bound(returns, [e], sigma, alpha).bound[0] == pytest.approx(expected, rel=1e-9)
        # returns known to be >= -1: the band [-1, 0] adds 1 * Phi(Phi^-1(1 - kappa) - eps / sigma), minus 1
        lower = certified_return_bound(returns, [e], sigma, alpha, r_min=-1.0).bound[0]
        assert lower == pytest.approx(-1 + shifted(1 - k, e, sigma) + expected, rel=1e-9)


def test_bound_is_non_increasing_in_eps_and_below_the_mean():
    rng = np.random.default_rng(0)
    returns = rng.gamma(2.0, 50.0, 500)
    eps = np.linspace(0, 3, 61)
    result = certified_return_bound(returns, eps, 0.2, 0.05, r_max=returns.max())
    assert np.all(np.diff(result.bound) <= 0) and np.diff(result.bound).min() < 0
    assert result.bound[0] == pytest.approx(result.ci[0]) and result.ci[0] < result.mean < result.ci[1]
    assert result.bound[-1] == pytest.approx(0.0, abs=1e-3)  # eps = 15 sigma: nothing is left above r_min
    with pytest.raises(PolicylabError, match="above r_max"):
        certified_return_bound(returns, eps, 0.2, r_max=returns.max() - 1)


def test_returns_rarer_than_the_band_count_for_nothing():
    returns = np.array([0.0] * 99 + [1000.0])  # P(R >= 1000) = 0.01 < kappa = 0.136
    result = certified_return_bound(returns, [0.0, 0.5], 0.2, 0.05)
    np.testing.assert_array_equal(result.bound, [0.0, 0.0])
    assert result.mean == 10.0


def test_clopper_pearson_bounds_solve_the_binomial_tail_equations():
    """The low end p solves P(Binomial(n, p) >= k) = level; the high end P(Binomial(n, p) <= k) = level."""
    from scipy.stats import binom

    n, level = 100, 0.05
    low, high = clopper_pearson(np.array([0, 1, 70, 99, 100]), n, level)
    np.testing.assert_allclose(binom.sf([0, 69, 98], n, low[1:4]), level, rtol=1e-7)
    np.testing.assert_allclose(binom.cdf([1, 70, 99], n, high[1:4]), level, rtol=1e-7)
    assert low[0] == 0.0 and high[-1] == 1.0
    assert low[-1] == pytest.approx(level ** (1 / n)) and high[0] == pytest.approx(1 - level ** (1 / n))


def test_clopper_pearson_variant_matches_the_formula_and_beats_dkw_at_the_top():
    """Every episode at CartPole-v1's top return: each tail's bound is (alpha / K)^(1 / n) by hand."""
    n, alpha, sigma, top = 1000, 0.05, 0.2, 500
    returns = np.full(n, float(top))
    thresholds = np.arange(1.0, top + 1)
    eps = [0.0, 0.1, 0.4]
    result = certified_return_bound(returns, eps, sigma, alpha, thresholds=thresholds)
    tail = (alpha / top) ** (1 / n)  # 0.99083
    np.testing.assert_allclose(result.bound, [top * shifted(tail, e, sigma) for e in eps], rtol=1e-9)
    assert result.method == "clopper-pearson" and result.band is None
    assert result.ci[0] == pytest.approx(result.bound[0]) and result.ci[1] == pytest.approx(top)
    dkw = certified_return_bound(returns, eps, sigma, alpha)
    assert np.all(result.bound > dkw.bound + 10)  # 495.4 against 478.5 at eps = 0, 320 against 194 at 2 sigma
    # with the grid stopping at 400, returns above it count only up to 400
    short = certified_return_bound(returns, eps, sigma, alpha, thresholds=thresholds[:400])
    tail_400 = (alpha / 400) ** (1 / n)
    np.testing.assert_allclose(short.bound, [400 * shifted(tail_400, e, sigma) for e in eps], rtol=1e-9)


def test_clopper_pearson_variant_on_three_values_and_its_coverage():
    returns = np.repeat([0.0, 1.0, 3.0], [20, 30, 50])  # #{R >= 1} = 80, #{R >= 2} = #{R >= 3} = 50
    alpha, sigma = 0.1, 0.3
    low, _ = clopper_pearson(np.array([80, 50, 50]), 100, alpha / 3)
    for e in (0.0, 0.2, 0.6):
        expected = shifted(low[0], e, sigma) + shifted(low[1], e, sigma) + shifted(low[2], e, sigma)
        bound = certified_return_bound(returns, [e], sigma, alpha, thresholds=[1.0, 2.0, 3.0]).bound[0]
        assert bound == pytest.approx(expected, rel=1e-9)
    # over many datasets from a known integer distribution, both ends of the interval hold as often as promised
    rng = np.random.default_rng(0)
    values, probs = np.arange(11.0), np.linspace(1, 3, 11) / np.linspace(1, 3, 11).sum()
    truth = float(values @ probs)
    ends = np.array(
        [
            certified_return_bound(
                rng.choice(values, 60, p=probs), [0.0], 0.5, 0.2, r_max=10.0, thresholds=values[1:]
            ).ci
            for _ in range(300)
        ]
    )
    assert np.mean(ends[:, 0] <= truth) >= 0.8 and np.mean(ends[:, 1] >= truth) >= 0.8
    assert np.all(ends[:, 0] < ends[:, 1])


def test_thresholds_are_parsed_and_checked():
    assert parse_thresholds("1:5", "clopper-pearson") == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert parse_thresholds("0:1:0.25", "clopper-pearson") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_thresholds("50,100,200", "clopper-pearson") == [50.0, 100.0, 200.0]
    assert parse_thresholds(None, "dkw") is None
    with pytest.raises(PolicylabError, match="only to the Clopper-Pearson variant") as info:
        parse_thresholds("1:5", "dkw")
    assert "--bound clopper-pearson" in info.value.fix
    with pytest.raises(PolicylabError, match="needs a grid of return thresholds"):
        parse_thresholds(None, "clopper-pearson")
    for bad in ("1:x", "5:1", "1:5:0", "1:2:3:4"):
        with pytest.raises(PolicylabError, match="not START:STOP"):
            parse_thresholds(bad, "clopper-pearson")
    returns = np.arange(10.0)
    with pytest.raises(PolicylabError, match="non-empty increasing"):
        certified_return_bound(returns, [0.0], 0.2, thresholds=[3.0, 2.0])
    with pytest.raises(PolicylabError, match="not above r_min"):
        certified_return_bound(returns, [0.0], 0.2, thresholds=[0.0, 5.0])


# --- smoothed rollouts and the attack --------------------------------------------------------------------------


def test_policy_that_ignores_observations(tmp_path):
    """Its returns do not depend on the noise or the attack; the certificate (a function of the returns alone)
    is the interval's low end at eps = 0, and constant when the returns sit at their known floor."""
    policy = always_right()
    calm = smoothed_returns(policy, 0.1, 20, seed=0)
    np.testing.assert_array_equal(calm, np.full(20, 16.0))
    np.testing.assert_array_equal(smoothed_returns(policy, 2.0, 20, seed=1), calm)
    attacked = attack_returns(policy, 0.1, [0.0, 1.0, 5.0], horizon=30, episodes=4, seed=0)
    np.testing.assert_array_equal(attacked, np.full((3, 4), 16.0))
    eps = [0.0, 0.5, 2.0]
    result = certified_return_bound(calm, eps, 0.1, 0.05)
    assert result.bound[0] == pytest.approx(result.ci[0]) == pytest.approx(16 * (1 - kappa(20, 0.05)))
    np.testing.assert_array_equal(certified_return_bound(calm, eps, 0.1, 0.05, r_min=16.0).bound, [16.0] * 3)


def test_smoothed_returns_are_seeded_and_noise_matters():
    policy = cartpole_expert()
    a = smoothed_returns(policy, 0.05, 16, seed=3)
    np.testing.assert_array_equal(a, smoothed_returns(policy, 0.05, 16, seed=3))
    assert a.shape == (16,) and smoothed_returns(policy, 1e-6, 16, seed=3).mean() == 500.0
    assert smoothed_returns(policy, 0.5, 16, seed=3).mean() < 200  # noise as large as the pole's angle limit


def test_attack_spends_the_episode_budget_exactly():
    """30-step episodes: every step's perturbation has norm eps / sqrt(30), so each episode spends exactly eps."""
    eps, horizon = 0.7, 30
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    net = GaussianActor(1, torch.tensor([-1.0]), torch.tensor([1.0]), hidden_sizes=(16,))
    policy = Policy(net.eval(), obs_space, gym.spaces.Box(-1.0, 1.0, (1,), np.float32), env_id=SPARSE_GOAL)
    attack = L2Attack(policy, eps / math.sqrt(horizon), steps=3, seed=0)
    smoothed = SmoothedPolicy(policy, 0.1, seed=0, attack=attack)
    env = make_single_env(SPARSE_GOAL)
    obs, _ = env.reset(seed=0)
    squares, effective, done = [], [], False
    while not done:
        action = smoothed.act(obs)
        assert attack.last_delta is not None
        squares.append(float((attack.last_delta**2).sum()))
        seen = (obs + attack.last_delta[0]).astype(np.float32)  # what the agent gets before its own noise
        effective.append(float(((seen.astype(np.float64) - obs) ** 2).sum()))
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    assert len(squares) == horizon
    np.testing.assert_allclose(squares, eps**2 / horizon, rtol=1e-12)
    assert math.sqrt(sum(squares)) == pytest.approx(eps, rel=1e-12)
    assert math.sqrt(sum(effective)) <= eps * (1 + 1e-5)  # after rounding to float32 observations


def test_attack_batches_have_the_per_step_norm_and_zero_budget_is_no_attack():
    policy = cartpole_expert()
    obs = np.random.default_rng(0).normal(0, 0.05, (64, 4)).astype(np.float32)
    delta = L2Attack(policy, 0.03, seed=1)(obs)
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1), 0.03, rtol=1e-12)
    np.testing.assert_array_equal(L2Attack(policy, 0.0)(obs), 0.0)
    assert episode_horizon(policy) == 500 and episode_horizon(always_right(), 30) == 30
    with pytest.raises(PolicylabError, match="episode-length cap"):
        episode_horizon(always_right())


def _nets() -> list[tuple[str, torch.nn.Module, gym.Space]]:
    discrete, box = gym.spaces.Discrete(3), gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    obs_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    low, high = torch.full((2,), -2.0), torch.full((2,), 2.0)
    return [
        ("actor-critic discrete", ActorCritic(obs_space, discrete, (32,), ortho_init=False), discrete),
        ("actor-critic gaussian", ActorCritic(obs_space, box, (32,), ortho_init=False), box),
        ("q-network", QNetwork(4, 3, (32,)), discrete),
        ("bc discrete", DiscreteBCActor(4, 3, (32,)), discrete),
        ("sac discrete", CategoricalActor(4, 3, (32,)), discrete),
        ("td3", DeterministicActor(4, low, high, (32,)), box),
        ("sac", TanhGaussianActor(4, low, high, (32,)), box),
        ("iql", GaussianActor(4, low, high, (32,)), box),
        ("ars discrete", SearchPolicy(obs_space, discrete, [32], "relu", bias=True, squash=False), discrete),
        ("ars box", SearchPolicy(obs_space, box, [32], "relu", bias=True, squash=True), box),
    ]


@pytest.mark.parametrize("index", range(10))
def test_attack_moves_every_network_further_than_a_random_perturbation(index):
    """The loss (minus the clean action's log-prob, or the distance from the clean action) grows more than twice
    as much under the attack as under a random perturbation of the same norm."""
    torch.manual_seed(index)
    name, net, act_space = _nets()[index]
    obs_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    policy = Policy(net.eval(), obs_space, act_space, env_id="CartPole-v1")
    obs = np.random.default_rng(index).normal(0, 1, (256, 4)).astype(np.float32)
    radius = 0.3
    attack = L2Attack(policy, radius, steps=5, seed=0)
    clean_action, loss = _attack_functions(net)
    x = torch.from_numpy(obs)
    with torch.no_grad():
        clean = clean_action(net, x)
        base = loss(net, x, clean).mean()
        attacked = loss(net, x + torch.from_numpy(attack(obs)).float(), clean).mean()
        direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
        random = loss(net, x + radius * direction / direction.norm(dim=1, keepdim=True), clean).mean()
    assert attacked - base > 2 * max(float(random - base), 0.0), name


def test_attack_lowers_the_return_of_a_cartpole_expert():
    returns = attack_returns(cartpole_expert(), 0.02, [0.0, 2.0], horizon=500, episodes=8, seed=0)
    assert returns[0].mean() > 450 and returns[1].mean() < returns[0].mean() - 50


# --- certify() and the command ---------------------------------------------------------------------------------


def test_certify_writes_plot_and_numbers(cartpole_run, tmp_path):
    out = tmp_path / "cert" / "cert.png"
    cert = certify(cartpole_run.dir, sigma=0.1, samples=64, eps=[0.0, 0.2, 0.4], out=out, attack_episodes=4)
    assert cert.plot == out and out.stat().st_size > 5000
    assert sorted(p.name for p in out.parent.iterdir()) == ["cert.csv", "cert.json", "cert.png"]  # no temp files
    assert np.all(np.diff(cert.bound) <= 0) and cert.bound[0] == pytest.approx(cert.smoothed_ci[0])
    assert cert.smoothed_ci[0] <= cert.smoothed_mean <= cert.smoothed_ci[1] and cert.samples == len(cert.returns)
    assert cert.attack_return is not None and len(cert.attack_return) == 3 and cert.horizon == 500
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["bound"] == cert.bound and data["sigma"] == 0.1 and len(data["returns"]) == 64
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [float(r["eps"]) for r in rows] == [0.0, 0.2, 0.4]
    assert [float(r["certified_return"]) for r in rows] == cert.bound
    assert float(rows[1]["attack_return"]) == cert.attack_return[1]


def test_certify_command(cartpole_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_certify_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "c.png"
    argv = ["certify", str(cartpole_run.dir), "--sigma", "0.1", "--samples", "50", "--eps", "0,0.3"]
    args = parser.parse_args([*argv, "--out", str(out), "--no-attack", "--seed", "2"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "certified" in text and "attack" not in text.splitlines()[1] and f"plot: {out}" in text
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["attack_return"] for r in rows] == ["", ""]
    with pytest.raises(PolicylabError, match="not a list of numbers"):
        bad = parser.parse_args([*argv[:-1], "0,x", "--out", str(out)])
        bad.func(bad)
    args = parser.parse_args([*argv, "--out", str(out), "--no-attack", "--bound", "clopper-pearson"])
    with pytest.raises(PolicylabError, match="needs a grid"):
        args.func(args)
    args = parser.parse_args(
        [*argv, "--out", str(out), "--no-attack", "--bound", "clopper-pearson", "--thresholds", "1:500"]
    )
    assert args.func(args) == 0
    assert "Clopper-Pearson at 500 thresholds" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["method"] == "clopper-pearson" and data["thresholds"][-1] == 500 and data["band"] is None


def test_certify_command_passes_every_option_of_the_api(cartpole_run, tmp_path, monkeypatch, capsys):
    """r_max, attack_steps, num_envs and deterministic reach certify() from their flags, with its defaults."""
    import importlib
    import inspect

    certify_module = importlib.import_module("policylab.certify")  # pl.certify is the function, not the module
    seen: dict = {}

    def spy(*args, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return certify(*args, **kwargs)

    monkeypatch.setattr(certify_module, "certify", spy)
    parser = argparse.ArgumentParser()
    add_certify_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "c.png"
    argv = ["certify", str(cartpole_run.dir), "--sigma", "0.1", "--samples", "20", "--eps", "0,0.3", "--out", str(out)]
    args = parser.parse_args([*argv, "--no-attack"])
    assert args.func(args) == 0
    defaults = {k: v.default for k, v in inspect.signature(certify).parameters.items()}
    for key in ("r_max", "attack_steps", "num_envs", "deterministic", "r_min", "attack_episodes", "horizon"):
        assert seen[key] == defaults[key], key
    plain = json.loads(out.with_suffix(".json").read_text())
    assert plain["r_max"] is None and "returns >= 0 assumed" in capsys.readouterr().out
    extra = ["--attack-episodes", "2", "--attack-steps", "1", "--num-envs", "3", "--stochastic", "--r-max", "600"]
    args = parser.parse_args([*argv, *extra])
    assert args.func(args) == 0
    assert (seen["attack_steps"], seen["num_envs"], seen["deterministic"], seen["r_max"]) == (1, 3, False, 600.0)
    assert "returns in [0, 600] assumed" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["r_max"] == 600.0 and data["attack_return"] is not None
    assert data["smoothed_ci"][1] > plain["smoothed_ci"][1]  # the interval's upper end reaches towards r_max


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "positive standard deviation"),
        ({"sigma": -0.1}, "positive standard deviation"),
        ({"alpha": 0.0}, "strictly between 0 and 1"),
        ({"alpha": 1.0}, "strictly between 0 and 1"),
        ({"samples": 1}, "too few episodes"),
        ({"samples": 3, "alpha": 1e-3}, "too few episodes"),
        ({"samples": 0}, "none would be sampled"),
        ({"samples": "1"}, "too few episodes"),  # a string is read as --samples reads it
        ({"samples": "lots"}, "lots"),
        ({"eps": [0.1, -0.1]}, r"eps=0.1,-0.1: -0.1 is not an attack budget"),
        ({"eps": [0.0, float("nan"), -2]}, r"eps=0,nan,-2: nan, -2 are not an attack budget"),
        ({"eps": []}, "non-empty list"),
        ({"attack_episodes": 0}, "attack_episodes=0"),
        ({"attack_steps": -1}, "attack_steps=-1"),
        ({"num_envs": 0}, "num_envs=0"),
        ({"r_max": -1.0}, r"r_max=-1.0: .* >= r_min \(0\)"),
        ({"r_max": float("nan")}, "r_max=nan"),
        ({"r_min": float("-inf")}, "r_min=-inf"),
        ({"out": "cert.pdf"}, "not a .png path"),
    ],
)
def test_bad_settings_are_clear_errors_before_any_work(kwargs, message, tmp_path):
    with pytest.raises(PolicylabError, match=message) as info:
        certify(tmp_path / "no-such-run", **kwargs)
    assert info.value.fix


def test_bad_numbers_are_shown_as_typed_and_fixes_name_the_interface_used(tmp_path, capsys):
    from policylab.cli import main

    missing = str(tmp_path / "no-such-run")
    assert main(["certify", missing, "--eps", "0,-1"]) == 2
    err = capsys.readouterr().err
    assert "eps=0,-1: -1 is not an attack budget" in err and "np.float64" not in err
    assert main(["certify", missing, "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "samples=0" in err and "DKW band" not in err and "--samples 10000" in err
    assert main(["certify", missing, "--samples", "1"]) == 2
    assert "the DKW band (1.36)" in capsys.readouterr().err  # the band of n = 1, where it is meant
    assert main(["certify", missing, "--attack-episodes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--attack-episodes 0" in err and "--no-attack" in err and "attack=False" not in err
    with pytest.raises(PolicylabError) as info:  # from Python the fix names the keyword
        certify(missing, attack_episodes=0)
    assert "attack=False" in (info.value.fix or "") and "--no-attack" not in (info.value.fix or "")
    for flag, value in (("--attack-steps", "-1"), ("--num-envs", "0"), ("--r-max", "-5"), ("--r-max", "nan")):
        assert main(["certify", missing, flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}" in err and "fix:" in err and "Traceback" not in err
    assert main(["certify", missing, "--r-min", "inf"]) == 2
    assert "--r-min inf" in capsys.readouterr().err


def test_bad_runs_and_envs_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        certify(tmp_path / "no-such-run", samples=10)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        certify(tmp_path, samples=10)
    expert = cartpole_expert()
    discrete_obs = Policy(expert.net, gym.spaces.Discrete(5), expert.action_space, env_id="CartPole-v1")  # type: ignore[arg-type]
    with pytest.raises(EnvError, match="continuous observations"):
        smoothed_returns(discrete_obs, 0.2, 10)
    with pytest.raises(PolicylabError, match="below r_min"):
        certified_return_bound([-1.0, 2.0, 3.0], [0.0], 0.2)
    with pytest.raises(PolicylabError, match="cannot differentiate"):
        L2Attack(Policy(torch.nn.Linear(4, 2), expert.observation_space, expert.action_space), 0.1)
    assert min_samples(0.05) == 2 and min_samples(1e-3) == 4
