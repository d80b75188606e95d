"""The bad-input corpus: every malformed input the pipeline accepts (data files, configs, CLI arguments,
model specs, store locations) is refused with exit code 2 or a named exception whose message names the
file / line / key and what was expected, and the artifact store is left byte-for-byte as it was.

One parametrised test runs the whole corpus through the real entry points (`finetune.cli.main`, or the
Python API for the exception cases). Data cases run the real Prefect flow (`finetune run`) and fail in
collect: one per kind of data error here; the whole corpus of bad data files (every reader and source kind) is
checked on the collect stage itself in tests/unit/test_collect_bad_input.py. Everything else fails before any
Prefect work starts. The table of cases and the message each gives is in the module's CASES list (ids are the
case names).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from data_files import GOOD, jsonl, write
from exploits import MARKER, exploit  # a malicious pickle in the corpus writes MARKER if anything ever unpickles it

import flows.finetune  # noqa: F401  Prefect sets up its console log handler on import: not inside a test's capsys
from finetune.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning")


# --------------------------------------------------------------------------- helpers


def run(tmp: Path, *sets: str, config: str = TINY, command: str = "run") -> list[str]:
    """`finetune <command> --config <config> --set store.uri=<tmp>/store --set ...`."""
    argv = [command, "--config", config, "--set", f"store.uri={tmp / 'store'}"]
    for item in sets:
        argv += ["--set", item]
    return argv


def run_data(tmp: Path, source: str, *sets: str) -> list[str]:
    """`finetune run` on the tiny config with one data source (YAML flow mapping) and data.min_rows=1."""
    return run(tmp, f"data.sources=[{source}]", "data.min_rows=1", *sets)


def tiny_config_json() -> str:
    return json.dumps(
        {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "vocab_size": 512,
        }
    )


def pickle_only_model(tmp: Path) -> str:
    folder = tmp / "pickled-model"
    write(folder, "config.json", tiny_config_json())
    write(folder, "pytorch_model.bin", exploit(tmp / MARKER))
    return str(folder)


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (folders included as '<dir>/')."""
    if not root.exists():
        return {}
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        files[rel + ("/" if path.is_dir() else "")] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
    return files


