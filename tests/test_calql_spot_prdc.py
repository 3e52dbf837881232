"""Cal-QL, SPOT and PRDC: their loss terms against hand-computed values, Monte-Carlo returns in the replay buffer,
learning on Pendulum datasets, exact resume."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos.cal_ql import CalQL, CalQLConfig
from policylab.algos.prdc import NearestActions
from policylab.checkpoint import load_checkpoint
from policylab.data import Batch, ReplayBuffer
from policylab.data.dataset import load_dataset
from policylab.data.replay import discounted_returns_to_go
from policylab.data.sources import dataset_transitions
from policylab.errors import ConfigError
from policylab.objectives.offline import (
    calibrated_values,
    gaussian_kl_to_standard_normal,
    td3_bc_lambda,
    vae_importance_weighted_log_likelihood,
    vae_negative_elbo,
)
from tests.helpers import assert_same_params, resumed_and_full_runs
from tests.test_offline import SMALL_NETS, _loop, _train_until


def params_of_module(module: torch.nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in module.parameters()]


# --- Monte-Carlo returns in the replay buffer --------------------------------------------------------------------


def test_mc_returns_of_a_dataset_are_its_discounted_returns_to_go():
    lengths = np.array([3, 2])  # episode 0 terminates, episode 1 is truncated: nothing is added after either
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32)
    expected = [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 10 + 0.5 * 20, 20.0]
    for n_step in (1, 2):
        buffer = ReplayBuffer(20, 1, (1,), (1,), n_step=n_step, gamma=0.5, mc_returns=True)
        obs = np.arange(7, dtype=np.float32)[:, None]
        buffer.add_episodes(obs, np.zeros((5, 1), np.float32), rewards, np.array([0, 0, 1, 0, 0], bool), lengths)
        batch = buffer.gather(torch.tensor([0, 1, 2, 4, 5]))
        torch.testing.assert_close(batch.mc_returns, torch.tensor(expected))
    assert "mc_returns" not in ReplayBuffer(20, 1, (1,), (1,)).gather(torch.tensor([0]))


def test_discounted_returns_to_go_agree_with_the_recursion_for_long_episodes_and_any_gamma():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, size=12)
    rewards = rng.normal(size=int(lengths.sum())) * 5
    for gamma in (0.0, 0.3, 0.99, 1.0):
        expected, start = [], 0
        for length in lengths:  # G_t = r_t + gamma G_{t+1}, backwards through each episode
            returns, running = [], 0.0
            for r in rewards[start : start + length][::-1]:
                running = r + gamma * running
                returns.append(running)
            expected += returns[::-1]
            start += length
        np.testing.assert_allclose(discounted_returns_to_go(rewards, lengths, gamma), expected, rtol=1e-5, atol=1e-3)


def test_mc_returns_of_online_episodes_appear_when_they_end_and_survive_a_checkpoint():
    def add_step(buffer: ReplayBuffer, rewards: list[float], terminated: list[bool], truncated: list[bool]) -> None:
        obs = np.zeros((2, 1), np.float32)
        final = obs if any(terminated) or any(truncated) else None
        actions, rewards_ = np.zeros((2, 1), np.float32), np.array(rewards, np.float32)
        buffer.add(obs, actions, rewards_, obs, np.array(terminated), np.array(truncated), final)

    buffer = ReplayBuffer(40, 2, (1,), (1,), gamma=0.5, mc_returns=True)
    add_step(buffer, [1.0, 4.0], [False, False], [False, False])
    add_step(buffer, [2.0, 8.0], [False, False], [False, True])  # env 1 is truncated after two steps
    running = buffer.gather(torch.tensor([0, 2]))  # flat index = slot * 2 + env: env 0's episode runs on
    assert torch.equal(running.mc_returns, torch.full((2,), -math.inf)), "no bound before the episode ends"
    resumed = ReplayBuffer(40, 2, (1,), (1,), gamma=0.5, mc_returns=True)
    resumed.load(*buffer.state())  # a checkpoint in the middle of env 0's episode
    for b in (buffer, resumed):
        add_step(b, [3.0, 1.0], [True, False], [False, False])  # env 0 terminates after three steps
        env0, env1 = b.gather(torch.tensor([0, 2, 4])), b.gather(torch.tensor([1, 3, 7]))
        torch.testing.assert_close(env0.mc_returns, torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]))
        torch.testing.assert_close(env1.mc_returns, torch.tensor([4 + 0.5 * 8, 8.0, -math.inf]))


def test_mc_returns_of_an_episode_longer_than_the_ring_cover_the_steps_it_kept():
    buffer = ReplayBuffer(5, 1, (1,), (1,), gamma=0.5, mc_returns=True)
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    for t, r in enumerate(rewards):
        obs = np.full((1, 1), float(t), np.float32)
        last = t == len(rewards) - 1
        buffer.add(obs, np.zeros((1, 1)), np.array([r]), obs + 1, np.array([last]), np.array([False]), obs + 1)
    kept = torch.nonzero(buffer.valid[:, 0]).flatten()
    batch = buffer.gather(kept)
    steps = batch.obs[:, 0].long().tolist()
    expected = discounted_returns_to_go(np.array(rewards), np.array([7]), 0.5)[steps]
    assert sorted(steps) == [4, 5, 6], "a 5-slot ring keeps the last 3 (the final obs and the next start take 2)"
    torch.testing.assert_close(batch.mc_returns, torch.as_tensor(expected))


# --- the loss terms against hand-computed values -------------------------------------------------------------------


def test_cal_ql_bounds_only_the_policy_samples_from_below():
    q_policy = torch.tensor([[[1.0, -3.0], [0.0, 5.0]]])  # one critic, two states, two samples
    bound = torch.tensor([-1.0, float("-inf")])  # the second state's episode is still running: no bound
    torch.testing.assert_close(calibrated_values(q_policy, bound), torch.tensor([[[1.0, -1.0], [0.0, 5.0]]]))
    spaces = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (1,))
    algo = CalQL(CalQLConfig(dataset="unused", hidden_sizes=[8], n_action_samples=2), *spaces)
    q = torch.tensor([[[-5.0, -4.0, -3.0, 0.0, -6.0, 2.0], [-5.0, -5.0, -5.0, -5.0, -5.0, -5.0]]])  # 2 uniform, 4 pi
    values = algo.penalized_values(q, Batch(mc_returns=torch.tensor([-2.0, -4.0])))
    expected = torch.tensor([[[-5.0, -4.0, -2.0, 0.0, -2.0, 2.0], [-5.0, -5.0, -4.0, -4.0, -4.0, -4.0]]])
    torch.testing.assert_close(values, expected)
    assert algo._below_bound is not None and algo._below_bound.item() == pytest.approx(6 / 8)


def test_spot_density_terms_match_hand_computed_values():
    mean, std = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.5]])
    # KL per latent dim: 0 and -1/2 (1 + 2 log 0.5 - 1 - 0.25); averaged over the two dims
    kl = -0.5 * (1 + 2 * math.log(0.5) - 1 - 0.25) / 2
    assert gaussian_kl_to_standard_normal(mean, std).item() == pytest.approx(kl)
    reconstructed = torch.tensor([[[0.0], [1.0]]])  # two latent samples of a one-dim action
    elbo = vae_negative_elbo(reconstructed, torch.tensor([[[0.5]]]), mean, std, kl_weight=0.5)
    assert elbo.item() == pytest.approx((0.25 + 0.25) / 2 + 0.5 * kl)
    # importance sampling, two samples: log mean_j N(a; dec_j, s_d) N(z_j; 0, I) / N(z_j; mean, std)
    latents = torch.tensor([[[0.5, 1.0], [-1.0, 2.0]]])
    normal = torch.distributions.Normal
    log_w = [
        normal(reconstructed[0, j], 0.25).log_prob(torch.tensor([0.5])).sum()
        + normal(0.0, 1.0).log_prob(latents[0, j]).sum()
        - normal(mean[0], std[0]).log_prob(latents[0, j]).sum()
        for j in range(2)
    ]
    expected = torch.logsumexp(torch.stack(log_w), 0) - math.log(2)
    estimate = vae_importance_weighted_log_likelihood(torch.tensor([[0.5]]), reconstructed, latents, mean, std, 0.25)
    assert estimate.item() == pytest.approx(expected.item(), rel=1e-5)


def test_spot_pretrains_its_vae_then_freezes_it_and_penalizes_the_actor_with_it(datasets):
    loop = _loop("spot", datasets["medium"], {"vae_steps": 20, "vae_hidden_sizes": [16], "batch_size": 32})
    algo, history = loop.algo, {}
    actor, vae = params_of_module(algo.net), params_of_module(algo.vae)
    for _ in range(20):
        loop._update(loop.offline_source, history)
    assert params_of_module(algo.net) == actor and params_of_module(algo.vae) != vae, "VAE steps train the VAE only"
    vae = params_of_module(algo.vae)
    for _ in range(4):
        loop._update(loop.offline_source, history)
    assert params_of_module(algo.net) != actor and params_of_module(algo.vae) == vae, "then TD3 steps, VAE frozen"
    # the actor loss: -Q / mean |Q| + lambda (negative ELBO of pi(s) under the VAE), with the same latent draws
    batch = loop.offline_source.sample(32, torch.Generator().manual_seed(0))
    state = algo.generator.get_state()
    with torch.no_grad():
        loss = algo.actor_loss(batch)
        algo.generator.set_state(state)
        pi = algo.net(batch.obs)
        q = algo.critic(batch.obs, pi, members=1)
        reconstructed, _, mean, std = algo.vae(batch.obs, pi, 1, algo.generator)
        density = vae_negative_elbo(reconstructed, pi.unsqueeze(1), mean, std, 0.5).mean()
    assert loss.item() == pytest.approx((-q.mean() / q.abs().mean() + 1.0 * density).item(), rel=1e-5)
    loop.close()


def test_prdc_targets_are_the_actions_of_the_nearest_dataset_points():
    obs, actions = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[-1.0], [0.0], [1.0]])
    # beta 2: points (0, -1), (2, 0), (4, 1); the key (2 * 1.2, 1.0) is nearest (2, 0)
    nearest = NearestActions(obs, actions, beta=2.0)
    torch.testing.assert_close(
        nearest(torch.tensor([[1.2], [0.1]]), torch.tensor([[1.0], [1.0]])), torch.tensor([[0.0], [-1.0]])
    )
    # beta 1: points (0, -1), (1, 0), (2, 1); the key (1.2, 1.0) is nearest (2, 1): states matter less
    nearest = NearestActions(obs, actions, beta=1.0)
    torch.testing.assert_close(nearest(torch.tensor([[1.2]]), torch.tensor([[1.0]])), torch.tensor([[1.0]]))
    # a diverged actor's NaN action is looked up (as 0), for the loop's divergence check to stop the run: scipy
    # raised on the non-finite query before
    torch.testing.assert_close(nearest(torch.tensor([[0.9]]), torch.tensor([[float("nan")]])), torch.tensor([[0.0]]))


def test_prdc_actor_loss_regularizes_towards_nearest_dataset_actions(datasets):
    loop = _loop("prdc", datasets["medium"], {"policy_delay": 1})
    algo = loop.algo
    batch = loop.offline_source.sample(64, torch.Generator().manual_seed(0))
    data_obs, data_actions = dataset_transitions(load_dataset(datasets["medium"]), (1,), loop.obs_norm)
    with torch.no_grad():
        loss = algo.actor_loss(batch)
        pi = algo.net(batch.obs)
        q = algo.critic(batch.obs, pi, members=1)
        # brute force over the dataset: argmin_i |(2 s, pi(s)) - (2 s_i, a_i)|
        distances = torch.cdist(torch.cat([2.0 * batch.obs, pi], -1), torch.cat([2.0 * data_obs, data_actions], -1))
        target = data_actions[distances.argmin(1)]
    assert not torch.equal(target, batch.actions)
    expected = -td3_bc_lambda(q, 2.5) * q.mean() + (pi - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loop.close()


# --- learning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "overrides"),
    [
        ("prdc", {"lr": 1e-3, "bc_alpha": 5.0}),  # seeds 1-3 reach 85 by 2-3.5k steps (alpha 2.5: 1 in 3 by 6k)
        (
            "spot",
            {
                "vae_steps": 1000,
                "vae_hidden_sizes": [64, 64],
                "vae_lr": 3e-3,
                "lr": 1e-3,
                "actor_lr": 1e-3,
                "spot_lambda": 3.0,
            },
        ),
    ],
)
def test_spot_and_prdc_learn_pendulum_from_a_medium_dataset(datasets, tmp_path, algo, overrides):
    """SPOT's budget includes its 1000 VAE steps (seeds 1-3 reach 85 by 2.5k steps in all)."""
    _train_until(algo, datasets["medium"], 85.0, 6000, tmp_path, overrides)


