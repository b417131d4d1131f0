"""`instructray`: the command line. Each stage is a module under orchestration/stages."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from orchestration.rundir import DiskFull
from orchestration.serve.auth import check_servable
from rlhf.config import ConfigError, check_trainable, format_problems, load_config

# name -> (module with run(cfg, resume=...), one-line description). Order = pipeline order.
STAGES = {
    "pretrain": ("orchestration.stages.pretrain", "stage 0: pretrain the tiny base model (tiny only)"),
    "sft": ("orchestration.stages.sft", "stage 1: supervised fine-tuning on demonstrations"),
    "rm": ("orchestration.stages.rm", "stage 2: reward model on K-way rankings"),
    "ppo": ("orchestration.stages.ppo", "stage 3: PPO-ptx against the reward model"),
    "eval": ("orchestration.stages.evaluate", "win rates, RM score, KL and LM loss; writes report.md"),
}
COMMANDS = {
    "run": ("orchestration.pipeline", "the whole pipeline: stages 0-3 and the evaluation"),
    **STAGES,
    "serve": ("orchestration.serve.app", "OpenAI-compatible Ray Serve endpoint for a policy"),
    "reproduce": ("orchestration.reproduce.main", "the paper's findings in miniature, over seeds, with verdicts"),
}
# Commands that train, so refuse what training does not implement (rlhf.config.check_trainable).
TRAINING_COMMANDS = ("run", "pretrain", "sft", "rm", "ppo")
# What each command refuses before it starts; the others start on any valid config.
CHECKS = {**dict.fromkeys(TRAINING_COMMANDS, check_trainable), "serve": check_servable}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructray",
        description="The InstructGPT recipe (SFT -> reward model -> PPO-ptx) on Ray.",
        epilog="CONFIG is a YAML file or a preset name (tiny, instructgpt-1.3b, -6b, -175b); "
               "default: configs/tiny.yaml. Overrides are key.sub=value, e.g. ppo.kl_coef=0.01.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "serve":
            p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                           help="a run directory (serves its final policy) or an HF checkpoint dir")
            # As `vllm serve` and uvicorn take them; the same as serve.host=/serve.port= overrides.
            p.add_argument("--host", help="address to bind (serve.host)")
            p.add_argument("--port", help="port to listen on (serve.port)")
        if name == "reproduce":
            p.add_argument("--seeds", type=int, help="full runs (other data, other models) behind the "
                           "multi-seed findings (default 3; 1 with --quick)")
            p.add_argument("--only", nargs="+", metavar="NAME",
                           help="these experiments only (a name that is not one lists them)")
            p.add_argument("--quick", action="store_true", help="every experiment at toy size, one point "
                           "of each sweep besides the config's (minutes; the numbers mean nothing)")
            p.add_argument("--out", default="findings", help="where runs, results.json and report.md go")
        p.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                       help="optional config file or preset, then overrides")
        if name == "reproduce":  # always resumes: finished runs and experiments are kept
            continue
        p.add_argument("--dry-run", action="store_true",
                       help="print the resource plan and batch geometry; start nothing")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    return parser


def split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for i, a in enumerate(args):
        if "=" in a:
            overrides.append(a)
        elif i == 0:
            config = a
        else:
            raise ConfigError(f"{a!r}: expected key.sub=value (the config file must come first)")
    return config, overrides


def resolve_config(ns: argparse.Namespace):
    """The config a parsed command line names, its overrides and flags applied."""
    config, overrides = split_config_and_overrides(ns.args)
    overrides += [f"serve.{flag}={value}" for flag in ("host", "port")
                  if (value := getattr(ns, flag, None)) is not None]
    return load_config(config, overrides, check_files=not ns.dry_run)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.command == "reproduce":
        return _reproduce(ns)
    try:
        cfg = resolve_config(ns)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    checks = CHECKS.get(ns.command)
    refused = format_problems(cfg, checks(cfg)) if checks else ""
    if ns.dry_run:
        from orchestration.plan import describe_plan
        print(describe_plan(cfg, ns.command))
        if refused:  # the plan still prints, so a preset can be read before it is made trainable
            print(f"\n{ns.command} would stop here with a config error:\n"
                  + "\n".join(f"  {line}" for line in refused.splitlines()))
        return 0
    if refused:
        print(f"config error: {refused}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[ns.command][0])
    kwargs = {"target": ns.target} if ns.command == "serve" else {"resume": ns.resume}
    try:
        module.main(cfg, **kwargs)
    except DiskFull as e:  # nothing to debug: the message says what happened and what to do
        print(f"error: {e.strerror}", file=sys.stderr)
        return 3
    return 0


def _reproduce(ns: argparse.Namespace) -> int:
    from orchestration.reproduce.main import main as reproduce

    try:
        config, overrides = split_config_and_overrides(ns.args)
        reproduce(config, seeds=ns.seeds, only=ns.only, quick=ns.quick, out=ns.out, overrides=overrides)
    except (ConfigError, ValueError) as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
