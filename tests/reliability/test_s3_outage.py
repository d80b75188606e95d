"""The S3 server (SeaweedFS) stops in the middle of the work.

* A short outage: the S3 request is retried by botocore (standard retry mode, exponential backoff) and the
  write goes through; the task that made it ran once, so no Prefect task retry was needed.
* The server dies between two uploads of a commit and stays down: the commit fails with a message
  naming the endpoint (never the secret) after its retries; the half-uploaded artifact has no manifest,
  so it does not exist; once the server is back the same commit goes through cleanly.
* The server dies in the middle of a flow run (during training) and stays down: the run fails naming
  the endpoint; when it is back, a rerun reuses every stage that had finished, resumes training from
  the checkpoint in the bucket, and every manifest in the bucket verifies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.refs import MANIFEST_NAME
from pipeline.store import StoreSettings, StoreUnavailable, open_store

pytestmark = [pytest.mark.integration]

BEFORE_TRAIN = ["collect", "template", "tokenize", "validate", "split"]


def _settings(server, tmp_path: Path, **changes) -> StoreSettings:
    return StoreSettings(
        uri=f"s3://outage-{uuid.uuid4().hex[:10]}/runs",
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        access_key_id=SecretStr(server.access_key),
        secret_access_key=SecretStr(server.secret_key),
        cache_dir=str(tmp_path / "s3-cache"),
        **changes,
    )


def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    for name, size in [("a.bin", 1000), ("b.bin", 2000), ("c.jsonl", 300)]:
        (staging / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return staging


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning")  # a task run outside a flow
def test_a_short_outage_is_ridden_out_by_botocore_retries_not_by_a_task_retry(
    prefect_harness, weed_server, tmp_path, logs
):
    from prefect import task

    # 14 attempts: botocore's waits (a random share of 50 ms x 2^n, at most 20 s) add up to > 10 s almost surely.
    store = open_store(_settings(weed_server, tmp_path, retry_attempts=14))
    store.put_bytes("before.txt", b"up")
    runs: list[float] = []

    @task(retries=2, retry_delay_seconds=0)  # a task that could retry, like an I/O stage
    def write_during_the_outage() -> None:
        runs.append(time.monotonic())
        store.put_bytes("during.txt", b"written while the server came back")

    weed_server.stop()
    restart = threading.Timer(2.5, weed_server.start)
    restart.start()
    started = time.monotonic()
    try:
        write_during_the_outage()
    finally:
        restart.join()
    waits = logs.retries()
    assert store.get_bytes("during.txt") == b"written while the server came back"
    assert len(waits) >= 2 and time.monotonic() - started >= 2.5
    # botocore backed off from its 50 ms base for a refused connection, exponentially (ceiling 50 ms x 2^n, 20 s).
    assert waits[0] <= 0.05 < max(waits), f"the waits should grow: {waits}"
    assert all(wait <= min(2.0**n, 20.0) for n, wait in enumerate(waits)), waits
    # Which layer rode the outage out: botocore, inside one request of one task run. The task ran once (Prefect
    # retried nothing); the store logged each failed attempt and botocore's RetryAttempts for the PutObject.
    assert len(runs) == 1, "a Prefect task retry was needed"
    assert logs.retried_requests() == [("PutObject", len(waits))], logs.messages(logging.INFO)
    assert [(op, attempt) for op, attempt, _ in logs.failed_attempts()] == [
        ("PutObject", n) for n in range(1, len(waits) + 1)
    ]


def test_the_server_dying_mid_commit_leaves_no_artifact_and_names_the_endpoint(
    weed_server, tmp_path, logs, monkeypatch
):
    settings = _settings(weed_server, tmp_path, retry_attempts=3)
    store = open_store(settings)
    uri = "split/" + "5" * 32
    staging = _staging(tmp_path)
    put_file, uploaded = store.put_file, []

    def upload_then_lose_the_server(path, local):
        put_file(path, local)
        uploaded.append(path)
        if len(uploaded) == 1:
            weed_server.stop()

    monkeypatch.setattr(store, "put_file", upload_then_lose_the_server)
    with pytest.raises(StoreUnavailable) as failure:
        store.commit(uri, staging, kind="split", inputs={}, config={}, meta={})
    message = str(failure.value)
    assert weed_server.endpoint_url in message and "Gave up after 3 attempt(s)" in message
    assert settings.secret_access_key.get_secret_value() not in message
    waits = logs.retries()
    # botocore retried the upload twice (3 attempts in all), waiting a random share of 50 ms, then of 100 ms.
    # The best-effort clean-up of this attempt's files comes after, and botocore retries those requests too
    # (on a busy machine a stopping server can answer them with a throttling error: longer waits), so only the
    # upload's two waits are bounded here.
    assert len(waits) >= 2 and all(wait <= 0.1 for wait in waits[:2]), waits
    assert ("PutObject", 1, 3) in logs.failed_attempts() and ("PutObject", 2, 3) in logs.failed_attempts()

    weed_server.start()
    monkeypatch.undo()
    # Just restarted after a SIGKILL, SeaweedFS may answer 500 for a few seconds for objects written before it;
    # enough botocore attempts (waits adding up to ~10 s on average) ride that out.
    store = open_store(settings.model_copy(update={"retry_attempts": 12}))
    # One file made it before the server died; without a manifest it is no artifact.
    assert store.list(uri) == [uploaded[0]]
    assert store.read_manifest(uri) is None and not store.has_artifact(uri)
    ref = store.commit(uri, staging, kind="split", inputs={}, config={}, meta={})
    assert store.list(uri) == sorted(f"{uri}/{name}" for name in ["a.bin", "b.bin", "c.jsonl", MANIFEST_NAME])
    assert (store.fetch(ref) / "b.bin").read_bytes() == (staging / "b.bin").read_bytes()


@pytest.mark.flow
def test_the_server_dying_during_a_run_fails_it_and_a_rerun_reuses_what_finished(
    prefect_harness, weed_server, checks, tmp_path, logs, monkeypatch
):
    from flows.finetune import finetune

    # Credentials from the environment only, as in production: they are never flow parameters.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed_server.secret_key)
    settings = _settings(weed_server, tmp_path)
    overrides = [
        f"store.uri={settings.uri}",
        f"store.endpoint_url={weed_server.endpoint_url}",
        "store.region=us-east-1",
        f"store.cache_dir={tmp_path / 'cache'}",
        "store.retry_attempts=3",
    ]
    bucket, prefix = settings.uri[len("s3://") :].split("/", 1)

    # Stop the server as soon as the first training checkpoint is committed to the bucket.
    client, stopped, done = weed_server.client(), threading.Event(), threading.Event()

    def stop_at_first_checkpoint() -> None:
        while not done.is_set():
            try:
                listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/")
                if any(o["Key"].endswith(f"/{MANIFEST_NAME}") for o in listed.get("Contents", [])):
                    weed_server.stop()
                    stopped.set()
                    return
            except Exception:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_at_first_checkpoint, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Exception) as failure:
            finetune(config_path="configs/tiny.yaml", overrides=overrides)
    finally:
        done.set()
        watcher.join()
    assert stopped.is_set(), "the run ended before the server was stopped"
    message = str(failure.value)
    assert weed_server.endpoint_url in message and "Check store.endpoint_url" in message, message
    assert weed_server.secret_key not in message
    assert len(logs.retries()) >= 2  # the requests were retried by botocore, with backoff, before giving up

    weed_server.start()
    # Reads of what was stored before the kill may still fail for a while on busy cores (see the test above):
    # the test's own checks ride that out with more botocore attempts; the rerun keeps the run's 3.
    store = open_store(settings.model_copy(update={"retry_attempts": 12}))
    committed = checks.assert_every_manifest_verifies(store)
    assert {uri.split("/")[0] for uri in committed} == {*BEFORE_TRAIN, "checkpoints"}, committed
    assert not any(uri.startswith("train/") for uri in committed)

    summary = finetune(config_path="configs/tiny.yaml", overrides=overrides)
    states = {entry["stage"]: entry["state"] for entry in summary["stages"]}
    assert [states[stage] for stage in BEFORE_TRAIN] == ["Cached"] * len(BEFORE_TRAIN), states
    assert states["train"] == "Completed"
    train = next(entry for entry in summary["stages"] if entry["stage"] == "train")
    report = json.loads((store.fetch(store.open_ref(train["uri"])) / "report.json").read_text())
    assert report["resumed_from_step"] == 2  # from the checkpoint the bucket kept through the outage
    committed = checks.assert_every_manifest_verifies(store)
    assert {entry["uri"] for entry in summary["stages"]} <= set(committed)
    assert not any(uri.startswith("checkpoints/") for uri in committed)
    assert all(checks.artifact_uris(store).values()), "a folder without a manifest was left in the bucket"


def test_io_tasks_retry_with_backoff_only_on_transient_failures():
    from botocore.exceptions import EndpointConnectionError
    from prefect.states import Failed

    from pipeline.stage import retry_on_transient_errors, stage_task
    from pipeline.store import StoreError
    from tasks.collect import collect

    # Stage tasks that declare retries (I/O tasks, e.g. collect) wait 2 s, 4 s, 8 s, ... (+-25% jitter).
    assert collect.retries == 2 and collect.retry_delay_seconds == [2.0, 4.0] and collect.retry_jitter_factor == 0.25

    @stage_task("probe", retries=3)
    def probe(out: Path) -> dict: ...

    assert probe.retry_delay_seconds == [2.0, 4.0, 8.0] and probe.retry_condition_fn is retry_on_transient_errors

    def failed(error: BaseException) -> Failed:
        return Failed(data=error)

    def raised(error: BaseException, cause: BaseException) -> BaseException:
        try:
            raise error from cause
        except BaseException as chained:
            return chained

    assert retry_on_transient_errors(probe, None, failed(StoreUnavailable("endpoint down")))
    assert retry_on_transient_errors(probe, None, failed(ConnectionResetError("peer reset")))
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert retry_on_transient_errors(probe, None, failed(raised(ValueError("s3://b/k: cannot read"), unreachable)))
    # Bad input or refused access fails at once: a retry would only repeat it after a wait.
    assert not retry_on_transient_errors(probe, None, failed(ValueError("expected a column 'answer'")))
    assert not retry_on_transient_errors(probe, None, failed(StoreError("access denied")))
