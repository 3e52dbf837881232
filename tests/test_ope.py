"""Off-policy evaluation of policies on logged datasets: FQE, the estimators on real logged data against the
exact value, behaviour cloning where log-probs are missing, selection metrics, and the CLI."""

from __future__ import annotations

import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.cli import main
from policylab.errors import ConfigError, DatasetError, PolicylabError
from policylab.nets.critics import CategoricalActor
from policylab.nets.population import SearchPolicy
from policylab.ope import FQEConfig, evaluate_policy, select_policies
from policylab.ope.policies import TargetPolicy
from policylab.ope.selection import nmse, rank_correlation, regret_at_k, sharpe_ratio_at_k, top_k
from tests.envs_for_tests import ChainMDP, chain_value

CHAIN = "tests.envs_for_tests:ChainMDP"
GAMMA = 0.9


def _chain_policy(seed: int, scale: float = 2.0) -> pl.Policy:
    """A softmax policy on the chain with random logits (a CategoricalActor, as discrete SAC's)."""
    torch.manual_seed(seed)
    net = CategoricalActor(4, 2, (16,))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return pl.Policy(net, ChainMDP.observation_space, ChainMDP.action_space, algo="sac_discrete")


def _truth(policy: pl.Policy) -> float:
    with torch.no_grad():
        probs = TargetPolicy(policy).probs(torch.eye(4)).numpy().astype(np.float64)
    return chain_value(probs, GAMMA)


@pytest.fixture(scope="module")
def chain_dataset():
    """2000 episodes of the uniform random policy (its log-probs recorded by collect)."""
    return pl.collect(CHAIN, "random", episodes=2000, seed=0)


def test_fqe_and_the_estimators_recover_the_exact_value_of_a_policy_on_the_chain(chain_dataset):
    policy = _chain_policy(1)
    truth = _truth(policy)
    report = evaluate_policy(
        chain_dataset,
        policy,
        ["fqe", "is", "pdis", "wis", "wpdis", "dr", "wdr"],
        gamma=GAMMA,
        bootstrap=200,
        fqe=FQEConfig(steps=3000, hidden_sizes=(64, 64), lr=1e-3),
    )
    assert report.behavior == "recorded in the dataset"
    for name, result in report.results.items():
        assert abs(result.value - truth) < 0.03, (name, result.value, truth)
        assert result.ci_low - 0.02 <= truth <= result.ci_high + 0.02, (name, result, truth)
    # the critic makes DR tighter than PDIS on the same episodes
    assert report.results["dr"].std_error < report.results["pdis"].std_error


def test_estimates_on_a_logged_pendulum_dataset_match_the_policys_monte_carlo_value():
    """Box actions: a Gaussian policy (IQL's actor, std 0.2 half-ranges) evaluated on 1000 episodes logged by a
    noisier Gaussian around its mean (std 0.25 half-ranges, log-densities recorded by collect); the truth is the
    mean discounted return of 2000 episodes of the policy itself (standard error about 0.5 of a value near -57).
    FQE alone, DR, WDR and WPDIS land within 3% of it; plain IS does not have to (its ESS is about 13)."""
    from policylab.nets.critics import GaussianActor
    from policylab.ope import pad_episodes

    env = gym.make("Pendulum-v1")
    bounds = torch.as_tensor(env.action_space.low), torch.as_tensor(env.action_space.high)
    torch.manual_seed(0)
    net = GaussianActor(3, *bounds, (32,))
    with torch.no_grad():
        net.log_std.fill_(np.log(0.2))
    policy = pl.Policy(net, env.observation_space, env.action_space, algo="iql")
    short = {"max_episode_steps": 60}  # gamma 0.9: later rewards weigh under 0.2%
    logged = pl.collect("Pendulum-v1", policy, episodes=1000, noise=0.25, seed=0, env_kwargs=short)
    own = pl.collect("Pendulum-v1", lambda obs: policy.act(obs, deterministic=False), 2000, seed=1, env_kwargs=short)
    rewards, _ = pad_episodes(np.asarray(own.episode_lengths, np.int64), own.rewards)
    truth = float((rewards @ 0.9 ** np.arange(rewards.shape[1])).mean())
    fqe = FQEConfig(steps=2000, tau=0.05, hidden_sizes=(64, 64), lr=1e-3)
    alone = evaluate_policy(logged, policy, ["fqe"], gamma=0.9, bootstrap=50, fqe=fqe)
    assert abs(alone.results["fqe"].value - truth) < 0.03 * abs(truth), (alone.results["fqe"], truth)
    report = evaluate_policy(logged, policy, ["dr", "wdr", "wpdis"], gamma=0.9, bootstrap=200, fqe=fqe)
    for name, result in report.results.items():
        assert abs(result.value - truth) < 0.03 * abs(truth), (name, result.value, truth)


