"""ReBRAC, SAC-N and EDAC: their loss terms by hand, the dataset's next actions in replay batches, learning (ReBRAC),
the ensembles' mechanisms (SAC-N, EDAC) and exact resume."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from policylab.algos.edac import SACN, EDACConfig, member_action_gradients
from policylab.data import Batch, ReplayBuffer
from policylab.data.sources import BatchSource
from policylab.objectives.offline import ensemble_gradient_similarity, rebrac_actor_loss, rebrac_target
from tests.helpers import resumed_and_full_runs
from tests.test_offline import SMALL_NETS, _loop, _train_until

# --- the loss terms against hand-computed values -------------------------------------------------------------


def test_rebrac_actor_loss_sums_the_bc_error_over_action_dims_and_scales_the_ensemble_minimum():
    pi = torch.tensor([[0.5, -0.5], [0.0, 1.0]], requires_grad=True)
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # squared errors summed: 0.5 and 1.0
    q = torch.tensor([[2.0, -4.0], [3.0, -6.0]], requires_grad=True)  # minimum over 2 critics: [2, -6]
    # lambda = 1 / mean(|2|, |-6|) = 0.25: mean(0.1 * 0.5 - 0.25 * 2, 0.1 * 1.0 + 0.25 * 6)
    loss = rebrac_actor_loss(pi, data, q, bc_coef=0.1)
    assert loss.item() == pytest.approx((0.05 - 0.5 + 0.1 + 1.5) / 2)
    loss.backward()
    # lambda is held constant: dL/dQ is -lambda / B at each state's minimum, 0 elsewhere
    torch.testing.assert_close(q.grad, torch.tensor([[-0.125, 0.0], [0.0, -0.125]]))
    torch.testing.assert_close(pi.grad, 0.1 * 2 * (pi - data).detach() / 2)
    assert rebrac_actor_loss(pi, data, q, 0.1, normalize_q=False).item() == pytest.approx((0.05 - 2 + 0.1 + 6) / 2)


def test_rebrac_target_subtracts_the_bc_penalty_of_the_next_action_and_stops_at_terminals():
    rewards, discounts = torch.tensor([1.0, 2.0]), torch.tensor([0.9, 0.9])
    terminated = torch.tensor([False, True])
    next_q = torch.tensor([[5.0, 3.0], [4.0, 7.0]])  # min over critics [4, 3]
    next_actions = torch.tensor([[0.5, 0.0], [1.0, -1.0]])
    data_next_actions = torch.zeros(2, 2)  # penalties 0.25 and 2.0
    y = rebrac_target(rewards, discounts, terminated, next_q, next_actions, data_next_actions, bc_coef=2.0)
    torch.testing.assert_close(y, torch.tensor([1 + 0.9 * (4 - 2 * 0.25), 2.0]))


def test_ensemble_gradient_similarity_is_the_mean_pairwise_cosine_over_k_minus_one():
    grads = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 1.0]],  # member 0 at states 0 and 1
            [[0.0, 2.0], [2.0, 2.0]],
            [[-3.0, 0.0], [3.0, 3.0]],
        ]
    )
    # state 0: cos(0, 1) = 0, cos(0, 2) = -1, cos(1, 2) = 0, every pair twice: -2 / (3 - 1) = -1
    # state 1: all parallel, 6 ordered pairs of cosine 1: 6 / 2 = 3; mean over states 1
    assert ensemble_gradient_similarity(grads).item() == pytest.approx(1.0, abs=1e-6)
    assert ensemble_gradient_similarity(grads[:, :1]).item() == pytest.approx(-1.0, abs=1e-6)


def test_member_action_gradients_are_each_critics_own_in_one_call():
    torch.manual_seed(0)
    algo = _synthetic_edac(n_critics=4, eta=1.0)
    obs, actions = torch.randn(8, 4), torch.rand(8, 3) * 2 - 1
    q, grads = member_action_gradients(algo.critic, obs, actions)
    torch.testing.assert_close(q, algo.critic(obs, actions).detach())
    for k in range(4):
        a = actions.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(algo.critic(obs, a)[k].sum(), a)
        torch.testing.assert_close(grads[k], expected)


# --- the dataset's next actions in replay batches ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_step", "index", "expected"), [(1, [0, 1, 2, 3, 6, 7, 8], [1, 2, 3, 4, 11, 12, 13]), (3, [0, 1, 6], [3, 4, 13])]
)
def test_gather_gives_the_datasets_next_action_within_episodes(n_step, index, expected):
    lengths = np.array([5, 4])  # episode 0 on slots 0-4 (final obs on 5), episode 1 on slots 6-9 (final obs on 10)
    actions = np.array([0, 1, 2, 3, 4, 10, 11, 12, 13], np.float32)[:, None]
    buffer = ReplayBuffer(30, 1, (1,), (1,), n_step=n_step, next_actions=True)
    buffer.add_episodes(np.zeros((11, 1), np.float32), actions, np.zeros(9), np.zeros(9, bool), lengths)
    batch = buffer.gather(torch.tensor(index))
    torch.testing.assert_close(batch.next_actions[:, 0], torch.tensor(expected, dtype=torch.float32))
    plain = ReplayBuffer(30, 1, (1,), (1,), n_step=n_step)
    plain.add_episodes(np.zeros((11, 1), np.float32), actions, np.zeros(9), np.zeros(9, bool), lengths)
    assert "next_actions" not in plain.gather(torch.tensor(index))


def test_online_replay_and_mixed_batches_carry_next_actions():
    online = ReplayBuffer(40, 2, (1,), (1,), next_actions=True)
    for t in range(6):  # env e takes action 10 e + t at step t
        actions = np.array([[t], [10 + t]], np.float32)
        online.add(np.zeros((2, 1)), actions, np.zeros(2), np.zeros((2, 1)), np.zeros(2, bool), np.zeros(2, bool))
    batch = online.sample(64, torch.Generator().manual_seed(0))
    pending = batch.actions[:, 0] % 10 == 5  # the last step's next action is not written yet
    torch.testing.assert_close(batch.next_actions[~pending], batch.actions[~pending] + 1)
    dataset = ReplayBuffer(40, 1, (1,), (1,), next_actions=True)
    dataset.add_episodes(np.zeros((6, 1)), np.full((5, 1), -1.0), np.zeros(5), np.zeros(5, bool), np.array([5]))
    mixed = BatchSource(online, dataset, 0.5).sample(32, torch.Generator().manual_seed(0))
    assert mixed.next_actions.shape == (32, 1)
    # dataset rows first: -1 within the episode, the final-obs slot's zeros after its last step
    assert set(mixed.next_actions[:16, 0].tolist()) <= {-1.0, 0.0}
    online_rows, pending = mixed.actions[16:], mixed.actions[16:, 0] % 10 == 5
    torch.testing.assert_close(mixed.next_actions[16:][~pending], online_rows[~pending] + 1)


# --- ReBRAC ---------------------------------------------------------------------------------------------------


def test_rebrac_update_uses_the_datasets_next_actions_and_the_critics_minimum(datasets):
    overrides = {"target_noise": 0.0, "actor_bc_coef": 0.3, "critic_bc_coef": 0.7, "batch_size": 32}
    loop = _loop("rebrac", datasets["medium"], overrides)
    algo = loop.algo
    assert not algo.fused and algo.critic.body.layer_norm and not algo.net.body.layer_norm
    batch = loop.offline_source.sample(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        next_pi = algo.actor_target(batch.next_obs)
        next_value = algo.critic_target(batch.next_obs, next_pi).min(0).values
        next_value -= 0.7 * (next_pi - batch.next_actions).pow(2).sum(-1)
        expected_target = batch.rewards + batch.discounts * (~batch.terminated) * next_value
        torch.testing.assert_close(algo.td_target(batch), expected_target)
        pi = algo.net(batch.obs)
        q_min = algo.critic(batch.obs, pi).min(0).values
        bc = (pi - batch.actions).pow(2).sum(-1)
        expected_actor = (0.3 * bc - q_min / q_min.abs().mean()).mean()
        assert algo.actor_loss(batch).item() == pytest.approx(expected_actor.item(), rel=1e-5)
    stale = Batch(**{k: v for k, v in batch.items()})
    stale.next_actions = -batch.next_actions
    assert not torch.allclose(algo.td_target(stale), expected_target)
    loop.close()


def test_rebrac_learns_pendulum_from_the_medium_dataset(datasets, tmp_path):
    """CORL's coefficients (1.0, 1.0) and lr; 64x64 nets and batch 256 instead of 3x256 and 1024 (test time)."""
    _train_until("rebrac", datasets["medium"], 85.0, 6000, tmp_path, {"batch_size": 256})


