"""`finetune serve` under a bounded burst: 16 concurrent clients, 64 chat completions, on 127.0.0.1 only.

In: a model as `finetune serve` takes it (default latest-passing), a run config and overrides (its store, and
its data for the questions), the burst's shape. Out, printed: requests/s, latency p50 and p95, errors, answers
that differ from `finetune ask`'s, and the ratio against the baseline measured in the same run: `ask`'s own
path (render the prompt, greedy `generate_answers`, one question at a time) in this process. Exit code 1 when
any request failed or any answer differed.

    .venv/bin/python bench/serve_load.py                                    # latest-passing of configs/default.yaml
    .venv/bin/python bench/serve_load.py train/<key> --config configs/tiny.yaml --set store.uri=/tmp/store

The server is the real command (`python -m finetune.cli serve MODEL --port <free port>`) started as a child
process and stopped with SIGTERM at the end. Questions are the config's distinct collected questions (seeded
order), cycled to fill the requests; every request asks greedily (`temperature: 0`) for the same answer budget
as the baseline. `transformers serve` generates one request at a time (no continuous batching on CPU), so the
burst measures queueing and HTTP overhead on top of generation, not batching.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from finetune.handoff import model_source  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models import find_model, load_model, load_tokenizer  # noqa: E402
from pipeline.prompts import render_prompt  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from tasks.collect import collect_rows  # noqa: E402
from tasks.evaluate import generate_answers  # noqa: E402

STARTUP_TIMEOUT_S = 300.0


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run the baseline and the burst; print the figures; 0 when nothing failed and every answer matched."""
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="latest-passing")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--questions", type=int, default=16, help="distinct questions, cycled over the requests")
    parser.add_argument("--max-tokens", type=int, default=None, help="answer budget (default eval.max_new_tokens)")
    args = parser.parse_args(argv)
    config = load_config(ROOT / args.config if not Path(args.config).is_absolute() else args.config, args.overrides)
    max_tokens = args.max_tokens or config.eval.max_new_tokens
    store = open_store(config.store)
    name = model_source(args.model, store).name  # the model id the server answers to
    folder = find_model(args.model, store)

    rows = [row for row in collect_rows(config.data, config.store) if row.get("question")]
    distinct = sorted({row["question"] for row in rows})
    random.Random(0).shuffle(distinct)
    questions = distinct[: args.questions]
    burst = [questions[i % len(questions)] for i in range(args.requests)]

    # Baseline: what `finetune ask` runs, one question at a time, in this process.
    model = load_model(folder, trust_remote_code=config.model.trust_remote_code)
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=config.model.trust_remote_code)
    expected: dict[str, str] = {}
    started = time.perf_counter()
    for question in questions:
        prompt = render_prompt(question, config.template, tokenizer=tokenizer)
        expected[question] = generate_answers(model, tokenizer, [prompt], max_new_tokens=max_tokens, batch_size=1)[0]
    baseline_rps = len(questions) / (time.perf_counter() - started)
    del model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        log = Path(work) / "serve.log"
        command = [sys.executable, "-m", "finetune.cli", "serve", args.model, "--port", str(port)]
        command += ["--config", args.config, *(f"--set={o}" for o in args.overrides)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, proc, log)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=600)

            def one(question: str) -> tuple[float, str | None, str | None]:
                began = time.perf_counter()
                try:
                    response = client.chat.completions.create(
                        model=name,
                        messages=[{"role": "user", "content": question}],
                        temperature=0,
                        max_tokens=max_tokens,
                    )
                    return time.perf_counter() - began, (response.choices[0].message.content or "").strip(), None
                except openai.OpenAIError as exc:
                    return time.perf_counter() - began, None, f"{type(exc).__name__}: {exc}"

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                results = list(pool.map(one, burst))
            wall = time.perf_counter() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    latencies = [seconds for seconds, _, _ in results]
    errors = [error for _, _, error in results if error]
    mismatches = [q for q, (_, answer, error) in zip(burst, results) if not error and answer != expected[q]]
    rps = len(burst) / wall
    print(f"model {name} ({folder}), {len(questions)} distinct questions, answer budget {max_tokens} tokens")
    print(f"baseline (ask's path, one at a time, in-process): {baseline_rps:.2f} requests/s")
    print(
        f"finetune serve, {args.clients} clients x {len(burst)} requests: {rps:.2f} requests/s, "
        f"latency p50 {percentile(latencies, 0.5):.3f} s, p95 {percentile(latencies, 0.95):.3f} s"
    )
    print(f"ratio serve / baseline: {rps / baseline_rps:.2f}x")
    print(f"errors: {len(errors)}, answers different from ask's: {len(mismatches)}")
    for error in errors[:3]:
        print(f"  error: {error}")
    for question in mismatches[:3]:
        print(f"  differs: {question!r}")
    return 1 if errors or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
