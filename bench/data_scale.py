"""Benchmark: data preparation as rows grow -- time should grow linearly, peak memory should stay flat.

For each size (default 20,000, 200,000 and 2,000,000 rows) it writes a JSON Lines export of question/answer
pairs (the generator of bench/data_prep.py, random.Random(0); 2% exact duplicates, 1.4% near-duplicate
questions and 0.1% empty answers, so de-duplication and the drop log have work to do), then runs data
preparation on it in a fresh child process through the real stage bodies (`collect.body`, `template.body`,
`tokenize.body`, `split.body`; validate's core `tokens_quality` + `check_quality` + the plot, i.e. the body
without its Prefect UI artifact) with the default config and the default model's tokenizer. The child's peak
resident set and CPU seconds come from `os.wait4` (that child alone). Time is the stages' own CPU seconds (all
threads; the child's imports are printed apart and left out), which a shared machine's load barely changes;
their wall seconds are printed too.

Printed per size: rows, seconds, rows/s, peak RSS, and the ratios against the smallest run (time / rows
ratio ~1 means linear; memory ratio <= 1.5 is the target), the peak RSS reached by the end of each stage (so
the stage that raised it shows), with the load average before and after.

Run from the repository root (nice it on a shared machine):

    nice -n 19 .venv/bin/python bench/data_scale.py [--sizes 20000 200000 2000000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

MEMORY_TARGET = 1.5


def write_export(path: Path, n_rows: int) -> None:
    """`n_rows` JSON lines {"question", "answer"}: the same rows for every run, the smaller a prefix of the larger."""
    from bench.data_prep import answer_text, sentence

    rng = random.Random(0)
    recent: list[tuple[str, str]] = []
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n_rows):
            if i % 50 == 49 and recent:  # an exact duplicate of a recent row
                question, answer = recent[i % len(recent)]
            elif i % 71 == 70 and recent:  # the same question, shouted: a near duplicate
                question, answer = recent[(i * 7) % len(recent)][0].upper() + "!!", answer_text(rng)
            else:
                question, answer = sentence(rng, rng.randint(4, 20), "?"), answer_text(rng)
                recent = [*recent, (question, answer)][-100:]
            if i % 1000 == 999:
                answer = "  "  # dropped as empty
            handle.write(json.dumps({"question": question, "answer": answer}) + "\n")


def child(export: Path, work: Path) -> dict:
    """Run collect..split on `export` in this process with outputs under `work`; out: seconds per stage, rows."""
    started = time.perf_counter()
    from pipeline.config import DataConfig, JsonlSource, ModelConfig, SplitConfig, TemplateConfig, TokenizeConfig
    from tasks.collect import collect
    from tasks.split import split
    from tasks.template import template
    from tasks.tokenize import tokenize
    from tasks.validate import check_quality, plot_token_lengths, tokens_quality

    data, model = DataConfig(sources=[JsonlSource(path=str(export))]), ModelConfig()
    seconds: dict[str, float] = {"imports": time.perf_counter() - started}
    cpu: dict[str, float] = {"imports": time.process_time()}
    folders = {name: work / name for name in ("collect", "template", "tokenize", "validate", "split")}
    for folder in folders.values():
        folder.mkdir(parents=True)

    high: dict[str, int] = {"imports": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}

    def timed(name: str, run) -> dict:
        began, cpu_began = time.perf_counter(), time.process_time()
        figures = run()
        seconds[name] = round(time.perf_counter() - began, 2)
        cpu[name] = round(time.process_time() - cpu_began, 2)
        high[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak so far (KiB): where it rose
        return figures

    collected = timed("collect", lambda: collect.body(data, None, folders["collect"]))
    timed("template", lambda: template.body(folders["collect"], TemplateConfig(), folders["template"], model))
    timed("tokenize", lambda: tokenize.body(folders["template"], TokenizeConfig(), model, folders["tokenize"]))

    def validate() -> dict:
        reports = [json.loads((folders[s] / "report.json").read_text()) for s in ("collect", "tokenize")]
        report, lengths = tokens_quality(*reports, folders["tokenize"] / "tokens.parquet")
        check_quality(report, data)
        plot_token_lengths(lengths, report["max_length"], folders["validate"] / "token_lengths.png")
        return report

    quality = timed("validate", validate)
    figures = timed("split", lambda: split.body(folders["tokenize"], SplitConfig(), folders["split"]))
    seconds["total"] = round(time.perf_counter() - started, 2)
    return {
        "seconds": seconds,
        "cpu": cpu,
        "high_kib": high,
        "rows_read": collected["rows_read"],
        "rows": collected["rows"],
        "dropped": quality["dropped"],
        "train_rows": figures["train_rows"],
        "test_rows": figures["test_rows"],
    }


def measure(export: Path, work: Path) -> dict:
    """Run `child` in a fresh process; out: its figures plus wall seconds and its own peak RSS in bytes."""
    command = [sys.executable, __file__, "--child", str(export), str(work)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    output = process.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"child failed on {export} (status {status}):\n{output[-2000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    cpu = usage.ru_utime + usage.ru_stime
    return {**result, "wall": wall, "cpu_total": cpu, "peak_rss": usage.ru_maxrss * 1024}  # ru_maxrss: KiB


def main(argv: list[str] | None = None) -> int:
    """Generate, prepare and measure each size; print the table and the verdicts. 0 when memory stays in target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("EXPORT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))), flush=True)
        return 0
    scratch = args.work or Path(tempfile.mkdtemp(prefix="finetune-data-scale-"))
    results = []
    try:
        for size in args.sizes:
            export = scratch / f"export-{size}.jsonl"
            write_export(export, size)
            load_before = os.getloadavg()
            result = measure(export, scratch / f"run-{size}")
            result.update(size=size, mb=export.stat().st_size / 1e6, load=(load_before, os.getloadavg()))
            results.append(result)
            shutil.rmtree(scratch / f"run-{size}", ignore_errors=True)
            export.unlink()
            print_row(result, results[0], flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    base = results[0]
    worst = max(r["peak_rss"] / base["peak_rss"] for r in results)
    print(f"peak memory, largest / smallest run: {worst:.2f}x (target <= {MEMORY_TARGET}x): ", end="")
    print("PASS" if worst <= MEMORY_TARGET else "FAIL")
    return 0 if worst <= MEMORY_TARGET else 1


def print_row(result: dict, base: dict, flush: bool = False) -> None:
    """One size's line: rows, MB, CPU and wall seconds of the stages, rows per CPU second, peak RSS, ratios against
    `base`, per-stage CPU seconds, the peak RSS reached by the end of each stage (which stage raised it), load
    average."""

    def prep_cpu(r: dict) -> float:
        return sum(v for k, v in r["cpu"].items() if k != "imports")

    rows_ratio = result["size"] / base["size"]
    cpu, wall = prep_cpu(result), result["seconds"]["total"] - result["seconds"]["imports"]
    time_ratio = cpu / prep_cpu(base)
    stages = ", ".join(f"{k} {v:g}" for k, v in result["cpu"].items() if k != "imports")
    highs = ", ".join(f"{k} {v / 1024:.0f}" for k, v in result["high_kib"].items())
    (before, after) = result["load"]
    print(
        f"{result['size']:>9,} rows ({result['mb']:.0f} MB): {cpu:7.1f} CPU s ({wall:.0f} s wall), "
        f"{result['size'] / cpu:7,.0f} rows/CPU s, peak RSS {result['peak_rss'] / 2**20:5.0f} MiB | "
        f"x{rows_ratio:g} rows -> CPU time x{time_ratio:.2f} (per row x{time_ratio / rows_ratio:.2f}), "
        f"memory x{result['peak_rss'] / base['peak_rss']:.2f} | kept {result['rows']:,} of {result['rows_read']:,}, "
        f"train {result['train_rows']:,} test {result['test_rows']:,}, dropped {result['dropped']} | "
        f"stages CPU s: {stages} | peak RSS after each stage, MiB: {highs} | "
        f"load avg {before[0]:.1f} -> {after[0]:.1f}",
        flush=flush,
    )


if __name__ == "__main__":
    raise SystemExit(main())