def test_cal_ql_keeps_policy_values_above_the_mc_lower_bound_where_cql_does_not(datasets):
    """The calibration at work: the same run (same data, seed and settings; gamma 0.9 and tau 0.05 so that Q
    settles within 400 steps) with and without it. CQL pushes Q(s, a ~ pi) below the data's Monte-Carlo value
    for most states; Cal-QL stops the push at that value."""
    settings = {"gamma": 0.9, "tau": 0.05, "lr": 1e-3, "cql_alpha": 5.0, "backup_entropy": False}
    loops = {
        name: _loop(name, datasets["medium"], {**settings, "log_every": 400, "batch_size": 64, "n_action_samples": 4})
        for name in ("cal_ql", "cql")
    }
    batch = loops["cal_ql"].offline_source.sample(2048, torch.Generator().manual_seed(0))  # with mc_returns
    below = {}
    for name, loop in loops.items():
        loop.iterate()
        with torch.no_grad():
            actions, _ = loop.algo.net.sample(batch.obs, torch.Generator().manual_seed(1))
            q_pi = loop.algo.critic(batch.obs, actions)  # [2 critics, B]
        below[name] = (q_pi < batch.mc_returns).float().mean().item()
        loop.close()
    assert below["cal_ql"] < 0.4 and below["cql"] > 0.6 and below["cal_ql"] < 0.5 * below["cql"], below


