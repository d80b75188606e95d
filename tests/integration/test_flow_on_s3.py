"""The whole flow against a real S3 server (SeaweedFS): artifacts and Prefect's cache records live in the
bucket, and a second machine (a fresh local cache) pointed at the same bucket finds every stage Cached."""

import pytest

from flows.finetune import finetune
from pipeline.store import StoreSettings, open_store

pytestmark = [pytest.mark.integration, pytest.mark.flow]


def test_flow_on_s3_then_cached_from_a_fresh_cache(prefect_harness, seaweedfs, monkeypatch, tmp_path):
    # Credentials from the environment only: they must not appear in flow parameters.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    uri = "s3://flow-test/runs"
    first = finetune(
        config_path="configs/tiny.yaml",
        overrides=[f"store.uri={uri}", f"store.cache_dir={tmp_path}/machine-a", "train.max_steps=2"],
    )
    assert {e["state"] for e in first["stages"]} == {"Completed"}
    second = finetune(
        config_path="configs/tiny.yaml",
        overrides=[f"store.uri={uri}", f"store.cache_dir={tmp_path}/machine-b", "train.max_steps=2"],
    )
    assert [e["state"] for e in second["stages"]] == ["Cached"] * len(first["stages"])

    store = open_store(StoreSettings(uri=uri))
    stored = store.list("")
    assert any(path.startswith("_prefect/") for path in stored), "Prefect's cache records are in the bucket"
    for entry in first["stages"]:
        assert store.has_artifact(entry["uri"]), entry["uri"]
    model_files = store.list(next(e["uri"] for e in first["stages"] if e["stage"] == "train"))
    assert any(path.endswith("model/model.safetensors") for path in model_files)
    assert not any(path.endswith((".bin", ".pkl", ".pt")) for path in stored), "nothing pickled in the store"
