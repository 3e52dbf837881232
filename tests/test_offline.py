"""Offline and hybrid training: dataset batches, the offline losses, collect, learning, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

import policylab as pl
from policylab.cli import main
from policylab.collect import collect, collect_from_buffer
from policylab.data import ReplayBuffer
from policylab.data.dataset import concat_datasets, load_dataset, write_dataset
from policylab.data.sources import BatchSource
from policylab.errors import ConfigError, DatasetError, PolicylabError
from policylab.objectives.offline import (
    advantage_weights,
    cql_penalty,
    discrete_cql_penalty,
    expectile_loss,
    td3_bc_lambda,
)
from tests.helpers import resumed_and_full_runs

SMALL_NETS = {"hidden_sizes": [64, 64], "log_every": 250}


# --- the offline losses against hand-computed values --------------------------------------------------------


def test_expectile_loss_weights_negative_errors_by_one_minus_tau():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # tau 0.7: (0.7*4 + 0.3*1 + 0.7*0.25 + 0.3*9) / 4
    assert expectile_loss(diff, 0.7).item() == pytest.approx((2.8 + 0.3 + 0.175 + 2.7) / 4)
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (diff**2).mean().item())


def test_advantage_weights_are_clipped_exponentials():
    w = advantage_weights(torch.tensor([0.0, 1.0, -2.0, 10.0]), beta=3.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), math.exp(-6.0), 100.0]))


def test_td3_bc_lambda_is_alpha_over_mean_abs_q():
    q = torch.tensor([[1.0, -3.0, 2.0]], requires_grad=True)
    lam = td3_bc_lambda(q, 2.5)
    assert lam.item() == pytest.approx(2.5 / 2.0)
    assert not lam.requires_grad


def test_cql_penalty_is_an_importance_weighted_logsumexp_minus_the_data_value():
    q_data = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # 2 critics, 2 states
    q_sampled = torch.tensor([[[0.0, 1.0], [2.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])  # 2 samples per state
    log_density = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # critic 0: state 0 log(e^0 + e^(1 - log 2)) - 1, state 1 log(2 e^2) - 2
    # critic 1: state 0 log(e^1 + e^(1 - log 2)) - 0, state 1 log 2 - 1
    expected = torch.tensor(
        [
            (math.log(1 + math.e / 2) - 1 + math.log(2) + 2 - 2) / 2,
            (math.log(math.e + math.e / 2) + math.log(2) - 1) / 2,
        ]
    )
    torch.testing.assert_close(cql_penalty(q_data, q_sampled, log_density), expected)
    # temperature T: T logsumexp(x / T)
    hot = cql_penalty(q_data[:1, :1], q_sampled[:1, :1], log_density[:1], temperature=2.0)
    assert hot.item() == pytest.approx(2 * math.log(1 + math.exp((1 - math.log(2)) / 2)) - 1, rel=1e-6)
    q_all = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert discrete_cql_penalty(q_all, torch.tensor([3.0, 0.0])).item() == pytest.approx(
        (math.log(math.e + math.e**2 + math.e**3) - 3 + math.log(3)) / 2
    )


def test_td3_bc_actor_loss_matches_the_paper(datasets):
    """-lambda mean Q + mean (pi(s) - a)^2 with lambda = alpha / mean |Q|, recomputed by hand on one batch."""
    loop = _loop("td3_bc", datasets["medium"], {"policy_delay": 1, "lr": 1e-3})
    algo = loop.algo
    batch = loop.offline_source.sample(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pi = algo.net(batch.obs)
        q = algo.critic(batch.obs, pi, members=1)
    metrics = algo.update(batch, 0)
    # the critic stepped first; the actor loss uses the critic after its step
    with torch.no_grad():
        critic_after = algo.critic(batch.obs, pi, members=1)
    expected = -(2.5 / critic_after.abs().mean()) * critic_after.mean() + (pi - batch.actions).pow(2).mean()
    assert metrics["actor_loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert not torch.equal(q, critic_after)
    loop.close()


# --- datasets in replay buffers, mixed batches ---------------------------------------------------------------


def test_add_episodes_gives_the_layout_of_add_and_n_step_returns_stop_at_episode_ends():
    lengths = np.array([3, 2])
    obs = np.arange(7, dtype=np.float32)[:, None]  # episode 0: obs 0..3, episode 1: obs 4..6
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32)
    terminations = np.array([False, False, True, False, False])
    buffer = ReplayBuffer(20, 1, (1,), (1,), n_step=2, gamma=0.5)
    buffer.add_episodes(obs, np.zeros((5, 1), np.float32), rewards, terminations, lengths)
    assert len(buffer) == 5 and buffer.transitions_added == 5
    batch = buffer.gather(torch.tensor([0, 1, 2, 4, 5]))
    torch.testing.assert_close(batch.obs[:, 0], torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0]))
    torch.testing.assert_close(batch.rewards, torch.tensor([1 + 0.5 * 2, 2 + 0.5 * 3, 3.0, 10 + 0.5 * 20, 20.0]))
    torch.testing.assert_close(batch.next_obs[:, 0], torch.tensor([2.0, 3.0, 3.0, 6.0, 6.0]))
    assert batch.terminated.tolist() == [False, True, True, False, False]
    torch.testing.assert_close(batch.discounts, torch.tensor([0.25, 0.25, 0.5, 0.25, 0.5]))
    drawn = buffer.sample(5000, torch.Generator().manual_seed(0)).obs[:, 0]
    assert set(drawn.tolist()) == {0.0, 1.0, 2.0, 4.0, 5.0}, "final observations are never sampled"
    counts = torch.bincount(drawn.long(), minlength=6)[[0, 1, 2, 4, 5]].float()
    assert counts.min() > 900 and counts.max() < 1100, counts  # uniform over the 5 transitions (1000 each)
    assert buffer._step_table is not None and buffer._step_table.tolist() == [0, 1, 2, 4, 5]
    buffer.add(
        np.array([[9.0]]), np.zeros((1, 1)), np.zeros(1), np.array([[9.5]]), np.zeros(1, bool), np.zeros(1, bool)
    )
    assert buffer._step_table is None  # online steps added: the rejection sampler again, over every slot written
    drawn = buffer.sample(5000, torch.Generator().manual_seed(1)).obs[:, 0]
    assert set(drawn.tolist()) == {0.0, 1.0, 2.0, 4.0, 5.0, 9.0}


def test_a_mixed_batch_takes_its_share_from_each_buffer():
    def filled(value: float) -> ReplayBuffer:
        buffer = ReplayBuffer(50, 1, (1,), (1,))
        obs = np.full((11, 1), value, np.float32)
        buffer.add_episodes(obs, np.zeros((10, 1)), np.zeros(10), np.zeros(10, bool), np.array([10]))
        return buffer

    source = BatchSource(filled(1.0), filled(-1.0), 0.25)
    batch = source.sample(64, torch.Generator().manual_seed(0))
    assert (batch.obs == -1.0).sum().item() == 16 and (batch.obs == 1.0).sum().item() == 48
    assert "indices" not in batch
    with pytest.raises(DatasetError, match="offline_ratio"):
        BatchSource(filled(1.0), filled(2.0), 1.5)


# --- collect -------------------------------------------------------------------------------------------------


def test_collect_keeps_whole_episodes_with_references_and_behaviour_log_probs(datasets):
    expert, medium = load_dataset(datasets["expert"]), load_dataset(datasets["medium"])
    assert expert.num_episodes == 20 and expert.num_steps == 20 * 200
    assert expert.ref_min_score < -1000 and expert.ref_max_score > -250
    assert medium.ref_max_score == expert.ref_max_score
    assert expert.behavior_log_probs is None, "a deterministic policy has no density"
    assert medium.behavior_log_probs is not None and np.isfinite(medium.behavior_log_probs).all()
    assert medium.episode_returns().mean() < expert.episode_returns().mean()
    cartpole = load_dataset(datasets["cartpole"])
    # epsilon-greedy: log(eps / 2 + (1 - eps) [a = greedy]), two values
    logp = cartpole.behavior_log_probs.astype(np.float64)
    assert np.isclose(logp[:, None], [math.log(0.1), math.log(0.9)], atol=1e-5).any(1).all()
    random = collect("CartPole-v1", "random", 4, seed=0)
    np.testing.assert_allclose(random.behavior_log_probs, math.log(0.5))
    assert random.ref_max_score is None and random.normalized_score(10.0) is None


def _hold_at_the_bottom(obs: np.ndarray) -> np.ndarray:
    """Worse than random on Pendulum-v1: damp the swing so that the pendulum hangs (about -2000 per episode)."""
    return -2.0 * np.sign(obs[:, 2:3])


def test_inverted_reference_returns_are_refused_or_left_out(tmp_path, capsys):
    """Explicit references must rise from random to expert; a measured expert reference below random is not
    stored (with a warning): a worse-than-random policy would otherwise get a high normalized score."""
    with pytest.raises(PolicylabError, match="ref_max_score=-2000 is not above ref_min_score=-100"):
        collect("Pendulum-v1", "random", 1, ref_min_score=-100.0, ref_max_score=-2000.0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PolicylabError, match="noise=2: for Discrete actions noise is epsilon-greedy's epsilon"):
        collect("CartPole-v1", lambda obs: np.zeros(len(obs), np.int64), 1, noise=2.0, out=tmp_path / "y")
    assert not (tmp_path / "y").exists()
    assert main(["collect", "--env", "Pendulum-v1", "--ref-min", "-100", "--ref-max", "-2000", "--out",
                 str(tmp_path / "y")]) == 2  # fmt: skip
    assert "error: ref_max_score=-2000 is not above" in capsys.readouterr().err and not (tmp_path / "y").exists()
    with pytest.warns(UserWarning, match="not above a random policy's"):
        bad = collect("Pendulum-v1", _hold_at_the_bottom, 2, ref_episodes=2)
    assert bad.ref_min_score is not None and bad.ref_max_score is None and bad.normalized_score(-1500.0) is None
    assert main(["collect", "--env", "Pendulum-v1", "--policy", "tests.helpers:pendulum_expert", "--episodes", "1",
                 "--ref-max", "-5000", "--out", str(tmp_path / "z")]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "warning: a random policy's return" in out.err and "1 episode, 200 steps" in out.out
    with pytest.warns(UserWarning, match="stores no random reference"):
        expert = collect("Pendulum-v1", "random", 1, ref_max_score=-5000.0, ref_episodes=1)
    assert expert.ref_min_score is None and expert.ref_max_score == -5000.0


def test_inverted_reference_returns_on_disk_are_left_out_with_a_warning(tmp_path, capsys):
    """A dataset whose metadata has the expert reference below the random one (another tool's, or edited by hand)
    loads without normalized scores and says why, instead of scoring a worse policy higher."""
    import json

    collect("Pendulum-v1", "random", 1, ref_min_score=-100.0, ref_max_score=-50.0, out=tmp_path / "d")
    meta_file = tmp_path / "d" / "data" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    for where in (meta, meta["policylab"]):
        where.update(ref_min_score=-50.0, ref_max_score=-2000.0)
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records ref_max_score=-2000, not above ref_min_score=-50") as caught:
        data = load_dataset(tmp_path / "d")
    assert "data/metadata.json" in str(caught[0].message)
    assert data.ref_min_score is None and data.ref_max_score is None and data.normalized_score(-1500.0) is None
    assert main(["dataset", "info", str(tmp_path / "d")]) == 0
    assert "warning: " + str(tmp_path / "d") + " records ref_max_score=-2000" in capsys.readouterr().err


def test_collect_checks_a_runs_env_up_front_and_defaults_to_it(tmp_path, capsys):
    run = pl.train("sac", env="Pendulum-v1", steps=200, overrides={"learning_starts": 100, "eval_episodes": 1},
                   preset="none", runs_dir=tmp_path, verbose=False)  # fmt: skip
    with pytest.raises(PolicylabError, match="was trained on Pendulum-v1 and cannot act in CartPole-v1") as err:
        collect("CartPole-v1", str(run.dir), 1)
    assert "env='Pendulum-v1'" in err.value.fix
    assert main(["collect", "--policy", str(run.dir), "--episodes", "1", "--out", str(tmp_path / "d")]) == 0
    assert load_dataset(tmp_path / "d").env_id == "Pendulum-v1" and "wrote" in capsys.readouterr().out
    assert main(["collect", "--out", str(tmp_path / "e")]) == 2
    assert "collect needs an env" in capsys.readouterr().err


def test_collect_from_a_runs_replay_buffer_keeps_its_complete_episodes(tmp_path):
    for capacity, episodes in ((10_000, 6), (700, 3)):  # 700 slots: the ring wrapped, the oldest episode is cut
        run = pl.train(
            "sac",
            env="Pendulum-v1",
            steps=1200,
            seed=1,
            preset="none",
            runs_dir=tmp_path,
            verbose=False,
            overrides={"save_buffer": True, "buffer_size": capacity, "hidden_sizes": [16], "eval_every": 0},
        )
        data = collect_from_buffer(run.dir, tmp_path / f"replay-{capacity}")
        assert data.num_episodes == episodes and (data.episode_lengths == 200).all()
        assert np.abs(data.actions).max() <= 2.0 and np.abs(data.actions).max() > 1.0, "actions in env units"
        assert data.truncations.sum() == episodes and not data.terminations.any()
        reloaded = load_dataset(tmp_path / f"replay-{capacity}")
        np.testing.assert_array_equal(reloaded.observations, data.observations)


# --- learning --------------------------------------------------------------------------------------------------


def _train_until(algo: str, dataset, bar: float, steps: int, tmp_path, overrides=None) -> pl.Run:
    """Offline training that stops at the first evaluation whose normalized score reaches `bar`."""
    best: list[float] = []

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        if info.eval_return is not None:
            best.append(info.eval_return)
        return not (best and info.eval_return is not None and _score(dataset, info.eval_return) >= bar)

    cfg = {**SMALL_NETS, "eval_every": 500, "eval_episodes": 5, **(overrides or {})}
    run = pl.train(
        algo,
        dataset=dataset,
        steps=steps,
        seed=1,
        overrides=cfg,
        runs_dir=tmp_path,
        callback=stop_at_bar,
        verbose=False,
    )
    scores = [_score(dataset, r) for r in best]
    assert scores and max(scores) >= bar, f"{algo}: normalized scores {scores} never reached {bar}"
    return run


def _score(path, ret: float) -> float:
    return float(load_dataset(path, validate=False).normalized_score(ret))


@pytest.mark.parametrize(
    ("algo", "which", "bar", "steps", "overrides"),
    [
        ("bc", "expert", 85.0, 3000, {}),
        ("bc", "expert", 85.0, 3000, {"gaussian": True}),
        ("td3_bc", "medium", 85.0, 6000, {}),
        ("iql", "medium", 85.0, 6000, {}),
        ("awac", "medium", 85.0, 6000, {}),
        # CQL (like offline SAC, its cql_alpha = 0 case) peaks by ~2,500 steps on this 4k-transition set and then
        # degrades; the first evaluation at the bar stops the run
        (
            "cql",
            "medium",
            50.0,
            4000,
            {"cql_alpha": 5.0, "lr": 1e-3, "actor_lr": 1e-3, "batch_size": 64, "n_action_samples": 4},
        ),
    ],
)
def test_offline_algorithms_learn_pendulum_from_a_dataset(datasets, tmp_path, algo, which, bar, steps, overrides):
    _train_until(algo, datasets[which], bar, steps, tmp_path, overrides)


def test_bc_on_the_best_tenth_of_mixed_data_learns_where_bc_on_all_of_it_does_not(datasets, tmp_path):
    """CORL's BC-10% (top_fraction): 20 expert episodes among 80 of a random policy. BC on the best 20% of the
    episodes by return clones the expert; BC on every episode clones a blend of the two."""
    expert = load_dataset(datasets["expert"])
    randoms = collect("Pendulum-v1", "random", 80, seed=3, ref_max_score=expert.ref_max_score)
    mixed = write_dataset(concat_datasets([expert, randoms]), tmp_path / "mixed")
    _train_until("bc", mixed, 85.0, 3000, tmp_path, {"top_fraction": 0.2})
    everything = pl.train("bc", dataset=mixed, steps=3000, seed=1, runs_dir=tmp_path, verbose=False,
                          overrides={**SMALL_NETS, "eval_every": 500, "eval_episodes": 5})  # fmt: skip
    scores = [_score(mixed, float(row["return_mean"])) for row in csv.DictReader(open(everything.dir / "eval.csv"))]
    assert max(scores) < 50.0, f"BC on every episode scored {scores}"


def test_discrete_bc_learns_cartpole_from_an_epsilon_greedy_expert(datasets, tmp_path):
    run = pl.train(
        "bc",
        dataset=datasets["cartpole"],
        steps=1500,
        seed=1,
        runs_dir=tmp_path,
        verbose=False,
        overrides={**SMALL_NETS, "eval_every": 0},
    )
    assert run.final_eval["return_mean"] >= 475


SPARSE_GOAL = "tests.envs_for_tests:SparseGoalEnv"


@pytest.fixture(scope="module")
def goal_datasets(tmp_path_factory):
    """SparseGoalEnv data: "expert" moves right at full speed (noise 0.3), "medium" at half speed with noise
    0.5, which mostly ends short of the goal (returns 0 to 3 of 16)."""
    root = tmp_path_factory.mktemp("goal")
    full, half = (lambda obs, v=v: np.full((len(obs), 1), v, np.float32) for v in (1.0, 0.5))
    expert = collect(SPARSE_GOAL, full, 10, noise=0.3, seed=0, out=root / "expert")
    medium = collect(SPARSE_GOAL, half, 10, noise=0.5, seed=0, out=root / "medium", ref_max_score=16.0)
    return {"expert": expert.path, "medium": medium.path}


def test_offline_to_online_improves_on_the_offline_score(goal_datasets, tmp_path):
    """IQL on the SparseGoalEnv "medium" data: 1000 gradient steps offline, then 3000 env steps online (replay
    seeded with the dataset). The online phase finds what the data barely shows: the return at the end beats
    the return at the end of the offline phase by 5 or more (of 16). Measured here: 2 offline, 12 after."""
    overrides = {"hidden_sizes": [64, 64], "lr": 1e-3, "eval_every": 500, "eval_episodes": 2, "log_every": 250}
    run = pl.train(
        "iql",
        dataset=goal_datasets["medium"],
        steps=1000,
        online_steps=3000,
        seed=1,
        overrides=overrides,
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    with open(run.dir / "eval.csv") as f:
        returns = {int(row["step"]): float(row["return_mean"]) for row in csv.DictReader(f)}
    offline, online = returns[1000], max(returns[3500], returns[4000])
    assert online >= offline + 5, returns


def test_hybrid_sac_with_expert_data_reaches_a_sparse_goal_plain_sac_does_not_find(goal_datasets, tmp_path):
    """SparseGoalEnv (tests/envs_for_tests.py: reward only beyond x = 1.5, which a random walk almost never
    reaches; moving right all the way earns 16). Ten noisy expert episodes mixed into half of each batch
    (offline_ratio 0.5, two updates per env step as RLPD, a fixed temperature 0.05): SAC reaches a return of 8
    within 2000 env steps; SAC with the same settings and seed, without the data, has not by that step.
    Measured here: the hybrid reaches 8 at 750 (seed 1) and 1250 (seed 2) steps; plain SAC's return stays 0
    up to 2000 steps."""
    expert = goal_datasets["expert"]
    overrides = {
        "hidden_sizes": [64, 64],
        "learning_starts": 100,
        "alpha": 0.05,
        "auto_alpha": False,
        "gradient_steps": 2,
        "lr": 1e-3,
        "eval_every": 250,
        "eval_episodes": 2,
        "log_every": 250,
    }
    for seed in (1, 2):
        reached: list[int] = []

        def until_bar(info: pl.IterationInfo, reached=reached) -> bool:
            if info.eval_return is not None and info.eval_return >= 8:
                reached.append(info.step)
            return not reached

        kwargs = dict(env=SPARSE_GOAL, seed=seed, preset="none", runs_dir=tmp_path, verbose=False)
        pl.train(
            "sac",
            dataset=expert,
            steps=2000,
            overrides={**overrides, "offline_ratio": 0.5},
            callback=until_bar,
            **kwargs,
        )
        assert reached, f"seed {seed}: hybrid SAC never reached a return of 8 in 2000 env steps"
        plain = pl.train("sac", steps=reached[0], overrides=overrides, **kwargs)
        with open(plain.dir / "eval.csv") as f:
            returns = [float(row["return_mean"]) for row in csv.DictReader(f)]
        assert max(returns) < 8, f"seed {seed}: plain SAC reached {max(returns)} by step {reached[0]}"


def test_cql_critics_value_dataset_actions_above_random_ones(datasets):
    """The conservative term at work: after 800 steps on expert data, Q(s, a_data) - Q(s, a_uniform) is large
    with the penalty and small without it (the same run otherwise: offline SAC)."""
    gaps = {}
    for alpha in (0.0, 5.0):
        overrides = {"cql_alpha": alpha, "log_every": 400, "batch_size": 64, "n_action_samples": 4}
        loop = _loop("cql", datasets["expert"], overrides)
        loop.iterate()
        loop.iterate()
        batch = loop.offline_source.sample(1024, torch.Generator().manual_seed(0))
        with torch.no_grad():
            q_data = loop.algo.critic(batch.obs, batch.actions).mean()
            q_uniform = loop.algo.critic(batch.obs, torch.rand_like(batch.actions) * 2 - 1).mean()
        gaps[alpha] = float(q_data - q_uniform)
        loop.close()
    assert gaps[5.0] > 2.0 and gaps[5.0] > 4 * max(gaps[0.0], 0.25), gaps


def test_tanh_gaussian_log_prob_of_a_sampled_action_is_the_samples_log_prob():
    from policylab.nets.critics import TanhGaussianActor

    torch.manual_seed(0)
    actor = TanhGaussianActor(3, -torch.ones(2), torch.ones(2), hidden_sizes=(16,))
    obs = torch.randn(64, 3)
    actions, logp = actor.sample(obs, torch.Generator().manual_seed(1))
    torch.testing.assert_close(actor.log_prob(obs, actions), logp, rtol=1e-4, atol=1e-3)


def test_cql_bc_steps_clone_the_dataset_before_the_conservative_actor_update(datasets):
    """With bc_steps the actor maximizes the data's likelihood first (CORL's option): after 600 such steps the
    dataset actions are far more likely under it than under the actor of the same run without the phase."""
    likelihood = {}
    for bc_steps in (0, 600):
        overrides = {
            "cql_alpha": 1.0,
            "bc_steps": bc_steps,
            "lr": 1e-3,
            "actor_lr": 1e-3,
            "log_every": 600,
            "batch_size": 64,
            "n_action_samples": 2,
        }
        loop = _loop("cql", datasets["expert"], overrides)
        loop.iterate()
        batch = loop.offline_source.sample(1024, torch.Generator().manual_seed(0))
        with torch.no_grad():
            likelihood[bc_steps] = float(loop.algo.net.log_prob(batch.obs, batch.actions).mean())
        loop.close()
    assert likelihood[600] > likelihood[0] + 1.0, likelihood


def test_discrete_cql_learns_cartpole_from_an_epsilon_greedy_expert(datasets, tmp_path):
    overrides = {**SMALL_NETS, "eval_every": 0, "lr": 1e-3, "target_update_interval": 250}
    run = pl.train(
        "cql_discrete",
        dataset=datasets["cartpole"],
        steps=3000,
        seed=1,
        runs_dir=tmp_path,
        verbose=False,
        overrides=overrides,
    )
    assert run.final_eval["return_mean"] >= 475


def test_dataset_runs_save_the_datasets_observation_statistics_with_the_policy(datasets, tmp_path):
    run = pl.train(
        "bc",
        dataset=datasets["expert"],
        steps=500,
        seed=1,
        runs_dir=tmp_path,
        verbose=False,
        overrides={**SMALL_NETS, "eval_every": 0},
    )
    policy = pl.load(run.dir)
    data = load_dataset(datasets["expert"])
    np.testing.assert_allclose(policy.obs_normalizer.rms.mean, data.observations.mean(0), rtol=1e-5, atol=1e-6)
    assert "score" in run.final_eval


# --- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "extra"),
    [
        ("iql", {"steps": 1000}),  # offline
        ("iql", {"steps": 1200, "log_every": 1000, "eval_every": 300, "checkpoint_every": 400}),  # blocks of 300/400
        ("sac", {"steps": 1000, "offline_ratio": 0.5, "learning_starts": 200, "save_buffer": True}),  # hybrid
        ("td3_bc", {"steps": 500, "online_steps": 500, "save_buffer": True}),  # offline, then online (seeded replay)
        ("cql", {"steps": 1000, "lagrange": True, "n_action_samples": 2, "batch_size": 32}),  # its multiplier too
    ],
)
def test_resumed_dataset_run_equals_uninterrupted_run(datasets, tmp_path, algo, extra):
    steps = extra.pop("steps")
    cfg = {**SMALL_NETS, "eval_every": 0, "checkpoint_every": 0, **extra}
    online_steps = cfg.pop("online_steps", None)
    kwargs = dict(
        dataset=datasets["medium"],
        steps=steps,
        online_steps=online_steps,
        seed=3,
        overrides=cfg,
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    resumed_and_full_runs(algo, 750, **kwargs)


def test_offline_evaluations_and_checkpoints_come_at_their_multiples_below_log_every(datasets, tmp_path):
    """eval_every and checkpoint_every count gradient steps, also when they are below log_every (1000)."""
    cfg = {**SMALL_NETS, "log_every": 1000, "eval_every": 500, "checkpoint_every": 500, "keep_checkpoints": 0,
           "eval_episodes": 1}  # fmt: skip
    run = pl.train("iql", dataset=datasets["medium"], steps=1500, overrides=cfg, preset="none", runs_dir=tmp_path,
                   verbose=False)  # fmt: skip
    with open(run.dir / "eval.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [500, 1000, 1500]
    saved = sorted(p.name for p in (run.dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert [int(name[len("step_") :]) for name in saved] == [500, 1000, 1500]
    with open(run.dir / "train.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [500, 1000, 1500]


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_dataset_settings_are_clear_errors(datasets, tmp_path):
    with pytest.raises(ConfigError, match="learns from a dataset"):
        pl.train("iql", env="Pendulum-v1", steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="no offline phase"):
        pl.train("ppo", dataset=datasets["expert"], steps=100, online_steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="offline_ratio=1.5 is outside"):
        pl.train("sac", dataset=datasets["expert"], steps=100, overrides={"offline_ratio": 1.5}, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="need a dataset"):
        pl.train("sac", env="Pendulum-v1", steps=100, overrides={"offline_ratio": 0.5}, runs_dir=tmp_path)
    with pytest.raises(DatasetError):
        pl.train("bc", dataset=datasets["cartpole"], env="Pendulum-v1", steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(PolicylabError, match="continuous"):
        pl.train("iql", dataset=datasets["cartpole"], steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(DatasetError, match="no local dataset|does not exist|not found"):
        pl.train("bc", dataset=str(tmp_path / "missing"), steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match=r"top_fraction=0.0 is outside \(0, 1\]"):
        pl.train("bc", dataset=datasets["expert"], steps=100, overrides={"top_fraction": 0}, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="(?s)this run has none.*dataset=PATH"):
        pl.train("sac", env="Pendulum-v1", steps=100, overrides={"top_fraction": 0.5}, runs_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("iql", "ppo", "sac", "bc"))]


def test_cli_collects_a_dataset_and_trains_on_it(tmp_path, capsys):
    out = tmp_path / "cartpole-random"
    assert main(["collect", "--env", "CartPole-v1", "--episodes", "3", "--out", str(out)]) == 0
    assert "3 episodes" in capsys.readouterr().out
    assert main(["collect", "--env", "CartPole-v1", "--episodes", "3", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    argv = ["train", "bc", "--dataset", str(out), "--steps", "200", "--runs-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, "--set", "hidden_sizes=[16]"]) == 0
    assert "run directory" in capsys.readouterr().out


def test_offline_progress_lines_show_the_latest_evaluation_and_its_normalized_score(goal_datasets, tmp_path, capsys):
    """An offline phase has no training episodes: its progress lines show the latest evaluation instead, with
    the D4RL-normalized score, as the final and best-policy lines do."""
    overrides = {**SMALL_NETS, "eval_every": 100, "log_every": 100, "eval_episodes": 2}
    run = pl.train("bc", dataset=goal_datasets["medium"], steps=300, runs_dir=tmp_path, overrides=overrides)
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "/300 steps" in line]
    assert progress and all("return " in line for line in progress)
    assert re.search(r"return -?[0-9.]+ \(evaluation, normalized -?[0-9.]+\)", progress[-2]), progress
    final = next(line for line in lines if line.startswith("done:"))
    best = next(line for line in lines if line.startswith("best policy:"))
    assert "normalized score" in final and "normalized score" in best
    assert run.best is not None


def test_a_dataset_runs_policy_keeps_its_reference_returns_for_normalized_scores(goal_datasets, tmp_path, capsys):
    """`pl.load` (final or best) and `policylab eval` give normalized scores from the references the checkpoint
    stores, without the dataset; a run without a dataset gives none."""
    overrides = {**SMALL_NETS, "eval_every": 100, "log_every": 100, "eval_episodes": 2}
    run = pl.train("bc", dataset=goal_datasets["medium"], steps=200, runs_dir=tmp_path, overrides=overrides,
                   verbose=False)  # fmt: skip
    for which in ("final", "best"):
        policy = pl.load(run.dir, which=which)
        assert policy.reference_returns is not None and policy.reference_returns[1] == 16.0
        assert policy.normalized_score(run.final_eval["return_mean"]) == pytest.approx(run.final_eval["score"])
    shutil.move(goal_datasets["medium"], tmp_path / "moved")  # eval needs no dataset
    try:
        assert main(["eval", str(run.dir), "--episodes", "2", "--json"]) == 0
        assert main(["eval", str(run.dir), "--episodes", "2", "--best"]) == 0
    finally:
        shutil.move(tmp_path / "moved", goal_datasets["medium"])
    out = capsys.readouterr().out.splitlines()
    assert "normalized score" in out[0] and "score" in json.loads(out[1]) and "normalized score" in out[2]
    online = pl.train("sac", env="Pendulum-v1", steps=300, runs_dir=tmp_path, verbose=False,
                      overrides={**SMALL_NETS, "learning_starts": 100, "eval_episodes": 1})  # fmt: skip
    assert pl.load(online.dir).reference_returns is None


def _loop(algo: str, dataset, overrides: dict):
    from policylab.algos import get_algo
    from policylab.train import OffPolicyLoop, resolve_config

    spec = get_algo(algo)
    cfg, _ = resolve_config(spec, steps=1000, seed=0, overrides={**SMALL_NETS, **overrides}, dataset=dataset)
    return OffPolicyLoop(spec, cfg)


@pytest.mark.parametrize(
    ("algo", "which", "named", "offered"),
    [
        ("td3_bc", "cartpole", "td3_bc needs a continuous (Box) action space; the dataset's is Discrete", "cql_disc"),
        ("iql", "cartpole", "iql needs a continuous (Box) action space; the dataset's is Discrete", "cql_discrete"),
        ("cql_discrete", "medium", "cql_discrete needs a Discrete action space; the dataset's is Box", "iql, cql"),
    ],
)
def test_action_space_errors_name_the_algorithm_run_and_offline_alternatives(datasets, tmp_path, algo, which,
                                                                             named, offered):  # fmt: skip
    with pytest.raises(PolicylabError) as err:
        pl.train(algo, dataset=datasets[which], steps=10, runs_dir=tmp_path, verbose=False)
    assert named in err.value.problem and offered in str(err.value.fix)
    assert not any(tmp_path.iterdir()), "nothing written"
    with pytest.raises(PolicylabError, match="td3 needs a continuous") as online:
        pl.train("td3", env="CartPole-v1", steps=10, runs_dir=tmp_path, verbose=False)
    assert "dqn or sac_discrete" in str(online.value.fix)


def test_collect_finds_a_policy_function_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """`policylab collect --policy mymod:fn` finds mymod.py in the directory it runs from, as `python -m` would."""
    import sys

    (tmp_path / "my_pendulum_controller.py").write_text(
        "import numpy as np\n\ndef act(obs):\n    return np.zeros((len(obs), 1), np.float32)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["collect", "--env", "Pendulum-v1", "--policy", "my_pendulum_controller:act", "--episodes", "1",
                 "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(load_dataset(tmp_path / "d").actions, 0.0)
    monkeypatch.delitem(sys.modules, "my_pendulum_controller")
