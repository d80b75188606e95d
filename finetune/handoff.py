"""Handing a trained model over: `finetune export` writes a self-contained folder, `finetune serve` answers
OpenAI-compatible requests with it.

    finetune export MODEL --to DIR [--dtype bf16|fp16|fp32] [--merge | --adapter-only]
    finetune serve [MODEL] [--port 8000] [--host 127.0.0.1]

MODEL is whatever `finetune ask` takes (`pipeline.models.find_model`): a readable alias, `latest-passing`, a
train artifact's uri (`train/<key>`, `train/<key>/adapter`), a local folder (a model, an adapter, or a whole
train artifact) or a base-model spec.

Export (the default, `--merge`): the full model in safetensors (a LoRA adapter merged into its base weights;
`--dtype` casts the weights, else they keep the dtype they were saved in), the tokenizer with the chat template
training used, the generation config that stops at the EOS training appended, and the model card as
`README.md` when a passing run wrote one (`pipeline.card`). The folder loads with `from_pretrained` offline
and has no link back to the store or to this project. `--adapter-only` writes the LoRA adapter instead (peft
layout, the same tokenizer, generation config and card); it needs its base model to load.

Serve: the model is exported to a temporary folder and served by `transformers serve` (the
`transformers[serving]` extra) pinned to it, on 127.0.0.1 (`serve_main`: a conversation the chat template
refuses gets HTTP 400 with the template's message); the model id clients send is the folder's name
(the alias for a stored model). The server answers `/v1/chat/completions`, `/v1/completions`, `/v1/models`
and `/health`; it runs in a child process that this command stops (and the folder is removed) on Ctrl-C or
SIGTERM. Weights run in the dtype `finetune ask` uses (float32 on CPU, bfloat16 on a CUDA GPU that has it),
so a greedy request (`temperature: 0`) gets `ask`'s answer.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.assets import UnknownModelError, resolve_model
from pipeline.card import CARD_FILE, read_card
from pipeline.models import (
    ADAPTER_SUBDIR,
    MODEL_SUBDIR,
    adapter_base_spec,
    check_model_folder,
    find_model,
    inference_dtype,
    is_adapter_folder,
    pick_device,
    stored_model_ref,
)
from pipeline.store import ArtifactStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bf16", "fp16", "fp32")
_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SERVE_STARTUP_TIMEOUT_S = 300.0
SERVE_STOP_TIMEOUT_S = 20.0


class ExportError(ValueError):
    """A model that cannot be exported or served as asked (no adapter, a folder in the way, a port in use)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's parts are: full weights and/or a LoRA adapter, its card, and a name for it."""

    name: str
    model: str | None  # a folder (or a hub id) with full weights
    adapter: Path | None  # a peft adapter folder
    card: str | None  # README.md text


