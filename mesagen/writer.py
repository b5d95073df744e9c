"""Write (or check) generated files: all-or-nothing, atomic per file (temp file + rename), LF endings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mesagen.errors import MesagenError


def _encode(text: str) -> bytes:
    """The bytes written for ``text``: UTF-8 with a final newline (what :func:`drift` compares against too)."""
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def drift(files: dict[str, str], out: Path) -> list[str]:
    """Relative paths whose bytes on disk differ from ``files`` (missing files count)."""
    bad = []
    for rel, text in sorted(files.items()):
        target = out / rel
        try:
            if target.read_bytes() != _encode(text):
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad


def write_all(files: dict[str, str], out: Path) -> list[Path]:
    """Write every file under ``out``; first to temp files beside each target, then rename them all.

    Args:
        files: relative path → text (written as UTF-8, LF, with a final newline).
        out: the output folder (created if needed).

    Returns:
        The paths written.

    Raises:
        MesagenError: a file could not be written (temp files are removed; targets not yet renamed are
            left as they were).
    """
    staged: list[tuple[str, Path]] = []
    try:
        for rel, text in sorted(files.items()):
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            staged.append((tmp, target))  # staged before writing, so a failed write still removes its temp file
            with os.fdopen(fd, "wb") as fh:
                fh.write(_encode(text))
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise MesagenError(f"cannot write generated files under {out}: {exc.strerror or exc}") from None
    return [target for _, target in staged]