def seed_store(root: Path) -> None:
    """A store that already holds one committed artifact, so 'unchanged' is checked against real content."""
    from pipeline.store import LocalStore

    staging = root.parent / "seed-staging"
    write(staging, "rows.jsonl", jsonl(GOOD[:3]))
    LocalStore(root).commit(
        "collect/" + "0" * 32, staging, kind="collect", inputs={}, config={"seed": True}, meta={"rows": 3}
    )


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, what must happen, and the message that must say so.

    `make(tmp)` writes any files and returns CLI argv (run through finetune.cli.main) or a
    callable (run as Python API). `expect` is the exit code (2) or the exception type.
    `message` is a regex searched in stderr (or the exception text); it must name the
    file / line / key and what was expected or found.
    """

    id: str
    make: Callable[[Path], list[str] | Callable[[], object]]
    expect: int | type[BaseException]
    message: str
    flow: bool = False  # needs the Prefect test server (the flow starts and fails in collect)


def _api_load_model(tmp: Path) -> Callable[[], object]:
    from pipeline.models import load_model

    folder = pickle_only_model(tmp)
    return lambda: load_model(folder, device="cpu")


def _api_adapter_pickle(tmp: Path) -> Callable[[], object]:
    from pipeline.models import load_model

    folder = tmp / "adapter"
    write(folder, "adapter_config.json", json.dumps({"base_model_name_or_path": "tiny-neox", "peft_type": "LORA"}))
    write(folder, "adapter_model.bin", exploit(tmp / MARKER))
    return lambda: load_model(str(folder), device="cpu")


def _api_finetuner(tmp: Path) -> Callable[[], object]:
    from finetune.api import FineTuner

    return lambda: FineTuner("tiny-neox", config=TINY, overrides=[f"store.uri={tmp / 'store'}", "train.max_steps=-1"])


def _api_store_escape(tmp: Path) -> Callable[[], object]:
    from pipeline.store import StoreSettings, open_store

    store = open_store(StoreSettings(uri=str(tmp / "store")))
    return lambda: store.put_bytes("collect/../../escaped.txt", b"x")


def _api_ref_escape(tmp: Path) -> Callable[[], object]:
    from pipeline.refs import Ref
    from pipeline.store import StoreSettings, open_store

    store = open_store(StoreSettings(uri=str(tmp / "store")))
    return lambda: store.fetch(Ref(kind="collect", uri="collect/%2e%2e/%2e%2e/etc", sha256="0" * 64))


def _file(name: str, content: str | bytes, extra: str = "") -> Callable[[Path], list[str]]:
    """A case maker: write `content` to tmp/name and run the flow with it as the only source (+ `extra` keys)."""
    return lambda tmp: run_data(tmp, f"{{path: '{write(tmp, name, content)}'{extra}}}")


def _large(name: str, rows: int, tail: str = "", repeat: int = 1) -> Callable[[Path], list[str]]:
    """A case maker: a JSON Lines file of `rows` distinct good rows (each `repeat` times in a row), then `tail`."""
    content = "".join(
        json.dumps({"question": f"What does function number {i} do?", "answer": f"It returns {i}."}) + "\n"
        for i in range(rows)
        for _ in range(repeat)
    )
    return lambda tmp: run_data(tmp, f"{{path: '{write(tmp, name, content + tail)}'}}")


def _csv(rows: str) -> Callable[[Path], list[str]]:
    return _file("faq.csv", rows)


def _all_duplicates(tmp: Path) -> list[str]:
    path = write(tmp, "dup.jsonl", jsonl(GOOD[:1] * 30))
    return run(tmp, f"data.sources=[{{path: '{path}'}}]", "data.max_bad_fraction=1.0")


def _yaml_file(text: str, *sets: str) -> Callable[[Path], list[str]]:
    return lambda tmp: run(tmp, *sets, config=write(tmp, "bad.yaml", text))


def _model_without_config(tmp: Path) -> list[str]:
    write(tmp, "no-config/model.safetensors", b"\x00" * 16)
    return run(tmp, f"model.name={tmp / 'no-config'}")


CASES: list[Case] = [
    # ---- data files (the flow starts, collect refuses the file, nothing is committed): one case per kind of
    # error, end to end (broken content, no usable schema, too few rows left, a path naming nothing, a source that
    # is not a file). Every other bad data file is refused by the collect stage itself in
    # tests/unit/test_collect_bad_input.py, with the same messages, without a flow run each.
    Case(
        "jsonl_broken_line",
        _file("bad.jsonl", jsonl(GOOD[:2]) + '{"question": "x", "answer": }\n'),
        2,
        r"bad\.jsonl:3: expected a JSON object, found malformed JSON \(Expecting value at column \d+\)",
        flow=True,
    ),
    Case(  # collect streams: the error still names the line, deep in the file, and nothing of it is stored
        "jsonl_broken_line_deep_in_a_large_file",
        _large("large.jsonl", 100_000, '{"question": "x", "answer": }\n' + jsonl(GOOD[:3])),
        2,
        r"large\.jsonl:100001: expected a JSON object, found malformed JSON \(Expecting value at column \d+\)",
        flow=True,
    ),
    Case(  # fails after collect's second pass wrote its rows to the staging folder: none may reach the store
        "too_many_duplicates_in_a_large_file",
        _large("halves.jsonl", 40_000, repeat=2),
        2,
        r"expected at most data\.max_bad_fraction=0\.25 of the rows read to be dropped, found 40000 of 80000 \(50%\)",
        flow=True,
    ),
    Case(
        "csv_missing_columns",
        _csv("q,a\nWhy?,Because.\n"),
        2,
        r"faq\.csv: expected the columns of an accepted schema \(question\+answer; .*; messages\), found \['a', 'q'\]; "
        r"or map your columns",
        flow=True,
    ),
    Case(
        "all_rows_duplicates",
        _all_duplicates,
        2,
        r"data: expected at least data\.min_rows=20 rows, found 1\n  duplicate: 29 \(e\.g\. .*repeats an earlier row\)",
        flow=True,
    ),
    Case(
        "missing_file",
        lambda t: run_data(t, f"{{path: '{t / 'missing.jsonl'}'}}"),
        2,
        r"data\.sources\[0\]\.path: expected a file, found nothing at '.*missing\.jsonl'",
        flow=True,
    ),
    Case(
        "hf_hub_dataset_offline",
        lambda t: run_data(t, "{kind: hf, dataset: some-org/some-dataset}"),
        2,
        r"hub dataset 'some-org/some-dataset' \(split 'train'; no local folder of that name\): expected a loadable "
        r"dataset, found .*HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set",
        flow=True,
    ),
    # ---- config files
    Case("config_file_missing", lambda t: run(t, config=str(t / "nope.yaml")), 2, r"nope\.yaml: config file not found"),
    Case(
        "config_yaml_syntax",
        _yaml_file("model:\n  name: tiny-neox\ntrain:\n  max_steps: [3\n  lr: 2\n"),
        2,
        r"bad\.yaml:5:\d+: expected valid YAML, found .*\(while parsing a flow sequence at line 4\)",
    ),
    Case(
        "config_bad_indentation",
        _yaml_file("train:\n max_steps: 3\n  learning_rate: 2\n"),
        2,
        r"bad\.yaml:3:\d+: expected valid YAML, found mapping values are not allowed here",
    ),
    Case(
        "config_not_a_mapping",
        _yaml_file("- train\n- eval\n"),
        2,
        r"bad\.yaml: expected a mapping of sections at the top, found list",
    ),
    Case(
        "config_not_utf8",
        lambda t: run(t, config=write(t, "bad.yaml", "model:\n  name: tiny-neox\n# caf\xe9\n".encode("latin-1"))),
        2,
        r"bad\.yaml:3: expected UTF-8 YAML text, found byte 0xe9",
    ),
    Case(
        "config_unknown_section_in_file",
        _yaml_file("model:\n  name: tiny-neox\ntrian:\n  max_steps: 3\n"),
        2,
        r"bad\.yaml: trian: unknown key \(did you mean 'train'\?\); expected one of \['model', 'data', .*\] "
        r"\(found a section with keys \['max_steps'\]\) \(line 3\)",
    ),
    Case(
        "config_wrong_type_in_file",
        _yaml_file("train:\n  max_steps: 4\n  learning_rate: fast\n"),
        2,
        r"bad\.yaml: train\.learning_rate: Input should be a valid number.* \(found 'fast'\) \(line 3\)",
    ),
    Case(
        "unknown_key_with_suggestion",
        lambda t: run(t, "train.learnin_rate=0.1"),
        2,
        r"tiny\.yaml: train\.learnin_rate: unknown key \(did you mean 'learning_rate'\?\); expected one of \[.*'max_steps'.*\] \(found 0\.1\)",
    ),
    Case(
        "unknown_source_key",
        lambda t: run(t, "data.sources.0.packge=more_itertools"),
        2,
        r"data\.sources\.0\.packge: unknown key \(did you mean 'package'\?\); expected one of \[.*'phrasings'.*\]",
    ),
    Case(
        "learning_rate_not_a_number",
        lambda t: run(t, "train.learning_rate=fast"),
        2,
        r"train\.learning_rate: Input should be a valid number, unable to parse string as a number \(found 'fast'\)",
    ),
    Case(
        "negative_max_steps",
        lambda t: run(t, "train.max_steps=-3"),
        2,
        r"train\.max_steps: Input should be greater than 0 \(found -3\)",
    ),
    Case(
        "test_fraction_above_one",
        lambda t: run(t, "split.test_fraction=1.5"),
        2,
        r"split\.test_fraction: Input should be less than 1 \(found 1\.5\)",
    ),
    Case(
        "several_problems_at_once",
        lambda t: run(t, "train.max_steps=0", "eval.batch_size=-1", "tokenize.labels=none"),
        2,
        r"(?s)(?=.*train\.max_steps: Input should be greater than 0 \(found 0\))(?=.*eval\.batch_size: Input should be "
        r"greater than 0 \(found -1\))(?=.*tokenize\.labels: Input should be 'all' or 'completion' \(found 'none'\))",
    ),
    Case(
        "gate_unknown_metric",
        lambda t: run(t, "gates=[{metric: eval.bleu, value: 0.5}]"),
        2,
        r"gates\.0: expected eval\.<exact_match\|similarity_mean\|.*> or benchmark\.<task>\.<acc\|acc_norm>, found 'eval\.bleu'",
    ),
    Case(
        "gate_invalid_op",
        lambda t: run(t, "gates=[{metric: eval.exact_match, op: '>', value: 0.5}]"),
        2,
        r"gates\.0\.op: Input should be '>=' or '<=' \(found '>'\)",
    ),
    Case(
        "gate_on_task_not_benchmarked",
        lambda t: run(t, "gates=[{metric: benchmark.piqa.acc, value: 0.1}]"),
        2,
        r"gate metric 'benchmark\.piqa\.acc' names task 'piqa', expected one of benchmark\.tasks \['arc_easy'\]",
    ),
    Case(
        "template_unknown_placeholder",
        lambda t: run(t, "template.name=custom", "template.custom='Q: {question} {context}'"),
        2,
        r"template\.custom: unknown placeholder\(s\) \{context\}: expected only \{question\}, \{input\}, \{answer\}",
    ),
    Case(
        "template_file_missing",
        lambda t: run(t, "template.name=custom", f"template.file={t / 'tpl.txt'}"),
        2,
        r"template: .*template\.file: expected a readable file, found no file at '.*tpl\.txt'",
    ),
    Case(
        "unknown_source_kind",
        lambda t: run(t, "data.sources=[{kind: xml, path: a.xml}]"),
        2,
        r"data\.sources\.0: expected kind: file, jsonl, json, csv, parquet, hf or docs",
    ),
    Case(
        "unknown_lm_eval_task",
        lambda t: run(t, "benchmark.tasks=[mmlu_pro]"),
        2,
        r"benchmark\.tasks: unknown lm-eval task\(s\) \['mmlu_pro'\], expected local tasks \['arc_easy', .*\]",
    ),
    Case(
        "s3_bad_bucket_name",
        lambda t: ["run", "--config", TINY, "--set", "store.uri=s3://Bad_Bucket!/runs"],
        2,
        r"store\.uri: invalid bucket in 's3://Bad_Bucket!/runs': expected 1-63 lowercase letters, digits, .*found 'Bad_Bucket!'",
    ),
    Case(
        "s3_uri_with_credentials",
        lambda t: ["run", "--config", TINY, "--set", "store.uri=s3://AKIAEXAMPLE:topsecret@bucket/x"],
        2,
        r"store\.uri: invalid bucket in 's3://\*\*\*@bucket/x': .*found '\*\*\*@bucket'",
    ),
    Case(
        "credential_of_wrong_type_not_echoed",
        lambda t: run(t, "store.access_key_id=AKIAEXAMPLEKEY123456", "store.secret_access_key=[987654321, 123]"),
        2,
        r"^(?!(?s:.*)987654321)(?s:.*)store\.secret_access_key: Input should be a valid string \(found a value of "
        r"type list, not shown\)",
    ),
    Case(
        "store_unsupported_scheme",
        lambda t: ["run", "--config", TINY, "--set", "store.uri=ftp://files.example.com/runs"],
        2,
        r"store\.uri: expected a folder or s3://bucket/prefix, found 'ftp://files\.example\.com/runs'",
    ),
    Case(
        "store_s3_prefix_escapes",
        lambda t: ["run", "--config", TINY, "--set", "store.uri=s3://bucket/runs/../../other"],
        2,
        r"store\.uri: invalid prefix in 's3://bucket/runs/\.\./\.\./other': '\.' and '\.\.' segments are not allowed",
    ),
    # ---- CLI arguments
    Case(
        "set_without_equals",
        lambda t: run(t, "train.max_steps"),
        2,
        r"--set 'train\.max_steps': expected key\.sub=value, found no '='",
    ),
    Case(
        "set_value_bad_yaml",
        lambda t: run(t, "data.sources=[{path: x"),
        2,
        r"--set 'data\.sources=\[\{path: x': the value at column \d+: expected valid YAML, found expected ',' or '\}'",
    ),
    Case(
        "set_into_a_value",
        lambda t: run(t, "train.max_steps.x=1"),
        2,
        r"--set train\.max_steps\.x: train\.max_steps is a value, not a section",
    ),
    Case(
        "set_list_index_out_of_range",
        lambda t: run(t, "data.sources.5.limit=3"),
        2,
        r"--set data\.sources\.5: expected a list index below 1, found '5'",
    ),
    Case(
        "unknown_subcommand",
        lambda t: ["trian", "--config", TINY],
        2,
        r"argument command: invalid choice: 'trian' \(choose from '?run'?, '?validate'?, .*\)",
    ),
    Case("unknown_flag", lambda t: [*run(t), "--max-steps", "3"], 2, r"unrecognized arguments: --max-steps 3"),
    Case(
        "ask_negative_max_new_tokens",
        lambda t: ["ask", "tiny-neox", "Hi?", "--config", TINY, "--max-new-tokens", "-1"],
        2,
        r"argument --max-new-tokens: expected a positive integer, found -1",
    ),
    # ---- model specs (refused before the flow starts)
    Case(
        "model_path_missing",
        lambda t: run(t, f"model.name={t / 'models' / 'nope'}"),
        2,
        r"tiny\.yaml: model\.name: Unknown model '.*models/nope': it is not a built-in alias, not an existing local "
        r"folder, and it is not a valid Hugging Face hub id either",
    ),
    Case(
        "model_folder_without_config",
        _model_without_config,
        2,
        r"model\.name: model folder .*no-config: expected config\.json .*found \['model\.safetensors'\]",
    ),
    Case(
        "model_folder_pickle_only",
        lambda t: run(t, f"model.name={pickle_only_model(t)}"),
        2,
        r"model\.name: model folder .*pickled-model: expected model\.safetensors \(pickled weights are never loaded: "
        r"they can run code\), found \['pytorch_model\.bin'\]; convert it once",
    ),
    Case(
        "model_hub_id_offline",
        lambda t: run(t, "model.name=some-org/some-model-that-is-not-cached"),
        2,
        r"model\.name: Unknown model 'some-org/some-model-that-is-not-cached': .*HF_HUB_OFFLINE is set while the hub "
        r"id is not in the local Hugging Face cache",
    ),
    Case(
        "ask_pickle_only_folder",
        lambda t: ["ask", pickle_only_model(t), "Hi?", "--config", TINY, "--set", f"store.uri={t / 'store'}"],
        2,
        r"model error:\nmodel folder .*pickled-model: expected model\.safetensors .*found \['pytorch_model\.bin'\]",
    ),
    Case(
        "ask_unknown_alias",
        lambda t: [
            "ask",
            "more_itertools_9_steps_20990101T000000Z",
            "Hi?",
            "--config",
            TINY,
            "--set",
            f"store.uri={t / 'store'}",
        ],
        2,
        r"(?s)model error:\nUnknown model 'more_itertools_9_steps_20990101T000000Z'.*\nTrained models in the store .*store \(aliases\)",
    ),
    # ---- Python API (named exceptions)
    Case(
        "api_load_model_pickle_only",
        _api_load_model,
        "ModelFolderError",
        r"model folder .*pickled-model: expected model\.safetensors .*found \['pytorch_model\.bin'\]",
    ),
    Case(
        "api_adapter_pickle_only",
        _api_adapter_pickle,
        "ModelFolderError",
        r"adapter folder .*adapter: expected adapter_model\.safetensors \(pickled weights are never loaded\), "
        r"found \['adapter_config\.json', 'adapter_model\.bin'\]; convert it once",
    ),
    Case(
        "api_finetuner_bad_override",
        _api_finetuner,
        "ConfigError",
        r"tiny\.yaml: train\.max_steps: Input should be greater than 0 \(found -1\)",
    ),
    Case(
        "api_store_key_escapes",
        _api_store_escape,
        ValueError,
        r"invalid store path 'collect/\.\./\.\./escaped\.txt': '\.' and '\.\.' segments are not allowed",
    ),
    Case(
        "api_ref_uri_percent_encoded",
        _api_ref_escape,
        ValueError,
        r"invalid store path 'collect/%2e%2e/%2e%2e/etc': percent-encoded .* read as 'collect/\.\./\.\./etc'",
    ),
]


def _exception_type(expect: int | type[BaseException] | str) -> type[BaseException]:
    if isinstance(expect, type):
        return expect
    from pipeline.config import ConfigError
    from pipeline.models import ModelFolderError

    return {"ConfigError": ConfigError, "ModelFolderError": ModelFolderError}[expect]


def test_the_corpus_is_large_and_varied():
    assert len(CASES) >= 25 and len({case.id for case in CASES}) == len(CASES)
    kinds = {
        "data": sum(c.flow for c in CASES),
        "exit 2 without a flow": sum(not c.flow and c.expect == 2 for c in CASES),
        "exceptions": sum(c.expect != 2 for c in CASES),
    }
    assert min(kinds.values()) >= 5, kinds


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_by_name_and_leaves_the_store_unchanged(
    case: Case, tmp_path: Path, monkeypatch, capsys, request
):
    if case.flow:
        request.getfixturevalue("prefect_harness")
    monkeypatch.chdir(tmp_path)  # a default ./artifacts store would appear here
    store = tmp_path / "store"
    seed_store(store)
    before = snapshot(store)
    action = case.make(tmp_path)

    if isinstance(action, list):
        try:
            code = main(action)
        except SystemExit as exit_:  # argparse exits on its own with code 2
            code = exit_.code
        err = capsys.readouterr().err
        assert code == case.expect, f"exit code {code}, expected {case.expect}; stderr:\n{err}"
        message = err[err.rfind("\n", 0, err.rfind("error:")) + 1 :]  # the CLI's own last word, after Prefect's logs
        assert "Traceback" not in message, err
    else:
        with pytest.raises(_exception_type(case.expect)) as raised:
            action()
        message = str(raised.value)
    assert re.search(case.message, message), f"message does not match {case.message!r}:\n{message}"

    after = snapshot(store)
    for path in set(after) - set(before):
        # Prefect persists a failed task's exception into result storage (pipeline/stage.py puts that in the
        # store) under a random key: a JSON record naming the error, never an artifact nor a cache record.
        if re.fullmatch(r"_prefect(/[0-9a-f]{32})?", path.rstrip("/")) and case.flow:
            if not path.endswith("/"):
                record = json.loads((store / path).read_bytes())
                assert json.loads(record["result"])["__exc_type__"] == "pipeline.rows.DataError", record
            del after[path]
    assert after == before, "the store changed"
    assert not (tmp_path / "artifacts").exists(), "something was written to a default store"
    assert not (tmp_path / MARKER).exists(), "a pickle was loaded"
