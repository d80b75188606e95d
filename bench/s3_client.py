"""Benchmark: CPU time to make the store's S3 client, against a fresh boto3 session per client.

A run opens its store a few dozen times (each stage, each of Prefect's cache records), and each S3 store makes a
client (`pipeline.store.s3client.make_s3_client`). Each client gets a session of its own, so credentials resolve
afresh, but the sessions share one loader of botocore's service models (`new_boto3_session`). The baseline,
measured in the same process, is what the store did before: `boto3.session.Session().client("s3", ...)`, which
parses botocore's S3 model and endpoint files again for every client. No request is sent (the endpoint is a
closed port). Each side makes `--clients` clients, best of `--repeat`, CPU time of this process.

Run from the repository root:

    .venv/bin/python bench/s3_client.py [--clients 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import boto3
from pydantic import SecretStr

from pipeline.store.s3client import make_s3_client, s3_client_config
from pipeline.store.settings import StoreSettings

SETTINGS = StoreSettings(
    uri="s3://bench/runs",
    endpoint_url="http://127.0.0.1:9",
    access_key_id=SecretStr("AKIABENCHMARK0000000"),
    secret_access_key=SecretStr("bench-secret-not-used-for-any-request"),
)


def fresh_session_client() -> object:
    """The baseline: a client from a new boto3 session (and so a new loader), same arguments as the store's."""
    return boto3.session.Session().client(
        "s3",
        region_name="us-east-1",
        endpoint_url=SETTINGS.endpoint_url,
        aws_access_key_id=SETTINGS.access_key_id.get_secret_value(),
        aws_secret_access_key=SETTINGS.secret_access_key.get_secret_value(),
        config=s3_client_config(SETTINGS),
    )


def cpu_per_client(make: Callable[[], object], clients: int, repeat: int) -> float:
    """Least CPU seconds per client over `repeat` rounds of `clients` clients."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(clients):
            make()
        best = min(best, (time.process_time() - started) / clients)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    make_s3_client(SETTINGS)  # both sides start with botocore imported and its files in the page cache
    fresh_session_client()
    store = cpu_per_client(lambda: make_s3_client(SETTINGS), args.clients, args.repeat)
    fresh = cpu_per_client(fresh_session_client, args.clients, args.repeat)
    load = os.getloadavg()
    print(f"store client (shared model loader): {store * 1000:6.1f} ms CPU per client")
    print(f"baseline (fresh boto3 session):     {fresh * 1000:6.1f} ms CPU per client")
    print(f"ratio baseline / store: {fresh / store:.1f}x; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
