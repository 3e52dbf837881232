"""`policylab llm ...`: tasks, sft, train, eval (transformers is imported only when a command runs)."""

from __future__ import annotations

import argparse
import json


def add_llm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm", help="language-model policies: SFT and RL (GRPO, RLOO, ...) on tasks")
    llm_sub = p.add_subparsers(dest="llm_command", required=True)
    llm_sub.add_parser("tasks", help="the built-in tasks (they run on a CPU in minutes)")
    q = llm_sub.add_parser("sft", help="supervised fine-tuning on a task's answers")
    _common(q)
    q = llm_sub.add_parser(
        "train",
        help="RL on a task's reward (GRPO, PPO, ...), preference learning (DPO, KTO, ...), reward models and "
        "distillation",
    )
    q.add_argument(
        "algo",
        nargs="?",
        help="grpo, dr_grpo, dapo, gspo, cispo, sapo, gmpo, rloo, reinforce++, ppo, dpo, online_dpo, cpo, simpo, orpo, "
        "kto, reward_model, distill, gkd or a2po (with --resume: the run's)",
    )
    _common(q)
    q.add_argument("--group-size", type=int, help="completions sampled per prompt (default 8)")
    q.add_argument("--expert", help="a JSONL file of {prompt, completion} rows for --set mix=chord")
    q.add_argument("--teacher", help="distill, gkd: the teacher (a run or save_pretrained directory)")
    q = llm_sub.add_parser("eval", help="greedy exact-match accuracy (and pass@k) of a model or run")
    q.add_argument("model", help="run directory, save_pretrained directory, or a built-in tiny model")
    q.add_argument("--task", default="addition", help="a built-in task (default: addition)")
    q.add_argument(
        "--prompts",
        help="a JSONL file to evaluate on instead of the task's rows: prompts with answers (exact match) or plain "
        'text rows, {"text": ...} (loss, perplexity, mean_token_accuracy)',
    )
    q.add_argument("--k", type=int, default=1, help="also pass@k from k sampled completions per prompt")
    q.add_argument("--seed", type=int, default=0, help="seed of the sampled completions (default 0)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_llm_command)


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", help="tiny-llama (default), small-llama, tiny-gpt2, or a local directory")
    q.add_argument("--task", help="a built-in task (default: addition)")
    q.add_argument("--prompts", help='a JSONL file of {"prompt": ...} rows instead of the task\'s')
    q.add_argument(
        "--reward", action="append", default=[], help="name, module:function, or either =weight; repeatable (summed)"
    )
    q.add_argument(
        "--tool", action="append", default=[], help="a tool completions may call: calculator or module:function"
    )
    q.add_argument("--stop", action="append", default=[], help="a stop string (repeatable): completions end after it")
    q.add_argument("--steps", help="gradient steps (SFT) or rollout batches (RL), e.g. 200, 2k")
    q.add_argument("--seed", type=int, help="random seed (default 0)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    q.add_argument("--name", help="run name (default: <algo>-<task>-s<seed>)")
    q.add_argument("--runs-dir", help="where run directories go (default: ./runs)")  # None: not given (--resume)
    q.add_argument("--no-progress", action="store_true", help="no progress lines (notes and the result still print)")
    q.add_argument("--resume", help="continue this run directory from its latest checkpoint (its own settings)")


def run_llm_command(args: argparse.Namespace) -> int:
    from policylab.config import parse_set_args
    from policylab.llm.tasks import TASKS

    if args.llm_command == "tasks":
        width = max(len(name) for name in TASKS)
        for task in TASKS.values():
            print(f"{task.name:<{width}}  {task.summary}")
        return 0
    if args.llm_command == "eval":
        from policylab.llm.trainer import evaluate_llm

        result = evaluate_llm(args.model, args.task, args.k, args.seed, prompts=args.prompts)
        print(json.dumps(result) if args.json else ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return 0
    from policylab.config import check_resume_place, parse_count
    from policylab.errors import ConfigError
    from policylab.llm.trainer import train_llm

    algo = "sft" if args.llm_command == "sft" else args.algo
    progress = False if args.no_progress else None
    if args.resume:
        check_resume_place(args.resume, args.name, args.runs_dir)
        given = [
            flag
            for flag, value in (
                ("--model", args.model),
                ("--task", args.task),
                ("--prompts", args.prompts),
                ("--reward", args.reward),
                ("--tool", args.tool),
                ("--stop", args.stop),
                ("--seed", args.seed),
                ("--set", args.set),
                ("--expert", getattr(args, "expert", None)),
                ("--group-size", getattr(args, "group_size", None)),
                ("--teacher", getattr(args, "teacher", None)),
            )
            if value is not None and value != []
        ]
        if given:
            raise ConfigError(
                f"--resume continues a run with its saved config; {', '.join(given)} cannot change it",
                f"drop {', '.join(given)} (only --steps may change)",
            )
        steps = {"steps": parse_count(args.steps)} if args.steps is not None else {}
        train_llm(algo, steps, resume=args.resume, progress=progress)
        return 0
    if algo is None:
        raise ConfigError(
            "no algorithm given",
            "write e.g. `policylab llm train grpo --model runs/sft-add`, or `policylab llm train --resume RUN`",
        )
    overrides: dict = {"model": args.model or "tiny-llama", "task": args.task or "addition", **parse_set_args(args.set)}
    if args.steps is not None:
        overrides["steps"] = parse_count(args.steps)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.prompts is not None:
        overrides["prompts"] = args.prompts
    if args.reward:
        overrides["rewards"] = args.reward
    if args.tool:
        overrides["tools"] = args.tool
    if args.stop:
        overrides["stop"] = args.stop
    if getattr(args, "expert", None) is not None:
        overrides["expert"] = args.expert
    if getattr(args, "group_size", None) is not None:
        overrides["group_size"] = args.group_size
    if getattr(args, "teacher", None) is not None:
        overrides["teacher"] = args.teacher
    runs_dir = args.runs_dir if args.runs_dir is not None else "runs"
    train_llm(algo, overrides, runs_dir, args.name, progress=progress)
    return 0
