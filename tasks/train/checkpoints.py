"""Training checkpoints kept in the artifact store, so a killed training run resumes instead of starting over.

Checkpoints live under `checkpoints/<train key>/checkpoint-<step>/` (manifest last); `StoreCheckpoints`
(`tasks.train.trainer`, a Trainer callback) mirrors the Trainer's local ones after every save and
`restore_checkpoints` brings them back for a rerun.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.store import ArtifactStore

CHECKPOINTS_PREFIX = "checkpoints"


CHECKPOINT_DIR_PREFIX = "checkpoint-"  # what the Trainer names its checkpoint folders


def checkpoint_prefix(key: str) -> str:
    """Where the checkpoints of the train run with content key `key` live in the store."""
    return f"{CHECKPOINTS_PREFIX}/{key}"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder name ('checkpoint-40' -> 40)."""
    return int(name.removeprefix(CHECKPOINT_DIR_PREFIX))


def stored_checkpoints(store: ArtifactStore, prefix: str) -> list[str]:
    """Names of the committed checkpoints under `prefix`, oldest step first (uncommitted ones do not count)."""
    names = {path[len(prefix) + 1 :].split("/", 1)[0] for path in store.list(prefix)}
    names = {
        n for n in names if n.startswith(CHECKPOINT_DIR_PREFIX) and n.removeprefix(CHECKPOINT_DIR_PREFIX).isdigit()
    }
    return sorted((n for n in names if store.has_artifact(f"{prefix}/{n}")), key=checkpoint_step)


def sync_checkpoints(store: ArtifactStore, prefix: str, output_dir: Path) -> None:
    """Make the store hold exactly the checkpoints the Trainer keeps locally (the latest and the best).

    New ones are committed first (manifest last), then the ones the Trainer rotated out
    are deleted, so a kill at any moment leaves at least the previous checkpoint.
    """
    local = sorted((p.name for p in output_dir.glob(f"{CHECKPOINT_DIR_PREFIX}*") if p.is_dir()), key=checkpoint_step)
    stored = stored_checkpoints(store, prefix)
    for name in local:
        if name not in stored:
            store.commit(
                f"{prefix}/{name}",
                output_dir / name,
                kind="checkpoint",
                inputs={},
                config={},
                meta={"step": checkpoint_step(name)},
            )
    for name in stored:
        if name not in local:
            store.delete(f"{prefix}/{name}")


def restore_checkpoints(store: ArtifactStore, prefix: str, output_dir: Path) -> Path | None:
    """Copy the store's checkpoints into `output_dir`; out: the latest one to resume from, or None.

    Every file is verified against its manifest on the way. The Trainer state records
    the best checkpoint's folder by absolute path, which was the killed run's folder, so
    it is pointed at the restored copy.
    """
    latest = None
    for name in stored_checkpoints(store, prefix):  # oldest first: folder mtimes keep the step order
        target = output_dir / name
        if not target.is_dir():
            source = store.fetch(store.open_ref(f"{prefix}/{name}"))
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("manifest.json", ".verified"))
        _repoint_best_checkpoint(target / "trainer_state.json", output_dir)
        latest = target
    return latest


def _repoint_best_checkpoint(state_file: Path, output_dir: Path) -> None:
    """Rewrite `best_model_checkpoint` in a Trainer state file to the same checkpoint under `output_dir`."""
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    best = state.get("best_model_checkpoint")
    if best:
        state["best_model_checkpoint"] = str(output_dir / Path(best).name)
        state_file.write_text(json.dumps(state, indent=2), encoding="utf-8")
