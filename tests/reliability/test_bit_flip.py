"""A stored file altered after the fact (one bit flipped, same size): detected by its hash when the run
reaches the stage that made it, reported (file, expected and found sha256), recomputed, and never
handed to the stages that read it.

A copy of the reference run's store gets one bit flipped in the split's test.parquet; the rerun
changes eval.max_new_tokens, so both evaluations run and read the split. Recomputing the split gives
the same bytes, so it keeps its Ref and the stages after it that did not change stay cached.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline.store import LocalStore, sha256_file

pytestmark = [pytest.mark.flow]


def test_a_flipped_bit_is_detected_reported_recomputed_and_never_read(
    prefect_harness, reference_run, checks, logs, tmp_path, monkeypatch
):
    from flows.finetune import finetune

    reference_dir, reference = reference_run
    root = tmp_path / "store"
    shutil.copytree(reference_dir, root)
    split_uri = next(entry["uri"] for entry in reference["stages"] if entry["stage"] == "split")
    target = root / split_uri / "test.parquet"
    original = sha256_file(target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    flipped = sha256_file(target)
    store = LocalStore(root)
    assert store.has_artifact(split_uri), "same size: only hashing can tell"

    handed_out: list[str] = []  # test.parquet's sha256 each time the split artifact is handed to a reader
    fetch = LocalStore.fetch

    def watched_fetch(self, ref):
        folder = fetch(self, ref)
        if ref.uri == split_uri:
            handed_out.append(sha256_file(folder / "test.parquet"))
        return folder

    monkeypatch.setattr(LocalStore, "fetch", watched_fetch)
    summary = finetune(config_path="configs/tiny.yaml", overrides=[f"store.uri={root}", "eval.max_new_tokens=6"])

    states = {entry["stage"]: entry["state"] for entry in summary["stages"]}
    assert states == {
        "collect": "Cached",
        "template": "Cached",
        "tokenize": "Cached",
        "validate": "Cached",
        "split": "Completed",  # recomputed: its cached record pointed at a corrupt artifact
        "train": "Cached",  # the recomputed split has the same bytes and the same Ref: no retraining
        "evaluate (base)": "Completed",
        "evaluate (fine-tuned)": "Completed",  # eval.max_new_tokens changed
        "benchmark (base, arc_easy 0-8)": "Cached",
        "benchmark (fine-tuned, arc_easy 0-8)": "Cached",
        "gate (look 1)": "Completed",
    }
    reports = [m for m in logs.messages() if "corrupt artifact" in m and "test.parquet" in m]
    assert reports and original in reports[0] and flipped in reports[0], logs.messages()
    assert handed_out and set(handed_out) == {original}, "the flipped file was handed to a reader"
    assert sha256_file(target) == original
    assert [e["uri"] for e in summary["stages"][:6]] == [e["uri"] for e in reference["stages"][:6]]
    assert store.open_ref(split_uri).sha256 == next(
        LocalStore(reference_dir).open_ref(e["uri"]).sha256 for e in reference["stages"] if e["stage"] == "split"
    )
    checks.assert_every_manifest_verifies(store)
    assert checks.leftover_temp_files(root) == []
