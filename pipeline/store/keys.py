"""Store keys: which '/'-separated paths and s3:// roots the store accepts, and how locations are shown.

In: strings from configs, Refs, manifests and stage code. Out: the same strings, checked (ValueError
naming the path otherwise), or a (bucket, prefix) pair for an s3:// root. A path that passes means the
same thing in a local folder and in a bucket and cannot leave the store's root.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

TMP_PREFIX = ".~tmp-"
"""Names of temp files (interrupted local writes, commit locks) start with this; listings skip them."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# 's3:', 'file:', 'http:' and also Windows drive letters ('C:'): none belongs in a relative path.

_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
# S3 bucket names (DNS-compatible, as AWS, MinIO and SeaweedFS require); no ':', '@', '?', '#', '%' or '_'.


def validate_path(path: str) -> str:
    """Check a store path and return it unchanged.

    In: a '/'-separated path relative to the store root, e.g. 'collect/ab12/data.jsonl'.
    Out: the same string. Raises ValueError naming the path when it is empty, absolute,
    has a URL scheme, backslashes, an empty segment ('//' or a trailing '/') or a '.' or
    '..' segment: such paths would mean different things in a folder and in a bucket,
    or escape the root.
    """
    problem = path_problem(path)
    if problem:
        raise ValueError(f"invalid store path {path!r}: {problem}")
    return path


def path_problem(path: object) -> str | None:
    """In: anything. Out: what is wrong with it as a store path, or None when it is fine."""
    if not isinstance(path, str) or path == "":
        return "expected a non-empty relative path like 'stage/key/file'"
    if "\\" in path:
        return "backslashes are not allowed, use '/'"
    if "://" in path or _SCHEME.match(path):
        return "a URL or drive is not allowed, paths are relative to the store root"
    if path.startswith("/"):
        return "absolute paths are not allowed, paths are relative to the store root"
    if "\x00" in path:
        return "NUL characters are not allowed"
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        return "control characters are not allowed"
    segments = path.split("/")
    if "" in segments:
        return "empty segments ('//' or a trailing '/') are not allowed"
    if any(seg in (".", "..") for seg in segments):
        return "'.' and '..' segments are not allowed"
    decoded = _decoded(path)
    if decoded != path and path_problem(decoded):
        # '%2e%2e' is '..' to any server or proxy that decodes keys once more
        return f"percent-encoded or look-alike characters that read as {decoded!r} are not allowed"
    return None


def _decoded(path: str) -> str:
    """`path` as a server that percent-decodes (repeatedly) and Unicode-normalises keys might read it."""
    for _ in range(3):  # '%252e' -> '%2e' -> '.'
        path = unquote(path)
    return unicodedata.normalize("NFKC", path)


def prefix_path(prefix: str) -> str:
    """In: a listing/deletion prefix. Out: it as a store path, one trailing '/' tolerated and trimmed."""
    return validate_path(prefix[:-1] if prefix.endswith("/") else prefix)


def redact_uri(text: str) -> str:
    """In: text that may hold a URL. Out: the text with any 'user:password@' part replaced by '***@'."""
    text = re.sub(r"(?<=://)[^/@\s]*@", "***@", text)
    return re.sub(r"^[^/@\s]*@", "***@", text)  # a bare 'user:secret@bucket' (an s3 uri's netloc)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """In: 's3://bucket/some/prefix'. Out: ('bucket', 'some/prefix'); the prefix may be ''.

    Raises ValueError naming the uri when the bucket is missing or the prefix is not a valid store path.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://bucket/prefix, found {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"expected s3://bucket/prefix, found {uri!r} (no bucket)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        # Also stops URL tricks: 'user:secret@host', '?query', '#fragment', '%2e' never reach an endpoint.
        raise ValueError(
            f"invalid bucket in {redact_uri(uri)!r}: expected 1-63 lowercase letters, digits, '.' and "
            f"'-', starting and ending with a letter or digit, found {redact_uri(bucket)!r}"
        )
    if prefix and path_problem(prefix):
        raise ValueError(f"invalid prefix in {uri!r}: {path_problem(prefix)}")
    return bucket, prefix
