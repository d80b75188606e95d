"""`finetune serve` for real: a `transformers serve` subprocess on a free port of 127.0.0.1, asked through the
official `openai` client, answers as `finetune ask` does, lists its model, refuses a conversation the model was not
trained for with a clear 400, and stops cleanly on SIGTERM; bad input exits 2 before anything starts.

The model: tiny-neox trained for 2 steps on templated rows (`qa`) by the training process's core, so its folder
carries the chat template and generation config the train stage writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import openai
import pyarrow.parquet as pq
import pytest
from prefect_helpers import free_port, http, start, stop, wait_for

from finetune.cli import main
from pipeline.assets import resolve_model
from pipeline.config import TemplateConfig, TokenizeConfig, TrainConfig
from pipeline.models import load_tokenizer
from pipeline.prompts import render_prompt
from tasks.template import template_rows
from tasks.tokenize import tokenize_rows
from tasks.train import TrainJob, fine_tune

pytestmark = pytest.mark.integration

STARTUP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
MAX_TOKENS = 12
QUESTIONS = [
    "What does more_itertools.chunked do?",
    "How do I use windowed()?",
    "What is the capital of France?",
]
MODEL_NAME = "served-model"


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A train output folder (`model/` inside) named MODEL_NAME: tiny-neox after 2 steps on `qa` rows."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = load_tokenizer(resolve_model("tiny-neox"))
    rows = [
        {"id": f"r{i}", "question": q, "answer": f"Answer number {i} about iterables.", "source": "t"}
        for i, q in enumerate(QUESTIONS * 2)
    ]
    table, _ = tokenize_rows(template_rows(rows, TemplateConfig()), tokenizer, TokenizeConfig(max_length=96))
    split = root / "split"
    split.mkdir()
    pq.write_table(table, split / "train.parquet")
    pq.write_table(table, split / "test.parquet")
    out = root / MODEL_NAME
    out.mkdir()
    config = TrainConfig(
        max_steps=2, learning_rate=1e-3, batch_size=3, optim="adamw_torch", warmup_steps=0, eval_steps=2, save_steps=2
    )
    fine_tune(
        TrainJob(
            base_folder=resolve_model("tiny-neox"),
            base_spec="tiny-neox",
            split_dir=str(split),
            out_dir=str(out),
            work_dir=str(root / "work"),
            config=config,
        )
    )
    return out


def _options(tmp_path: Path) -> list[str]:
    return ["--config", "configs/tiny.yaml", "--set", f"store.uri={tmp_path / 'store'}"]


@pytest.fixture(scope="module")
def server(trained_folder, tmp_path_factory):
    """`finetune serve <folder>` as a subprocess; yields (base url, process, its temp folder, its log)."""
    base = tmp_path_factory.mktemp("server")
    temp, log_path = base / "tmp", base / "serve.log"
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "finetune.cli", "serve", str(trained_folder), "--port", str(port)]
    proc = start([*command, *_options(base)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        health = f"{url}/health"
        wait_for(
            "finetune serve's health",
            lambda: http().get(health, timeout=2).status_code == 200,
            STARTUP_TIMEOUT_S,
            proc,
            log_path,
        )
        yield url, proc, temp, log_path
    finally:
        stop(proc)


def _session_alive(session_id: int) -> bool:
    """Whether any process of the session `session_id` (the server's, started with start_new_session) is alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, 0)
        return True
    return False


def _ask(folder: Path, question: str, tmp_path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["ask", str(folder), question, "--max-new-tokens", str(MAX_TOKENS), *_options(tmp_path)]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_chat_completions_answer_as_finetune_ask_does(server, trained_folder, tmp_path, capsys):
    url, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    tokenizer = load_tokenizer(str(trained_folder / "model"))
    for question in QUESTIONS:
        response = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        expected = _ask(trained_folder, question, tmp_path, capsys)
        assert expected, question
        assert response.choices[0].message.content.strip() == expected, question
        prompt_ids = tokenizer(render_prompt(question, TemplateConfig()), add_special_tokens=False)["input_ids"]
        assert response.usage.prompt_tokens == len(prompt_ids)


def test_models_lists_the_served_model(server):
    url, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]


def test_a_conversation_the_model_was_not_trained_for_is_refused_with_the_reason(server):
    url, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="system messages are not supported"):
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
    with pytest.raises(openai.BadRequestError, match="multi-turn conversations are not supported"):
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": q} for q in QUESTIONS[:2]],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )


def test_the_server_stops_cleanly(server):
    """Last in the module: SIGTERM stops the server, exit 0, port free again, exported folder removed."""
    url, proc, temp, log_path = server
    port = int(url.rsplit(":", 1)[1])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # nothing listens any more
    assert list(temp.iterdir()) == []  # no exported folder, no multiprocessing folder (pymp-*) left
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _session_alive(proc.pid):  # the model's own process (transformers >= 5.25) goes with its server
        assert time.monotonic() < deadline, "a process of the server outlived it"
        time.sleep(0.2)
    log = log_path.read_text()
    assert f"Serving {MODEL_NAME} at {url}/v1" in log and "Application shutdown complete" in log
    assert "leaked" not in log, log[-3000:]  # multiprocessing's semaphores were released, not swept up after


def test_bad_input_exits_2_before_starting_anything(trained_folder, tmp_path, capsys):
    port = free_port()
    capsys.readouterr()
    assert main(["serve", "no_such_model_1_steps_20000101T000000Z", "--port", str(port), *_options(tmp_path)]) == 2
    assert "Trained models in the store" in capsys.readouterr().err
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    assert main(["serve", str(no_weights), "--port", str(port), *_options(tmp_path)]) == 2
    assert "expected model.safetensors" in capsys.readouterr().err
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert main(["serve", str(trained_folder), "--port", str(taken), *_options(tmp_path)]) == 2
    assert f"--port {taken}: expected a free port on 127.0.0.1, found it in use" in capsys.readouterr().err