def test_behaviour_cloning_stands_in_for_missing_log_probs_and_says_so(chain_dataset):
    from dataclasses import replace

    policy = _chain_policy(2)
    stripped = replace(chain_dataset, behavior_log_probs=None)
    report = evaluate_policy(stripped, policy, ["pdis", "wpdis"], gamma=GAMMA, bootstrap=100)
    assert report.behavior.startswith("estimated by behaviour cloning")
    assert any("behaviour cloning" in note for note in report.notes)
    assert abs(report.results["wpdis"].value - _truth(policy)) < 0.08


def test_ope_errors_name_the_problem(chain_dataset):
    cartpole = pl.Policy(CategoricalActor(4, 2), gym.spaces.Box(-5, 5, (4,), np.float32), gym.spaces.Discrete(2))
    with pytest.raises(PolicylabError, match="observation"):
        evaluate_policy(chain_dataset, cartpole, ["pdis"], gamma=GAMMA)
    with pytest.raises(ConfigError, match="unknown OPE estimator 'pids'"):
        evaluate_policy(chain_dataset, _chain_policy(0), ["pids"], gamma=GAMMA)
    with pytest.raises(ConfigError, match="no discount"):
        evaluate_policy(chain_dataset, _chain_policy(0), ["pdis"])
    from dataclasses import replace

    zero = replace(chain_dataset, behavior_log_probs=np.full(chain_dataset.num_steps, -np.inf))
    with pytest.raises(DatasetError, match="probability 0"):
        evaluate_policy(zero, _chain_policy(0), ["pdis"], gamma=GAMMA)


def test_a_policy_of_another_env_gets_a_fix_that_ope_offers(chain_dataset):
    from policylab.data.dataset import check_compatible

    cartpole = pl.Policy(
        CategoricalActor(4, 2),
        gym.spaces.Box(-5, 5, (4,), np.float32),
        gym.spaces.Discrete(2),
        env_id="CartPole-v1",
    )
    with pytest.raises(DatasetError, match="observation") as info:
        evaluate_policy(chain_dataset, cartpole, ["pdis"], gamma=GAMMA)
    assert info.value.fix is not None and "--env" not in info.value.fix  # ope has no --env flag
    assert f"trained in the env the dataset was collected in ({CHAIN})" in info.value.fix
    assert "collected in the policy's env (CartPole-v1)" in info.value.fix
    with pytest.raises(DatasetError) as info:  # training's message keeps its --env fix
        check_compatible(chain_dataset, cartpole.observation_space, cartpole.action_space, "--env CartPole-v1")
    assert info.value.fix == f"use the env the dataset was collected in: env={CHAIN!r}"


def test_the_unknown_estimator_error_lists_every_accepted_name(chain_dataset):
    with pytest.raises(ConfigError) as info:
        evaluate_policy(chain_dataset, _chain_policy(0), ["pids"], gamma=GAMMA)
    for name in ("dm", "fqe", "is", "pdis", "wis", "wpdis", "dr", "wdr"):
        assert re.search(rf"\b{name}\b", info.value.fix or ""), name
    report = evaluate_policy(chain_dataset, _chain_policy(0), ["fqe"], gamma=GAMMA, bootstrap=0,
                             fqe=FQEConfig(steps=50))  # fmt: skip
    assert set(report.results) == {"fqe"}  # and what it lists is accepted
    as_text = evaluate_policy(chain_dataset, _chain_policy(0), "pdis,wpdis", gamma=GAMMA, bootstrap=0)
    assert set(as_text.results) == {"pdis", "wpdis"}  # a string is the CLI's comma list, not its characters


