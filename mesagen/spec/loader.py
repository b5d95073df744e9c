"""Load a spec file: safe YAML → located data → validated, frozen :class:`Spec`.

Every error is a :class:`~mesagen.errors.SpecError` naming the file, the 1-based line and column and the
dotted field path, e.g. ``specs/ridge.yaml:9:18: objective.regularizer.coefficient: 'lamda' is not a
declared parameter``; a spec with several problems gets them all, one line each. YAML is read with ruamel's
round-trip loader, which keeps each node's position and never builds arbitrary Python objects; anything
but maps, sequences, strings, numbers, booleans and null (explicit non-core tags, ``!!binary``/``!!set``/
``!!omap``/``!!pairs`` values, unquoted dates) is refused, and so is nesting deeper than
:data:`MAX_SPEC_DEPTH`, while the text is still being scanned.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.scanner import RoundTripScanner

from mesagen.errors import SpecError
from mesagen.spec.schema import Spec, semantic_errors

#: Spec files larger than this are refused before parsing (a spec is a page of YAML).
MAX_SPEC_BYTES = 256 * 1024


#: Tags a spec may state explicitly: the YAML core schema's (``!!str``, ``!!int`` ...). ``!!python/*`` and
#: local tags (``!foo``) are refused -- they would ask for objects a spec never needs.
_CORE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq"))

#: Deepest nesting of maps and sequences a spec may have (a valid spec nests four levels).
MAX_SPEC_DEPTH = 32

#: Most YAML nodes a spec may expand to (aliases share nodes, so a small file can expand exponentially).
MAX_SPEC_NODES = 100_000


class _TooDeep(Exception):
    """Raised by :class:`_DepthLimitedScanner` where the text opens one collection too many."""

    def __init__(self, mark: Any) -> None:
        super().__init__("too deep")
        self.mark = mark


class _DepthLimitedScanner(RoundTripScanner):
    """ruamel's round-trip scanner, stopping at the first collection nested deeper than :data:`MAX_SPEC_DEPTH`.

    ruamel's scanner takes time quadratic in the nesting depth of flow collections (its stale-simple-key
    check walks every open level at every token): a 256 KiB file of ``[`` costs hours before the composer
    could fail. Counting the open block indents and flow brackets as they are scanned stops such a file
    after a few dozen tokens.
    """

    def _check_depth(self) -> None:
        if len(self.indents) + len(self.flow_context) >= MAX_SPEC_DEPTH:
            raise _TooDeep(self.reader.get_mark())

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: Any) -> None:  # noqa: N803 (ruamel's name)
        self._check_depth()
        super().fetch_flow_collection_start(TokenClass, to_push)

    def add_indent(self, column: int) -> bool:
        if self.indent < column:
            self._check_depth()
        return super().add_indent(column)


_TAG = "tag:yaml.org,2002:"
#: Tags YAML gives plain (untagged) scalars other than strings.
_PLAIN_SCALAR_TAGS = frozenset(_TAG + t for t in ("int", "float", "bool", "null", "timestamp"))


def _node_problems(root: Any, path: str) -> list[SpecError]:
    """Check the composed YAML node graph before anything is constructed from it.

    Refuses, at the node's position and with its field path: explicit tags outside the core schema
    (``!!python/...``, ``!foo``, ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs``), dates (``2024-01-01``, which
    YAML resolves to ``!!timestamp``), merge keys (``<<``) and keys that are not strings (``1:``, ``[a]:``,
    ``? {a: 1}``). Checking nodes rather than the constructed data matters: ruamel forgets the tag of some
    values it builds, and crashes outright on some non-scalar keys. Aliases share nodes: each is checked once.
    """
    problems: list[SpecError] = []
    seen: set[int] = set()
    stack: list[tuple[Any, tuple]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        tag = str(getattr(node.tag, "value", node.tag))
        mark = {"line": node.start_mark.line + 1, "column": node.start_mark.column + 1}
        if tag == _TAG + "timestamp":
            problems.append(SpecError(path, f"{node.value} reads as a date, which no spec key takes; quote it if "
                                      "you meant text", field=_dotted(loc), **mark))
            continue
        if tag not in _CORE_TAGS:
            problems.append(SpecError(path, f"explicit YAML tag {_short_tag(tag)!r} is not allowed in a spec",
                                      field=_dotted(loc), **mark))
            continue
        if isinstance(node, MappingNode):
            children = []
            for key, value in node.value:
                key_tag = str(getattr(key.tag, "value", key.tag))
                key_mark = {"line": key.start_mark.line + 1, "column": key.start_mark.column + 1}
                if key_tag == _TAG + "merge":
                    problems.append(SpecError(path, "YAML merge keys ('<<') are not supported in a spec; write "
                                              "the keys out", field=_dotted(loc), **mark))
                elif not isinstance(key, ScalarNode) or key_tag != _TAG + "str":
                    if isinstance(key, (MappingNode, SequenceNode)):
                        shown = "a mapping" if isinstance(key, MappingNode) else "a sequence"
                    elif key_tag in _PLAIN_SCALAR_TAGS:  # 1, 1.5, true, null, 2024-01-01: as written
                        shown = key.value or "null"
                    else:
                        shown = f"a value tagged {_short_tag(key_tag)!r}"
                    problems.append(SpecError(path, f"keys must be strings, got {shown}", field=_dotted(loc),
                                              **key_mark))
                else:
                    children.append((value, loc + (key.value,)))
            stack.extend(reversed(children))
        elif isinstance(node, SequenceNode):
            stack.extend(reversed([(item, loc + (i,)) for i, item in enumerate(node.value)]))
    return problems


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _pos(getter: Any, key: Any) -> tuple:
    """0-based ``(line, column)`` from a ruamel ``lc`` getter, or ``()`` where ruamel kept none."""
    try:
        found = getter(key)
    except (KeyError, IndexError, TypeError):
        return ()
    return tuple(found[:2]) if found else ()


class _Walk:
    """State of one :func:`_plain` walk: the node budget left and the problems found so far."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.left = MAX_SPEC_NODES
        self.problems: list[SpecError] = []


def _plain(node: Any, walk: _Walk, where: tuple, loc: tuple = ()) -> Any:
    """Convert ruamel's constructed data (checked by :func:`_node_problems`) to plain dict/list/scalars.

    ``where`` is the node's 0-based (line, column) (``()`` if unknown) and ``loc`` its field path. Aliases
    are expanded here, so the node budget and the depth limit stop it, by raising; any value of an
    unexpected type is appended to ``walk.problems``.
    """
    path = walk.path
    walk.left -= 1
    if walk.left < 0:
        raise SpecError(path, f"spec expands to more than {MAX_SPEC_NODES} YAML nodes (aliases of aliases?)")
    if len(loc) > MAX_SPEC_DEPTH:
        raise SpecError(path, f"the YAML nests deeper than {MAX_SPEC_DEPTH} levels (a spec is a few levels of maps)",
                        field=_dotted(loc[:MAX_SPEC_DEPTH]), **_loc_kwargs(where))
    if isinstance(node, TaggedScalar):  # a core tag ruamel keeps as text: only ``!!str`` gets here
        return str(node.value)
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():  # keys are strings: _node_problems checked them
            out[key] = _plain(value, walk, _pos(node.lc.value, key) or where, loc + (key,))
        return out
    if isinstance(node, CommentedSeq):
        return [_plain(item, walk, _pos(node.lc.item, i) or where, loc + (i,)) for i, item in enumerate(node)]
    if node is None or isinstance(node, (str, bool, int, float)):
        return node
    walk.problems.append(SpecError(path, f"a YAML value of type {type(node).__name__} is not allowed in a spec",
                                   field=_dotted(loc), **_loc_kwargs(where)))
    return None


def _render(value: Any) -> str:
    """A value as a spec author would write it: ``true``/``null`` rather than Python's ``True``/``None``;
    a huge integer or a long string abridged (an error line quotes it, it need not repeat it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int) and len(digits := str(abs(int(value)))) > 24:
        return f"a {len(digits)}-digit integer"
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return repr(value)


def _loc_kwargs(where: tuple) -> dict:
    return {"line": where[0] + 1, "column": where[1] + 1} if where else {}


def _locate(root: Any, loc: tuple) -> tuple[int | None, int | None, tuple]:
    """Deepest (line, column) reachable along ``loc`` in the ruamel tree (1-based), and the path reached.

    A key found is located at the key; where the path leaves the tree (a missing field), the position is
    that of the mapping that lacks it.
    """
    line = col = None
    if isinstance(root, (CommentedMap, CommentedSeq)) and root.lc.line is not None:
        line, col = root.lc.line + 1, root.lc.col + 1
    node, reached = root, ()
    for key in loc:
        if isinstance(node, CommentedMap) and isinstance(key, str) and key in node and key in node.lc.data:
            kl, kc = node.lc.key(key)
            line, col = kl + 1, kc + 1
            node, reached = node[key], reached + (key,)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node) and node.lc.data:
            il, ic = node.lc.item(key)
            line, col = il + 1, ic + 1
            node, reached = node[key], reached + (key,)
        else:
            break
    return line, col, reached


def _dotted(loc: tuple) -> str:
    """``("parameters", "lam", "shape", 1)`` → ``parameters.lam.shape[1]``.

    A key that is empty, has leading or trailing blanks, or holds a character that does not print (a line
    break, a control or format character) is shown quoted and escaped (``objective.'\\r'``), so that every
    error stays one readable line.
    """
    parts = []
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
            continue
        text = str(key)
        if not text or not text.isprintable() or text.strip() != text:
            text = repr(text)
        parts.append(("." if parts else "") + text)
    return "".join(parts)


#: Discriminator tags pydantic inserts into an error's location after ``solver`` (not keys of the file).
_SOLVER_TAGS = frozenset({"closed_form", "gd", "online_gd"})

_IDENTIFIER_RULE = ("is not a valid name: use letters, digits and '_', not starting with a digit, at most 64 "
                    "characters (no spaces, dots or slashes)")


def _pydantic_errors(path: str, root: Any, err: ValidationError) -> list[SpecError]:
    """One located :class:`SpecError` per field pydantic rejected (the first error of each field)."""
    out: dict[tuple, SpecError] = {}
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if len(loc) >= 2 and loc[0] == "solver" and loc[1] in _SOLVER_TAGS:
            loc = loc[:1] + loc[2:]
        if loc and loc[-1] == "[key]":  # an invalid mapping key (a parameter or input name): cite the key itself
            loc = loc[:-1]
        if loc in out:
            continue
        line, col, _ = _locate(root, loc)
        kind = e["type"]
        value = e.get("input")
        if kind == "extra_forbidden":
            reason = f"unknown key {_render(loc[-1]) if loc else ''}"
        elif kind == "missing":
            reason = "required field is missing"
        elif kind == "string_pattern_mismatch":
            reason = f"{_render(value)} {_IDENTIFIER_RULE}"
        elif kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
            reason = f"{_render(value)} is too large to be a number (the largest is about 1.8e308)"
        else:
            reason = e["msg"]
            if "input" in e and not isinstance(value, (dict, list)):
                reason += f" (got {_render(value)})"
        out[loc] = SpecError(path, reason, line=line, column=col, field=_dotted(loc))
    return list(out.values())


def _syntax_error(path: str, exc: MarkedYAMLError) -> SpecError:
    """One line for a ruamel parse error: the problem where it was found, and the construct it broke."""
    mark = exc.problem_mark or exc.context_mark
    problem = " ".join((exc.problem or "").split())
    context = " ".join((exc.context or "").split())
    if not problem:
        problem, context = context or "invalid YAML", ""
    if "'\\t'" in problem:
        problem += "; indent YAML with spaces, not tabs"
    if context and problem.startswith("but "):
        problem = f"{context}, {problem}"
    elif context and exc.context_mark is not None and exc.context_mark is not mark:
        cm = exc.context_mark
        problem += f" ({context} at line {cm.line + 1}, column {cm.column + 1})"
    return SpecError(path, f"YAML syntax error: {problem}",
                     line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None)


def parse_spec(text: str, path: str | Path = "<string>") -> Spec:
    """Parse and validate spec text.

    Args:
        text: the YAML text of a spec (v1 language, see ``docs/specs.md``).
        path: the file name to cite in errors.

    Returns:
        The validated, frozen :class:`Spec`.

    Raises:
        SpecError: on YAML syntax errors, unknown keys, wrong types, inconsistent dimensions, unsupported
            combinations or out-of-domain inits; the message names file, line, column and field path. All
            problems of one stage are reported together (``err.problems``, one line each, sorted by
            position): every disallowed tag, merge key and non-string key; else every field the schema
            rejects; else every cross-field rule that fails. A YAML syntax error stops at the first.
    """
    path = str(path)
    if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecError(path, f"spec is larger than {MAX_SPEC_BYTES} bytes")
    yaml = YAML(typ="rt", pure=True)
    yaml.Scanner = _DepthLimitedScanner
    too_deep = f"the YAML nests deeper than {MAX_SPEC_DEPTH} levels (a spec is a few levels of maps)"
    try:
        node = yaml.compose(io.StringIO(text))
        problems = _node_problems(node, path) if node is not None else []
        if problems:
            raise SpecError.collect(problems)
        root = yaml.load(io.StringIO(text))
    except _TooDeep as exc:
        raise SpecError(path, too_deep, line=exc.mark.line + 1, column=exc.mark.column + 1) from None
    except RecursionError:  # aliases can still nest deeper than the text; _plain stops those too
        raise SpecError(path, too_deep) from None
    except MarkedYAMLError as exc:
        raise _syntax_error(path, exc) from None
    except YAMLError as exc:
        raise SpecError(path, f"YAML error: {exc}") from None
    if root is None:  # no document, only comments, or a bare null
        raise SpecError(path, "the spec is empty (expected a mapping with spec_version, name, description, "
                        "objective, solver and readout)")
    if not isinstance(root, CommentedMap):
        kind = "a sequence" if isinstance(root, CommentedSeq) else f"the scalar {_render(root)}"
        where = (root.lc.line, root.lc.col) if isinstance(root, CommentedSeq) and root.lc.line is not None else ()
        raise SpecError(path, f"a spec must be a YAML mapping at the top level, not {kind}", **_loc_kwargs(where))
    walk = _Walk(path)
    data = _plain(root, walk, ())
    if walk.problems:
        raise SpecError.collect(walk.problems)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError.collect(_pydantic_errors(path, root, exc)) from None
    problems = []
    for loc, reason in semantic_errors(spec):
        line, col, _ = _locate(root, loc)
        problems.append(SpecError(path, reason, line=line, column=col, field=_dotted(loc)))
    if problems:
        raise SpecError.collect(problems)
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
        with p.open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)  # never read a huge file whole
    except OSError as exc:
        raise SpecError(str(path), f"cannot read spec file: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(str(path), f"spec is larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(str(path), f"spec is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                        line=line, column=column) from None
    return parse_spec(text, path)


#: Fields added to the language after specs were hashed with it: left out of the canonical form while they hold
#: their default, so that every existing spec keeps its hash (and the run folders and configs that pin it).
_LATER_FIELDS = ((("objective", "regularizer"), "decays_with_data", False),)


def canonical_json(spec: Spec) -> str:
    """The spec re-serialised canonically (sorted keys, defaults filled, except the :data:`_LATER_FIELDS` at their
    default): comments and layout don't change it."""
    data = spec.model_dump(mode="json")
    for path, key, default in _LATER_FIELDS:
        node = data
        for p in path:
            node = node[p]
        if node.get(key) == default:
            del node[key]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_sha256(spec: Spec) -> str:
    """Hex sha256 of :func:`canonical_json` -- the provenance hash written into every generated header."""
    return hashlib.sha256(canonical_json(spec).encode("ascii")).hexdigest()