# --- SAC-N and EDAC: the ensembles' mechanisms --------------------------------------------------------------


def test_sac_n_with_more_critics_values_random_actions_lower_than_dataset_actions(datasets):
    """Pessimism from the ensemble: after 300 steps on expert data, min_k Q_k(s, a_data) - min_k Q_k(s, a_uniform)
    is much larger with N = 10 than with N = 2, the same run otherwise (measured: 0.24 and 0.02, Q about -0.5)."""
    gaps = {}
    for n in (2, 10):
        loop = _loop("sac_n", datasets["expert"], {"n_critics": n, "log_every": 300, "batch_size": 64})
        loop.iterate()
        batch = loop.offline_source.sample(1024, torch.Generator().manual_seed(0))
        uniform = torch.rand(batch.actions.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            q_data = loop.algo.critic(batch.obs, batch.actions).min(0).values.mean()
            q_uniform = loop.algo.critic(batch.obs, uniform).min(0).values.mean()
        gaps[n] = float(q_data - q_uniform)
        loop.close()
    assert gaps[10] > 0.1 and gaps[10] > 4 * max(gaps[2], 0.02), gaps


@pytest.fixture
def one_thread():
    """Updates outside a training loop (which picks its own thread count): one thread, as the loop would on a
    busy 2-core machine (two threads there run several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic_edac(n_critics: int, eta: float) -> SACN:
    cfg = EDACConfig(hidden_sizes=[64, 64], n_critics=n_critics, eta=eta, batch_size=64, seed=0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    return SACN(cfg, obs_space, gym.spaces.Box(-1.0, 1.0, (3,), np.float32))


def _synthetic_batches(count: int, size: int) -> list[Batch]:
    """A narrow behaviour policy on 3-D actions (EDAC's term is degenerate for 1-D ones: a cosine is +-1)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)
    obs = torch.randn(count * size, 4, generator=g)
    actions = (0.5 * torch.tanh(obs @ weight) + 0.05 * torch.randn(count * size, 3, generator=g)).clamp(-1, 1)
    rewards = -(actions - 0.3).pow(2).sum(-1)
    next_obs = torch.randn(count * size, 4, generator=g)
    return [
        Batch(
            obs=obs[i : i + size],
            actions=actions[i : i + size],
            rewards=rewards[i : i + size],
            next_obs=next_obs[i : i + size],
            terminated=torch.zeros(size, dtype=torch.bool),
            discounts=torch.full((size,), 0.9),
        )
        for i in range(0, count * size, size)
    ]


def test_edac_term_spreads_the_critics_action_gradients_apart(one_thread):
    """After 100 steps on the same batches, the members' action gradients at the data are much less aligned with
    eta = 1 than with eta = 0, SAC-N (measured: ES -1.2 and 2.5, of at most N = 5)."""
    batches = _synthetic_batches(100, 64)
    similarity = {}
    for eta in (0.0, 1.0):
        torch.manual_seed(0)
        algo = _synthetic_edac(n_critics=5, eta=eta)
        for index, batch in enumerate(batches):
            algo.update(batch, index)
        _, grads = member_action_gradients(algo.critic, batches[0].obs, batches[0].actions)
        similarity[eta] = ensemble_gradient_similarity(grads).item()
    assert similarity[1.0] < similarity[0.0] - 1.0 and similarity[1.0] < 0.5, similarity


# --- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "extra"),
    [("rebrac", {"batch_size": 64}), ("edac", {"n_critics": 3, "batch_size": 64})],
)
def test_resumed_run_equals_uninterrupted_run(datasets, tmp_path, algo, extra):
    cfg = {**SMALL_NETS, "log_every": 100, "eval_every": 0, "eval_episodes": 1, "checkpoint_every": 0, **extra}
    kwargs = dict(
        dataset=datasets["medium"], steps=300, seed=3, overrides=cfg, preset="none", runs_dir=tmp_path, verbose=False
    )
    resumed_and_full_runs(algo, 100, **kwargs)
