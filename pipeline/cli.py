"""The `finetune` command.

    finetune run [--config configs/default.yaml] [--set train.max_steps=20 ...]
    finetune validate [--config ...] [--set ...]
    finetune ask MODEL "question" [--config ...] [--set ...] [--max-new-tokens 64]

`run` validates the config first (exit code 2 with every problem listed), then
runs the Prefect flow and prints the summary table: exit 0 when every gate passed,
2 when the input data cannot be used (a DataError naming file, line and column),
1 when any other stage failed or a gate failed.

`ask` answers one question with a trained model: MODEL is a readable alias
(`more_itertools_60_steps_20261122T074641Z`), a train artifact's uri (`train/<key>`),
a local folder or a base-model spec; the config's template and store apply.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from pipeline.config import ConfigError, PipelineConfig, load_config

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
    ask_command = commands.add_parser("ask", help="answer a question with a trained model")
    ask_command.add_argument("model", help="alias, train/<key>, local folder or base-model spec")
    ask_command.add_argument("question", help="the question, without any template")
    ask_command.add_argument("--config", default="configs/default.yaml", help="YAML config file (template, store)")
    ask_command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value (repeatable)")
    ask_command.add_argument("--max-new-tokens", type=_positive_int, default=None,
                             help="answer length cap (default eval.max_new_tokens)")
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an integer above 0 (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


# Credentials given with --set go into the environment that boto3 reads in this process,
# never into the flow run's parameters: the Prefect UI shows those to everyone.
SECRET_OVERRIDES = {"store.access_key_id": "AWS_ACCESS_KEY_ID", "store.secret_access_key": "AWS_SECRET_ACCESS_KEY"}


def secrets_to_environment(overrides: list[str]) -> list[str]:
    """Move credential overrides (`SECRET_OVERRIDES`) into os.environ; out: the other overrides, in order."""
    from pipeline.config import parse_override

    kept = []
    for text in overrides:
        key, value = parse_override(text)
        variable = SECRET_OVERRIDES.get(".".join(key))
        if variable is None:
            kept.append(text)
        else:
            os.environ[variable] = "" if value is None else str(value)
    return kept


def ask(config: PipelineConfig, model: str, question: str, max_new_tokens: int | None) -> int:
    """Print the model's greedy answer to `question` in the run's template; return the exit code.

    The answer is what the model generates after the prompt's tokens, up to its EOS.
    """
    from pipeline.assets import UnknownModelError
    from pipeline.models import find_model, load_model, load_tokenizer
    from pipeline.store import open_store
    from tasks.evaluate import generate_answers
    from tasks.template import render_prompt

    trust = config.model.trust_remote_code
    try:
        folder = find_model(model, open_store(config.store))
        model_object = load_model(folder, trust_remote_code=trust)  # refuses a folder without config.json or safetensors
    except UnknownModelError as exc:  # ModelFolderError included
        print(f"model error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=trust)
    answer = generate_answers(model_object, tokenizer, [render_prompt(question, config.template)],
                              max_new_tokens=max_new_tokens or config.eval.max_new_tokens, batch_size=1)[0]
    print(answer)
    return EXIT_OK


def run(config_path: str, overrides: list[str]) -> int:
    """Run the flow; print the summary; return the exit code."""
    from flows.finetune import GatesFailed, finetune, summary_table
    from tasks.collect import DataError

    state = finetune(config_path=config_path, overrides=overrides, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, GatesFailed):
        print(summary_table(outcome.summary))
        print(f"\nFAILED: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(outcome, DataError):  # bad input data is a usage error, like a bad config
        print(f"data error:\n{outcome}", file=sys.stderr)
        return EXIT_USAGE
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
    if args.command == "ask":
        return ask(config, args.model, args.question, args.max_new_tokens)
    from pipeline.assets import UnknownModelError
    from pipeline.models import check_model_spec

    try:  # before the flow starts: nothing is written to the store for a model that cannot load
        check_model_spec(config.model.name)
    except UnknownModelError as exc:
        print(f"config error:\n{args.config}: model.name: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(args.config, secrets_to_environment(args.overrides))


if __name__ == "__main__":
    sys.exit(main())
