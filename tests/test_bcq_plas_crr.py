"""BCQ (Box and Discrete actions), PLAS and CRR: their targets, filters and weights against hand-computed values,
their acting rules, learning from Pendulum and CartPole datasets, loading a saved policy, exact resume, bad
settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import policylab as pl
from policylab.checkpoint import load_checkpoint
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, GaussianActor
from policylab.nets.selection import CriticSelectedActor
from policylab.nets.support import LatentPolicyActor, Perturbation, PerturbedVAEActor, filter_bias, filtered_greedy
from policylab.nets.vae import ConditionalVAE
from policylab.objectives.offline import crr_weights, discrete_imitation_loss
from policylab.objectives.q_targets import MASKED_Q, soft_clipped_double_q
from tests.helpers import assert_same_params, resumed_and_full_runs
from tests.test_offline import SMALL_NETS, _loop, _train_until

# --- the terms against hand-computed values ----------------------------------------------------------------------


def test_bcq_target_value_mixes_min_and_max_critics_then_takes_the_best_candidate():
    # two critics, two states with three candidates each (a state's candidates adjacent)
    q = torch.tensor([[1.0, 5.0, 2.0, -1.0, -4.0, 0.0], [3.0, 1.0, 2.0, -3.0, 0.0, -2.0]])
    # lam 0.75: 0.75 min + 0.25 max per candidate: [1.5, 2.0, 2.0], [-2.5, -3.0, -1.5]
    torch.testing.assert_close(soft_clipped_double_q(q, 0.75, 3), torch.tensor([2.0, -1.5]))
    torch.testing.assert_close(soft_clipped_double_q(q, 1.0, 3), torch.tensor([2.0, -2.0]))  # TD3's min
    torch.testing.assert_close(soft_clipped_double_q(q, 0.0, 3), torch.tensor([5.0, 0.0]))  # the max


def test_perturbation_moves_an_action_by_at_most_phi_and_stays_in_bounds():
    torch.manual_seed(0)
    xi = Perturbation(3, 2, 0.05, [16])
    actions = torch.tensor([[0.0, 0.5], [0.99, -0.99], [-1.0, 1.0]])
    moved = xi(torch.randn(3, 3), actions)
    assert 0 < (moved - actions).abs().max() <= 0.05 and moved.abs().max() <= 1.0
    with torch.no_grad():
        xi.body.biases[-1].fill_(100.0)  # saturate the tanh: the largest move, +phi, clipped at the bound
    expected = torch.tensor([[0.05, 0.55], [1.0, -0.94], [-0.95, 1.0]])
    torch.testing.assert_close(xi(torch.randn(3, 3), actions), expected)


def test_bcq_acts_with_the_candidate_of_highest_first_critic():
    torch.manual_seed(0)
    vae, critic = ConditionalVAE(3, 2, 4, [16]), ContinuousCritic(3, 2, [16], members=2)
    actor = PerturbedVAEActor(vae, Perturbation(3, 2, 0.05, [16]), critic, -torch.ones(2), torch.ones(2), 7)
    obs = torch.randn(4, 3)
    chosen = actor.act(obs, torch.Generator().manual_seed(5))
    repeated = obs.repeat_interleave(7, 0)
    proposals = actor.propose(repeated, torch.Generator().manual_seed(5))  # the same draws
    q1 = critic(repeated, proposals)[0].view(4, 7)
    torch.testing.assert_close(chosen, proposals.view(4, 7, 2)[torch.arange(4), q1.argmax(1)])


def test_plas_acts_by_decoding_its_bounded_latent_action_then_perturbing_it():
    torch.manual_seed(0)
    vae = ConditionalVAE(3, 2, 4, [16])
    xi = Perturbation(3, 2, 0.05, [16])
    for perturbation in (None, xi):
        actor = LatentPolicyActor(
            3, vae, -torch.ones(2), torch.ones(2), [16], max_latent=2.0, perturbation=perturbation
        )
        with torch.no_grad():
            actor.latent.biases[-1].fill_(50.0)  # a saturated latent policy: z = +2 in every dimension
            obs = torch.randn(5, 3)
            decoded = vae.decode(obs, torch.full((5, 4), 2.0))
            expected = decoded if perturbation is None else xi(obs, decoded)
            torch.testing.assert_close(actor(obs), expected)


def test_discrete_bcq_filter_keeps_the_actions_within_the_threshold_of_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]))
    # ratios to the likeliest: [1, 0.2, 0.8] and [1/3, 1/3, 1]; threshold 0.3 drops action 1 of the first state
    bias = filter_bias(logits, 0.3)
    assert (bias == 0).tolist() == [[True, False, True], [True, True, True]] and bias.min() == MASKED_Q
    q = torch.tensor([[0.0, 10.0, 1.0], [5.0, 0.0, 1.0]])
    assert filtered_greedy(q, logits, 0.3).tolist() == [2, 0]
    assert filtered_greedy(q, logits, 0.5).tolist() == [2, 2], "ratio 1/3 < 0.5: only the likeliest is left"
    assert filtered_greedy(q, logits, 0.0).tolist() == [1, 0], "threshold 0: DQN's argmax"
    assert filtered_greedy(q, logits, 1.0).tolist() == [0, 2], "threshold 1: the likeliest action alone"
    masked = torch.tensor([[0.0, 0.0, MASKED_Q], [0.0, 0.0, 0.0]])  # action masks forbid action 2 of the first
    assert filtered_greedy(q, logits, 0.3, masked).tolist() == [0, 0]


def test_discrete_imitation_loss_is_cross_entropy_plus_squared_logits():
    logits, actions = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    nll = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert discrete_imitation_loss(logits, actions, 0.5).item() == pytest.approx(nll + 0.5 * 5 / 4)


def test_crr_weights_are_clipped_exponentials_or_indicators():
    adv = torch.tensor([0.0, 1.0, -2.0, 10.0])
    torch.testing.assert_close(
        crr_weights(adv, "exp", 2.0, 20.0), torch.tensor([1.0, math.exp(0.5), math.exp(-1), 20.0])
    )
    torch.testing.assert_close(crr_weights(adv, "binary", 2.0, 20.0), torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_crr_critic_weighted_policy_draws_by_softmax_of_q():
    """Four Gaussian draws per state; the chosen one's frequency follows softmax(Q) over the four."""
    torch.manual_seed(0)
    actor, critic = GaussianActor(2, -torch.ones(1), torch.ones(1), [8]), ContinuousCritic(2, 1, [8], members=1)
    with torch.no_grad():
        actor.log_std.fill_(math.log(0.5))
    policy = CriticSelectedActor(actor, critic, None, 4, "softmax", "softmax")
    obs = torch.zeros(20_000, 2)
    chosen = policy.act(obs, torch.Generator().manual_seed(1), deterministic=True)
    draws = actor.sample(obs.repeat_interleave(4, 0), torch.Generator().manual_seed(1)).view(-1, 4)
    probs = torch.softmax(critic(obs.repeat_interleave(4, 0), draws.reshape(-1, 1))[0].view(-1, 4), -1)
    picked = (draws == chosen).float().argmax(1)  # which of its four draws each state took
    expected = (probs * (draws < 0)).sum(1).mean()  # P(chosen action < 0)
    assert (chosen < 0).float().mean().item() == pytest.approx(expected.item(), abs=0.02)
    assert torch.equal(draws[torch.arange(len(obs)), picked], chosen[:, 0])


