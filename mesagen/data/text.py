"""Byte-level language modelling: a corpus of bytes (vocabulary 256, no tokenizer), split and streamed.

A corpus is a byte sequence: one file, every file under a folder (sorted relative paths, hidden entries
skipped, concatenated), or -- the default -- the source and docstrings of the running Python's standard
library (:func:`stdlib_corpus`), which every machine has after installing mesagen, so a language model trains
with no download.

Split (deterministic, disjoint): the corpus is cut into consecutive segments of ``split_block`` bytes; segment
``i`` is validation if ``i % period == period - 1`` with ``period = round(1 / valid_fraction)``, training
otherwise. A window of ``seq_len + 1`` bytes never crosses a segment, so no training window shares a byte with
a validation window.

Streaming: user corpora are read through ``np.memmap`` (one per file), so only the bytes of the windows drawn
are read; nothing holds the whole corpus in memory. The stdlib corpus is at most ``stdlib_max_bytes``
(default 8 MB) and is held in memory.

Batches: training window ``j`` of step ``s`` starts at a uniformly random training offset drawn from
``numpy.random.default_rng([seed, s])``: a pure function of (seed, step), so a resumed run sees the batches an
uninterrupted run would. Validation windows are a fixed, evenly spread set of non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesagen.errors import MesagenError

#: Byte-level vocabulary size.
VOCAB_SIZE = 256

#: Folders of the standard library left out of the default corpus (third-party packages, test suites).
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class CorpusError(MesagenError):
    """A text corpus is missing, empty, unreadable or too small for the configured windows."""


class TextConfig(BaseModel):
    """Frozen configuration of the byte-level language-modelling task (``task: {kind: text, ...}``).

    Attributes:
        kind: ``text``.
        seq_len: T, tokens per training sequence (the model predicts bytes 1..T of a T + 1 byte window).
        corpus: a text file or a folder (every non-hidden file under it, sorted); null for the default corpus
            (the standard library's ``.py`` files, :func:`stdlib_corpus`). Relative paths are relative to the
            working directory. ``mesagen train CONFIG --text PATH`` sets it.
        valid_fraction: fraction of the corpus's segments held out for validation (0 < f <= 0.5).
        split_block: segment size in bytes of the train / validation split (>= seq_len + 1).
        stdlib_max_bytes: size cap of the default corpus (whole files in sorted path order while they fit).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["text"] = "text"
    seq_len: int = Field(128, ge=1)
    corpus: str | None = None
    valid_fraction: float = Field(0.05, gt=0.0, le=0.5)
    split_block: int = Field(65_536, ge=2)
    stdlib_max_bytes: int = Field(8_000_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.split_block < self.seq_len + 1:
            raise ValueError(f"split_block ({self.split_block}) must be at least seq_len + 1 = {self.seq_len + 1}")
        return self

    @property
    def vocab_size(self) -> int:
        """256 (bytes)."""
        return VOCAB_SIZE

    @property
    def period(self) -> int:
        """Every ``period``-th segment is validation: ``round(1 / valid_fraction)`` (>= 2)."""
        return max(2, round(1.0 / self.valid_fraction))


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int = 8_000_000) -> tuple[bytes, dict]:
    """The default corpus: the running Python's standard-library sources, deterministically extracted.

    ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (folders in :data:`STDLIB_SKIP` and hidden ones
    left out), in sorted relative-path order, concatenated whole while the total stays within ``max_bytes``
    (the first file that would exceed it ends the corpus). The same Python gives the same bytes; another
    Python version gives another corpus, hence the record.

    Args:
        max_bytes: size cap in bytes (>= 1).

    Returns:
        ``(data, record)``: the bytes, and ``{"source": "stdlib", "path", "python_version", "files", "bytes",
        "sha256"}``.

    Raises:
        CorpusError: the standard library folder holds no ``.py`` file within the cap.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total, count = [], 0, 0
    for path in _stdlib_files(root):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            break
        parts.append(data)
        total += len(data)
        count += 1
    if not total:
        raise CorpusError(f"default corpus: no .py file of at most {max_bytes} bytes under {root}")
    data = b"".join(parts)
    record = {"source": "stdlib", "path": str(root), "python_version": sys.version.split()[0],
              "files": count, "bytes": total, "sha256": hashlib.sha256(data).hexdigest()}
    return data, record


#: Corpora up to this size get a content sha256 in their record (a streamed pass); larger ones do not.
SHA256_MAX_BYTES = 1 << 30


class ByteCorpus:
    """A read-only byte sequence made of pieces (memory-mapped files or in-memory arrays), indexable by offset.

    Attributes:
        size: total bytes. record: provenance (source, path, files, bytes, sha256 or None).
    """

    def __init__(self, pieces: list[np.ndarray], record: dict) -> None:
        self._pieces = [p for p in pieces if len(p)]
        self._starts = np.cumsum([0] + [len(p) for p in self._pieces])
        self.size = int(self._starts[-1])
        self.record = record

    @classmethod
    def from_bytes(cls, data: bytes, record: dict) -> "ByteCorpus":
        """A corpus held in memory."""
        return cls([np.frombuffer(data, np.uint8)], record)

    @classmethod
    def from_path(cls, path: str | Path, *, what: str = "task.corpus") -> "ByteCorpus":
        """Memory-map a file, or every non-hidden file under a folder (recursively, sorted relative paths).

        Args:
            path: file or folder.  what: how errors name the setting (``task.corpus`` or ``--text``).

        Raises:
            CorpusError: the path does not exist, is neither file nor folder, holds no non-empty file, or a
                file cannot be read.
        """
        p = Path(path)
        if not p.exists():
            raise CorpusError(f"{what}: {path}: no such file or folder")
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
            files = sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
        else:
            raise CorpusError(f"{what}: {path}: neither a file nor a folder")
        pieces = []
        for f in files:
            try:
                if f.stat().st_size:
                    pieces.append(np.memmap(f, np.uint8, mode="r"))
            except (OSError, ValueError) as exc:
                raise CorpusError(f"{what}: {f}: cannot read: {exc}") from None
        if not pieces:
            raise CorpusError(f"{what}: {path}: no non-empty file" + (" under this folder" if p.is_dir() else ""))
        corpus = cls(pieces, {})
        sha = None
        if corpus.size <= SHA256_MAX_BYTES:
            h = hashlib.sha256()
            for piece in corpus._pieces:
                for i in range(0, len(piece), 1 << 24):
                    h.update(piece[i:i + (1 << 24)].tobytes())
            sha = h.hexdigest()
        corpus.record = {"source": "folder" if p.is_dir() else "file", "path": str(p.resolve()),
                         "files": len(pieces), "bytes": corpus.size, "sha256": sha}
        return corpus

    def read(self, offset: int, length: int) -> np.ndarray:
        """``length`` bytes from ``offset`` as ``(length,)`` uint8 (pieces joined seamlessly).

        Raises:
            ValueError: the range leaves ``[0, size)``.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read({offset}, {length}) outside the corpus of {self.size} bytes")
        out = np.empty(length, np.uint8)
        i, done = int(np.searchsorted(self._starts, offset, side="right")) - 1, 0
        while done < length:
            piece, start = self._pieces[i], int(self._starts[i])
            lo = offset + done - start
            n = min(length - done, len(piece) - lo)
            out[done:done + n] = piece[lo:lo + n]
            done, i = done + n, i + 1
        return out


def load_corpus(config: TextConfig, *, what: str = "task.corpus") -> ByteCorpus:
    """The corpus of ``config``: :meth:`ByteCorpus.from_path` of ``config.corpus``, or the stdlib corpus.

    Raises:
        CorpusError: see :meth:`ByteCorpus.from_path` and :func:`stdlib_corpus`.
    """
    if config.corpus is None:
        return ByteCorpus.from_bytes(*stdlib_corpus(config.stdlib_max_bytes))
    return ByteCorpus.from_path(config.corpus, what=what)


class TextData:
    """Train / validation windows of a corpus (module docstring: split and sampling).

    Attributes:
        config: the task. corpus: the :class:`ByteCorpus`. train_segments, valid_segments: ``(start, length)``
            int64 arrays of the segments that hold at least one window.
    """

    def __init__(self, config: TextConfig, corpus: ByteCorpus | None = None) -> None:
        """Load (or take) the corpus and split it.

        Raises:
            CorpusError: the corpus cannot be loaded, or either split has no segment of ``seq_len + 1`` bytes.
        """
        self.config = config
        self.corpus = corpus if corpus is not None else load_corpus(config)
        w, blk, n = config.seq_len + 1, config.split_block, self.corpus.size
        starts = np.arange(0, n, blk, dtype=np.int64)
        lengths = np.minimum(blk, n - starts)
        is_valid = (np.arange(len(starts)) % config.period) == config.period - 1
        usable = lengths >= w
        self.train_segments = np.stack([starts[~is_valid & usable], lengths[~is_valid & usable]], 1)
        self.valid_segments = np.stack([starts[is_valid & usable], lengths[is_valid & usable]], 1)
        for name, seg in (("training", self.train_segments), ("validation", self.valid_segments)):
            if not len(seg):
                raise CorpusError(
                    f"task.corpus: the corpus ({n} bytes, {self.corpus.record.get('path', 'stdlib')}) has no "
                    f"{name} segment of seq_len + 1 = {w} bytes (split_block {blk}, every {config.period}-th "
                    "segment is validation); use a larger corpus, or lower split_block / seq_len")
        # training offsets: segment i offers lengths[i] - w + 1 window starts
        self._train_counts = self.train_segments[:, 1] - w + 1
        self._train_cum = np.cumsum(self._train_counts)

    @property
    def train_windows(self) -> int:
        """How many distinct training window starts there are."""
        return int(self._train_cum[-1])

    def train_offsets(self, seed: int, step: int, batch: int) -> np.ndarray:
        """``(batch,)`` int64 start offsets of step ``step``'s training windows (uniform over training starts)."""
        rng = np.random.default_rng([seed, step])
        r = rng.integers(0, self.train_windows, batch)
        seg = np.searchsorted(self._train_cum, r, side="right")
        before = np.where(seg > 0, self._train_cum[seg - 1], 0)
        return self.train_segments[seg, 0] + (r - before)

    def windows(self, offsets: np.ndarray) -> np.ndarray:
        """``(len(offsets), seq_len + 1)`` uint8 windows starting at ``offsets``."""
        w = self.config.seq_len + 1
        return np.stack([self.corpus.read(int(o), w) for o in offsets]) if len(offsets) else np.zeros((0, w), np.uint8)

    def train_batch(self, seed: int, step: int, batch: int) -> np.ndarray:
        """``(batch, seq_len + 1)`` int32 bytes of step ``step`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        return self.windows(self.train_offsets(seed, step, batch)).astype(np.int32)

    def valid_offsets(self, count: int) -> np.ndarray:
        """Up to ``count`` non-overlapping validation window starts, spread evenly over the validation split
        (fewer if the split holds fewer windows): ``(n,)`` int64, deterministic."""
        w = self.config.seq_len + 1
        per_seg = self.valid_segments[:, 1] // w
        all_starts = np.concatenate([s + w * np.arange(k, dtype=np.int64)
                                     for (s, _), k in zip(self.valid_segments, per_seg)])
        if len(all_starts) <= count:
            return all_starts
        return all_starts[np.linspace(0, len(all_starts) - 1, count).round().astype(np.int64)]

    def valid_batch(self, count: int) -> np.ndarray:
        """``(n, seq_len + 1)`` int32 validation windows, n = ``len(valid_offsets(count))``."""
        return self.windows(self.valid_offsets(count)).astype(np.int32)


def bits_per_byte(nats: float) -> float:
    """Cross-entropy in nats per byte -> bits per byte (``nats / ln 2``)."""
    return float(nats) / float(np.log(2.0))


def icl_score(per_t: np.ndarray) -> float:
    """In-context-learning score of a per-position loss curve ``(T,)`` (Olsson et al. 2022, "In-context
    learning and induction heads": loss late in the context minus loss early in it): mean over the last
    eighth of the positions ``[T - T//8, T)`` minus mean over ``[T//16, T//8)`` (both at least one position).
    Negative: the model predicts later bytes better, i.e. it uses its context.

    Raises:
        ValueError: ``per_t`` has fewer than 2 positions.
    """
    per_t = np.asarray(per_t, np.float64)
    t = len(per_t)
    if t < 2:
        raise ValueError(f"icl_score needs at least 2 positions, got {t}")
    e0 = min(t // 16, t - 2)
    e1 = max(t // 8, e0 + 1)
    late = max(t // 8, 1)
    return float(per_t[t - late:].mean() - per_t[e0:e1].mean())
