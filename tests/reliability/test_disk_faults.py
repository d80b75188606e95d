"""A full disk or a write permission error in the local store: a clear error naming the store and what
happened, nothing partial left behind (no manifest, no files of the failed commit, no temp files), and
what was committed before stays intact.

* A real full disk: a 1 MiB tmpfs mounted in a private mount namespace (`unshare`, no root needed where
  user namespaces are enabled), then a commit larger than the space left.
* ENOSPC reported by fsync of the manifest, the very last write of a commit (as delayed allocation on
  ext4/XFS or a quota can report it), injected at the OS call.
* No write permission: the commit runs as another user (root drops to `nobody`; anyone else gets a
  folder they may not write to).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pipeline.refs import MANIFEST_NAME
from pipeline.store import LocalStore, StoreError

REPO = Path(__file__).resolve().parents[2]

# Run in a child process: commits a small artifact that fits, then one that does not (or may not be
# written), and reports what the store holds afterwards.
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from pipeline.store import LocalStore, StoreError

    root, staging = Path(sys.argv[1]), Path(sys.argv[2])
    if sys.argv[3:] == ["as-nobody"]:  # root: drop to an unprivileged user once everything is imported
        import shutil, tempfile
        scratch = Path(tempfile.mkdtemp())  # one commit, fetch and failure first: every lazy import happens now
        warm = LocalStore(scratch / "store")
        warm.fetch(warm.commit("collect/" + "0" * 32, staging, kind="collect", inputs={}, config={}, meta={}))
        warm.list()
        try:
            with warm._writing("warming up", scratch):
                raise PermissionError(13, "warm-up")
        except StoreError:
            pass
        shutil.rmtree(scratch)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    store = LocalStore(root)
    report = {}
    try:
        store.commit("collect/" + "b" * 32, staging, kind="collect", inputs={}, config={}, meta={})
        report["error"] = None
    except StoreError as error:
        report["error"], report["error_type"] = str(error), type(error).__name__
    except Exception as error:
        report["error"], report["error_type"] = repr(error), type(error).__name__
    report["listing"] = store.list()
    report["temp_files"] = sorted(str(p.relative_to(root)) for p in root.rglob(".~tmp-*"))
    report["free_bytes"] = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    small = "collect/" + "a" * 32
    report["small_intact"] = store.has_artifact(small) and store.fetch(store.open_ref(small)).is_dir()
    print(json.dumps(report))
""")


def _staging(folder: Path, sizes: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        (folder / name).write_bytes(os.urandom(size))
    return folder


def _commit_small(root: Path, tmp: Path) -> None:
    LocalStore(root).commit(
        "collect/" + "a" * 32,
        _staging(tmp / "small", {"rows.jsonl": 20_000}),
        kind="collect",
        inputs={},
        config={},
        meta={},
    )


def test_a_full_disk_gives_a_clear_error_and_leaves_nothing_partial(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` here: cannot mount a private tmpfs to fill")
    mount, script = tmp_path / "tiny-disk", tmp_path / "commit.py"
    mount.mkdir()
    script.write_text(_SCRIPT)
    small = _staging(tmp_path / "small", {"rows.jsonl": 20_000})
    big = _staging(tmp_path / "big", {"a.bin": 300_000, "b.bin": 900_000, "c.bin": 10_000})  # > 1 MiB in all
    inner = textwrap.dedent(f"""
        set -e
        mount -t tmpfs -o size=1m tmpfs {mount}
        {sys.executable} -c "
    from pathlib import Path
    from pipeline.store import LocalStore
    LocalStore(Path('{mount}/store')).commit('collect/' + 'a' * 32, Path('{small}'), kind='collect', inputs={{}},
                                             config={{}}, meta={{}})"
        {sys.executable} {script} {mount}/store {big}
    """)
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if result.returncode != 0 and "mount" in result.stderr and "commit.py" not in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["error_type"] == "StoreError", report
    message = report["error"]
    print(message)  # for the record (pytest -rA)
    assert f"{mount}/store" in message and "no space left on the device" in message, message
    assert "Nothing of this write was kept" in message
    assert report["listing"] == [f"collect/{'a' * 32}/{MANIFEST_NAME}", f"collect/{'a' * 32}/rows.jsonl"], report
    assert report["temp_files"] == [], report
    assert report["small_intact"] is True
    assert report["free_bytes"] > 900_000  # the failed commit's files were removed again


def test_enospc_on_the_manifest_removes_the_whole_attempt(tmp_path, monkeypatch):
    root = tmp_path / "store"
    _commit_small(root, tmp_path)
    real_fsync = os.fsync

    def fsync_reports_a_full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".~tmp-{MANIFEST_NAME}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_reports_a_full_disk)
    store, uri = LocalStore(root), "tokenize/" + "c" * 32
    with pytest.raises(StoreError) as failure:
        store.commit(
            uri,
            _staging(tmp_path / "staging", {"tokens.parquet": 50_000, "report.json": 100}),
            kind="tokenize",
            inputs={},
            config={},
            meta={},
        )
    monkeypatch.undo()
    message = str(failure.value)
    print(message)
    assert str(root) in message and f"{uri}/{MANIFEST_NAME}" in message and "no space left" in message, message
    assert not (root / "tokenize").exists(), "files of the failed commit were left behind"
    assert not list(root.rglob(".~tmp-*"))
    assert store.list() == [f"collect/{'a' * 32}/{MANIFEST_NAME}", f"collect/{'a' * 32}/rows.jsonl"]
    assert store.is_intact("collect/" + "a" * 32)


def _as_another_user() -> tuple[list[str], str]:
    """Arguments that make the child unable to write where this process can (and a note for messages).

    Root may write anywhere, so the child drops to `nobody` (after its imports: Python itself lives
    under /root here); anyone else is refused by the folders' modes alone.
    """
    if os.geteuid() == 0:
        return ["as-nobody"], "as user nobody"
    return [], "with folder modes 0o555"


def test_no_write_permission_gives_a_clear_error_and_leaves_nothing_partial(tmp_path):
    # A folder outside pytest's private temp tree, so that the other user can reach it.
    base = Path(tempfile.mkdtemp(prefix="store-perm-"))
    try:
        os.chmod(base, 0o755)
        root = base / "store"
        small_tmp = base / "work"
        _commit_small(root, small_tmp)
        big = _staging(base / "big", {"rows.jsonl": 5_000})
        script = base / "commit.py"
        script.write_text(_SCRIPT)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        extra, how = _as_another_user()
        cases = {}
        for case, root_mode in (("store root not writable", 0o555), ("stage folder not writable", 0o777)):
            root.chmod(root_mode)
            (root / "collect").chmod(0o555)
            result = subprocess.run(
                [sys.executable, str(script), str(root), str(big), *extra],
                cwd=base,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            assert result.returncode == 0, result.stderr
            cases[case] = json.loads(result.stdout.strip().splitlines()[-1])
        root.chmod(0o755)
        for case, report in cases.items():
            print(f"{case} ({how}): {report['error']}")
            assert report["error_type"] == "StoreError", (case, how, report)
            assert str(root) in report["error"] and "permission denied" in report["error"], (case, report["error"])
            assert report["listing"] == [f"collect/{'a' * 32}/{MANIFEST_NAME}", f"collect/{'a' * 32}/rows.jsonl"]
            assert report["temp_files"] == [] and report["small_intact"] is True, (case, report)
        assert not list(root.rglob(".~tmp-*")) and not (root / "collect" / ("b" * 32)).exists()
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
