"""The command line: user mistakes end in one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from policylab.cli import main


def _error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    assert captured.err.startswith("error: ")
    return captured.err


def test_unknown_algorithm_suggests_close_match(capsys, tmp_path):
    err = _error(capsys, ["train", "ppoo", "--env", "CartPole-v1", "--runs-dir", str(tmp_path)])
    assert "unknown algorithm 'ppoo'" in err and "Did you mean: ppo" in err


def test_unknown_env_suggests_close_match(capsys, tmp_path):
    err = _error(capsys, ["train", "ppo", "--env", "CartPol-v1", "--runs-dir", str(tmp_path)])
    assert "unknown environment 'CartPol-v1'" in err and "CartPole-v1" in err
    assert not any(tmp_path.iterdir()), "nothing is written for a failed start"


def test_unsupported_action_space_names_the_space(capsys, tmp_path):
    err = _error(capsys, ["train", "ppo", "--env", "tests.envs_for_tests:TupleActionEnv", "--runs-dir", str(tmp_path)])
    assert "cannot handle the action space Tuple" in err and "fix:" in err


def test_bad_set_value_and_unknown_key(capsys, tmp_path):
    err = _error(capsys, ["train", "ppo", "--env", "CartPole-v1", "--set", "lr=fast", "--runs-dir", str(tmp_path)])
    assert "bad value for 'lr'" in err and "fix: lr expects a number (e.g. 3e-4)" in err
    err = _error(capsys, ["train", "ppo", "--env", "CartPole-v1", "--set", "lrr=1e-3", "--runs-dir", str(tmp_path)])
    assert "unknown config key 'lrr'" in err and "Did you mean: lr" in err and "valid keys" in err
    err = _error(capsys, ["train", "ppo", "--set", "gamma=1.5", "--runs-dir", str(tmp_path)])
    assert "gamma=1.5 is outside [0, 1]" in err


def test_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nnum_envs: [8\n")
    err = _error(capsys, ["train", "ppo", "--config", str(bad), "--runs-dir", str(tmp_path / "runs")])
    assert "not valid YAML" in err and "line" in err


def test_missing_checkpoint_for_eval_and_resume(capsys, tmp_path):
    err = _error(capsys, ["eval", str(tmp_path / "nope")])
    assert "does not exist" in err
    err = _error(capsys, ["train", "ppo", "--resume", str(tmp_path / "nope")])
    assert "does not exist" in err


def test_debug_flag_shows_the_traceback(tmp_path):
    from policylab.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "ppoo", "--runs-dir", str(tmp_path)])


def test_running_out_of_memory_is_one_error_naming_the_sizes(capsys, tmp_path):
    """A failed allocation (torch's allocator refusing a 1e9-wide layer here) was a traceback; other runtime
    errors still are (they are bugs), and --debug shows this one's."""
    argv = ["train", "ppo", "--env", "CartPole-v1", "--steps", "64", "--runs-dir", str(tmp_path)]
    err = _error(capsys, [*argv, "--set", "hidden_sizes=[1000000000]"])
    assert "error: out of memory:" in err and "can't allocate memory" in err
    assert "fix: use smaller sizes (hidden_sizes, buffer_size" in err and not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        main(["--debug", *argv, "--set", "hidden_sizes=[1000000000]"])


def test_yaml_config_set_and_preset_resolution(capsys, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("lr: 0.002\nnum_envs: 8\nn_steps: 16\nbatch_size: 64\neval_every: 0\neval_episodes: 2\n")
    code = main(
        [
            "train",
            "ppo",
            "--env",
            "CartPole-v1",
            "--steps",
            "1k",
            "--seed",
            "1",
            "--config",
            str(cfg),
            "--set",
            "num_envs=4",
            "--set",
            "epochs=1",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "using the tuned ppo preset for CartPole-v1" in out and "run directory:" in out
    import yaml

    saved = yaml.safe_load((tmp_path / "runs" / "ppo-CartPole-v1-s1" / "config.yaml").read_text())
    # preset (gamma 0.98) < YAML (lr, n_steps) < --set (num_envs, epochs) < flags (steps, seed); --steps 1000 is
    # saved as the run takes it, in whole rollouts of 16 x 4 steps
    assert saved["gamma"] == 0.98 and saved["lr"] == 0.002 and saved["n_steps"] == 16
    assert saved["num_envs"] == 4 and saved["epochs"] == 1 and saved["steps"] == 1024 and saved["seed"] == 1


def test_preset_none_opts_out(capsys, tmp_path):
    code = main(
        [
            "train",
            "ppo",
            "--env",
            "CartPole-v1",
            "--steps",
            "256",
            "--preset",
            "none",
            "--set",
            "n_steps=32",
            "--set",
            "eval_episodes=1",
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "using the tuned" not in out


def test_list_shows_algorithms_and_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ppo", "a2c", "reinforce", "iql", "td3_bc", "offline-to-online", "CartPole-v1", "InvertedPendulum-v5"):
        assert name in out


def test_bad_env_kwargs_and_bad_list_value_are_clear_errors(capsys, tmp_path):
    err = _error(
        capsys, ["train", "ppo", "--env", "CartPole-v1", "--set", "env_kwargs={foo: 1}", "--runs-dir", str(tmp_path)]
    )
    assert "cannot create 'CartPole-v1' with the given env_kwargs" in err
    err = _error(capsys, ["train", "ppo", "--set", "hidden_sizes=[32,", "--runs-dir", str(tmp_path)])
    assert "bad value for 'hidden_sizes'" in err
    assert not any(tmp_path.iterdir()), "a failed start leaves no run directory"


def test_env_kwargs_reach_the_numpy_vectorized_cartpole(tmp_path):
    import policylab as pl

    run = pl.train(
        "ppo",
        env="CartPole-v1",
        steps=256,
        overrides={
            "env_kwargs": {"max_episode_steps": 10},
            "n_steps": 32,
            "num_envs": 8,
            "batch_size": 256,
            "eval_episodes": 2,
        },
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    assert run.final_eval["length_mean"] <= 10


def test_list_shows_each_presets_budget(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich's table width: one line per algorithm
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1 (30k)" in out and "Pendulum-v1 (20k)" in out and "HalfCheetah-v5 (1M)" in out


def test_list_in_an_80_column_terminal_cuts_nothing_off(capsys, monkeypatch):
    """The table needs about 103 columns: narrower, each algorithm is a wrapped paragraph, every preset whole."""
    from policylab.algos import ALGORITHMS
    from policylab.config import format_count
    from policylab.presets import presets_for

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and not any(line.endswith(" ") for line in lines)
    names = {spec.name for spec in ALGORITHMS.values()}  # a paragraph's continuation lines are indented
    assert all(line.startswith("    ") for line in lines if line.split(" ")[0] not in names)
    assert "1 D4RL dataset kinds" not in out and "e.g. hopper-medium" in out  # singular; names not cut at "-"
    text = " ".join(out.split())  # the wrapped lines joined again
    for spec in ALGORITHMS.values():
        assert f"{spec.name} ({spec.kind}; " in text and spec.summary in text
        for env, budget in presets_for(spec.name).items():
            assert f"{env} ({format_count(budget)})" in text, (spec.name, env)


def test_a_budget_too_short_for_a_presets_warm_up_gets_a_note():
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    _, notes = resolve_config(get_algo("td3"), env="Pendulum-v1", steps="15k")
    assert any("5,000 env steps of learning after learning_starts=10,000" in n and "--steps 20k" in n for n in notes)
    for algo, env, steps in (
        ("td3", "Pendulum-v1", "20k"),
        ("sac", "Pendulum-v1", "15k"),
        ("ppo", "CartPole-v1", "5k"),
    ):
        _, notes = resolve_config(get_algo(algo), env=env, steps=steps)  # the budget; a short warm-up; on-policy
        assert not any("env steps of learning after learning_starts" in n for n in notes)


def test_the_short_budget_note_names_the_preset_used_and_skips_dataset_phases(tmp_path):
    """A preset named by --preset is the one the note names; an offline phase (gradient steps on a dataset, no
    random warm-up) gets no learning_starts note, a hybrid run mixing the dataset into batches does."""
    from policylab.algos import get_algo
    from policylab.collect import collect
    from policylab.train import resolve_config

    _, notes = resolve_config(get_algo("td3"), env="MountainCarContinuous-v0", preset="Pendulum-v1", steps="15k")
    assert any("the td3 preset for Pendulum-v1 is tuned for 20,000 steps" in n for n in notes)
    data = collect("Pendulum-v1", "random", episodes=1, out=tmp_path / "pend", ref_episodes=1).path
    warm_up = "env steps of learning after learning_starts"
    for extra in ({}, {"online_steps": 1000}):  # offline, offline then online
        _, notes = resolve_config(get_algo("sac"), dataset=data, steps=200, overrides=extra)
        assert not any(warm_up in n for n in notes), notes
    _, notes = resolve_config(get_algo("sac"), dataset=data, steps=200, overrides={"offline_ratio": 0.5})
    assert any(warm_up in n for n in notes)
