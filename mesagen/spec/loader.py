"""Load a spec file: safe YAML → located data → validated, frozen :class:`Spec`.

Every error is a :class:`~mesagen.errors.SpecError` naming the file, the 1-based line and column and the
dotted field path, e.g. ``specs/ridge.yaml:9:18: objective.regularizer.coefficient: 'lamda' is not a
declared parameter``. YAML is read with ruamel's round-trip loader, which builds only plain maps,
sequences and scalars (never Python objects) and keeps each node's position; explicit tags are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from mesagen.errors import SpecError
from mesagen.spec.schema import Spec, semantic_errors

#: Spec files larger than this are refused before parsing (a spec is a page of YAML).
MAX_SPEC_BYTES = 256 * 1024


def _plain(node: Any, path: str, where: tuple) -> Any:
    """Convert ruamel containers to plain dict/list, refusing explicit tags and non-string keys."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if tag is not None and not str(tag).startswith("tag:yaml.org,2002:"):
        raise SpecError(path, f"explicit YAML tag {tag!r} is not allowed in a spec", **_loc_kwargs(where))
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                line, col = node.lc.key(key)
                raise SpecError(path, f"keys must be strings, got {key!r}", line=line + 1, column=col + 1)
            line, col = node.lc.value(key)
            out[key] = _plain(value, path, (line, col))
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for i, item in enumerate(node):
            line, col = node.lc.item(i)
            out_list.append(_plain(item, path, (line, col)))
        return out_list
    return node


def _loc_kwargs(where: tuple) -> dict:
    return {"line": where[0] + 1, "column": where[1] + 1} if where else {}


def _locate(root: Any, loc: tuple) -> tuple[int | None, int | None, tuple]:
    """Deepest (line, column) reachable along ``loc`` in the ruamel tree (1-based), and the path reached."""
    line = col = None
    node, reached = root, ()
    for key in loc:
        if isinstance(node, CommentedMap) and isinstance(key, str) and key in node:
            kl, kc = node.lc.key(key)
            line, col = kl + 1, kc + 1
            node, reached = node[key], reached + (key,)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            il, ic = node.lc.item(key)
            line, col = il + 1, ic + 1
            node, reached = node[key], reached + (key,)
        else:
            break
    return line, col, reached


def _dotted(loc: tuple) -> str:
    parts = []
    for key in loc:
        parts.append(f"[{key}]" if isinstance(key, int) else ("." if parts else "") + str(key))
    return "".join(parts)


def _pydantic_error(path: str, root: Any, err: ValidationError) -> SpecError:
    first = err.errors(include_url=False)[0]
    loc = tuple(x for x in first["loc"] if not (isinstance(x, str) and x in {"closed_form", "gd", "online_gd"}))
    line, col, _ = _locate(root, loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        reason = f"unknown key {loc[-1]!r}"
    elif kind == "missing":
        reason = "required field is missing"
    else:
        reason = first["msg"]
        if "input" in first and kind not in {"missing"} and not isinstance(first["input"], (dict, list)):
            reason += f" (got {first['input']!r})"
    return SpecError(path, reason, line=line, column=col, field=_dotted(loc))


def parse_spec(text: str, path: str | Path = "<string>") -> Spec:
    """Parse and validate spec text.

    Args:
        text: the YAML text of a spec (v1 language, see ``docs/specs.md``).
        path: the file name to cite in errors.

    Returns:
        The validated, frozen :class:`Spec`.

    Raises:
        SpecError: on YAML syntax errors, unknown keys, wrong types, inconsistent dimensions, unsupported
            combinations or out-of-domain inits; the message names file, line, column and field path.
    """
    path = str(path)
    if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecError(path, f"spec is larger than {MAX_SPEC_BYTES} bytes")
    yaml = YAML(typ="rt", pure=True)
    try:
        root = yaml.load(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise SpecError(path, f"YAML syntax error: {problem}",
                        line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    except YAMLError as exc:
        raise SpecError(path, f"YAML error: {exc}") from None
    if not isinstance(root, CommentedMap):
        raise SpecError(path, "a spec must be a YAML mapping at the top level")
    data = _plain(root, path, ())
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(path, root, exc) from None
    problems = semantic_errors(spec)
    if problems:
        loc, reason = problems[0]
        line, col, _ = _locate(root, loc)
        raise SpecError(path, reason, line=line, column=col, field=_dotted(loc))
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file.

    Args:
        path: path of a ``.yaml`` spec file.

    Returns:
        The validated :class:`Spec`.

    Raises:
        SpecError: the file is missing or unreadable, not UTF-8, or invalid (see :func:`parse_spec`).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(str(path), f"cannot read spec file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), f"spec is not valid UTF-8 (byte {exc.start})") from None
    return parse_spec(text, path)


def canonical_json(spec: Spec) -> str:
    """The spec re-serialised canonically (sorted keys, defaults filled): comments and layout don't change it."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_sha256(spec: Spec) -> str:
    """Hex sha256 of :func:`canonical_json` -- the provenance hash written into every generated header."""
    return hashlib.sha256(canonical_json(spec).encode("ascii")).hexdigest()