def test_a_greedy_q_policy_at_epsilon_0_gets_a_note_pointing_to_epsilon():
    from policylab.nets.critics import QNetwork

    logged = pl.collect("CartPole-v1", "random", episodes=30, seed=0)  # ~20 steps each: no episode is all-greedy
    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    greedy = pl.Policy(QNetwork(4, 2, (16,)), env.observation_space, env.action_space, algo="dqn")
    report = evaluate_policy(logged, greedy, ["wpdis"], gamma=GAMMA, bootstrap=0)
    assert report.results["wpdis"].ess == 0.0
    (note,) = [n for n in report.notes if "effective sample size" in n]
    assert "deterministic" in note and "--epsilon" in note and "fqe" in note
    assert "--epsilon" in report.format()
    smoothed = evaluate_policy(logged, greedy, ["wpdis"], gamma=GAMMA, bootstrap=0, epsilon=0.5)
    assert smoothed.results["wpdis"].ess > 1.0 and not any("--epsilon" in n for n in smoothed.notes)


def test_bootstrap_0_gives_estimates_without_intervals_and_says_so(chain_dataset, tmp_path, capsys):
    report = evaluate_policy(chain_dataset, _chain_policy(0), ["pdis", "wpdis"], gamma=GAMMA, bootstrap=0)
    text = report.format()
    assert "nan" not in text and "no intervals" in text and "--bootstrap 1000" in text
    saved = json.loads(json.dumps(report.to_json()))  # standard JSON: null where there is no interval
    assert saved["results"]["pdis"]["ci_low"] is None and saved["results"]["pdis"]["value"] is not None
    with pytest.raises(ConfigError, match="selection needs intervals"):
        select_policies(chain_dataset, [_chain_policy(0)], estimator="pdis", gamma=GAMMA, bootstrap=0)
    missing = str(tmp_path / "missing")
    for bad in ("1", "-5"):  # refused before anything is read
        assert main(["ope", "--dataset", missing, "--policy", missing, "--bootstrap", bad]) == 2
        err = capsys.readouterr().err
        assert f"--bootstrap {bad}" in err and "--bootstrap 0" in err


def test_selection_metrics_against_hand_computed_values():
    estimates = np.array([3.0, 1.0, 2.0, 0.5])
    true = np.array([2.0, 4.0, 1.0, 0.0])
    assert top_k(estimates, 2).tolist() == [0, 2]
    assert regret_at_k(estimates, true, 2) == pytest.approx(4.0 - 2.0)
    # top-2 true values {2, 1}: best 2, std 0.5, behaviour 0.5 -> (2 - 0.5) / 0.5
    assert sharpe_ratio_at_k(estimates, true, 2, behavior_value=0.5) == pytest.approx(3.0)
    assert np.isnan(sharpe_ratio_at_k(estimates, true, 1, behavior_value=0.5))
    assert nmse(estimates, true) == pytest.approx(np.mean((estimates - true) ** 2) / 16.0)
    assert rank_correlation(estimates, true) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="top-k=5 with 4 candidates"):
        top_k(estimates, 5)


def test_online_value_is_the_exact_value_of_the_distribution_ope_evaluates(chain_dataset):
    from policylab.ope.evaluate import online_value

    policy = _chain_policy(4)
    value = online_value(policy, chain_dataset, GAMMA, episodes=4000, seed=3)
    assert abs(value - _truth(policy)) < 0.03  # 4000 episodes: standard error about 0.008


