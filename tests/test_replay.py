"""Replay buffer: next observations without duplicates, ring wrap-around, n-step targets at episode ends."""

from __future__ import annotations

import pytest
import torch

from policylab.data.replay import ReplayBuffer


class Stream:
    """N fake envs whose observation is (env id, time step); an episode's final obs is (env, t + 0.5)."""

    def __init__(self, num_envs: int) -> None:
        self.n = num_envs
        self.t = torch.zeros(num_envs)
        self.ep_t = torch.zeros(num_envs)

    def obs(self) -> torch.Tensor:
        return torch.stack([torch.arange(self.n, dtype=torch.float32), self.t], 1)

    def step(self, buf: ReplayBuffer, reward: float, terminated: list[bool], truncated: list[bool]) -> None:
        obs = self.obs()
        self.t += 1
        term, trunc = torch.tensor(terminated), torch.tensor(truncated)
        end = term | trunc
        final = self.obs()
        final[:, 1] -= 0.5  # the final obs of an ended episode: (env, t + 0.5)
        self.t[end] += 100.0  # a reset obs far from the previous episode's times
        buf.add(obs, torch.zeros(self.n, 1), torch.full((self.n,), reward), self.obs(), term, trunc, final)


def _all(buf: ReplayBuffer) -> dict[float, dict]:
    """Every stored transition of env 0, keyed by its obs time."""
    idx = torch.nonzero(buf.valid.flatten()).squeeze(1)
    b = buf.gather(idx)
    out = {}
    for i in range(len(idx)):
        if b.obs[i, 0] == 0:
            out[float(b.obs[i, 1])] = {k: b.get(k)[i] for k in ("next_obs", "rewards", "terminated", "discounts")}
    return out


def test_next_obs_inside_an_episode_and_at_truncation_and_termination():
    buf = ReplayBuffer(100, 1, (2,), (1,), gamma=0.9)
    s = Stream(1)
    s.step(buf, 1.0, [False], [False])  # t=0
    s.step(buf, 1.0, [False], [True])  # t=1: truncated, final obs (0, 1.5)
    s.step(buf, 2.0, [True], [False])  # t=102: terminated, final obs (0, 102.5)
    s.step(buf, 3.0, [False], [False])  # t=203: the newest; its next obs is pending
    tr = _all(buf)
    assert sorted(tr) == [0.0, 1.0, 102.0, 203.0] and len(buf) == 4
    assert tr[0.0]["next_obs"].tolist() == [0.0, 1.0] and not tr[0.0]["terminated"]
    assert tr[1.0]["next_obs"].tolist() == [0.0, 1.5] and not tr[1.0]["terminated"]  # bootstrap from the final obs
    assert tr[102.0]["next_obs"].tolist() == [0.0, 102.5] and tr[102.0]["terminated"]
    assert tr[203.0]["next_obs"].tolist() == [0.0, 204.0]
    assert all(float(t["discounts"]) == pytest.approx(0.9) for t in tr.values())


def test_n_step_returns_stop_at_episode_ends_and_at_the_newest_transition():
    buf = ReplayBuffer(100, 1, (2,), (1,), n_step=3, gamma=0.5)
    s = Stream(1)
    for reward, term in ((1.0, False), (2.0, False), (3.0, False), (4.0, True), (5.0, False), (6.0, False)):
        s.step(buf, reward, [term], [False])
    tr = _all(buf)  # times 0, 1, 2, 3 (terminates), then 104, 105
    # 1 + 0.5 * 2 + 0.25 * 3 = 2.75, bootstrapping from obs 3 with discount 0.5^3
    assert float(tr[0.0]["rewards"]) == 2.75 and tr[0.0]["next_obs"].tolist() == [0.0, 3.0]
    assert float(tr[0.0]["discounts"]) == 0.125 and not tr[0.0]["terminated"]
    # 2 + 0.5 * 3 + 0.25 * 4 = 4.5, ending in the termination: terminated, next obs = final obs
    assert float(tr[1.0]["rewards"]) == 4.5 and tr[1.0]["terminated"] and tr[1.0]["next_obs"].tolist() == [0.0, 3.5]
    # 3 + 0.5 * 4 = 5: two steps, then the episode ended
    assert float(tr[2.0]["rewards"]) == 5.0 and float(tr[2.0]["discounts"]) == 0.25 and tr[2.0]["terminated"]
    # the newest transitions only have what has been written: 5 + 0.5 * 6, bootstrapping from the pending obs 106
    assert float(tr[104.0]["rewards"]) == 8.0 and tr[104.0]["next_obs"].tolist() == [0.0, 106.0]
    assert float(tr[105.0]["rewards"]) == 6.0 and float(tr[105.0]["discounts"]) == 0.5


