"""Decision Transformer: the replay buffer's windows, the network's causality, acting on a context against the
network on the same window, AdamW against torch's, learning (and asking for a return), exact resume, refusals."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos.dt import DT, DTConfig
from policylab.collect import collect
from policylab.data import Batch
from policylab.data.dataset import concat_datasets, load_dataset, write_dataset
from policylab.data.replay import ReplayBuffer
from policylab.errors import ConfigError, PolicylabError
from policylab.nets.transformer import DecisionTransformer
from policylab.optim import Adam
from tests.helpers import resumed_and_full_runs, train_until

TINY = {"embed_dim": 32, "n_layers": 1, "context_length": 5, "warmup_steps": 10, "lr": 1e-3, "log_every": 100}


def _two_episodes(sequence_length: int = 4) -> ReplayBuffer:
    """Episodes of 3 and 2 steps: observation = step number + 10 * episode, reward = 1 + step."""
    buffer = ReplayBuffer(20, 1, (1,), (1,), mc_returns=True, gamma=1.0, sequence_length=sequence_length)
    obs = np.array([[0], [1], [2], [3], [10], [11], [12]], np.float32)  # each episode's T + 1 observations
    actions = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]], np.float32)
    rewards = np.array([1.0, 2.0, 3.0, 1.0, 2.0], np.float32)
    buffer.add_episodes(obs, actions, rewards, np.array([0, 0, 1, 0, 1], bool), np.array([3, 2]))
    return buffer


def test_windows_hold_an_episodes_steps_from_the_sampled_one_on_and_zeros_after_its_end():
    buffer = _two_episodes()
    batch = buffer.windows(torch.tensor([1, 4]), 4)  # step 1 of episode 0; step 0 of episode 1 (slot 4)
    np.testing.assert_array_equal(batch.obs[..., 0].numpy(), [[1, 2, 0, 0], [10, 11, 0, 0]])
    np.testing.assert_allclose(batch.actions[..., 0].numpy(), [[0.2, 0.3, 0, 0], [0.4, 0.5, 0, 0]])
    np.testing.assert_array_equal(batch.returns.numpy(), [[5, 3, 0, 0], [3, 2, 0, 0]])  # sums of the rewards ahead
    np.testing.assert_array_equal(batch.timesteps.numpy(), [[1, 2, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(batch.mask.numpy(), [[1, 1, 0, 0], [1, 1, 0, 0]])
    drawn = buffer.sample(64, torch.Generator().manual_seed(0))
    assert drawn.obs.shape == (64, 4, 1) and bool((drawn.mask[:, 0] == 1).all())  # never a window of padding


def test_windows_of_steps_added_online_carry_their_timesteps():
    buffer = ReplayBuffer(40, 2, (1,), (1,), mc_returns=True, gamma=1.0, sequence_length=3)
    obs = np.zeros((2, 1), np.float32)
    for t in range(4):  # env 0's episode ends after step 1 (terminated), env 1's runs on
        end = np.array([t == 1, False])
        next_obs = np.full((2, 1), t + 1, np.float32)
        buffer.add(obs, np.full((2, 1), t, np.float32), np.ones(2, np.float32), next_obs, end, np.zeros(2, bool))
        obs = np.where(end[:, None], np.float32(-1), next_obs)
    first = buffer.windows(torch.tensor([0, 1]), 3)  # slot 0 of envs 0 and 1
    np.testing.assert_array_equal(first.timesteps.numpy(), [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(first.returns[0].numpy(), [2, 1, 0])  # env 0's ended episode: returns known
    np.testing.assert_array_equal(first.mask.numpy(), [[1, 1, 0], [0, 0, 0]])  # env 1's runs on: no returns yet
    assert float(first.returns[1].abs().sum()) == 0.0
    buffer.add(obs, np.zeros((2, 1), np.float32), np.ones(2, np.float32), obs, np.ones(2, bool), np.zeros(2, bool))
    ended = buffer.windows(torch.tensor([1, 3 * 2 + 0]), 3)  # env 1's first step; env 0's second episode (slot 3)
    np.testing.assert_array_equal(ended.timesteps.numpy(), [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(ended.returns.numpy(), [[5, 4, 3], [3, 2, 1]])


def _tiny_net(discrete: bool = False, context: int = 4, seed: int = 0) -> DecisionTransformer:
    torch.manual_seed(seed)
    low, high = (None, None) if discrete else (-torch.ones(2), torch.ones(2))
    return DecisionTransformer(3, 0 if discrete else 2, 3 if discrete else 0, low, high, context=context,
                               embed_dim=16, layers=2, heads=2, dropout=0.0, max_timestep=50)  # fmt: skip


def _window(net: DecisionTransformer, b: int = 2, k: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, k, 3, generator=g)
    actions = torch.randint(3, (b, k), generator=g) if net.discrete else torch.rand(b, k, 2, generator=g) * 2 - 1
    returns = torch.randn(b, k, generator=g)
    timesteps = torch.arange(k).expand(b, k).clone()
    return obs, actions, returns, timesteps


def _reference(net: DecisionTransformer, obs, actions, returns, timesteps) -> torch.Tensor:
    """The network written out plainly: every block's output at every token, attention by its definition."""
    b, k = returns.shape
    time = net.embed_timestep(timesteps)
    tokens = [net.embed_return(returns[..., None]) + time, net.embed_obs(obs) + time, net.embed_action(actions) + time]
    x = net.embed_norm(torch.stack(tokens, 2).reshape(b, 3 * k, -1))
    causal = torch.ones(3 * k, 3 * k, dtype=torch.bool).tril()
    for block in net.blocks:
        h = block.ln1(x)
        n_heads = block.attn.heads
        q, key, v = (t.reshape(b, 3 * k, n_heads, -1).transpose(1, 2) for t in block.attn.qkv(h).chunk(3, -1))
        scores = (q @ key.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + block.attn.proj(y.transpose(1, 2).reshape(b, 3 * k, -1))
        x = x + block.mlp(block.ln2(x))
    return torch.tanh(net.head(net.out_norm(x[:, 1::3])))


def test_the_network_is_the_transformer_written_out_on_every_token():
    """The last block computes the observation tokens' outputs only: the same as computing all of them."""
    net = _tiny_net()
    window = _window(net, b=3, k=4)
    torch.testing.assert_close(net(*window), _reference(net, *window), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("discrete", [False, True])
def test_each_prediction_reads_the_steps_before_it_and_its_own_observation_and_return_only(discrete):
    net = _tiny_net(discrete)
    obs, actions, returns, timesteps = _window(net)
    base = net(obs, actions, returns, timesteps)
    changed_actions = actions.clone()
    changed_actions[:, 2] = (actions[:, 2] + 1) % 3 if discrete else -actions[:, 2]
    other = net(obs, changed_actions, returns, timesteps)
    torch.testing.assert_close(other[:, :3], base[:, :3])  # a_2 is not seen by the predictions of steps 0..2
    assert not torch.allclose(other[:, 3], base[:, 3])  # ... but by step 3's
    later = obs.clone()
    later[:, 3] += 1.0
    torch.testing.assert_close(net(later, actions, returns, timesteps)[:, :3], base[:, :3])
    wanted = returns.clone()
    wanted[:, 1] += 1.0
    assert not torch.allclose(net(obs, actions, wanted, timesteps)[:, 1], base[:, 1])  # its own return counts


@pytest.mark.parametrize("discrete", [False, True])
def test_acting_equals_the_network_on_the_window_of_the_last_k_steps(discrete):
    """Two envs step 7 times (past the context of 4); at each step, act's action equals the network's prediction at
    the last position of the window of the env's last (up to) 4 steps, returns lowered by the rewards observed."""
    k = 4
    net = _tiny_net(discrete, context=k)
    net.target_return, net.reward_scale = 10.0, 0.5
    g = torch.Generator().manual_seed(3)
    history: dict[str, list[torch.Tensor]] = {"obs": [], "actions": [], "returns": [], "timesteps": []}
    wanted = torch.full((2,), 10.0 * 0.5)
    with torch.inference_mode():
        for t in range(7):
            obs = torch.randn(2, 3, generator=g)
            action = net.act(obs)
            history["obs"].append(obs)
            history["returns"].append(wanted.clone())
            history["timesteps"].append(torch.full((2,), t))
            window = {key: torch.stack(values[-k:], 1) for key, values in history.items() if values}
            taken = torch.zeros_like(action)
            start = max(0, t + 1 - k)
            actions = torch.stack([*history["actions"][start:], taken], 1)
            expected = net(window["obs"], actions, window["returns"], window["timesteps"])[:, -1]
            expected = expected.argmax(-1) if discrete else expected
            torch.testing.assert_close(action, expected)
            history["actions"].append(action)
            rewards = torch.randn(2, generator=g)
            net.observe_rewards(rewards.numpy())
            wanted -= rewards * 0.5


def test_reset_memory_starts_one_envs_context_over():
    net = _tiny_net(context=3)
    net.target_return = 2.0
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for _ in range(4):
            net.act(torch.randn(2, 3, generator=g))
            net.observe_rewards(np.array([1.0, 1.0]))
        net.reset_memory(np.array([True, False]))
        obs = torch.randn(2, 3, generator=g)
        both = net.act(obs)
        fresh = _tiny_net(context=3)
        fresh.target_return = 2.0
        torch.testing.assert_close(both[0], fresh.act(obs[:1])[0])  # env 0: as at an episode's first step


def test_decoupled_weight_decay_is_torch_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(50))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = Adam([ours], lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(50, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-7)


def test_the_loss_is_the_masked_mean_squared_error_over_the_episodes_steps():
    cfg = DTConfig(dataset="d", **{k: v for k, v in TINY.items() if k != "log_every"}, dropout=0.0)
    algo = DT(cfg, gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Box(-2, 2, (2,), np.float32))
    obs, actions, returns, timesteps = _window(algo.net, b=2, k=5)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = Batch(obs=obs, actions=actions, returns=returns, timesteps=timesteps, mask=mask)
    predicted = algo.net(obs, actions, returns, timesteps)
    squared = (predicted - actions).pow(2)
    expected = (squared[0, :3].sum() + squared[1].sum()) / (8 * 2)  # 8 steps of 2 action dimensions
    torch.testing.assert_close(algo.loss(batch), expected)


def test_dt_learns_cartpole_from_an_epsilon_greedy_expert(datasets, tmp_path):
    run, evaluations = train_until(
        475.0, "dt", dataset=datasets["cartpole"], steps=1500, seed=1, runs_dir=tmp_path,
        overrides={**TINY, "eval_every": 250, "eval_episodes": 5},
    )  # fmt: skip
    assert evaluations and evaluations[-1][1] >= 475.0, evaluations


def test_dt_asks_for_a_return_and_gets_what_it_asks_for(datasets, tmp_path):
    """CartPole episodes of the epsilon-greedy expert (returns 150-500) and of a policy that always pushes left
    (about 9): one trained policy asked for the best return in the data balances the pole; asked for 9, it acts as
    the left-pusher did. reward_scale 0.01 puts the returns to go between 0 and 5."""
    left = collect("CartPole-v1", lambda obs: np.zeros(len(obs), np.int64), 10, seed=3, ref_max_score=500.0)
    mixed = concat_datasets([load_dataset(datasets["cartpole"]), left])
    path = write_dataset(mixed, tmp_path / "cartpole-mixed")
    overrides = {**TINY, "eval_every": 0, "eval_episodes": 1, "threads": 1, "reward_scale": 0.01}  # returns 0-5
    run = pl.train("dt", dataset=path, steps=600, seed=0, runs_dir=tmp_path, verbose=False, overrides=overrides)
    policy = pl.load(run.dir)
    assert policy.target_return == 500.0  # the best episode return of the data
    high = pl.evaluate(policy, episodes=5, seed=5)["return_mean"]
    policy.target_return = 9.0
    low = pl.evaluate(policy, episodes=5, seed=5)["return_mean"]
    assert high >= 400.0 and low <= 20.0, (high, low)


def test_a_resumed_dt_run_matches_an_uninterrupted_one(datasets, tmp_path):
    resumed_and_full_runs(
        "dt", 200, dataset=datasets["cartpole"], steps=400, seed=3, runs_dir=tmp_path, verbose=False,
        overrides={**TINY, "eval_every": 0, "checkpoint_every": 100, "eval_episodes": 1},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"online_steps": 100}, "takes no online_steps"),
        ({"offline_ratio": 0.5}, "takes no offline_ratio"),
        ({"n_step": 3}, "takes no n_step"),
        ({"embed_dim": 30, "n_heads": 4}, "not a multiple of n_heads"),
        ({"dropout": 1.0}, "dropout=1.0 is outside"),
    ],
)
def test_settings_dt_cannot_take_are_refused(datasets, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        pl.train("dt", dataset=datasets["cartpole"], steps=10, runs_dir=tmp_path, verbose=False, overrides=overrides)


def test_ope_refuses_a_dt_policy_and_other_policies_take_no_target_return(datasets, tmp_path):
    run = pl.train("dt", dataset=datasets["cartpole"], steps=20, runs_dir=tmp_path, verbose=False,
                   overrides={**TINY, "eval_every": 0, "eval_episodes": 1})  # fmt: skip
    with pytest.raises(PolicylabError, match="depend on the episode so far"):
        pl.ope.evaluate_policy(datasets["cartpole"], run.dir)
    bc = pl.train("bc", dataset=datasets["cartpole"], steps=20, runs_dir=tmp_path, verbose=False,
                  overrides={"eval_every": 0, "eval_episodes": 1})  # fmt: skip
    with pytest.raises(PolicylabError, match="not conditioned on a return"):
        pl.load(bc.dir).target_return = 5.0
    assert pl.load(bc.dir).target_return is None
