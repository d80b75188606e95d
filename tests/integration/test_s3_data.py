"""s3:// data sources on a real SeaweedFS server, read with the store's endpoint and credentials."""

import json

import pytest
from pydantic import SecretStr

from pipeline.config import DataConfig, JsonlSource, StoreConfig
from pipeline.rows import DataError
from pipeline.store import open_store
from tasks.collect import collect, collect_data, source_fingerprints

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning"),
]

PAIRS = [{"question": f"What is item {i}?", "answer": f"Item {i}."} for i in range(30)]


def s3_data(s3_settings, name: str) -> str:
    """The s3:// URI of a data object under the test bucket's prefix."""
    return f"{s3_settings.uri}/data/{name}"


def upload(s3_settings, name: str, records) -> str:
    open_store(s3_settings).put_bytes(f"data/{name}", "".join(json.dumps(r) + "\n" for r in records).encode())
    return s3_data(s3_settings, name)


def store_config(s3_settings) -> StoreConfig:
    return StoreConfig(**s3_settings.model_dump())


def test_collect_reads_s3_objects_and_globs(prefect_harness, s3_settings):
    upload(s3_settings, "part1.jsonl", PAIRS[:20])
    upload(s3_settings, "part2.jsonl", PAIRS[20:])
    data = DataConfig(sources=[JsonlSource(path=s3_data(s3_settings, "part*.jsonl"))])
    prints = source_fingerprints(data, s3_settings)
    assert not prints["0"].startswith("unavailable")
    ref = collect(config=data, store=store_config(s3_settings), fingerprints=prints)
    assert ref.meta["rows"] == 30 and ref.meta["sources"] == ["jsonl:part1.jsonl", "jsonl:part2.jsonl"]
    assert open_store(s3_settings).has_artifact(ref.uri)
    upload(s3_settings, "part2.jsonl", PAIRS[20:25])
    assert source_fingerprints(data, s3_settings) != prints, "a changed object changes the collect key"


def test_missing_s3_key_fails_and_stores_nothing(prefect_harness, s3_settings):
    data = DataConfig(sources=[JsonlSource(path=s3_data(s3_settings, "nope.jsonl"))], min_rows=1)
    with pytest.raises(
        DataError, match=r"s3://.*/data/nope.jsonl: expected an object, found none at http://127.0.0.1:\d+"
    ):
        collect(config=data, store=store_config(s3_settings))
    assert open_store(s3_settings).list("collect") == []
    with pytest.raises(DataError, match=r"expected objects matching .*/data/none-\*.jsonl', found none"):
        collect_data(DataConfig(sources=[JsonlSource(path=s3_data(s3_settings, "none-*.jsonl"))]), s3_settings)


def test_wrong_s3_credentials_fail_without_the_secret(prefect_harness, s3_settings):
    uri = upload(s3_settings, "faq.jsonl", PAIRS)
    wrong_secret = "wrong-secret-Kx81zq"
    wrong = s3_settings.model_copy(update={"secret_access_key": SecretStr(wrong_secret)})
    data = DataConfig(sources=[JsonlSource(path=uri)])
    with pytest.raises(DataError, match=r"faq.jsonl: access denied \(\w+\) at http.*check the access key id") as error:
        collect_data(data, wrong)
    assert wrong_secret not in str(error.value) and s3_settings.secret_access_key.get_secret_value() not in str(
        error.value
    )
    with pytest.raises(Exception) as error:  # the store itself refuses the credentials first
        collect.with_options(retries=0)(config=data, store=store_config(wrong))
    assert "access denied" in str(error.value) and wrong_secret not in str(error.value)
    assert open_store(s3_settings).list("collect") == []