# --- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "steps", "online_steps", "extra"),
    [
        # 600 gradient steps, the VAE's 500 first: the checkpoint at 450 is before the VAE -> TD3 boundary
        ("spot", 600, None, {"vae_steps": 500, "vae_hidden_sizes": [16], "batch_size": 32}),
        # 200 offline steps, then 300 online: the checkpoint at 300 is 100 steps into an online episode, whose
        # returns-to-go are computed when it ends after the resume
        ("cal_ql", 200, 300, {"save_buffer": True, "n_action_samples": 2, "batch_size": 32}),
    ],
)
def test_resumed_run_equals_uninterrupted_run(datasets, tmp_path, algo, steps, online_steps, extra):
    cfg = {**SMALL_NETS, "log_every": 150 if online_steps is None else 100, "eval_every": 0, "checkpoint_every": 0}
    cfg.update(threads=1, eval_episodes=1)  # bit-exact whatever the load (threads=auto may change the count)
    kwargs = dict(
        dataset=datasets["medium"],
        steps=steps,
        online_steps=online_steps,
        seed=3,
        overrides={**cfg, **extra},
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    stop = 450 if online_steps is None else 300
    full, part, resumed = resumed_and_full_runs(algo, stop, **kwargs)
    assert part.steps == stop
    # everything else too: critics, the VAE, optimizers, and (Cal-QL) the replay buffer's returns-to-go
    (full_tensors, *_), (resumed_tensors, *_) = load_checkpoint(full.dir), load_checkpoint(resumed.dir)
    assert full_tensors.keys() == resumed_tensors.keys()
    own_state = "buffer/mc_returns" if algo == "cal_ql" else "vae/"
    assert any(key.startswith(own_state) for key in full_tensors), f"{own_state} is missing from the checkpoint"
    assert_same_params(full_tensors, resumed_tensors)


def test_bad_settings_are_clear_errors(datasets, tmp_path):
    with pytest.raises(ConfigError, match="vae_steps=2000 must be"):
        pl.train("spot", dataset=datasets["medium"], steps=1000, overrides={"vae_steps": 2000}, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="dc_beta"):
        pl.train("prdc", dataset=datasets["medium"], steps=100, overrides={"dc_beta": 0.0}, runs_dir=tmp_path)