def _safe_name(text: str) -> str:
    """`text` as a folder name and model id: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def model_source(spec: str, store: ArtifactStore) -> ModelSource:
    """The parts of the model `spec` names (see the module docstring), checked to hold safetensors weights.

    Raises UnknownModelError (listing the store's aliases) when nothing matches, ModelFolderError for a folder
    without config.json or safetensors weights.
    """
    ref = stored_model_ref(spec, store)
    if ref is not None:
        artifact = store.fetch(ref)
        adapter = artifact / ADAPTER_SUBDIR
        merged = artifact / MODEL_SUBDIR
        only_adapter = spec.rstrip("/").endswith(f"/{ADAPTER_SUBDIR}")
        source = ModelSource(
            name=_safe_name(str(ref.meta.get("alias") or f"train-{ref.key}")),
            model=str(merged) if merged.is_dir() and not only_adapter else None,
            adapter=adapter if adapter.is_dir() else None,
            card=read_card(store, ref.uri),
        )
    elif Path(spec).expanduser().is_dir():
        local = Path(spec).expanduser().resolve()
        merged, adapter = local / MODEL_SUBDIR, local / ADAPTER_SUBDIR
        if not merged.is_dir() and not adapter.is_dir():
            merged, adapter = (local, adapter) if not is_adapter_folder(local) else (merged, local)
        card = local / CARD_FILE  # an exported folder's card (or peft's own README in an adapter folder)
        name = local.parent.name if local.name in (MODEL_SUBDIR, ADAPTER_SUBDIR) else local.name
        source = ModelSource(
            name=_safe_name(name),
            model=str(merged) if merged.is_dir() else None,
            adapter=adapter if adapter.is_dir() else None,
            card=card.read_text(encoding="utf-8") if card.is_file() else None,
        )
    else:
        source = ModelSource(name=_safe_name(spec), model=find_model(spec, store), adapter=None, card=None)
    for folder in (source.model, source.adapter):
        if folder is not None and Path(folder).is_dir():
            check_model_folder(folder)
    if source.model is None and source.adapter is None:
        raise UnknownModelError(f"{spec!r}: expected a model or a LoRA adapter, found neither")
    return source


def export(
    source: ModelSource, to: Path, *, dtype: str | None = None, adapter_only: bool = False, trust_remote_code=False
) -> Path:
    """Write `source` as a self-contained folder at `to` (see the module docstring); out: `to`.

    The folder is written under a temporary name beside `to` and renamed into place when complete, so a
    failed export leaves nothing behind. Raises ExportError when `to` is a file or a non-empty folder, or
    when `adapter_only` is asked of a model without an adapter.
    """
    to = Path(to).expanduser().resolve()
    if to.is_file() or (to.is_dir() and any(to.iterdir())):
        raise ExportError(f"--to {to}: expected a new or empty folder, found {'a file' if to.is_file() else 'files'}")
    if adapter_only and source.adapter is None:
        raise ExportError(
            f"{source.name}: --adapter-only: expected a LoRA adapter, found none (the model was fully "
            "fine-tuned, or trained with LoRA and only the merged model was kept); export it without --adapter-only"
        )
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}-partial-", dir=to.parent))
    try:
        if adapter_only:
            _write_adapter(source.adapter, staging, dtype)  # type: ignore[arg-type]
        else:
            _write_merged(source, staging, dtype, trust_remote_code)
        if source.card:
            (staging / CARD_FILE).write_text(source.card, encoding="utf-8")
        if to.is_dir():
            to.rmdir()  # empty, checked above
        staging.rename(to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


def _write_merged(source: ModelSource, out: Path, dtype: str | None, trust_remote_code: bool) -> None:
    """Full weights (an adapter merged into its base), tokenizer and generation config into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a command's output, not a terminal's progress bars
    wanted = getattr(torch, _TORCH_DTYPE_NAMES[dtype]) if dtype else "auto"
    if source.model is not None:
        model = AutoModelForCausalLM.from_pretrained(
            source.model, dtype=wanted, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        parts = source.model
    else:
        from peft import PeftModel

        adapter = source.adapter
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model(adapter_base_spec(adapter)),  # type: ignore[arg-type]
            dtype=torch.float32,  # merged at full precision, cast after
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        if dtype:
            model = model.to(wanted)
        parts = str(adapter)
    if (Path(parts) / "generation_config.json").is_file():  # the trained stop token, not the base model's
        model.generation_config = GenerationConfig.from_pretrained(parts)
    model.save_pretrained(out)  # safetensors
    AutoTokenizer.from_pretrained(parts, trust_remote_code=trust_remote_code).save_pretrained(out)


def _write_adapter(adapter: Path, out: Path, dtype: str | None) -> None:
    """The adapter folder's files into `out`, its weights cast to `dtype` when given."""
    for file in sorted(adapter.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        if file.name == "adapter_model.safetensors" and dtype:
            import torch
            from safetensors.torch import load_file, save_file

            cast = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
            tensors = {name: tensor.to(cast) for name, tensor in load_file(file).items()}
            save_file(tensors, out / file.name, metadata={"format": "pt"})
        else:
            shutil.copy2(file, out / file.name)


# --------------------------------------------------------------------------- serving


def check_port(host: str, port: int) -> None:
    """Raise ExportError when nothing can listen on `host`:`port` (another server holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: connections of an earlier server still closing (TIME_WAIT) do not count, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ExportError(
                f"--port {port}: expected a free port on {host}, found it in use ({exc.strerror}); "
                "pick another with --port"
            ) from None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve_command(name: str, host: str, port: int, trust_remote_code: bool = False) -> list[str]:
    """The server process: `transformers serve` pinned to the folder `name` (relative to its working directory),
    through `serve_main`."""
    dtype = str(inference_dtype(pick_device())).removeprefix("torch.")
    # -P: the working directory (which holds the model folder, named as anything) does not shadow modules.
    command = [
        sys.executable,
        "-P",
        "-m",
        "finetune.handoff",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
    ]
    return command + (["--trust-remote-code"] if trust_remote_code else [])


def _exit_cleanly(_signum: int, _frame: object) -> None:
    """Signal handler: exit with code 0 through Python's exit handlers (atexit, multiprocessing's finalizers)."""
    sys.exit(0)


def serve_main(argv: list[str] | None = None) -> None:
    """The server process (`python -m finetune.handoff NAME --host H --port P --dtype D`): `transformers serve`
    pinned to NAME, whose app also answers a request its chat template refuses (a system message or several turns
    for a model trained on single questions) with HTTP 400 and the template's message, instead of a bare 500.
    """
    import argparse

    from fastapi import Request
    from fastapi.responses import JSONResponse
    from jinja2.exceptions import TemplateError
    from transformers.cli import serve as transformers_serve
    from transformers.cli.serving import server
    from transformers.utils import logging as transformers_logging

    parser = argparse.ArgumentParser(prog="python -m finetune.handoff")
    parser.add_argument("name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    build_server = server.build_server

    def build_server_refusing_bad_conversations(*a, **k):
        app = build_server(*a, **k)

        @app.exception_handler(TemplateError)
        async def _refused(_request: Request, exc: TemplateError) -> JSONResponse:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, status_code=400)

        return app

    server.build_server = build_server_refusing_bad_conversations  # Serve imports it when it is constructed
    # No progress bars in a server's log, in this process or in the model's (transformers >= 5.25 spawns it, and
    # it reads this variable when it imports transformers); there tqdm's lock would be a semaphore left behind.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers_logging.disable_progress_bar()
    # uvicorn re-raises the stop signal once the server has shut down. Under the default handler SIGTERM would
    # then kill this process before Python's exit handlers run, and transformers >= 5.25 keeps the model in a
    # process of its own, fed through multiprocessing queues: their semaphores and temporary folder would be
    # left behind. A normal exit runs multiprocessing's clean-up (as `transformers serve --api-server-count` does).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _exit_cleanly)
    transformers_serve.Serve(
        force_model=args.name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        log_level="warning",
    )


def serve(
    source: ModelSource,
    *,
    host: str,
    port: int,
    trust_remote_code: bool = False,
    announce: Callable[[str], None] = print,
) -> int:
    """Export `source` to a temporary folder and serve it until the server stops or this process is signalled.

    Out: 0 after a stop by SIGINT/SIGTERM (forwarded to the server), the server's exit code otherwise (1 when
    it exits on its own before answering). Raises ExportError for a port in use (checked before any work).
    """
    check_port(host, port)
    stop = {"signal": None}

    def forward(signum, _frame):
        stop["signal"] = signum

    with tempfile.TemporaryDirectory(prefix="finetune-serve-") as root:
        export(source, Path(root) / source.name, trust_remote_code=trust_remote_code)
        command = serve_command(source.name, host, port, trust_remote_code)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        process = subprocess.Popen(command, cwd=root, env=env)
        try:
            ready, deadline = False, time.monotonic() + SERVE_STARTUP_TIMEOUT_S
            while process.poll() is None and stop["signal"] is None:
                if not ready and _healthy(f"http://{host}:{port}/health"):
                    ready = True
                    announce(
                        f"Serving {source.name} at http://{host}:{port}/v1 (OpenAI-compatible; model id "
                        f"{source.name!r}). Stop with Ctrl-C."
                    )
                if not ready and time.monotonic() > deadline:
                    announce(f"the server did not answer within {SERVE_STARTUP_TIMEOUT_S:.0f} s; stopping it")
                    break
                time.sleep(0.2)
            if process.poll() is not None:
                return process.returncode or (0 if ready else 1)
            process.terminate()
            try:
                process.wait(timeout=SERVE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return 0 if stop["signal"] is not None else 1
        finally:
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=SERVE_STOP_TIMEOUT_S)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    serve_main()