# --- one update of each, as written in the module docstrings ----------------------------------------------------


def test_bcq_update_trains_vae_critics_and_perturbation_and_the_targets_follow(datasets):
    loop = _loop("bcq", datasets["medium"], {"vae_hidden_sizes": [16], "batch_size": 32, "policy_delay": 2})
    algo = loop.algo
    modules = {"vae": algo.vae, "critic": algo.critic, "xi": algo.perturbation, "xi'": algo.actor_target.module}
    before = {name: [p.clone() for p in m.parameters()] for name, m in modules.items()}

    def changed(name: str, module: torch.nn.Module) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters()))

    batch = loop.offline_source.sample(32, torch.Generator().manual_seed(0))
    metrics = algo.update(batch, 0)  # index 0 with policy_delay 2: no perturbation step yet
    assert changed("vae", algo.vae) and changed("critic", algo.critic) and not changed("xi", algo.perturbation)
    assert "actor_loss" not in metrics
    algo.update(batch, 1)
    assert changed("xi", algo.perturbation) and changed("xi'", algo.actor_target.module)
    loop.close()


def test_discrete_bcq_update_bootstraps_from_the_target_at_the_filtered_online_argmax(datasets):
    loop = _loop("bcq_discrete", datasets["cartpole"], {"threshold": 0.3})
    algo = loop.algo
    batch = loop.offline_source.sample(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q_next, logits_next = algo.net.values_and_logits(batch.next_obs)
        q, logits = algo.net.values_and_logits(batch.obs)
        chosen = filtered_greedy(q_next[0], logits_next, 0.3)
        next_value = algo.q_target(batch.next_obs)[0].gather(1, chosen[:, None])[:, 0]
        target = batch.rewards + batch.discounts * (~batch.terminated) * next_value
        q_taken = q[0].gather(1, batch.actions.long()[:, None])[:, 0]
        expected = torch.nn.functional.smooth_l1_loss(q_taken, target)
        expected_imitation = discrete_imitation_loss(logits, batch.actions, 0.01)
    metrics = algo.update(batch, 0)
    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["imitation_loss"].item() == pytest.approx(expected_imitation.item(), rel=1e-5)
    loop.close()


def test_plas_trains_its_vae_first_then_freezes_it_and_trains_the_latent_policy(datasets):
    overrides = {"vae_steps": 3, "vae_hidden_sizes": [16], "batch_size": 32, "perturbation": 0.05}
    loop = _loop("plas", datasets["medium"], overrides)
    algo = loop.algo
    assert set(algo.actor) == {"latent", "perturbation"}, "PLAS+P: the actor step trains both"
    modules = {"vae": algo.vae, "critic": algo.critic, "actor": algo.actor}
    before = {name: [p.clone() for p in m.parameters()] for name, m in modules.items()}

    def changed(name: str) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(before[name], modules[name].parameters()))

    batch = loop.offline_source.sample(32, torch.Generator().manual_seed(0))
    for i in range(3):
        assert set(algo.update(batch, i)) == {"vae_loss"}
    assert changed("vae") and not changed("critic") and not changed("actor")
    vae = [p.clone() for p in algo.vae.parameters()]
    metrics = algo.update(batch, 3)
    assert "actor_loss" in metrics and changed("critic") and changed("actor")
    assert all(torch.equal(a, b) for a, b in zip(vae, algo.vae.parameters())), "the VAE is frozen after vae_steps"
    loop.close()


