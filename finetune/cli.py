"""The `finetune` command.

    finetune run [--config configs/default.yaml] [--set train.max_steps=20 ...]
    finetune validate [--config ...] [--set ...]
    finetune ask MODEL "question" [--config ...] [--set ...] [--max-new-tokens 64]
    finetune sweep [--config ...] [--set sweep.fractions=[0.1,0.5,1.0] ...]
    finetune plan MODEL [--method full|lora] [--device-memory 16GB] [--batch-size N] [--seq-len L] [--probe]
    finetune export MODEL --to DIR [--dtype bf16|fp16|fp32] [--merge | --adapter-only] [--config ...] [--set ...]
    finetune serve [MODEL] [--port 8000] [--host 127.0.0.1] [--config ...] [--set ...]

`run` validates the config first (exit code 2 with every problem listed), then
runs the Prefect flow and prints the summary table: exit 0 when every gate passed,
2 when the input data cannot be used (a DataError naming file, line and column),
1 when any other stage failed or a gate failed. The model spec is checked before the
flow starts (exit 2: a missing folder, a folder without config.json or without
safetensors weights, a hub id that is not reachable). Credentials given with
`--set store.access_key_id=... --set store.secret_access_key=...` go to the process
environment, never into the flow run's parameters (which the Prefect UI shows).

`ask` answers one question with a trained model: MODEL is a readable alias
(`more_itertools_60_steps_20261122T074641Z`), a train artifact's uri (`train/<key>`),
a local folder or a base-model spec; the config's template and store apply.

`export` writes a model (MODEL as for `ask`, or `latest-passing`) as a self-contained folder: safetensors,
the tokenizer with the training template as its chat template, the generation config, the model card;
`serve` serves one (default `latest-passing`) with an OpenAI-compatible API through `transformers serve` on
127.0.0.1 (finetune/handoff.py). Both exit 2 for an unknown model, a folder without safetensors weights, a
folder in the way or a port in use.

`sweep` runs the pipeline once per point of the config's `sweep` grid (data shares,
models, methods, learning rates; flows/sweep.py) and prints the table: exit 0 when the
sweep produced figures (gates may fail at some points: that is what a sweep measures).

`plan` estimates memory for inference and training from the model's config alone (no
weights loaded; pipeline/planner/), says whether it fits `--device-memory` and what to
change if not; `--probe` trains a few steps here for tokens/s and the time per epoch
(finetune/probe.py).

Run directly (not through the Makefile), the command sets the same environment defaults the
Makefile exports (`ENVIRONMENT_DEFAULTS`: no Prefect telemetry, Hugging Face offline, no
tokenizer threads in forked workers, time for a temporary Prefect server to start), each
only when the user has not set it, before Prefect or Hugging Face libraries are imported.
This module imports neither at the top for that reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

ENVIRONMENT_DEFAULTS: dict[str, str] = {
    # No telemetry from an air-gapped machine: it only logs an ERROR about a failed DNS lookup.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Nothing from the Hugging Face hub is reachable on air-gapped machines: fail fast instead of waiting on timeouts.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # Tokenizer threads and forked DataLoader workers do not mix (tokenize switches threads on per call).
    "TOKENIZERS_PARALLELISM": "false",
    # Without PREFECT_API_URL each run starts a temporary Prefect server; on a busy 2-core machine it can need
    # more than Prefect's default 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
"""Environment variables the command sets when the user has not: the ones the Makefile exports."""


def set_environment_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of ENVIRONMENT_DEFAULTS that `environ` (default: os.environ) does not have; out: the ones set.

    A value the user set, even an empty one, is kept. Call it before Prefect or Hugging Face libraries are
    imported: they read these variables when they load.
    """
    environ = os.environ if environ is None else environ
    added = {name: value for name, value in ENVIRONMENT_DEFAULTS.items() if name not in environ}
    environ.update(added)
    return added


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune, evaluate and gate a causal LM.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole pipeline"), ("validate", "check a config and print it resolved")):
        command = commands.add_parser(name, help=text)
        _add_config_options(command, "", "e.g. train.max_steps=20 ")
    ask_command = commands.add_parser("ask", help="answer a question with a trained model")
    ask_command.add_argument("model", help="alias, train/<key>, local folder or base-model spec")
    ask_command.add_argument("question", help="the question, without any template")
    _add_config_options(ask_command, " (template, store)")
    ask_command.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, help="answer length cap (default eval.max_new_tokens)"
    )
    add_handoff_parsers(commands)
    sweep_command = commands.add_parser("sweep", help="run the pipeline over the config's sweep grid")
    _add_config_options(sweep_command, "", "e.g. sweep.fractions=[0.1,0.5,1.0] ")
    add_plan_parser(commands)
    return parser


