"""Nothing read from the store (or from a model folder) is unpickled; models load from safetensors only;
trust_remote_code is off unless the config turns it on.

The pickles here are real exploits: unpickling one runs code that writes a marker file. Every test
plants one where a careless loader would read it and checks the marker never appears.
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from exploits import MARKER, exploit

REPO = Path(__file__).resolve().parents[2]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")

pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning")


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from pipeline.assets import resolve_model

    return Path(resolve_model("tiny-neox"))


def test_the_exploit_is_real(tmp_path: Path):
    pickle.loads(exploit(tmp_path / MARKER))
    assert (tmp_path / MARKER).read_text() == "unpickled"


def test_a_pickle_only_model_folder_is_refused_before_any_byte_is_unpickled(tiny_folder: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from pipeline.assets import model_load_kwargs
    from pipeline.models import ModelFolderError, check_model_spec, load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    (folder / "pytorch_model.bin").write_bytes(exploit(tmp_path / MARKER))

    with pytest.raises(ModelFolderError, match=r"expected model\.safetensors .*found \['pytorch_model\.bin'\]"):
        load_model(str(folder), device="cpu")
    with pytest.raises(ModelFolderError, match="pickled weights are never loaded"):
        check_model_spec(str(folder))
    # Defence in depth: even a direct transformers call with the pipeline's kwargs refuses the .bin.
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(str(folder), **model_load_kwargs())
    assert not (tmp_path / MARKER).exists()


def test_safetensors_are_used_even_with_a_pickle_planted_beside_them(tiny_folder: Path, tmp_path: Path):
    from pipeline.models import load_model, load_tokenizer

    folder = tmp_path / "planted"
    shutil.copytree(tiny_folder, folder)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "model.pkl"):
        (folder / name).write_bytes(exploit(tmp_path / MARKER))
    model = load_model(str(folder), device="cpu")
    load_tokenizer(str(folder))
    assert model.num_parameters() > 0
    assert not (tmp_path / MARKER).exists()


def test_an_adapter_with_pickled_weights_is_refused(tmp_path: Path):
    from pipeline.models import ModelFolderError, load_model

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "tiny-neox", "peft_type": "LORA"})
    )
    (folder / "adapter_model.bin").write_bytes(exploit(tmp_path / MARKER))
    with pytest.raises(ModelFolderError, match=r"expected adapter_model\.safetensors"):
        load_model(str(folder), device="cpu")
    assert not (tmp_path / MARKER).exists()


def test_loaders_ask_for_safetensors_and_no_remote_code_unless_told(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch):
    import transformers

    import pipeline.models as models
    from pipeline.assets import model_load_kwargs

    calls: list[dict] = []
    auto_model, auto_tokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer  # what models loads
    real_model, real_tokenizer = auto_model.from_pretrained, auto_tokenizer.from_pretrained

    def spy(real):
        def call(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(auto_model, "from_pretrained", spy(real_model))
    monkeypatch.setattr(auto_tokenizer, "from_pretrained", spy(real_tokenizer))
    models.load_model(str(tiny_folder), device="cpu")
    models.load_tokenizer(str(tiny_folder))
    assert calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is False
    assert calls[1]["trust_remote_code"] is False
    calls.clear()
    models.load_model(str(tiny_folder), device="cpu", trust_remote_code=True)
    assert calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is True
    assert model_load_kwargs() == {"trust_remote_code": False, "use_safetensors": True}


def test_trust_remote_code_is_off_by_default_everywhere():
    from pipeline.config import ModelConfig, load_config
    from pipeline.models import load_model, load_tokenizer
    from tasks.benchmark import load_for_benchmark, run_benchmark
    from tasks.evaluate import evaluate_model

    assert ModelConfig().trust_remote_code is False
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).model.trust_remote_code is False, f"{path.name} turns trust_remote_code on"
        assert "trust_remote_code" not in json.dumps(yaml.safe_load(path.read_text()) or {}), path.name
    for function in (load_model, load_tokenizer, load_for_benchmark, run_benchmark, evaluate_model):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function.__qualname__


def test_checkpoint_state_is_only_read_with_the_restricted_unpickler(tmp_path: Path):
    """Resuming from a stored checkpoint reads optimizer/scheduler/RNG state, which torch saves as pickles.

    The Trainer reads them with torch.load(weights_only=True): a restricted unpickler that refuses any
    global it does not know, so the exploit cannot run. Checked on the installed transformers source (an
    upgrade that drops weights_only fails here) and on the exploit itself.
    """
    import torch
    import transformers.trainer

    source = Path(inspect.getsourcefile(transformers.trainer)).read_text()
    loads = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
    ]
    assert loads, "the Trainer no longer calls torch.load: re-check how it resumes"
    for call in loads:
        weights_only = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("weights_only")
        assert weights_only == "True", f"transformers/trainer.py:{call.lineno} torch.load without weights_only=True"

    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (tmp_path / name).write_bytes(exploit(tmp_path / MARKER))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / name, weights_only=True)
    assert not (tmp_path / MARKER).exists()


def _is_pickle(path: Path) -> bool:
    data = path.read_bytes()[:2]
    if len(data) == 2 and data[0] == 0x80 and 2 <= data[1] <= 5:  # pickle protocol 2-5 header
        return True
    if zipfile.is_zipfile(path):  # torch.save's zip format holds data.pkl
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


def test_stage_results_in_the_store_are_json_and_nothing_stored_is_a_pickle(prefect_harness, tmp_path: Path):
    """Prefect's cache records live in the store (`_prefect/`): they must be JSON naming only our Ref class."""
    from pipeline.config import StoreConfig, load_config
    from pipeline.stage import result_storage_for
    from pipeline.store import open_store
    from tasks.collect import collect, source_fingerprints

    rows = tmp_path / "faq.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(25)))
    config = load_config(None, [f"data.sources=[{{path: '{rows}'}}]"])
    store_config = StoreConfig(uri=str(tmp_path / "store"))
    task = collect.with_options(result_storage=result_storage_for(store_config))  # as the flow runs it
    ref = task(config=config.data, store=store_config, fingerprints=source_fingerprints(config.data))
    state = task(
        config=config.data, store=store_config, fingerprints=source_fingerprints(config.data), return_state=True
    )
    assert state.name == "Cached" and state.result() == ref  # read back from the JSON record in the store

    root = tmp_path / "store"
    records = sorted((root / "_prefect").iterdir())
    assert records, "no Prefect result record in the store"
    for record_path in records:
        record = json.loads(record_path.read_bytes())
        assert record["metadata"]["serializer"]["type"] == "json", record["metadata"]
        classes = set()

        def collect_classes(obj, classes=classes):  # this record's set, bound now (B023)
            if isinstance(obj, dict):
                classes.update(v for k, v in obj.items() if k in ("__class__", "__exc_type__"))
                return obj
            return obj

        json.loads(record["result"], object_hook=collect_classes)
        assert classes <= {"pipeline.refs.Ref"}, classes
    for path in root.rglob("*"):
        assert not path.name.endswith(PICKLE_SUFFIXES), path
        assert not (path.is_file() and _is_pickle(path)), path
    assert open_store(store_config).has_artifact(ref.uri)