def test_plas_actor_steps_raise_the_first_critic_at_the_policy_s_decoded_actions(datasets):
    """PLAS's actor step, the critics held fixed: Q_1(s, pi(s)) rises, through the frozen decoder, while the
    latent action stays within max_latent. (PLAS has no score test: on these 4k-transition Pendulum datasets its
    policy, free anywhere in the decoder's range, follows a critic that has not converged within a CI budget and
    falls below the behaviour-cloning level its VAE alone reaches.)"""
    loop = _loop("plas", datasets["medium"], {"vae_steps": 200, "vae_hidden_sizes": [32], "max_latent": 1.0})
    algo, g = loop.algo, torch.Generator().manual_seed(0)
    for i in range(300):
        algo.update(loop.offline_source.sample(64, g), i)
    batch = loop.offline_source.sample(512, g)
    critic = [p.clone() for p in algo.critic.parameters()]

    def q_pi() -> float:
        with torch.no_grad():
            return algo.critic(batch.obs, algo.net(batch.obs), members=1).mean().item()

    before = q_pi()
    algo.critic.requires_grad_(False)
    for _ in range(50):
        algo.actor_opt.step(-algo.critic(batch.obs, algo.net(batch.obs), members=1).mean())
    algo.critic.requires_grad_(True)
    assert q_pi() > before and all(torch.equal(a, b) for a, b in zip(critic, algo.critic.parameters()))
    with torch.no_grad():
        z = algo.net.max_latent * torch.tanh(algo.net.latent(batch.obs)[0])
    assert z.abs().max() <= 1.0
    loop.close()


