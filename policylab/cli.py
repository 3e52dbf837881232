"""The `policylab` command: train, eval, plot, list, collect, dataset here; llm, ope, report, certify and sweep
register their own subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from policylab.certify import add_certify_parser
from policylab.errors import PolicylabError, cli_wording
from policylab.llm.cli import add_llm_parser
from policylab.ope.cli import add_ope_parser
from policylab.report import add_report_parser
from policylab.sweep import add_sweep_parser


def _train(args: argparse.Namespace) -> int:
    from policylab.config import parse_set_args
    from policylab.train import train

    if args.algo is None and args.resume is None:
        raise PolicylabError("no algorithm given", "write e.g. `policylab train ppo --env CartPole-v1`")
    run = train(
        args.algo or "",
        env=args.env,
        steps=args.steps,
        seed=args.seed,
        dataset=args.dataset,
        online_steps=args.online_steps,
        config=args.config,
        overrides=parse_set_args(args.set) or None,
        preset=args.preset,
        resume=args.resume,
        name=args.name,
        runs_dir=args.runs_dir,
        progress=False if args.no_progress else None,
    )
    return 130 if run.interrupted else 0


def _eval(args: argparse.Namespace) -> int:
    from policylab.logging import fixed
    from policylab.policy import evaluate, load, record_video

    if args.max_envs < 1:  # evaluate's rule, checked before the policy loads, its fix naming the flag
        raise PolicylabError(f"--max-envs {args.max_envs}: at least one env is needed", "pass --max-envs 1 or more")
    env_kwargs = _env_kwargs(args.env_kwargs)
    if args.video and (args.env or env_kwargs is not None):
        raise PolicylabError("--video records the run's own env, not --env / --env-kwargs", "drop one of the two")
    policy = load(args.run, which="best" if args.best else "final")
    if args.target_return is not None:
        policy.target_return = args.target_return
    deterministic = args.deterministic or (policy.eval_deterministic and not args.stochastic)
    result = evaluate(
        policy, args.episodes, args.seed, args.env, env_kwargs, deterministic=deterministic, max_envs=args.max_envs
    )
    score = policy.normalized_score(result["return_mean"]) if args.env is None else None  # refs: the run's env
    if score is not None:
        result["score"] = score
    print(
        f"{args.env or policy.env_id}: return {fixed(result['return_mean'], 2)} +/- {fixed(result['return_std'], 2)} "
        f"(min {fixed(result['return_min'])}, max {fixed(result['return_max'])}) over {result['episodes']} "
        f"episode{'s' if result['episodes'] != 1 else ''}, "
        f"mean length {result['length_mean']:.1f}" + (f", normalized score {fixed(score)}" if score is not None else "")
    )
    if args.json:
        print(json.dumps(result))
    if args.video:
        path = record_video(policy, args.video, episodes=1, seed=args.seed)
        print(f"video: {path}")
    return 0


def _env_kwargs(text: str | None) -> dict[str, Any] | None:
    """`--env-kwargs '{gravity: 5.0}'` (YAML, as `--set env_kwargs=...` takes it) as a dict; None when not given."""
    if text is None:
        return None
    import yaml

    fix = "write a mapping, e.g. --env-kwargs '{gravity: 5.0}'"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicylabError(f"--env-kwargs {text!r} is not YAML: {exc}", fix) from None
    if not isinstance(value, dict):
        raise PolicylabError(f"--env-kwargs {text!r} is not a mapping of keyword arguments", fix)
    return value


def _plot(args: argparse.Namespace) -> int:
    from policylab.plot import plot_runs

    notes: list[str] = []
    out = plot_runs([Path(p) for p in args.runs], Path(args.out), metric=args.metric, notes=notes)
    for note in notes:
        print(f"note: {note}")
    print(f"plot: {out}")
    return 0


def _list(_args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    from policylab.algos import ALGORITHMS
    from policylab.config import format_count
    from policylab.presets import DATASET_PRESETS, presets_for

    rows = []
    for spec in ALGORITHMS.values():
        tuned = [f"{env} ({format_count(budget)})" for env, budget in presets_for(spec.name).items()]
        if kinds := DATASET_PRESETS.get(spec.name):
            tuned.append(
                f"{len(kinds)} D4RL dataset kind{'s' if len(kinds) != 1 else ''} (CORL's), e.g. {sorted(kinds)[0]}"
            )
        rows.append((spec.name, spec.kind, spec.regimes, spec.summary, ", ".join(tuned)))
    table = Table(title="policylab algorithms")
    for col in ("algorithm", "kind", "regimes", "what"):
        table.add_column(col)
    table.add_column("tuned presets (--env) and their budgets", min_width=28)  # one preset per line fits
    for name, kind, regimes, summary, presets in rows:
        table.add_row(name, kind, "\n".join(regimes), summary, presets)
    console = Console()
    if Measurement.get(console, console.options.update_width(10_000), table).minimum <= console.width:
        console.print(table)
        return 0

    def paragraph(text: str, first: str = "") -> str:  # wrapped here (not by rich), names kept whole
        return textwrap.fill(
            text, console.width, initial_indent=first, subsequent_indent="    ", break_on_hyphens=False
        )

    for name, kind, regimes, summary, presets in rows:  # the table's columns would be cut off: paragraphs
        lines = [paragraph(f"{name} ({kind}; {', '.join(regimes)}): {summary}")]
        if presets:
            lines.append(paragraph(presets, "    tuned presets (--env): "))
        console.print(escape("\n".join(lines)), highlight=False, soft_wrap=True)
    return 0


def _collect(args: argparse.Namespace) -> int:
    from policylab.collect import collect, collect_from_buffer

    if args.from_buffer is None and args.env is None and args.policy == "random":
        raise PolicylabError("collect needs an env", "pass --env ENV_ID (or --policy RUN_DIR, or --from-buffer)")
    if args.from_buffer:
        dataset = collect_from_buffer(
            args.from_buffer,
            args.out,
            overwrite=args.overwrite,
            ref_min_score=args.ref_min,
            ref_max_score=args.ref_max,
        )
    else:
        dataset = collect(
            args.env,
            args.policy,
            args.episodes,
            noise=args.noise,
            seed=args.seed,
            out=args.out,
            overwrite=args.overwrite,
            ref_min_score=args.ref_min,
            ref_max_score=args.ref_max,
        )
    from policylab.logging import fixed

    returns = dataset.episode_returns()
    score = dataset.normalized_score(float(returns.mean()))
    print(
        f"wrote {dataset.path}: {dataset.num_episodes} episode{'s' if dataset.num_episodes != 1 else ''}, "
        f"{dataset.num_steps:,} steps, "
        f"return {fixed(returns.mean())} +/- {fixed(returns.std())}"
        + (f", normalized score {fixed(float(score))}" if score is not None else "")
    )
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from policylab.data.dataset import best_episodes, concat_datasets, format_info, load_dataset, write_dataset
    from policylab.logging import fixed

    if args.dataset_command == "info":
        info = load_dataset(args.path).info()
        try:
            print(json.dumps(info, indent=2) if args.json else format_info(info), flush=True)
        except BrokenPipeError:  # `policylab dataset info D | head`: the reader has what it wanted
            _quiet_broken_pipe()
    elif args.dataset_command == "validate":
        dataset = load_dataset(args.path)
        print(f"ok: {dataset.num_episodes} episodes, {dataset.num_steps} steps")
    elif args.dataset_command == "filter":
        source = load_dataset(args.path)
        kept = best_episodes(source, args.top)
        out = write_dataset(kept, args.out, overwrite=args.overwrite)
        lowest = float(kept.episode_returns().min()) if kept.num_episodes else float("nan")
        print(
            f"wrote {out}: the best {kept.num_episodes} of {source.num_episodes} episodes ({kept.num_steps} steps, "
            f"returns >= {fixed(lowest)})"
        )
    else:
        merged = concat_datasets([load_dataset(p) for p in args.paths])
        out = write_dataset(merged, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: {merged.num_episodes} episodes, {merged.num_steps} steps")
    return 0


def _quiet_broken_pipe() -> None:
    """After a BrokenPipeError on stdout: point stdout at devnull, so that the interpreter's flush at exit does not
    print a second traceback (Python's documented recipe)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policylab", description="Learn policies from any kind of experience.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an algorithm on an env")
    p.add_argument("algo", nargs="?", help="algorithm (see `policylab list`)")
    p.add_argument("--env", help="Gymnasium env id, or module:Class / module:function")
    p.add_argument("--steps", help="total env steps, e.g. 100k, 1e6")
    p.add_argument("--seed", type=int, help="random seed, a whole number >= 0 (default: 0, or the --config file's)")
    p.add_argument(
        "--dataset",
        help="an offline dataset: train offline (--steps are gradient steps), or hybrid with --set offline_ratio=P",
    )
    p.add_argument("--online-steps", help="after the offline --steps, this many env steps online")
    p.add_argument("--config", help="YAML file of config values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument(
        "--preset",
        default="auto",
        help="auto (the env's tuned preset if any), none, rl-zoo (rl-baselines3-zoo's values), or an env id",
    )
    p.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--name", help="run name (default: <algo>-<env>-s<seed>)")
    p.add_argument("--runs-dir", help="where run directories go (default: ./runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress output, only the final result")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a trained policy")
    p.add_argument("run", help="run directory (or a checkpoint directory)")
    p.add_argument("--best", action="store_true", help="the best evaluated policy (best/), not the final one")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation envs (default 0)")
    p.add_argument(
        "--max-envs", type=int, default=16, help="parallel evaluation envs, at most one per episode (default 16)"
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--stochastic", action="store_true", help="sample actions instead of the deterministic policy")
    how.add_argument(
        "--deterministic", action="store_true", help="the deterministic policy even where the run sampled (Atari)"
    )
    p.add_argument("--env", help="evaluate in this env instead of the run's (its spaces must fit the policy)")
    p.add_argument(
        "--env-kwargs", metavar="YAML", help="the env's keyword arguments, e.g. '{gravity: 5.0}' (default: the run's)"
    )
    p.add_argument("--video", help="also render one episode to this file (.mp4 or .gif)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument(
        "--target-return", type=float, metavar="R", help="dt runs: the return to ask for (default: the run's)"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="learning curves of runs as a PNG (mean and spread over seeds)")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="learning_curves.png", help="the PNG to write (default: learning_curves.png)")
    p.add_argument("--metric", help="train.csv column to plot (default: return_mean; for `policylab llm` runs: reward)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("list", help="algorithms and their tuned presets")
    p.set_defaults(func=_list)

    p = sub.add_parser("collect", help="make an offline dataset by running a policy in an env")
    p.add_argument("--env", help="Gymnasium env id (or module:Class); default with --policy RUN_DIR: the run's env")
    p.add_argument(
        "--policy", default="random", help="random (default), a run directory (its final policy), or module:function"
    )
    p.add_argument("--episodes", type=int, default=10, help="whole episodes to collect (default 10)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian std in half-ranges (Box) or epsilon (Discrete)")
    p.add_argument("--seed", type=int, default=0, help="seed of the envs and the noise (default 0)")
    p.add_argument("--from-buffer", help="a run directory saved with save_buffer=true: its replay as a dataset")
    p.add_argument("--out", required=True, help="the dataset directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ref-min", type=float, help="reference return of a random policy (default: measured)")
    p.add_argument("--ref-max", type=float, help="reference expert return (default: the policy's, measured)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("dataset", help="inspect, check and combine offline datasets (Minari directories)")
    dataset_sub = p.add_subparsers(dest="dataset_command", required=True)
    q = dataset_sub.add_parser("info", help="episodes, returns, spaces and provenance of a dataset")
    q.add_argument("path", help="dataset directory, D4RL-style .hdf5 file, or local Minari dataset id")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q = dataset_sub.add_parser("validate", help="check a dataset; exit 2 with the first problem found")
    q.add_argument("path", help="dataset directory, D4RL-style .hdf5 file, or local Minari dataset id")
    q = dataset_sub.add_parser("concat", help="write the episodes of several datasets as one")
    q.add_argument("paths", nargs="+", metavar="PATH", help="datasets collected in the same env")
    q.add_argument("--out", required=True, help="directory to write the combined dataset to")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q = dataset_sub.add_parser("filter", help="write the best episodes of a dataset by return (e.g. for BC-10%%)")
    q.add_argument("path", help="dataset directory, D4RL-style .hdf5 file, or local Minari dataset id")
    q.add_argument("--top", type=float, required=True, help="the share of episodes to keep, e.g. 0.1 for the best 10%%")
    q.add_argument("--out", required=True, help="directory to write the kept episodes to")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_dataset)

    add_llm_parser(sub)
    add_ope_parser(sub)
    add_report_parser(sub)
    add_certify_parser(sub)
    add_sweep_parser(sub)
    return parser


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """policylab's own warnings (e.g. a dataset's reference returns left out) as `warning: ...` lines on stderr,
    each time, not Python's file:line form; other warnings as Python shows them."""
    from policylab.data.dataset import ReferenceWarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, ReferenceWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", ReferenceWarning)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    with cli_wording():  # errors name this command line's flags
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _warnings_as_lines():
            return args.func(args)
    except PolicylabError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("aborted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if args.debug or not _out_of_memory(exc):
            raise
        print(f"error: out of memory: {exc}".rstrip(), file=sys.stderr)
        print(f"  fix: {OUT_OF_MEMORY_FIX}", file=sys.stderr)
        return 2


OUT_OF_MEMORY_FIX = (
    "use smaller sizes (hidden_sizes, buffer_size, num_envs, batch_size, n_steps; a smaller model), or a machine "
    "with more memory (--debug shows where it failed)"
)


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError (numpy's too) or torch's allocator refusing (CPU or CUDA)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "CUDA out of memory" in text


if __name__ == "__main__":
    sys.exit(main())