def test_ring_wrap_around_with_several_envs_keeps_every_next_obs_right():
    buf = ReplayBuffer(40, 4, (2,), (1,))
    s = Stream(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ends = (torch.rand(4, generator=g) < 0.15).tolist()
        s.step(buf, 1.0, [False] * 4, ends)
    assert buf.slots == 10 and 0 < len(buf) <= 40
    idx = torch.nonzero(buf.valid.flatten()).squeeze(1)
    b = buf.gather(idx)
    step = b.next_obs[:, 1] - b.obs[:, 1]
    assert torch.equal(b.next_obs[:, 0], b.obs[:, 0])  # the same env
    assert bool(((step == 1.0) | (step == 0.5)).all())  # the next step, or the final obs of the episode
    assert len(buf) >= 4 * 10 - 4 * 10 // 2  # at most one final-obs slot per transition


def test_uniform_sampling_over_stored_transitions_only():
    buf = ReplayBuffer(64, 2, (2,), (1,))
    s = Stream(2)
    for i in range(20):
        s.step(buf, 1.0, [False, False], [i % 5 == 4, False])
    batch = buf.sample(20_000, torch.Generator().manual_seed(0))
    assert bool(buf.valid.view(-1)[batch.indices].all())
    counts = torch.bincount(batch.indices, minlength=buf.slots * 2).float()
    stored = counts[buf.valid.view(-1)]
    assert len(stored) == len(buf) == 40
    expected = 20_000 / 40
    assert float(((stored - expected) ** 2 / expected).sum()) < 80  # chi-square, 39 dof: p > 0.999


def test_a_batch_of_only_the_fields_asked_for_holds_their_values():
    buf = ReplayBuffer(64, 2, (2,), (1,))
    s = Stream(2)
    for i in range(20):
        s.step(buf, float(i), [False, False], [i % 5 == 4, False])
    full = buf.sample(300, torch.Generator().manual_seed(3))
    some = buf.sample(300, torch.Generator().manual_seed(3), fields=("obs", "actions"))
    assert sorted(some.keys()) == ["actions", "indices", "obs"]  # the same draws, two lookups
    for name in ("obs", "actions", "indices"):
        assert torch.equal(getattr(some, name), getattr(full, name))
    assert sorted(buf.sample(8, fields=("obs", "next_obs")).keys()) == sorted(full.keys())  # next_obs: all of them


def test_memory_state_round_trip_and_empty_error():
    buf = ReplayBuffer(32, 2, (3,), (2,))
    # obs 3 floats + action 2 floats + reward + 3 bool flags, per slot; next obs is not stored again
    assert buf.bytes_per_transition == 3 * 4 + 2 * 4 + 4 + 3
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    s = Stream(2)
    for i in range(10):
        s.obs = lambda: torch.zeros(2, 3) + s.t.unsqueeze(1)  # type: ignore[method-assign]
        buf.add(
            s.obs(),
            torch.zeros(2, 2),
            torch.ones(2),
            s.obs() + 1,
            torch.tensor([False, i == 5]),
            torch.zeros(2, dtype=torch.bool),
        )
        s.t += 1
    tensors, meta = buf.state()
    other = ReplayBuffer(32, 2, (3,), (2,))
    other.load({k: v.clone() for k, v in tensors.items()}, meta)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = buf.sample(16, g1), other.sample(16, g2)
    for key in a.keys():
        assert torch.equal(a.get(key), b.get(key)), key


def test_truncation_without_final_obs_is_an_error():
    buf = ReplayBuffer(16, 1, (2,), (1,))
    with pytest.raises(ValueError, match="final observation"):
        buf.add(
            torch.zeros(1, 2),
            torch.zeros(1, 1),
            torch.ones(1),
            torch.zeros(1, 2),
            torch.tensor([False]),
            torch.tensor([True]),
        )


def test_sum_tree_find_and_set_by_hand():
    from policylab.data.sumtree import SumTree

    tree = SumTree(5)  # 8 leaves underneath
    tree.set(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64))
    assert float(tree.total) == 10.0
    masses = torch.tensor([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99], dtype=torch.float64)
    assert tree.find(masses).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    tree.set(torch.tensor([3, 4]), torch.tensor([0.0, 5.0], dtype=torch.float64))  # cumulative: 1, 3, 6, 6, 11
    assert float(tree.total) == 11.0 and tree.find(torch.tensor([6.0, 10.9], dtype=torch.float64)).tolist() == [4, 4]


