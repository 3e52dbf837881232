"""The off-policy loop: exact resume with the buffer saved, documented refill without it, checkpoint
contents, loading policies, action scaling, errors, and the update-to-data accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos import get_algo
from policylab.checkpoint import load_checkpoint
from policylab.errors import ConfigError, EnvError
from policylab.train import OffPolicyLoop, resolve_config

TINY = {
    "hidden_sizes": [32, 32],
    "learning_starts": 64,
    "batch_size": 32,
    "log_every": 100,
    "eval_every": 0,
    "eval_episodes": 2,
    "checkpoint_every": 0,
    "threads": 1,  # bit-for-bit results whatever else runs (threads=auto follows the machine's load)
}
CASES = [
    ("sac", "Pendulum-v1", {}),
    ("sac", "Pendulum-v1", {"normalize_obs": True}),
    ("td3", "Pendulum-v1", {"anneal_lr": True}),
    ("ddpg", "Pendulum-v1", {}),
    ("tqc", "Pendulum-v1", {"n_quantiles": 5}),
    # the renormalizations' warmup ends after the stop: their step counts must come back from the checkpoint
    ("crossq", "Pendulum-v1", {"critic_hidden_sizes": [32, 32], "renorm_warmup": 300}),
    ("dqn", "CartPole-v1", {"target_update_interval": 50, "double_q": True, "dueling": True, "n_step": 3}),
    ("dqn", "CartPole-v1", {"prioritized": True, "num_envs": 2, "anneal_lr": True}),
    ("sac_discrete", "CartPole-v1", {"num_envs": 2, "train_freq": 2, "gradient_steps": 3}),
    ("sac", "Pendulum-v1", {"use_sde": True, "train_freq": 7, "sde_sample_freq": 3}),  # stops inside a collection
]


def _checkpoint_tensors(run_dir) -> dict[str, torch.Tensor]:
    tensors, _, _ = load_checkpoint(run_dir)
    return {k: v for k, v in tensors.items() if not k.startswith(("buffer/", "env/"))}


def _stop_at(step: int):
    return lambda info: info.step < step


@pytest.mark.parametrize(("algo", "env", "extra"), CASES)
def test_resume_with_the_buffer_saved_equals_an_uninterrupted_run(tmp_path, algo, env, extra):
    overrides = {**TINY, **extra, "save_buffer": True}
    kwargs = dict(env=env, steps=600, seed=2, overrides=overrides, preset="none", runs_dir=tmp_path, verbose=False)
    full = pl.train(algo, name="full", **kwargs)
    part = pl.train(algo, name="part", callback=_stop_at(300), **kwargs)
    assert part.interrupted and part.steps == 300
    resumed = pl.train(algo, resume=part.dir, verbose=False)
    assert resumed.steps == full.steps == 600
    a, b = _checkpoint_tensors(full.dir), _checkpoint_tensors(resumed.dir)
    assert a.keys() == b.keys() and any(k.startswith("critic") or k.startswith("q_target") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    assert resumed.final_eval == full.final_eval


def test_resume_without_the_buffer_refills_it_first_and_says_so(tmp_path):
    kwargs = dict(env="Pendulum-v1", steps=600, seed=2, overrides=TINY, preset="none", runs_dir=tmp_path)
    part = pl.train("sac", callback=_stop_at(300), verbose=False, **kwargs)
    tensors, state, _ = load_checkpoint(part.dir)
    assert state["buffer"] is None and not any(k.startswith("buffer/") for k in tensors)
    spec = get_algo("sac")
    cfg, _ = resolve_config(spec, "Pendulum-v1", 600, 2, overrides=TINY, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    notes = loop.load_state(tensors, state)
    assert any("replay buffer was not saved" in n for n in notes)
    assert len(loop.buffer) == 0 and loop.updates_after == 300 + 64
    updates_before = loop.updates
    loop.iterate()  # steps 300..400: 64 steps of refill, then updates resume
    assert loop.step == 400 and loop.updates == updates_before + (400 - 364)
    loop.close()
    resumed = pl.train("sac", resume=part.dir, verbose=False)
    assert resumed.steps == 600 and resumed.final_eval is not None


def test_buffer_in_checkpoint_holds_only_the_written_slots(tmp_path):
    run = pl.train(
        "sac",
        env="Pendulum-v1",
        steps=200,
        seed=0,
        overrides={**TINY, "save_buffer": True, "buffer_size": 1_000_000},
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    tensors, state, _ = load_checkpoint(run.dir)
    assert tensors["buffer/obs"].shape[0] == 202  # 200 steps, 1 final obs, 1 pending obs: not the 1M capacity
    assert state["buffer"]["transitions_added"] == 200


@pytest.mark.parametrize(("algo", "env", "extra"), CASES[:5])
def test_loaded_policy_acts_inside_the_env_bounds(tmp_path, algo, env, extra):
    run = pl.train(
        algo, env=env, steps=200, seed=0, overrides={**TINY, **extra}, preset="none", runs_dir=tmp_path, verbose=False
    )
    policy = pl.load(run.dir)
    obs = np.stack([policy.observation_space.sample() for _ in range(16)])
    for deterministic in (True, False):
        actions = policy.act(obs, deterministic=deterministic)
        assert len(actions) == 16 and all(policy.action_space.contains(a) for a in actions)


def test_box_actions_are_scaled_to_the_env_bounds(tmp_path):
    # Pendulum's torque bounds are [-2, 2]: the buffer holds [-1, 1], the env gets twice that
    spec = get_algo("td3")
    cfg, _ = resolve_config(spec, "Pendulum-v1", 1000, 0, overrides=TINY, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    loop.iterate()
    stored = loop.buffer.actions[: loop.buffer.filled, 0]
    assert stored.abs().max() <= 1.0 and stored.abs().max() > 0.9
    np.testing.assert_allclose(loop.algo.to_env(np.array([[0.5]], np.float32)), [[1.0]])
    loop.close()


def test_update_to_data_ratio(tmp_path):
    spec = get_algo("sac")
    overrides = {**TINY, "num_envs": 2, "train_freq": 3, "gradient_steps": 2, "log_every": 60, "learning_starts": 0}
    cfg, _ = resolve_config(spec, "Pendulum-v1", 120, 0, overrides=overrides, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    metrics = loop.iterate()
    # 30 vector steps of 2 envs; an update of 2 gradient steps after every 3rd vector step
    assert loop.step == 60 and loop.updates == 10 * 2 and metrics["updates"] == 20
    loop.close()


def test_evaluations_and_checkpoints_happen_at_the_steps_asked_for_not_at_the_next_log(tmp_path):
    """An iteration ends at the next multiple of log_every, eval_every or checkpoint_every: eval_every=100 with
    log_every=250 evaluated at 250 and 500 only (the log's multiples); with 3 envs, at the first vector step
    reaching each multiple."""
    overrides = {**TINY, "num_envs": 3, "log_every": 250, "eval_every": 100, "checkpoint_every": 150,
                 "learning_starts": 50, "eval_episodes": 1}  # fmt: skip
    run = pl.train("sac", env="Pendulum-v1", steps=500, preset="none", runs_dir=tmp_path, verbose=False,
                   overrides=overrides)  # fmt: skip
    evaluated = [int(row.split(",")[0]) for row in (run.dir / "eval.csv").read_text().splitlines()[1:]]
    assert evaluated == [102, 201, 300, 402, 501]
    logged = [int(row.split(",")[0]) for row in (run.dir / "train.csv").read_text().splitlines()[1:]]
    assert logged == [102, 150, 201, 252, 300, 402, 450, 501]


def test_wrong_action_space_and_unsupported_options_are_clear_errors(tmp_path):
    with pytest.raises(EnvError, match="Discrete action space"):
        pl.train("dqn", env="Pendulum-v1", steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(EnvError, match="continuous"):
        pl.train("sac", env="CartPole-v1", steps=100, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="normalize_reward"):
        pl.train("td3", env="Pendulum-v1", steps=100, overrides={"normalize_reward": True}, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="gradient_steps"):
        pl.train("sac", env="Pendulum-v1", steps=100, overrides={"gradient_steps": 0}, runs_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "a failed start leaves no run directory"


def test_sac_command_line_uses_the_preset(tmp_path):
    spec = get_algo("sac")
    cfg, notes = resolve_config(spec, "Pendulum-v1", "15k", 1)
    assert cfg.lr == 1e-3 and cfg.steps == 15_000 and any("preset" in n for n in notes)


def test_dqn_epsilon_greedy_draws_the_greedy_action_and_uniform_random_ones():
    spec = get_algo("dqn")
    cfg, _ = resolve_config(spec, "CartPole-v1", 1000, 0, overrides={**TINY, "num_envs": 4}, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    algo = loop.algo
    obs = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    with torch.no_grad():
        greedy = algo.net(torch.from_numpy(obs))[0].argmax(-1).numpy()
    final = cfg.exploration_fraction  # progress from which epsilon is eps_final
    algo.cfg.eps_final = 0.0
    for _ in range(20):  # epsilon 0: always greedy
        np.testing.assert_array_equal(algo.explore(obs, final), greedy)
    algo.cfg.eps_final = 1.0  # epsilon 1: uniform over both actions, whatever the greedy one
    drawn = np.stack([algo.explore(obs, final) for _ in range(2000)])
    assert set(np.unique(drawn)) == {0, 1}
    assert abs(drawn.mean() - 0.5) < 0.02  # 8000 fair draws: std 0.0056
    algo.cfg.eps_final = 0.3  # P(not greedy) = eps / 2 with 2 actions
    drawn = np.stack([algo.explore(obs, final) for _ in range(2000)])
    assert abs((drawn != greedy).mean() - 0.15) < 0.02  # std 0.004
    loop.close()


def test_anneal_lr_decays_every_learning_rate_linearly_to_zero(tmp_path):
    overrides = {**TINY, "anneal_lr": True, "lr": 1e-3}
    kwargs = dict(env="Pendulum-v1", steps=600, seed=1, overrides=overrides, preset="none", runs_dir=tmp_path)
    part = pl.train("sac", callback=_stop_at(200), verbose=False, **kwargs)
    _, state, _ = load_checkpoint(part.dir)
    lrs = {name: opt["param_groups"][0]["lr"] for name, opt in state["optimizers"].items()}
    assert set(lrs) == {"actor", "critic", "temperature"}
    # the last update burst before the stop ran at step 200 of 600: 1e-3 * (1 - 200 / 600)
    assert lrs == pytest.approx({name: 1e-3 * 2 / 3 for name in lrs}, rel=1e-12)
    _, state, _ = load_checkpoint(pl.train("sac", resume=part.dir, verbose=False).dir)
    assert all(opt["param_groups"][0]["lr"] == 0.0 for opt in state["optimizers"].values())


def test_online_observation_normalization_keeps_raw_replay_and_normalizes_batches_when_drawn():
    spec = get_algo("sac")
    cfg, _ = resolve_config(spec, "Pendulum-v1", 1000, 0, overrides={**TINY, "normalize_obs": True}, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    loop.iterate()  # 100 env steps
    norm = loop.obs_norm
    assert norm is not None and norm.rms.count == pytest.approx(101, abs=1e-3), "the reset obs and one per step"
    pending = loop.buffer.obs[int(loop.buffer.ptr[0]), 0].numpy()
    np.testing.assert_array_equal(pending, loop.obs[0])  # the replay holds raw observations
    raw = loop.buffer.sample(8, torch.Generator().manual_seed(0)).obs
    np.testing.assert_allclose(loop._normalized(raw).numpy(), norm(raw.numpy()), rtol=1e-5, atol=1e-6)
    policy = loop.policy()
    np.testing.assert_allclose(policy.obs_normalizer.rms.mean, norm.rms.mean)
    loop.close()
