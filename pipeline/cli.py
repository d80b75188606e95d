"""The `finetune` command.

    finetune run [--config configs/default.yaml] [--set train.max_steps=20 ...]
    finetune validate [--config ...] [--set ...]

`run` validates the config first (exit code 2 with every problem listed), then
runs the Prefect flow and prints the summary table: exit 0 when every gate passed,
1 when a stage or a gate failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from pipeline.config import ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune, evaluate and gate a causal LM.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole pipeline"), ("validate", "check a config and print it resolved")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", default="configs/default.yaml", help="YAML config file")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value, e.g. train.max_steps=20 (repeatable)")
    return parser


def run(config_path: str, overrides: list[str]) -> int:
    """Run the flow; print the summary; return the exit code."""
    from flows.finetune import GatesFailed, finetune, summary_table

    state = finetune(config_path=config_path, overrides=overrides, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, GatesFailed):
        print(summary_table(outcome.summary))
        print(f"\nFAILED: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(outcome, BaseException):
        print(f"\nFAILED: {type(outcome).__name__}: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_table(outcome))
    print(f"\nArtifacts: {outcome['store']}\nModel:     {outcome['store']}/{outcome['model_uri']}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `finetune` console command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # Without PREFECT_API_URL each run starts a temporary Prefect server; on a busy 2-core
    # machine it can need more than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate":
        print(config.model_dump_json(indent=2))
        return EXIT_OK
    return run(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