def test_select_ranks_policies_by_their_estimates_in_the_order_of_their_true_values(chain_dataset):
    policies = [_chain_policy(seed, scale=4.0) for seed in range(5)]
    truths = [_truth(p) for p in policies]
    assert max(truths) - min(truths) > 0.2  # the candidates differ
    names = [f"policy-{seed}" for seed in range(5)]
    selection, _ = select_policies(
        chain_dataset,
        policies,
        names=names,
        estimator="wpdis",
        top_k=2,
        true_values=dict(zip(names, truths)),
        gamma=GAMMA,
        bootstrap=50,
    )
    metrics = selection.metrics()
    assert metrics["rank_correlation"] >= 0.9 and metrics["regret@2"] < 0.05
    assert selection.ranking[0] == int(np.argmax(truths))
    assert metrics["sharpe_ratio@2"] > 0  # the chosen ones beat the uniform behaviour policy


def test_the_ope_command_evaluates_and_selects_run_directories(chain_dataset, tmp_path, capsys):
    from policylab.data.dataset import write_dataset

    data = write_dataset(chain_dataset, tmp_path / "chain-random")
    runs = [
        pl.train("ppo", env=CHAIN, steps=1024, seed=seed, runs_dir=tmp_path / "runs", progress=False).dir
        for seed in (1, 2)
    ]
    code = main(["ope", "--dataset", str(data), "--policy", str(runs[0]), "--estimators", "fqe,pdis,wdr",
                 "--fqe-steps", "300", "--bootstrap", "50", "--json", str(tmp_path / "ope.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "pdis" in out and "gamma 0.99 (the run's" in out
    saved = json.loads((tmp_path / "ope.json").read_text())
    assert set(saved["results"]) == {"fqe", "pdis", "wdr"}
    true = {str(r): v for r, v in zip(runs, (0.1, 0.2))}
    (tmp_path / "true.json").write_text(json.dumps(true))
    code = main(["ope", "select", "--dataset", str(data), "--policies", *map(str, runs), "--estimator", "pdis",
                 "--top-k", "1", "--true", str(tmp_path / "true.json"), "--bootstrap", "50"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "ranking by pdis" in out and "regret@1" in out
    code = main(["ope", "select", "--dataset", str(data), "--policies", *map(str, runs), "--estimator", "wpdis",
                 "--true", "online:200", "--bootstrap", "50", "--gamma", "0.9"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "true" in out and "rank_correlation" in out
    assert main(["ope", "--dataset", str(tmp_path / "missing"), "--policy", str(runs[0])]) == 2
    assert "error:" in capsys.readouterr().err


def test_every_fqe_option_reaches_evaluate_policy_from_its_flag(tmp_path, monkeypatch, capsys):
    """Each FQEConfig field has a flag with FQEConfig's default; bad values are refused before anything is read."""
    import dataclasses
    import importlib

    module = importlib.import_module("policylab.ope.evaluate")
    seen: dict = {}

    class Stub:
        def format(self) -> str:
            return "stub report"

    def spy(dataset, policy, estimators, **options):
        seen.clear()
        seen.update(options)
        return Stub()

    monkeypatch.setattr(module, "evaluate_policy", spy)
    missing = str(tmp_path / "missing")
    base = ["ope", "--dataset", missing, "--policy", missing]
    assert main(base) == 0 and "stub report" in capsys.readouterr().out
    assert seen["fqe"] == FQEConfig()  # every default is FQEConfig's
    flags = "--fqe-steps 7 --fqe-batch-size 8 --fqe-lr 0.01 --fqe-hidden 16,8 --fqe-tau 0.5 --fqe-action-samples 2"
    flags += " --fqe-reward-scale 0.1 --fqe-threads 2 --seed 3"
    assert main([*base, *flags.split()]) == 0
    expected = FQEConfig(7, 8, 0.01, (16, 8), 0.5, 2, 0.1, seed=3, threads=2)
    assert dataclasses.asdict(seen["fqe"]) == dataclasses.asdict(expected) and seen["seed"] == 3
    seen.clear()
    bad = "--fqe-batch-size 0 --fqe-lr -1 --fqe-lr nan --fqe-hidden 8,x --fqe-hidden 0,8 --fqe-tau 0 --fqe-tau 1.5"
    bad += " --fqe-action-samples 0 --fqe-reward-scale 0 --fqe-threads 0"
    words = bad.split()
    for flag, value in zip(words[::2], words[1::2]):
        assert main([*base, flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert "error:" in err and flag in err and "Traceback" not in err
    assert not seen  # refused before evaluate_policy
    with pytest.raises(ConfigError, match="lr=0"):  # from Python too, before the dataset is read
        evaluate_policy(missing, missing, ["fqe"], fqe=FQEConfig(lr=0))


def test_bad_true_values_of_ope_select_are_clear_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    base = ["ope", "select", "--dataset", missing, "--policies", missing, "--true"]
    (tmp_path / "list.json").write_text("[1, 2]")
    for value, message in (
        ("online:x", "online or online:EPISODES"),
        ("online:0", "online or online:EPISODES"),
        (str(tmp_path / "none.json"), "cannot read --true"),
        (str(tmp_path / "list.json"), "not a JSON object"),
    ):
        assert main([*base, value]) == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err
    with pytest.raises(ConfigError, match="online or online:EPISODES"):
        select_policies(missing, [missing], true_values="results.json")  # a file name is not read as online


@pytest.mark.parametrize("discrete", [True, False])
def test_fqe_regression_gradient_by_hand_equals_autograd(discrete):
    from types import SimpleNamespace

    from policylab.nets.critics import ContinuousCritic, QNetwork
    from policylab.ope.fqe import FittedQ, _by_hand, _regression_step

    torch.manual_seed(0)
    critic = QNetwork(4, 3, (32, 32)) if discrete else ContinuousCritic(4, 2, (32, 32), members=1)
    assert _by_hand(critic)
    fitted = FittedQ(SimpleNamespace(discrete=discrete), critic, 1.0, 1, 0)  # type: ignore[arg-type]
    obs, y = torch.randn(16, 4), torch.randn(16)
    actions = torch.randint(0, 3, (16,)) if discrete else torch.rand(16, 2) * 2 - 1
    torch.nn.functional.mse_loss(fitted._q(obs, actions), y).backward()
    expected = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    _regression_step(fitted, obs, actions, y)
    for grad, want in zip((p.grad for p in critic.parameters()), expected):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    assert not _by_hand(QNetwork(4, 3, (32, 32), dueling=True))


def test_an_ars_policy_is_evaluated_as_a_greedy_or_deterministic_one():
    """ARS's search policy: Discrete, epsilon-greedy around its argmax; Box, a Gaussian of sigma half-ranges around
    its action (without sigma, no density: an error naming it)."""
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    net = SearchPolicy(obs_space, gym.spaces.Discrete(3), [8], "relu", bias=True, squash=False)
    policy = pl.Policy(net, obs_space, gym.spaces.Discrete(3), algo="ars")
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    greedy = policy.act(obs)
    target = TargetPolicy(policy, epsilon=0.3)
    assert target.greedy and not TargetPolicy(policy).deterministic_actor and TargetPolicy(policy).deterministic
    expected = np.full((5, 3), 0.1)
    expected[np.arange(5), greedy] += 0.7
    np.testing.assert_allclose(target.probs(torch.from_numpy(obs)).numpy(), expected, rtol=1e-6)

    box = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    net = SearchPolicy(obs_space, box, [], "relu", bias=False, squash=False)
    policy = pl.Policy(net, obs_space, box, algo="ars")
    actions = policy.act(obs)
    logged = actions + 0.5
    logp = TargetPolicy(policy, sigma=0.25).log_prob(obs, logged)
    std = 0.25 * 2.0  # sigma half-ranges
    z = 0.5 / std
    np.testing.assert_allclose(logp, 2 * (-0.5 * z * z - np.log(std) - 0.5 * np.log(2 * np.pi)), rtol=1e-5)
    samples = TargetPolicy(policy).sample_unit(torch.from_numpy(obs), 3)
    np.testing.assert_allclose(samples.numpy(), np.repeat(actions[:, None] / 2.0, 3, axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="deterministic"):
        TargetPolicy(policy).log_prob(obs, logged)