# --- learning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "bar", "overrides"),
    [
        ("bcq", 85.0, {"vae_hidden_sizes": [64, 64]}),  # seeds 1-3 reach 85 by 2-2.5k steps
        # two critics: with d3rlpy's one, seed 1 reaches 85.6 at 2.5k steps, just over the bar; like AWAC, CRR
        # peaks by ~2.5k steps on this 4k-transition set and then degrades (the first evaluation at the bar stops)
        ("crr", 85.0, {"n_critics": 2}),
        # binary weights imitate every action better than the policy's mean value, a weaker filter on this noisy
        # data: seeds 1-2 peak at 73 and 53
        ("crr", 60.0, {"n_critics": 2, "weight": "binary"}),
    ],
)
def test_bcq_and_crr_learn_pendulum_from_a_medium_dataset(datasets, tmp_path, algo, bar, overrides):
    _train_until(algo, datasets["medium"], bar, 6000, tmp_path, overrides)


def test_discrete_bcq_learns_cartpole_and_its_saved_policy_acts_by_the_filter(datasets, tmp_path):
    overrides = {**SMALL_NETS, "eval_every": 0, "lr": 1e-3, "target_update_interval": 250}
    run = pl.train("bcq_discrete", dataset=datasets["cartpole"], steps=1500, seed=1, runs_dir=tmp_path,
                   verbose=False, overrides=overrides)  # fmt: skip
    assert run.final_eval["return_mean"] >= 475
    policy = pl.load(run.dir)
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(policy.obs_normalizer(obs))
        q, logits = policy.net.values_and_logits(x)
        expected = filtered_greedy(q[0], logits, 0.3).numpy()
    np.testing.assert_array_equal(policy.act(obs), expected)
    net = policy.net
    np.testing.assert_array_equal(net.greedy_numpy(policy.obs_normalizer(obs)), expected)  # the numpy acting path


def test_a_saved_bcq_policy_acts_within_the_bounds_with_the_run_s_networks(datasets, tmp_path):
    overrides = {**SMALL_NETS, "eval_every": 0, "vae_hidden_sizes": [16], "batch_size": 32}
    run = pl.train("bcq", dataset=datasets["medium"], steps=100, seed=1, runs_dir=tmp_path, verbose=False,
                   overrides=overrides)  # fmt: skip
    policy = pl.load(run.dir)
    tensors, *_ = load_checkpoint(run.dir)
    assert any(k.startswith("policy/vae.") for k in tensors) and any(k.startswith("policy/critic.") for k in tensors)
    actions = policy.act(np.zeros((5, 3), np.float32))
    assert actions.shape == (5, 1) and np.all(np.abs(actions) <= 2.0)