def _add_config_options(command: argparse.ArgumentParser, config_note: str, example: str = "") -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` on a sub-command; the notes go into their help texts."""
    command.add_argument("--config", default="configs/default.yaml", help=f"YAML config file{config_note}")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, {example}(repeatable)" if example else "override a config value (repeatable)",
    )


def add_handoff_parsers(commands: Any) -> None:
    """The `export` and `serve` sub-commands' arguments (finetune/handoff.py, imported only when they run)."""
    export_command = commands.add_parser("export", help="write a trained model as a self-contained folder")
    export_command.add_argument("model", help="alias, latest-passing, train/<key>, local folder or base-model spec")
    export_command.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) folder")
    export_command.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="cast the weights (default: as saved)"
    )
    mode = export_command.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="full weights, a LoRA adapter merged in (the default)")
    mode.add_argument("--adapter-only", action="store_true", help="the LoRA adapter alone (needs its base model)")
    _add_config_options(export_command, " (store, trust_remote_code)")
    serve_command = commands.add_parser(
        "serve", help="serve a model with an OpenAI-compatible API (transformers serve)"
    )
    serve_command.add_argument(
        "model", nargs="?", default="latest-passing", help="as for export (default: latest-passing)"
    )
    serve_command.add_argument("--port", type=_port, default=8000)
    serve_command.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1, this machine)")
    _add_config_options(serve_command, " (store, trust_remote_code)")


def _port(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, found {value}")
    return value


def handoff(config: PipelineConfig, args: argparse.Namespace) -> int:
    """`export` or `serve` the model `args.model`; return the exit code (2: unknown model, no weights, bad
    folder or port, no adapter)."""
    from finetune.handoff import ExportError, export, model_source, serve
    from pipeline.assets import UnknownModelError
    from pipeline.store import open_store

    trust = config.model.trust_remote_code
    try:
        source = model_source(args.model, open_store(config.store))
        if args.command == "serve":
            return serve(source, host=args.host, port=args.port, trust_remote_code=trust)
        folder = export(source, args.to, dtype=args.dtype, adapter_only=args.adapter_only, trust_remote_code=trust)
    except UnknownModelError as exc:  # ModelFolderError included
        print(f"model error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as exc:
        print(f"{args.command} error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"Exported {source.name} to {folder}")
    return EXIT_OK


def add_plan_parser(commands: Any) -> None:
    """The `plan` sub-command's arguments (it needs no config file)."""
    from pipeline.planner import DEFAULT_RESERVE, OPTIMIZER_ALIASES, PRECISIONS

    plan_command = commands.add_parser(
        "plan", help="will it fit? memory for inference and training from a model's config"
    )
    plan_command.add_argument("model", help="alias, hub id, local folder or config.json path")
    plan_command.add_argument("--method", choices=["full", "lora"], default="full")
    plan_command.add_argument(
        "--device-memory",
        type=_memory_size,
        default=None,
        metavar="SIZE",
        help="device memory: 16GB (10^9 bytes), 16GiB or 24G (2^30)",
    )
    plan_command.add_argument("--batch-size", type=_positive_int, default=1)
    plan_command.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per row")
    plan_command.add_argument("--optimizer", choices=sorted(OPTIMIZER_ALIASES), default="adamw")
    plan_command.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32; mixed (16-bit compute over float32 weights, train.dtype=bfloat16); "
        "bfloat16/float16 (16-bit weights, model.dtype=bfloat16/float16)",
    )
    plan_command.add_argument("--gradient-checkpointing", action="store_true")
    plan_command.add_argument("--lora-r", type=_positive_int, default=8)
    plan_command.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    plan_command.add_argument("--inference-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    plan_command.add_argument("--reserve", type=float, default=DEFAULT_RESERVE, help="share of the device kept free")
    plan_command.add_argument("--trust-remote-code", action="store_true")
    plan_command.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_command.add_argument(
        "--probe", action="store_true", help="train a few steps here: measured memory, tokens/s, time per epoch"
    )
    plan_command.add_argument("--probe-steps", type=_positive_int, default=3)
    plan_command.add_argument(
        "--rows", type=_positive_int, default=1000, help="training rows per epoch, for the time estimate"
    )


def _memory_size(text: str) -> int:
    """argparse type: a memory size such as 16GB, 16GiB or 24G, in bytes."""
    from pipeline.planner import PlannerError, parse_memory

    try:
        return parse_memory(text)
    except PlannerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    from pipeline.prompts import render_prompt
    from pipeline.store import open_store
    from tasks.evaluate import generate_answers

    trust = config.model.trust_remote_code
    try:
        folder = find_model(model, open_store(config.store))
        # load_model refuses a folder without config.json or safetensors weights.
        model_object = load_model(folder, trust_remote_code=trust)
    except UnknownModelError as exc:  # ModelFolderError included
        print(f"model error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=trust)
    answer = generate_answers(
        model_object,
        tokenizer,
        [render_prompt(question, config.template, tokenizer=tokenizer)],  # `chat` renders with the tokenizer
        max_new_tokens=max_new_tokens or config.eval.max_new_tokens,
        batch_size=1,
    )[0]
    print(answer)
    return EXIT_OK


class _NoTracebackFor(logging.Filter):
    """Keeps log records of the given exception types but drops their traceback (the message says it all)."""

    def __init__(self, *types: type[BaseException]) -> None:
        super().__init__()
        self.types = types

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.types):
            record.exc_info, record.exc_text = None, None
        return True


def run(config_path: str, overrides: list[str]) -> int:
    """Run the flow; print the summary; return the exit code."""
    from flows.finetune import GatesFailed, finetune, summary_table
    from pipeline.rows import DataError

    quiet = _NoTracebackFor(DataError)  # bad input is the user's to fix: its message, not a traceback
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        state = finetune(config_path=config_path, overrides=overrides, return_state=True)
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, GatesFailed):
        print(summary_table(outcome.summary))
        print(f"\nFAILED: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(outcome, ConfigError):  # found when the flow starts: a placement the Prefect server lacks
        print(f"config error:\n{outcome}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(outcome, DataError):  # bad input data is a usage error, like a bad config
        print(f"data error:\n{outcome}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(outcome, BaseException):
        print(f"\nFAILED: {type(outcome).__name__}: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_table(outcome))
    print(f"\nArtifacts: {outcome['store']}\nModel:     {outcome['store']}/{outcome['model_uri']}")
    return EXIT_OK


def plan(args: argparse.Namespace) -> int:
    """Print the memory plan for `args.model` (and the probe's figures with --probe); return the exit code."""
    import json

    from pipeline.assets import UnknownModelError
    from pipeline.planner import (
        OPTIMIZER_ALIASES,
        PlannerError,
        TrainingSetup,
        format_plan,
        make_plan,
        model_shape,
        plan_as_json,
    )

    setup = TrainingSetup(
        method=args.method,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        optimizer=OPTIMIZER_ALIASES[args.optimizer],
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        attention=args.attention,
    )
    try:  # transformers raises OSError or ValueError for a bad config
        shape = model_shape(args.model, trust_remote_code=args.trust_remote_code, name=args.model)
        result = make_plan(shape, setup, args.device_memory, args.reserve, args.inference_dtype)
    except (PlannerError, UnknownModelError, OSError, ValueError) as exc:
        print(f"plan error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(plan_as_json(result), indent=2) if args.json else format_plan(result))
    if not args.probe:
        return EXIT_OK
    return probe(args.model, setup, result.training.total, args.probe_steps, args.rows)


def probe(model: str, setup: Any, estimate: int, steps: int, rows: int) -> int:
    """Train `model` for a few steps here; print measured vs estimated memory, tokens/s and time per epoch."""
    from finetune.probe import available_memory, epoch_seconds, probe_training
    from pipeline.planner import PlannerError, format_bytes

    free = available_memory()
    if free is not None and estimate > free:
        print(
            f"\nprobe skipped: training needs about {format_bytes(estimate)}, "
            f"this machine has {format_bytes(free)} available",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        measured = probe_training(model, setup, steps=steps)
    except PlannerError as exc:
        print(f"\nprobe failed:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    seconds = epoch_seconds(rows, setup.seq_len, measured.tokens_per_second)
    print(
        f"\nprobe ({steps} steps here): peak {format_bytes(measured.peak_bytes)} measured ({measured.peak_kind}) "
        f"vs {format_bytes(estimate)} estimated ({estimate / measured.peak_bytes - 1:+.0%})"
    )
    print(
        f"throughput {measured.tokens_per_second:,.0f} tokens/s -> "
        f"one epoch of {rows:,} rows x {setup.seq_len} tokens "
        f"takes about {seconds / 60:,.1f} min here"
    )
    return EXIT_OK


def sweep(config: PipelineConfig, config_path: str, overrides: list[str]) -> int:
    """Run the sweep flow over the config's grid; print its table; return the exit code."""
    from flows.sweep import grid_points, table_markdown
    from flows.sweep import sweep as sweep_flow
    from pipeline.assets import UnknownModelError
    from pipeline.models import check_model_spec

    for model in dict.fromkeys(point.model for point in grid_points(config)):
        try:  # every grid model, before the first point spends minutes training
            check_model_spec(model)
        except UnknownModelError as exc:
            print(f"config error:\n{config_path}: sweep.models: {exc}", file=sys.stderr)
            return EXIT_USAGE
    state = sweep_flow(config_path=config_path, overrides=overrides, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        print(f"\nFAILED: {type(outcome).__name__}: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    print(table_markdown(outcome["rows"]))
    print(f"\nSweep: {outcome['store']}/{outcome['uri']} (table.json, table.csv, learning_curve.png)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `finetune` console command; returns the process exit code."""
    set_environment_defaults()  # first: before anything imports Prefect or a Hugging Face library
    args = build_parser().parse_args(argv)
    if args.command == "plan":  # needs a model, not a config
        return plan(args)
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
    if args.command in ("export", "serve"):
        return handoff(config, args)
    if args.command == "sweep":
        return sweep(config, args.config, secrets_to_environment(args.overrides))
    from pipeline.assets import UnknownModelError
    from pipeline.models import UnsupportedPrecision, check_model_spec, check_training_device

    try:  # before the flow starts: nothing is written to the store for a model that cannot load
        check_model_spec(config.model.name)
    except UnknownModelError as exc:
        print(f"config error:\n{args.config}: model.name: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # QLoRA without CUDA or bitsandbytes, float16 on a CPU: refused before collect spends any time
        if config.placement.train is None:  # a placed train stage is checked on its own pool's machine
            check_training_device(config.model, config.train)
    except UnsupportedPrecision as exc:
        print(f"config error:\n{args.config}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(args.config, secrets_to_environment(args.overrides))


if __name__ == "__main__":
    sys.exit(main())
