"""Answers per second: the evaluate stage's batched generation vs the seeds' one-at-a-time `inference()`.

In: a model (alias, hub id or folder; default smollm2-135m-instruct), a run config
whose data gives the test questions (default configs/default.yaml), how many
questions (64), the answer budget and batch size. Out, printed: both figures, their
ratio (target: at least 4x on CPU) and how many greedy answers differ between the two.

Both sides run in this process on the same model object and the same questions
(the test split of the config's data, topped up from its train rows if the split is
smaller). The seeds' `inference()` is kept as written (tokenize, `generate` with
`max_length`, decode prompt and answer together, strip the prompt by characters)
except that `max_length` is the prompt's length plus the same answer budget, so
both sides may write equally long answers.

    .venv/bin/python bench/eval_throughput.py                      # the default model (minutes)
    .venv/bin/python bench/eval_throughput.py --model tiny-neox    # a quick check
    .venv/bin/python bench/eval_throughput.py --threads 1          # both sides on one intra-op thread

The machine's load average is printed before and after. On a shared machine with more
runnable processes than cores, torch's OpenMP threads spin while they wait for each other
at every parallel region (measured here at load 6 on 2 cores: a decode step 4-10x slower,
the batched matmuls hit hardest). `--threads` sets `torch.set_num_threads` for the whole
process; `OMP_WAIT_POLICY=PASSIVE` in the environment makes waiting threads sleep instead.
Either applies to both sides alike, so the comparison stays the same one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.assets import resolve_model
from pipeline.config import load_config
from pipeline.models import load_model, load_tokenizer
from tasks.collect import collect_rows
from tasks.evaluate import generate_answers
from tasks.split import split_indices
from tasks.template import apply_template


def seeds_inference(text, model, tokenizer, max_input_tokens=1000, max_new_tokens=64):
    """The seeds' inference(): one question, max_length, decode everything, strip the prompt by characters."""
    # Tokenize
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_input_tokens)
    # Generate (max_length counts the prompt: give the same answer budget as the batched side)
    device = model.device
    generated_tokens_with_prompt = model.generate(
        input_ids=input_ids.to(device), max_length=input_ids.shape[1] + max_new_tokens
    )
    # Decode
    generated_text_with_prompt = tokenizer.batch_decode(generated_tokens_with_prompt, skip_special_tokens=True)
    # Strip the prompt
    generated_text_answer = generated_text_with_prompt[0][len(text) :]
    return generated_text_answer


def test_prompts(config_path: str, count: int) -> list[str]:
    """`count` templated prompts: the config's test split first, then its train rows if the split is short."""
    config = load_config(config_path)
    rows = [apply_template(row, config.template) for row in collect_rows(config.data)]
    train, test = split_indices(len(rows), config.split)
    return [rows[i]["prompt"] for i in (test + train)[:count]]


@contextmanager
def _timed(total: list[float]) -> Iterator[None]:
    """Add the wall and CPU seconds of the block to total[0] and total[1]."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        total[0] += time.perf_counter() - wall
        total[1] += time.process_time() - cpu


def _load() -> str:
    """The 1-minute load average against the CPUs this process may use, e.g. 'load 5.8 on 2 CPUs'."""
    return f"load {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} CPUs"


def main(argv: list[str] | None = None) -> int:
    """Run both sides, print answers/s of each, the ratio and the mismatches; exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="configs/default.yaml", help="run config whose data gives the questions")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's eval.batch_size")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for both sides (default: torch's)"
    )
    args = parser.parse_args(argv)
    eval_config = load_config(args.config).eval
    args.max_new_tokens = args.max_new_tokens or eval_config.max_new_tokens
    args.batch_size = args.batch_size or eval_config.batch_size

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder, padding_side="left")
    model = load_model(folder, device="cpu")
    model.eval()
    prompts = test_prompts(args.config, args.questions)
    print(
        f"model {args.model} ({folder}), {len(prompts)} questions, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, {_load()}",
        flush=True,
    )

    # Warm-up on one prompt each, so neither side pays one-off start-up costs in its timing.
    generate_answers(model, tokenizer, prompts[:1], max_new_tokens=4, batch_size=1)
    with torch.inference_mode():
        seeds_inference(prompts[0], model, tokenizer, max_new_tokens=4)

    # The stage sorts all prompts by token length and generates them batch_size at a time. Here
    # the same batches are timed one by one, each followed by the seeds' loop over the same
    # questions: on a shared machine both sides then see the same background load.
    order = sorted(
        range(len(prompts)), key=lambda i: (len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]), i)
    )
    batched, seeds = [""] * len(prompts), [""] * len(prompts)
    clock = {"batched": [0.0, 0.0], "seeds": [0.0, 0.0]}  # [wall s, CPU s of this process]
    for start in range(0, len(order), args.batch_size):
        chunk = order[start : start + args.batch_size]
        with _timed(clock["batched"]):
            answers = generate_answers(
                model,
                tokenizer,
                [prompts[i] for i in chunk],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
            )
        with _timed(clock["seeds"]):
            for i in chunk:
                seeds[i] = seeds_inference(prompts[i], model, tokenizer, max_new_tokens=args.max_new_tokens).strip()
        for i, answer in zip(chunk, answers):
            batched[i] = answer
        print(f"  {start + len(chunk)}/{len(prompts)} answered", flush=True)
    (batched_s, batched_cpu), (seeds_s, seeds_cpu) = clock["batched"], clock["seeds"]

    mismatches = [i for i, (a, b) in enumerate(zip(batched, seeds)) if a != b]
    batched_rate, seeds_rate = len(prompts) / batched_s, len(prompts) / seeds_s
    print(f"evaluate stage (batched): {batched_rate:.2f} answers/s ({batched_s:.1f} s wall, {batched_cpu:.1f} s CPU)")
    print(f"seeds inference():        {seeds_rate:.2f} answers/s ({seeds_s:.1f} s wall, {seeds_cpu:.1f} s CPU)")
    print(
        f"ratio: {batched_rate / seeds_rate:.2f}x by wall time, "
        f"{seeds_cpu / batched_cpu:.2f}x by CPU time (target >= 4x)"
    )
    print(f"identical greedy answers: {len(prompts) - len(mismatches)}/{len(prompts)}")
    print(f"after: {_load()}")
    for i in mismatches[:5]:
        print(f"  mismatch #{i}:\n    batched: {batched[i][:160]!r}\n    seeds:   {seeds[i][:160]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