# --- resume and bad settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "extra", "own_state"),
    [
        ("bcq", {"vae_hidden_sizes": [16], "batch_size": 32, "policy_delay": 2}, "actor_target/"),
        # the checkpoint at 450 is before PLAS's VAE -> TD3 switch at 500
        ("plas", {"vae_steps": 500, "vae_hidden_sizes": [16], "batch_size": 32, "perturbation": 0.05}, "actor_target/"),
        ("crr", {"batch_size": 32, "target_update_interval": 40}, "actor_target/"),
        ("crr", {"batch_size": 32, "cwp": False}, "critic/"),
    ],
)
def test_resumed_run_equals_uninterrupted_run(datasets, tmp_path, algo, extra, own_state):
    cfg = {**SMALL_NETS, "log_every": 150, "eval_every": 0, "checkpoint_every": 0, "eval_episodes": 1, **extra}
    kwargs = dict(dataset=datasets["medium"], steps=600, seed=3, overrides=cfg, preset="none", runs_dir=tmp_path,
                  verbose=False)  # fmt: skip
    full, part, resumed = resumed_and_full_runs(algo, 450, **kwargs)
    (full_tensors, *_), (resumed_tensors, *_) = load_checkpoint(full.dir), load_checkpoint(resumed.dir)
    assert full_tensors.keys() == resumed_tensors.keys()
    assert any(key.startswith(own_state) for key in full_tensors), f"{own_state} is missing from the checkpoint"
    assert_same_params(full_tensors, resumed_tensors)


@pytest.mark.parametrize(
    ("algo", "overrides", "named"),
    [
        ("bcq", {"target_noise": 0.2}, "bcq's targets come from its VAE's actions"),
        ("bcq", {"perturbation": 0.0}, "perturbation=0 leaves BCQ's actor nothing to learn"),
        ("bcq", {"bcq_lambda": 1.5}, "bcq_lambda"),
        ("bcq_discrete", {"threshold": 1.5}, "threshold"),
        ("plas", {"vae_steps": 10}, "vae_steps=10 must be >= 0 and below steps=10"),
        ("plas", {"perturbation": 3.0}, "perturbation=3.0 must be in [0, 2]"),
        ("crr", {"weight": "softmax"}, "weight='softmax' is not one of exp, binary"),
        ("crr", {"deterministic_actor": True}, "CRR's policy is a Gaussian"),
    ],
)
def test_bad_settings_are_clear_errors(datasets, tmp_path, algo, overrides, named):
    which = "cartpole" if algo == "bcq_discrete" else "medium"
    with pytest.raises(ConfigError, match=None) as err:
        pl.train(algo, dataset=datasets[which], steps=10, runs_dir=tmp_path, verbose=False, overrides=overrides)
    assert named in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize(
    ("algo", "which", "extra"),
    [
        ("bcq", "medium", {"vae_hidden_sizes": [16], "candidates": 4}),
        ("plas", "medium", {"vae_hidden_sizes": [16], "vae_steps": 50, "perturbation": 0.05}),
        ("bear", "medium", {"vae_hidden_sizes": [16], "candidates": 4, "warmup_steps": 50}),
        ("crr", "medium", {}),
        ("crr", "medium", {"cwp": False}),
        ("bcq_discrete", "cartpole", {}),
        ("c51", "cartpole", {"n_atoms": 11, "v_min": 0.0, "v_max": 100.0}),  # an online algorithm, offline first
    ],
)
def test_offline_then_online_runs_explore_in_the_env_with_the_dataset_in_replay(datasets, tmp_path, algo, which,
                                                                                  extra):  # fmt: skip
    """Every regime the registry names: 150 gradient steps offline, then 150 env steps online, whose exploration
    (each algorithm's own rule) acts in the env and whose updates draw from the dataset-seeded replay."""
    cfg = {**SMALL_NETS, "batch_size": 32, "eval_every": 0, "eval_episodes": 1, "learning_starts": 0, **extra}
    run = pl.train(algo, dataset=datasets[which], steps=150, online_steps=150, seed=1, overrides=cfg,
                   preset="none", runs_dir=tmp_path, verbose=False)  # fmt: skip
    assert run.steps == 300 and run.final_eval is not None
