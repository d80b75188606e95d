"""Typed references to stored artifacts, and the content-addressed keys that name them.

A `Ref` is what crosses a task boundary: small, frozen, JSON-serialisable. The
artifact it points at lives in the artifact store under `<stage>/<key>/`, with a
`manifest.json` written last as the commit marker (see `pipeline.store`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MANIFEST_NAME = "manifest.json"


class Ref(BaseModel):
    """A pointer to one committed artifact.

    `uri` is the artifact's location relative to the store root (`<stage>/<key>`), so
    the same Ref resolves against a local folder or a bucket holding the same data.
    `sha256` is the digest of the artifact's manifest without its timing fields
    (`pipeline.store.manifest_sha256`); the manifest lists every file's digest, so two
    Refs with the same sha256 point at byte-identical artifacts, whenever each was made.
    `meta` carries a few small figures (row counts, losses) for summaries.
    """

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="The stage that produced the artifact, e.g. 'collect'.")
    uri: str = Field(description="Location relative to the store root: '<stage>/<key>'.")
    sha256: str = Field(description="sha256 of the artifact's manifest without created_at (its content).")
    meta: dict[str, Any] = Field(default_factory=dict, description="Small summary figures.")

    @property
    def key(self) -> str:
        """The content key (the last part of `uri`)."""
        return self.uri.rsplit("/", 1)[-1]


def canonical_json(value: Any) -> str:
    """Serialise `value` to JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> Any:
    """Turn Refs, pydantic models and containers into plain JSON values for hashing.

    A Ref contributes only its sha256 (its content), not where it is stored.
    Secrets never take part in a key (they must not change what is computed).
    """
    if isinstance(value, Ref):
        return {"ref": value.sha256}
    if isinstance(value, SecretStr):
        return None
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="python"))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def content_key(stage: str, version: str, inputs: Mapping[str, Any]) -> str:
    """The content-addressed key of a stage's output.

    In: the stage name, the stage's code version (`pipeline.code_version`: changes with its code)
    and its inputs (Refs and config sections, by parameter name). Out: a 32-hex-digit key.
    """
    payload = canonical_json({"stage": stage, "version": version, "inputs": inputs})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
