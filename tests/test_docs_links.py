"""The project's documentation is self-contained and its cross-references resolve.

* No file of the repository points at the design notes that are not shipped with it (the folder beside the
  checkout and the note files in it): everything a user needs is in README.md and docs/.
* Every relative Markdown link in README.md and docs/*.md names an existing file, and its ``#anchor``, if
  any, an existing heading of that file (GitHub's heading slugs).
* Every citation of the form ``docs/NAME.md §N`` (or ``§N.M``, or a list ``§N, §M``) anywhere in the
  repository names an existing numbered section ``## N.`` (``### N.M``) of that file.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not itself contain the strings it forbids.
_SECTION = "\u00a7"
FORBIDDEN = ("../" + "shared", "DESIGN " + _SECTION, "DESIGN" + ".md", "FAMILY" + ".md", "PAPER" + ".md")

_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", "venv", "node_modules", "runs",
              "build", "dist", ".eggs"}


def _repo_files() -> list[Path]:
    """Files of the repository: git's tracked and untracked-but-not-ignored files, else a walk of the tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
        if files:
            return sorted(p for p in files if p.is_file())
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        found.extend(Path(folder) / n for n in names)
    return sorted(found)


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _texts() -> dict[str, str]:
    out = {}
    for p in _repo_files():
        t = _text(p)
        if t is not None:
            out[p.relative_to(ROOT).as_posix()] = t
    return out


TEXTS = _texts()
MARKDOWN = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))


def _strip_fences(text: str) -> str:
    """Markdown text with the contents of fenced code blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def _headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*#*\s*$", _strip_fences(text), re.M)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links → their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in _headings(text):
        s = _slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def _sections(text: str) -> set[str]:
    """Numbers of the numbered headings: ``## 3. Title`` → "3", ``### 5.1 Title`` → "5.1"."""
    out = set()
    for h in _headings(text):
        m = re.match(r"(\d+(?:\.\d+)*)\.?\s", h + " ")
        if m:
            out.add(m.group(1))
    return out


def test_no_file_points_at_the_unshipped_design_notes():
    hits = []
    for rel, text in TEXTS.items():
        for n, line in enumerate(text.split("\n"), 1):
            for s in FORBIDDEN:
                if s in line:
                    hits.append(f"{rel}:{n}: {s!r}: {line.strip()[:120]}")
    assert not hits, ("these lines cite notes that are not part of the project; cite docs/ instead "
                      "(docs/contract.md, docs/family.md, docs/paper.md, ...):\n" + "\n".join(hits))


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_markdown_links_resolve():
    assert "README.md" in TEXTS
    bad, checked = [], 0
    for rel in MARKDOWN:
        text = _strip_fences((ROOT / rel).read_text(encoding="utf-8"))
        for n, line in enumerate(text.split("\n"), 1):
            for m in _LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):   # http:, https:, mailto: ...
                    continue
                path, _, anchor = target.partition("#")
                dest = (ROOT / rel).parent / path if path else ROOT / rel
                checked += 1
                if not dest.exists():
                    bad.append(f"{rel}:{n}: link to {target!r}: no file {path!r}")
                    continue
                if anchor and dest.is_file() and dest.suffix == ".md":
                    if anchor not in _anchors(dest.read_text(encoding="utf-8")):
                        bad.append(f"{rel}:{n}: link to {target!r}: {path or rel} has no heading #{anchor}")
    assert checked > 0
    assert not bad, "broken Markdown links:\n" + "\n".join(bad)


_CITATION = re.compile(r"docs/([A-Za-z0-9_-]+)\.md((?:\s*(?:,|and|or|–|-)?\s*" + _SECTION + r"\d+(?:\.\d+)*)+)")


def _citations() -> list[tuple[str, int, str, str]]:
    out = []
    for rel, text in TEXTS.items():
        for n, line in enumerate(text.split("\n"), 1):
            for m in _CITATION.finditer(line):
                for sec in re.findall(_SECTION + r"(\d+(?:\.\d+)*)", m.group(2)):
                    out.append((rel, n, m.group(1), sec))
    return out


def test_section_citations_name_existing_sections():
    cites = _citations()
    assert cites, "expected citations of numbered docs/ sections in the code"
    bad = []
    for rel, n, name, sec in cites:
        target = ROOT / "docs" / f"{name}.md"
        if not target.is_file():
            bad.append(f"{rel}:{n}: cites docs/{name}.md {_SECTION}{sec}, but there is no such file")
        elif sec not in _sections(target.read_text(encoding="utf-8")):
            bad.append(f"{rel}:{n}: cites docs/{name}.md {_SECTION}{sec}, but that file has no section {sec}")
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)


@pytest.mark.parametrize("heading, slug", [
    ("9. `State`, `init_params`, `init_state`", "9-state-init_params-init_state"),
    ("12. The paper's mesa layer and mesagen's `ridge`", "12-the-papers-mesa-layer-and-mesagens-ridge"),
    ("1. A first example", "1-a-first-example"),
])
def test_slug_follows_github(heading, slug):
    assert _slug(heading) == slug
