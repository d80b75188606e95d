"""Two flow runs of the same config, started together against the same local store, both finish; each
stage ends up as one artifact that both runs point at (whoever commits second keeps the first one's
artifact and uses its Ref), every manifest verifies, and nothing half-written or left over remains.

The two runs are the session's `concurrent_runs` fixture (conftest.py); once checked here, their store
is also the uninterrupted reference the other fault tests compare with.
"""

from __future__ import annotations

import pytest

from pipeline.card import card_prefix
from pipeline.store import LocalStore

pytestmark = [pytest.mark.flow]


def test_two_runs_at_once_on_one_store_both_finish_with_one_set_of_artifacts(concurrent_runs, checks):
    first, second = concurrent_runs.runs
    assert concurrent_runs.codes == [0, 0], f"{first.tail()}\n-----\n{second.tail()}"

    a, b = first.summary(), second.summary()
    assert [e["stage"] for e in a["stages"]] == checks.STAGES
    assert [e["uri"] for e in a["stages"]] == [e["uri"] for e in b["stages"]], "the runs point at different artifacts"
    assert a["model_uri"] == b["model_uri"]
    root = concurrent_runs.store
    store = LocalStore(root)
    committed = checks.assert_every_manifest_verifies(store)
    # Every stage's artifact, plus the passing model's card (one per model, committed like a stage's output).
    train_uri = next(e["uri"] for e in a["stages"] if e["stage"] == "train")
    expected = {e["uri"] for e in a["stages"]} | {card_prefix(train_uri)}
    assert sorted(committed) == sorted(expected), "an extra (duplicate or orphan) artifact"
    assert all(checks.artifact_uris(store).values()), "an artifact folder without a manifest"
    assert checks.leftover_temp_files(root) == []
    assert not store.list("checkpoints")
    # Which run computed what depends on timing; for the record (pytest -rA shows it).
    print({e["stage"]: f"{e['state']}/{f['state']}" for e, f in zip(a["stages"], b["stages"])})


# Two writers committing the same artifacts at the same moment, with different bytes in one file (as the
# train stage's report.json has: timings). Run in two processes, started together.
_WRITER = """
import json, sys
from pathlib import Path
from pipeline.store import LocalStore

root, name, rounds, work = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
store, refs = LocalStore(root), {}
(work.parent / f"ready-{name}").touch()  # start together: wait for the other writer
while len(list(work.parent.glob("ready-*"))) < 2:
    pass
for i in range(rounds):
    staging = work / f"{name}-{i}"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "weights.bin").write_bytes(bytes(range(256)) * 400)  # the same in both writers
    (staging / "report.json").write_text(json.dumps({"writer": name, "seconds": i}))  # not the same
    refs[f"train/{i:032d}"] = store.commit(f"train/{i:032d}", staging, kind="train", inputs={}, config={},
                                           meta={"writer": name}).sha256
print(json.dumps(refs))
"""


def test_two_writers_of_the_same_artifacts_agree_on_one_intact_artifact_each(tmp_path, checks):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, rounds = tmp_path / "store", 40
    repo = Path(__file__).resolve().parents[2]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), name, str(rounds), str(tmp_path / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        for name in ("a", "b")
    ]
    results = [writer.communicate(timeout=300) for writer in writers]
    assert all(writer.returncode == 0 for writer in writers), [err for _, err in results]
    refs_a, refs_b = (json.loads(out) for out, _ in results)
    store = LocalStore(root)
    assert sorted(checks.assert_every_manifest_verifies(store)) == sorted(refs_a)
    for uri in refs_a:
        # Both writers hold the Ref of what is stored: whoever came second kept the first one's artifact.
        assert refs_a[uri] == refs_b[uri] == store.open_ref(uri).sha256, uri
    assert checks.leftover_temp_files(root) == []


def test_two_runs_registering_the_result_storage_at_once_both_go_on(prefect_harness, monkeypatch, tmp_path):
    # Found by the two-runs test on a fresh Prefect server: both runs register the result storage's block
    # type, the slower gets 409 Conflict (ObjectAlreadyExists) and its run failed before any stage ran.
    from prefect.exceptions import ObjectAlreadyExists

    from pipeline.stage import ArtifactStoreResults, result_storage_for
    from pipeline.store import StoreSettings

    save, calls = ArtifactStoreResults.save, []

    def lose_the_race_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ObjectAlreadyExists(http_exc=RuntimeError("409 Conflict: block type already exists"))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(ArtifactStoreResults, "save", lose_the_race_once)
    block = result_storage_for(StoreSettings(uri=str(tmp_path / "store")))
    assert len(calls) == 2 and block.uri == str(tmp_path / "store")
