"""File storage without torch: atomic writes and the one JSON reader.

Every file robustkit writes goes to a temporary file in the same folder, named by robustkit
(``.NAME.XXXXXXXX.tmp``), and is renamed into place, so an interrupted write never leaves a
half-written file behind, and what a killed write leaves is recognised as scratch
(:data:`TEMPORARY`). A failed write's ``OSError`` names the file, not its temporary.

Every JSON file robustkit reads back (``settings.json``, ``manifest.json``, sidecars, resume
state) is read by :func:`read_json`: an object, or one :class:`UnreadableJsonError` error naming
the file and why (absent, unreadable, not JSON, not an object). :func:`read_json_if_any` is the
same reader for optional files, where any of those means "none".

Nothing here imports torch, so the report and the folder guard load without it; tensors are
:mod:`robustkit.checkpoint`'s business.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from robustkit.errors import RobustkitError

#: Temporary files of atomic writes: robustkit's ``.NAME.XXXXXXXX.tmp``, and the
#: ``.tmpXXXXXX`` of safetensors' ``save_file``, which robustkit used before it wrote
#: checkpoints itself (so a folder a killed older version left resumes too).
TEMPORARY = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not the
    private 0600 of the temporary file, so colleagues can read shared results.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path, str(exc.filename)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: name the file, not its temporary stand-in
        raise _naming(exc, path, tmp) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Writes to ``path`` in the block: an ``OSError`` that names no file (a failed write, a
    full disk) is raised again naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise _naming(exc, path, str(path)) from None


def _naming(exc: OSError, path: Path, tmp: str) -> OSError:
    """``exc`` naming ``path`` when it named no file or the temporary ``tmp`` (a write that
    failed reports no file name; the temporary file's is robustkit's business)."""
    if exc.filename is not None and str(exc.filename) != tmp:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def write_atomic(path: Path, write: Callable[[IO[str]], object]) -> None:
    """Write ``path`` atomically through ``write(handle)`` on a UTF-8 text handle."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        write(handle)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; an ``OSError`` names ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys (values JSON cannot hold as their text)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- the JSON reader


class UnreadableJsonError(RobustkitError):
    """A JSON file robustkit cannot use: ``{path} is {reason}: {fix}``; ``reason`` alone
    (``missing``, ``not valid JSON (…)``, ``a JSON list, not an object``, …) names the fault
    without the path."""

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"{path} is {reason}: {fix}")
        self.path, self.reason = path, reason


def read_json(path: Path, fix: str = "write it again with robustkit") -> dict[str, Any]:
    """The JSON object stored in ``path``; :class:`UnreadableJsonError` (whose message ends in
    ``fix``) when the file is absent or unreadable, not UTF-8 JSON, or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableJsonError(path, "missing", fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableJsonError(path, f"not readable ({exc})", fix) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UnreadableJsonError(path, f"not valid JSON ({exc})", fix) from None
    if not isinstance(data, dict):
        raise UnreadableJsonError(path, f"a JSON {type(data).__name__}, not an object", fix)
    return data


def read_json_if_any(path: Path) -> dict[str, Any] | None:
    """:func:`read_json` for an optional file: None when it is absent or unusable."""
    try:
        return read_json(path)
    except UnreadableJsonError:
        return None
