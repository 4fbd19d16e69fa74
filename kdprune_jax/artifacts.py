"""Workdir artifacts: atomic writes and fingerprints.

A reader never sees a half-written file: everything is written to a temp file in the same
directory and `os.replace`d into place (atomic on POSIX). Each artifact carries a `meta`
dict describing what produced it; `fingerprint(meta)` is a short stable hash of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from kdprune_jax import io_errors


def fingerprint(obj) -> str:
    """Stable 16-hex-digit hash of a JSON-serializable object (key order irrelevant)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serializable: {type(o)}")


def _atomic(path: str, write_fn, suffix: str, needed: int | None = None):
    """Write through a temp file renamed over `path`. Every file artifact passes here, so
    this is where a failed write (disk full, EIO, EACCES) becomes one line
    (`io_errors.WriteError`, naming `path` and the `needed` bytes); the temp file is removed
    and an older `path` is left as it was."""
    with io_errors.writing(path, needed=needed):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:  # already gone, or the filesystem refuses even that
                pass
            raise


def write_json(path: str, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode() + b"\n"
    _atomic(path, lambda f: f.write(data), ".json", len(data))


def read_json(path: str):
    """Read JSON, or None when the file is missing or unreadable (treated as absent)."""
    return read_json_checked(path)[0]


def describe(e: BaseException) -> str:
    """One line saying what an exception was (for "X is unreadable (...)" log lines)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


def read_json_checked(path: str):
    """(value, problem): (obj, None) when readable, (None, None) when the file does not
    exist, (None, "what is wrong") when it exists but is not a JSON document (empty,
    truncated, garbage). Callers log the problem naming the file, then rebuild or refuse."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, describe(e)
    if not data.strip():
        return None, "empty file"
    try:
        return json.loads(data), None
    except ValueError as e:  # includes UnicodeDecodeError (garbage bytes)
        return None, f"not valid JSON ({describe(e)})"


NUMBER = (int, float)


def check_fields(obj, fields: dict) -> str | None:
    """The first problem of a parsed JSON artifact, or None: not an object, a missing key,
    or a value of the wrong type. `fields` maps dotted key paths to a type or a tuple of
    types (e.g. ``{"metrics.accuracy": NUMBER}``)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, found {type(obj).__name__}"
    for path, types in fields.items():
        node = obj
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return f"missing key {path!r}"
            node = node[key]
        if not isinstance(node, types) or (isinstance(node, bool) and types is not bool):
            want = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else
                                                 (types,)))
            return f"{path!r} is {type(node).__name__}, expected {want}"
    return None


def write_npz(path: str, **arrays) -> None:
    """Atomically write arrays (and a JSON `meta` string, if given as meta=...)."""
    meta = arrays.pop("meta", None)
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True, default=_json_default))
    needed = sum(np.asarray(a).nbytes for a in arrays.values())
    _atomic(path, lambda f: np.savez(f, **arrays), ".npz", needed)
