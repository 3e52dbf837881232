"""The Python API: pl.train, pl.load(dir).act on single and batched observations, eval and video."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

import policylab as pl
from policylab.cli import main
from policylab.errors import PolicylabError, cli_wording, python_wording

SMALL = {"n_steps": 16, "num_envs": 2, "batch_size": 32, "epochs": 1, "eval_every": 0, "eval_episodes": 2}


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    return pl.train(
        "ppo",
        env="CartPole-v1",
        steps=512,
        seed=0,
        overrides=SMALL,
        preset="none",
        runs_dir=tmp_path_factory.mktemp("runs"),
        verbose=False,
    )


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    return pl.train(
        "ppo",
        env="Pendulum-v1",
        steps=256,
        seed=0,
        overrides={**SMALL, "normalize_obs": True},
        preset="none",
        runs_dir=tmp_path_factory.mktemp("runs"),
        verbose=False,
    )


def test_run_directory_layout(cartpole_run):
    names = {p.name for p in cartpole_run.dir.iterdir()}
    assert {"config.yaml", "train.csv", "eval.csv", "eval.json", "checkpoints"} <= names
    assert cartpole_run.dir.name == "ppo-CartPole-v1-s0"


def test_act_on_plain_gymnasium_observations_discrete(cartpole_run):
    policy = pl.load(cartpole_run.dir)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    action = policy.act(obs, deterministic=True)
    assert isinstance(action, int) and env.action_space.contains(action)
    env.step(action)
    batch = np.stack([obs, obs, obs])
    actions = policy.act(batch)
    assert actions.shape == (3,) and all(a == action for a in actions)


def test_act_on_plain_gymnasium_observations_continuous_with_normalization(pendulum_run):
    policy = pl.load(pendulum_run.dir)
    assert policy.obs_normalizer is not None and policy.obs_normalizer.rms.count > 100
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    action = policy.act(obs)
    assert action.shape == (1,) and env.action_space.contains(action)
    env.step(action)
    assert policy.act(np.stack([obs] * 5)).shape == (5, 1)
    sampled = policy.act(obs, deterministic=False)
    assert env.action_space.contains(sampled)
    assert repr(policy).startswith("Policy(algo='ppo', env='Pendulum-v1', observation_space=Box(")
    assert repr(policy).endswith("action_space=Box(-2.0, 2.0, (1,), float32), observations normalized)")


def test_wrong_observation_shape_is_a_clear_error(cartpole_run):
    with pytest.raises(PolicylabError, match="does not match the policy's observation shape"):
        pl.load(cartpole_run.dir).act(np.zeros(3))


def test_eval_command(capsys, cartpole_run):
    assert main(["eval", str(cartpole_run.dir), "--episodes", "3"]) == 0
    assert "over 3 episodes" in capsys.readouterr().out
    assert main(["eval", str(cartpole_run.dir), "--episodes", "1"]) == 0
    assert "over 1 episode," in capsys.readouterr().out


def test_eval_command_max_envs_reaches_evaluate(capsys, cartpole_run, monkeypatch):
    asked: list[int] = []
    real = pl.policy.evaluate

    def recorded(*args, **kwargs):
        asked.append(kwargs["max_envs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pl.policy, "evaluate", recorded)
    assert main(["eval", str(cartpole_run.dir), "--episodes", "3"]) == 0
    assert main(["eval", str(cartpole_run.dir), "--episodes", "3", "--max-envs", "2"]) == 0
    assert asked == [16, 2] and "over 3 episodes" in capsys.readouterr().out
    for bad in ("0", "-1"):  # evaluate's rule, refused before the policy loads
        assert main(["eval", "no-such-run", "--max-envs", bad]) == 2
        err = capsys.readouterr().err
        assert f"--max-envs {bad}: at least one env" in err and "fix: pass --max-envs 1 or more" in err


def test_eval_command_evaluates_in_another_env_or_with_other_env_kwargs(capsys, cartpole_run, monkeypatch):
    """`--env` and `--env-kwargs` reach evaluate (the API had env_id / env_kwargs; the CLI had neither)."""
    asked: list[tuple] = []
    real = pl.policy.evaluate

    def recorded(*args, **kwargs):
        asked.append(args[3:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(pl.policy, "evaluate", recorded)
    argv = ["eval", str(cartpole_run.dir), "--episodes", "2"]
    assert main([*argv, "--env", "CartPole-v1", "--env-kwargs", "{max_episode_steps: 20}"]) == 0
    assert asked == [("CartPole-v1", {"max_episode_steps": 20})]
    assert "mean length 20.0" in capsys.readouterr().out  # the shorter episodes of the kwargs
    assert main([*argv, "--env", "Pendulum-v1"]) == 2
    assert "trained on CartPole-v1 and cannot act in Pendulum-v1" in capsys.readouterr().err
    for bad in ("[1, 2]", "{a: [1"):
        assert main([*argv, "--env-kwargs", bad]) == 2
        assert "fix: write a mapping, e.g. --env-kwargs '{gravity: 5.0}'" in capsys.readouterr().err
    assert main([*argv, "--env", "CartPole-v1", "--video", "x.gif"]) == 2
    assert "--video records the run's own env" in capsys.readouterr().err


def test_eval_video(capsys, cartpole_run, tmp_path):
    out = tmp_path / "cartpole.gif"
    assert main(["eval", str(cartpole_run.dir), "--episodes", "1", "--video", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 1000


def test_evaluate_counts_each_episode_once(cartpole_run):
    result = pl.evaluate(pl.load(cartpole_run.dir), episodes=5, seed=1)
    assert result["episodes"] == 5 and len(result["returns"]) == 5
    result = pl.evaluate(pl.load(cartpole_run.dir), episodes=20, seed=1, max_envs=3)  # 7 + 7 + 6 episodes
    assert result["episodes"] == 20
    with pytest.raises(PolicylabError, match="at least one episode"):
        pl.evaluate(pl.load(cartpole_run.dir), episodes=0, seed=1)


def test_tensorboard_sink_writes_event_files(tmp_path):
    run = pl.train(
        "ppo",
        env="CartPole-v1",
        steps=128,
        seed=0,
        overrides={**SMALL, "tensorboard": True},
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    events = list((run.dir / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_async_envs_train_and_resume_says_episodes_restart(tmp_path):
    overrides = {**SMALL, "vectorization": "async"}
    part = pl.train(
        "ppo",
        env="CartPole-v1",
        steps=128,
        seed=0,
        overrides=overrides,
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
        callback=lambda info: False,
    )
    assert part.interrupted
    resumed = pl.train("ppo", resume=part.dir, verbose=False)
    assert resumed.steps == 128 and any("not bit-exact" in note for note in resumed.notes)


def test_csv_log_adds_columns_for_new_keys(tmp_path):
    from policylab.logging import CsvLog, read_csv

    log = CsvLog(tmp_path / "m.csv")
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.25, "early_stop_epoch": 3})
    log.write({"step": 3, "loss": 0.125})
    log.close()
    rows = read_csv(tmp_path / "m.csv")
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[1]["early_stop_epoch"] == 3.0 and np.isnan(rows[0]["early_stop_epoch"])


def test_progress_lines_off_a_terminal_are_the_ten_marks(capsys):
    from policylab.logging import Progress

    bar = Progress(10_240, "ppo CartPole-v1", enabled=None)  # pytest's stdout is not a terminal
    for step in range(512, 10_241, 512):
        bar.update(step, 1000.0, -0.04)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ppo CartPole-v1: 10,240 steps"
    marks = [int(line.split("/")[0].replace(",", "")) for line in lines[1:]]
    assert marks == [1024 * k for k in range(1, 11)]  # 3,072 included: tenths are counted in integers
    assert all(line.endswith("return 0.0") for line in lines[1:])  # not "-0.0"


def test_numbers_are_printed_without_a_negative_zero():
    from policylab.logging import fixed

    assert [fixed(-0.0), fixed(-0.04), fixed(-0.004, 2), fixed(-0.06), fixed(2.25, 2)] == [
        "0.0",
        "0.0",
        "0.00",
        "-0.1",
        "2.25",
    ]


def test_eval_video_on_an_env_that_cannot_render_is_one_clear_error(capsys, tmp_path):
    run = pl.train(
        "dqn", env="BitFlipping-v0", steps=64, seed=0, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={"learning_starts": 32, "eval_every": 0, "eval_episodes": 1, "num_envs": 1},
    )  # fmt: skip
    out = tmp_path / "out.gif"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium's render-mode UserWarning stays out of the output
        assert main(["eval", str(run.dir), "--episodes", "1", "--video", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'BitFlipping-v0' cannot render frames (it has no rgb_array render mode)" in err
    assert err.count("fix:") == 1 and "fix: run eval without --video" in err and "env_kwargs" not in err
    assert not out.exists()


def test_eval_video_into_a_new_folder_makes_it(capsys, cartpole_run, tmp_path):
    out = tmp_path / "videos" / "new" / "cartpole.gif"
    assert main(["eval", str(cartpole_run.dir), "--episodes", "1", "--video", str(out)]) == 0
    assert out.stat().st_size > 1000 and f"video: {out}" in capsys.readouterr().out


def test_seeds_are_checked_up_front_and_evaluate_takes_a_run_directory(capsys, cartpole_run, tmp_path):
    """A negative seed is one error naming the rule (it was Gymnasium's traceback from inside the env), in train,
    eval and pl.evaluate; pl.evaluate loads a run directory itself, with the CLI's defaults."""
    assert main(["train", "ppo", "--env", "CartPole-v1", "--steps", "2k", "--seed", "-1", "--runs-dir",
                 str(tmp_path)]) == 2  # fmt: skip
    assert "seed=-1: a seed is a whole number >= 0" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main(["eval", str(cartpole_run.dir), "--seed", "-1"]) == 2
    assert "seed=-1" in capsys.readouterr().err
    result = pl.evaluate(str(cartpole_run.dir), episodes=2)  # a run directory, seed 0 by default
    assert result == pl.evaluate(pl.load(cartpole_run.dir), 2, 0) and result["episodes"] == 2
    with pytest.raises(PolicylabError, match="max_envs=0"):
        pl.evaluate(cartpole_run.dir, 2, max_envs=0)


def test_wrong_types_in_the_python_api_are_clear_errors(cartpole_run, tmp_path):
    """Not TypeError / AttributeError / AssertionError from deep inside: one error naming the argument."""
    latest = pl.load(cartpole_run.dir / "checkpoints" / "latest")  # the pointer file: the checkpoint it names
    assert latest.env_id == "CartPole-v1"
    with pytest.raises(PolicylabError, match="path is a int"):
        pl.load(123)  # type: ignore[arg-type]
    with pytest.raises(PolicylabError, match="device='bogus' is not a device"):
        pl.load(cartpole_run.dir, device="bogus")
    with pytest.raises(PolicylabError, match=r"unknown config key 'lrr' in --set \(overrides\)"):  # both names
        pl.train("ppo", env="CartPole-v1", steps=64, overrides={"lrr": 1}, runs_dir=tmp_path, verbose=False)
    with pytest.raises(PolicylabError, match="overrides is a list: it takes a dict"):
        pl.train("ppo", env="CartPole-v1", steps=64, overrides=[("lr", 1)], runs_dir=tmp_path, verbose=False)  # type: ignore[arg-type]
    with pytest.raises(PolicylabError, match="episodes='abc'"):
        pl.collect("CartPole-v1", episodes="abc")  # type: ignore[arg-type]
    with pytest.raises(PolicylabError, match="trained on CartPole-v1 and cannot act in Pendulum-v1") as info:
        pl.evaluate(cartpole_run.dir, 2, env_id="Pendulum-v1")
    assert info.value.fix == "evaluate it in CartPole-v1 (leave env_id / env out)"  # the Python API's wording
    assert not any(tmp_path.iterdir())


def test_python_wording_turns_the_command_lines_flags_into_the_apis_arguments():
    cases = {
        "use --set device=cpu (or cuda)": "use overrides={'device': 'cpu'} (or cuda)",
        "lower lr (--set lr=3e-05)": "lower lr (overrides={'lr': 3e-05})",
        "--set action_masks=true": "overrides={'action_masks': True}",
        "use e.g. --set hidden_sizes=[64,64]": "use e.g. overrides={'hidden_sizes': [64, 64]}",
        "--set 'env_kwargs={max_episode_steps: 200}'": "overrides={'env_kwargs': {'max_episode_steps': 200}}",
        "drop it (--set a=false --set b=1)": "drop it (overrides={'a': False, 'b': 1})",
        "give a file (--set pairs=FILE)": "give a file (overrides={'pairs': FILE})",
        "pass --steps 100k or more.": "pass steps=100_000 or more.",
        "use the env it was collected in: --env my.mod:Env": "use the env it was collected in: env='my.mod:Env'",
        "pass the demonstrations (--dataset PATH)": "pass the demonstrations (dataset=PATH)",
        "(or leave --env out: collect uses the run's env)": "(or leave env out: collect uses the run's env)",
        "--preset none": "preset='none'",
        "pretrain with `policylab train bc --set head=flow`": "pretrain with `policylab train bc --set head=flow`",
        "(policylab eval runs/x --best, or --set lr=1)": "(policylab eval runs/x --best, or overrides={'lr': 1})",
        "set batch_size to 64": "set batch_size to 64",
    }
    for cli, python in cases.items():
        assert python_wording(cli) == python, cli
        assert python_wording(python) == python, "idempotent"


def test_the_same_error_names_flags_on_the_command_line_and_arguments_in_python(tmp_path, capsys):
    with pytest.raises(PolicylabError) as info:
        pl.train("sac", env="Pendulum-v1", steps=100, overrides={"threads": 0}, runs_dir=tmp_path)
    assert "overrides={'threads': 'auto'}" in info.value.fix and "--set" not in str(info.value)
    with cli_wording():
        assert "--set threads=auto" in info.value.fix  # the same error, as the command line shows it
    assert main(["train", "sac", "--env", "Pendulum-v1", "--set", "threads=0", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fix: use --set threads=auto" in err and "overrides" not in err
    assert info.value.args == (info.value._problem, info.value._fix), "pickles (Ray) with the raw wording"