def test_a_planted_pickle_cache_record_is_ignored_and_replaced_never_unpickled(prefect_harness, tmp_path: Path):
    """Prefect decodes a record with the serializer the record names: a planted 'pickle' record must not be loaded."""
    import base64

    from pipeline.config import StoreConfig, load_config
    from pipeline.stage import result_storage_for
    from tasks.collect import collect, source_fingerprints

    rows = tmp_path / "faq.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(25)))
    config = load_config(None, [f"data.sources=[{{path: '{rows}'}}]"])
    store_config = StoreConfig(uri=str(tmp_path / "store"))
    task = collect.with_options(result_storage=result_storage_for(store_config))
    arguments = dict(config=config.data, store=store_config, fingerprints=source_fingerprints(config.data))
    ref = task(**arguments)
    [record_path] = (tmp_path / "store" / "_prefect").iterdir()
    record = json.loads(record_path.read_bytes())
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    record["result"] = base64.encodebytes(exploit(tmp_path / MARKER)).decode()
    record_path.write_text(json.dumps(record))

    state = task(**arguments, return_state=True)
    assert not (tmp_path / MARKER).exists(), "the planted record was unpickled"
    assert state.name != "Cached" and state.result() == ref, (
        "the refused record counts as none: the stage answers again"
    )
    rewritten = json.loads(record_path.read_bytes())
    assert rewritten["metadata"]["serializer"]["type"] == "json", "a fresh JSON record replaced the planted one"
    assert task(**arguments, return_state=True).name == "Cached"


@pytest.mark.parametrize(
    "record, reason",
    [
        (b"\x80\x04not json", "in JSON"),
        (json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": "gASV"}).encode(), "serializer 'json'"),
        (
            json.dumps(
                {
                    "metadata": {"serializer": {"type": "json"}},
                    "result": json.dumps({"__class__": "os.PathLike", "data": {}}),
                }
            ).encode(),
            "os.PathLike",
        ),
        (
            json.dumps(
                {
                    "metadata": {"serializer": {"type": "json"}},
                    "result": json.dumps({"__exc_type__": "antigravity.Fly", "message": ""}),
                }
            ).encode(),
            "antigravity",
        ),
    ],
)
def test_result_records_naming_anything_but_refs_are_refused(record: bytes, reason: str):
    from pipeline.stage import UnsafeResultRecord, check_result_record

    with pytest.raises(UnsafeResultRecord, match=reason):
        check_result_record(record, "_prefect/key")
    good = {
        "metadata": {"serializer": {"type": "json"}},
        "result": json.dumps({"__exc_type__": "pipeline.rows.DataError", "message": "bad row"}),
    }
    import pipeline.rows  # noqa: F401  (a failed task's record names an exception its run imported)

    assert check_result_record(json.dumps(good).encode(), "_prefect/key") == json.dumps(good).encode()