def test_prioritized_sampling_frequencies_follow_priorities_and_weights_by_hand():
    buf = ReplayBuffer(64, 1, (2,), (1,), prioritized=True, alpha=1.0, beta=0.5, priority_eps=0.0)
    s = Stream(1)
    for i in range(8):
        s.step(buf, 1.0, [False], [i == 3])  # one truncation: a final-obs slot that must never be drawn
    stored = torch.nonzero(buf.valid.view(-1)).squeeze(1)
    assert len(stored) == 8 and torch.allclose(buf.tree.get(stored), torch.ones(8, dtype=torch.float64))
    priorities = torch.arange(1, 9, dtype=torch.float32)  # |delta| = 1..8, alpha 1: p_i = i
    buf.update_priorities(stored, -priorities)
    batch = buf.sample(36_000, torch.Generator().manual_seed(0))
    assert bool(buf.valid.view(-1)[batch.indices].all())
    counts = torch.stack([(batch.indices == i).sum() for i in stored]).double()
    expected = 36_000 * priorities.double() / 36.0
    assert float(((counts - expected) ** 2 / expected).sum()) < 24.3  # chi-square, 7 dof: p > 0.999
    # w_i = (n P(i))^-beta / max_j w_j with n = 8, P(i) = i / 36: the lowest priority has weight 1
    first = stored[0]
    pick = (batch.indices == stored[3]).nonzero()[0, 0]
    assert float(batch.weights[pick]) == pytest.approx((4 / 1) ** -0.5, rel=1e-5)
    assert float(batch.weights[(batch.indices == first).nonzero()[0, 0]]) == pytest.approx(1.0)
    s.step(buf, 1.0, [False], [False])  # a new transition gets the highest priority seen so far
    assert float(buf.tree.get(stored[-1] + 1)) == 8.0
    tensors, meta = buf.state()
    other = ReplayBuffer(64, 1, (2,), (1,), prioritized=True, alpha=1.0, beta=0.5, priority_eps=0.0)
    other.load({k: v.clone() for k, v in tensors.items()}, meta)
    assert torch.equal(other.tree.tree, buf.tree.tree) and other.max_priority == 8.0


@pytest.mark.parametrize("discrete", [False, True])
def test_the_one_env_path_writes_what_the_general_path_writes(discrete):
    """`add` for one env on the CPU takes scalar indices (`_add_one`); over a ring that wraps several times, with
    terminations and truncations, every stored tensor, the fill and the batches equal the general path's."""
    import numpy as np

    action_shape = () if discrete else (2,)
    action_dtype = torch.long if discrete else torch.float32
    fast = ReplayBuffer(7, 1, (3,), action_shape, action_dtype=action_dtype)
    general = ReplayBuffer(7, 1, (3,), action_shape, action_dtype=action_dtype)
    general.single = False
    assert fast.single
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(1, 3)).astype(np.float32)
    for _ in range(40):
        actions = rng.integers(0, 4, size=(1,)) if discrete else rng.normal(size=(1, 2)).astype(np.float32)
        reward = rng.normal(size=(1,)).astype(np.float32)
        next_obs = rng.normal(size=(1, 3)).astype(np.float32)
        event = rng.integers(0, 4)  # 0: terminated, 1: truncated, else running
        terminated, truncated = np.array([event == 0]), np.array([event == 1])
        final = rng.normal(size=(1, 3)).astype(np.float32) if event < 2 else None
        for buffer in (fast, general):
            buffer.add(obs, actions, reward, next_obs, terminated, truncated, final)
        obs = next_obs
    for name, tensor in general._tensors.items():
        assert torch.equal(fast._tensors[name], tensor), name
    assert (fast.filled, fast.transitions_added) == (general.filled, general.transitions_added)
    a, b = (buffer.sample(16, torch.Generator().manual_seed(1)) for buffer in (fast, general))
    for field in ("obs", "actions", "rewards", "next_obs", "terminated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(ValueError, match="a truncated episode needs its final observation"):
        fast.add(obs, actions, reward, obs, np.array([False]), np.array([True]))
