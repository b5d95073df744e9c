"""Spec fuzzing (issue 7, item 10): mutations of the shipped specs either build or are refused cleanly.

Each example mutates one of ``specs/*.yaml`` -- keys deleted, duplicated, renamed or retyped, random scalars
(unicode, empty strings, huge numbers, NaN/inf, null), deep nesting, lists for maps, text-level damage
(duplicated or dropped lines, tabs, truncation, CRLF, a BOM, invalid UTF-8 bytes) --
writes it to a file and runs ``mesagen build FILE --out OUT`` in-process. Every outcome is one of:

* exit 0: the layer's files were written (the derivation and its verification passed), or
* exit 2: one or more ``mesagen: error: FILE:LINE:COL: FIELD: REASON`` lines on stderr, nothing on stdout,
  and the output folder exactly as it was (a sentinel file and no new files).

Anything else -- a traceback (any exception out of ``main``), another exit status, a message without the
file name, a partial write -- fails. ``test_structural_mutations`` draws mutations that mostly fail
validation early (cheap); ``test_valid_mutations`` draws specs that stay within the supported combinations of
docs/specs.md §4 and so reach the derivation (each costs ~0.1-1 s). Together: 550 examples.
Examples are derandomised (the same on every run and machine) and no example database is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

import mesagen.pipeline as pipeline
from mesagen.cli import main
from mesagen.spec.loader import canonical_json

_compile_spec = pipeline.compile_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("linear", "gd", "delta", "ridge")
TEXTS = {n: (ROOT / "specs" / f"{n}.yaml").read_text() for n in SHIPPED}


def _load(text: str):
    return YAML(typ="safe", pure=True).load(text)


TREES = {n: _load(t) for n, t in TEXTS.items()}

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- values

_words = st.sampled_from(["squared", "uniform", "ridge", "none", "linear", "identity", "closed_form", "gd",
                          "online_gd", "sherman_morrison", "zero", "query", "heads", "d_k", "d_v", "batch", "time",
                          "real", "positive", "unit_interval", "log", "lam", "eta", "beta", "kind", "shape",
                          "init", "domain", "space", "steps", "step_size", "coefficient", "lambda", "q", "1"])
_text = st.one_of(
    _words,
    st.text(max_size=12),  # any unicode, empty strings included
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(["", " ", "\t", "\n", "\r", "\x85", "\u2028", "a\nb",
                     "\x00", "\u200b", "é", "λ", "\U0001f600", "../x", "a/b", "a.b", "-1",
                     "1e400", "nan", ".inf", "yes", "null", "~", "#", "&a", "*a", "!!int", "<<", "a" * 70]),
)
_numbers = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2, 3, 32, 33, 10 ** 30, -(10 ** 30), 2 ** 63, 10 ** 400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308, 0.5, 1.0]),
)
scalars = st.one_of(_text, _numbers, st.booleans(), st.none())
#: YAML source snippets (not values): dates, typed-collection tags, anchors, aliases, local tags, merge keys.
_raw_yaml = st.sampled_from(["2024-01-01", "2024-01-01 10:00:00", "!!binary aGk=", "!!timestamp 2024-01-01",
                             "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]", "&x 1", "*x", "!foo 1",
                             "!!python/name:os.system", "{<<: {a: 1}}", "1" + "0" * 400, "0x1F", "0o17", ".nan",
                             "-.inf", "~", "[", "}", "'", '"', "? a", "- a", "|", ">-", "@", "`", "%YAML 1.1"])


def _nest(value, depth: int, as_map: bool):
    for i in range(depth):
        value = {f"k{i}": value} if as_map else [value]
    return value


values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(_text, scalars, max_size=3),
    st.builds(_nest, scalars, st.integers(1, 40), st.booleans()),
)

# ---------------------------------------------------------------- tree mutations


def _paths(node, prefix=()):
    """Every path to a node of a plain YAML tree (maps and lists), the root excluded."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _parent(tree, path):
    node = tree
    for k in path[:-1]:
        node = node[k]
    return node


def _mutate(data, tree, values=values, scalars=scalars):
    """Apply one drawn mutation to ``tree`` in place (or return a replacement for the whole tree)."""
    paths = _paths(tree)
    if not paths:
        return data.draw(values)
    path = data.draw(st.sampled_from(paths))
    parent, key = _parent(tree, path), path[-1]
    op = data.draw(st.sampled_from(["delete", "retype", "rename", "duplicate", "nest", "list_for_map",
                                    "map_for_list", "scalar", "add_key"]))
    if op == "delete":
        del parent[key]
    elif op in ("retype", "scalar"):
        parent[key] = data.draw(values if op == "retype" else scalars)
    elif op == "rename" and isinstance(parent, dict):
        new = data.draw(st.one_of(_text, st.integers(-5, 5), st.booleans(), st.none(), st.floats()))
        parent[new] = parent.pop(key)
    elif op == "duplicate" and isinstance(parent, dict):  # same value under a second (new or existing) key
        parent[data.draw(st.one_of(_words, st.sampled_from(list(parent))))] = parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, parent[key])
    elif op == "nest":
        parent[key] = _nest(parent[key], data.draw(st.integers(1, 40)), data.draw(st.booleans()))
    elif op == "list_for_map":
        v = parent[key]
        parent[key] = list(v.values()) if isinstance(v, dict) else [v]
    elif op == "map_for_list":
        v = parent[key]
        parent[key] = {str(i): x for i, x in enumerate(v)} if isinstance(v, list) else {"kind": v}
    elif op == "add_key" and isinstance(parent[key], dict):
        parent[key][data.draw(_text)] = data.draw(values)
    else:
        parent[key] = data.draw(values)
    return tree


def _dump(tree) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = None
    buf = io.StringIO()
    yaml.dump(tree, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- text mutations

def _text_mutation(data, text: str | bytes) -> str | bytes:
    if isinstance(text, bytes):  # raw bytes were inserted already: damage them further
        pos = data.draw(st.integers(0, len(text)))
        return text[:pos] + data.draw(st.binary(max_size=8)) + text[pos:]
    lines = text.splitlines(keepends=True)
    op = data.draw(st.sampled_from(["dup_line", "drop_line", "insert", "delete_chars", "truncate", "indent",
                                    "deep_flow", "replace_token", "crlf", "bom", "raw_bytes"]))
    if op == "crlf":
        return text.replace("\n", "\r\n")
    if op == "bom":
        return "\ufeff" + text
    if op == "raw_bytes":  # invalid UTF-8, NUL bytes, stray continuation bytes
        raw = text.encode("utf-8")
        pos = data.draw(st.integers(0, len(raw)))
        return raw[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
    i = data.draw(st.integers(0, max(0, len(lines) - 1)))
    if op == "dup_line" and lines:  # duplicate keys, mostly
        lines.insert(i, lines[i])
    elif op == "drop_line" and lines:
        del lines[i]
    elif op == "indent" and lines:
        lines[i] = data.draw(st.sampled_from(["  ", "\t", " "])) + lines[i]
    elif op == "deep_flow":  # deep nesting in flow style, deeper than any recursion limit
        depth = data.draw(st.sampled_from([50, 300, 3000, 20000]))
        opener, closer = data.draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        lines.insert(i, f"deep: {opener * depth}1{closer * depth}\n")
    else:
        s = "".join(lines)
        pos = data.draw(st.integers(0, len(s)))
        if op == "insert":
            return s[:pos] + data.draw(st.one_of(_text, _raw_yaml)) + s[pos:]
        if op == "delete_chars":
            return s[:pos] + s[pos + data.draw(st.integers(1, 20)):]
        if op == "truncate":
            return s[:pos]
        token = data.draw(st.sampled_from(re.findall(r"[A-Za-z_0-9.]+", s) or ["x"]))
        return s.replace(token, data.draw(st.one_of(_text, _raw_yaml)), 1)
    return "".join(lines)


# ---------------------------------------------------------------- the property

_ERROR_LINE = r"^mesagen: error: {path}(:\d+:\d+)?: \S.*$"


_COMPILED: dict[tuple, object] = {}


def _compile_once(spec, spec_path, backends=None, out_arg=""):
    """``pipeline.compile_spec``, memoised on the canonical spec: many mutations (a deleted optional key, a
    comment) leave the canonical spec unchanged, and its derivation is a pure function of it. The CLI still
    loads, validates and writes every example."""
    key = (canonical_json(spec), spec_path, backends, out_arg)
    if key not in _COMPILED:
        _COMPILED[key] = _compile_spec(spec, spec_path, backends, out_arg)
    return _COMPILED[key]


#: One folder reused by every example of the module: the spec file is rewritten, the output folder restored
#: after a successful build (creating and removing a folder per example costs more than the examples).
WHERE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _fuzz_folder():
    base = Path(tempfile.mkdtemp(prefix="mesagen_fuzz_"))
    WHERE.update(spec=base / "specs" / "fuzz.yaml", out=base / "out")
    yield
    shutil.rmtree(base, ignore_errors=True)


def _run_build(text: str | bytes) -> tuple[int, str, str, dict, dict]:
    """Write ``text`` to the spec file and build it into the output folder, which holds only a sentinel file."""
    SPEC, OUT = WHERE["spec"], WHERE["out"]
    SPEC.parent.mkdir(parents=True, exist_ok=True)
    SPEC.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    OUT.mkdir(exist_ok=True)
    (OUT / "KEEP.txt").write_text("user file\n")
    before = {str(p.relative_to(OUT)): p.read_bytes() for p in OUT.rglob("*") if p.is_file()}
    assert list(before) == ["KEEP.txt"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            mock.patch.object(pipeline, "compile_spec", _compile_once):
        rc = main(["build", str(SPEC), "--out", str(OUT)])
    after = {str(p.relative_to(OUT)): p.read_bytes() for p in OUT.rglob("*") if p.is_file()}
    return rc, stdout.getvalue(), stderr.getvalue(), before, after


#: Seconds a refusal may take (they take ~30 ms; ruamel once spent seconds on a few thousand nested '[').
REFUSAL_SECONDS = 3.0


def _check(text: str | bytes) -> int:
    """Build ``text``; assert the outcome is a clean build or a clean refusal; return the exit status."""
    start = time.perf_counter()
    rc, stdout, stderr, before, after = _run_build(text)
    seconds = time.perf_counter() - start
    SPEC, OUT = WHERE["spec"], WHERE["out"]
    if rc == 0:
        names = {rel.split("/")[0] for rel in after if "/" in rel}
        assert len(names) == 1 and len(after) == 1 + 4, after  # the sentinel and one layer's 4 files
        assert after["KEEP.txt"] == before["KEEP.txt"]
        assert stderr == ""
        shutil.rmtree(OUT / names.pop())
    else:
        assert rc == 2, (rc, stderr)
        lines = stderr.splitlines()
        assert lines, "exit 2 without a message"
        pattern = _ERROR_LINE.format(path=re.escape(str(SPEC)))
        for line in lines:
            assert re.match(pattern, line), line
        assert "Traceback" not in stderr
        assert stdout == ""
        assert after == before, "a refused spec changed the output folder"
        assert seconds < REFUSAL_SECONDS, f"refusing took {seconds:.1f} s"
    return rc


@settings(max_examples=520, **FUZZ)
@given(st.data())
def test_structural_mutations(data):
    name = data.draw(st.sampled_from(SHIPPED))
    if data.draw(st.integers(0, 3)) == 0:
        text = TEXTS[name]
        for _ in range(data.draw(st.integers(1, 2))):
            text = _text_mutation(data, text)
    else:
        tree = copy.deepcopy(TREES[name])
        for _ in range(data.draw(st.integers(1, 3))):
            tree = _mutate(data, tree)
        text = _dump(tree)
    _check(text)


# ---------------------------------------------------------------- mutations that stay valid

_identifiers = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z").filter(lambda s: s not in _RESERVED)


def _reserved() -> frozenset[str]:
    from mesagen.spec.schema import RESERVED_NAMES

    return RESERVED_NAMES


_RESERVED = _reserved()
_domain_values = {
    "real": st.floats(-1e6, 1e6, allow_nan=False),
    "positive": st.floats(1e-6, 1e6),
    "unit_interval": st.floats(0.0, 1.0),
}


@st.composite
def valid_specs(draw) -> dict:
    """A spec within the supported combinations (docs/specs.md §4), with random names, inits, descriptions."""
    param = draw(_identifiers)
    combo = draw(st.sampled_from(["ridge_closed", "none_gd", "none_online_input", "none_online_param",
                                  "ridge_gd", "ridge_online_input", "ridge_online_param"]))
    ridge = combo.startswith("ridge")
    tree = copy.deepcopy(TREES["linear"])
    tree["name"] = draw(_identifiers)
    printable = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters='\\"').filter(
        str.isprintable)  # the description rule of docs/specs.md §3
    tree["description"] = draw(st.text(alphabet=printable, max_size=80))
    tree["objective"]["regularizer"] = {"kind": "ridge", "coefficient": param} if ridge else {"kind": "none"}
    params, inputs = {}, {}
    if ridge:
        params[param] = {"shape": ["heads"], "init": draw(_domain_values["positive"]), "domain": "positive"}
    step = param if ridge else draw(_identifiers)
    if combo == "ridge_closed":
        tree["solver"] = {"kind": "closed_form", "recurrence": "sherman_morrison"}
    elif combo in ("none_gd", "ridge_gd"):
        steps = draw(st.integers(1, 6))  # up to 6 keeps examples fast
        tree["solver"] = {"kind": "gd", "steps": steps, "step_size": step}
    else:
        tree["solver"] = {"kind": "online_gd", "step_size": step}
        if combo.endswith("input") and not ridge or combo == "ridge_online_input":
            step = draw(_identifiers.filter(lambda s: s != param))
            tree["solver"]["step_size"] = step
            inputs[step] = {"shape": ["batch", "time", "heads"], "space": "linear",
                            "domain": draw(st.sampled_from(["real", "positive", "unit_interval"]))}
    if tree["solver"]["kind"] != "closed_form" and step not in params and step not in inputs:
        domain = draw(st.sampled_from(["real", "positive", "unit_interval"]))
        params[step] = {"shape": ["heads"], "init": draw(_domain_values[domain]), "domain": domain}
    tree.pop("parameters", None)
    if params:
        tree["parameters"] = params
    if inputs:
        tree["inputs"] = inputs
    return tree


@settings(max_examples=30, **FUZZ)
@given(valid_specs())
def test_valid_mutations(tree):
    assert _check(_dump(tree)) == 0


# ---------------------------------------------------------------- v2: the loader alone

#: The v2 specs. Their mutations go through the loader only (``parse_spec``): what is checked here is that
#: the v2 vocabulary and cross-field rules (docs/specs.md §2-§3) refuse cleanly; building them is the job of
#: the layer tests.
SHIPPED_V2 = ("simple_gla", "retention", "gla", "gated_delta", "kda")
TEXTS_V2 = {n: (ROOT / "specs" / f"{n}.yaml").read_text() for n in SHIPPED_V2}
TREES_V2 = {n: _load(t) for n, t in TEXTS_V2.items()}
_v2_words = st.sampled_from(["decayed", "uniform", "gate", "importance", "g", "gamma", "beta", "w",
                             "l2_normalize", "elu_plus_one", "identity", "scale", "inverse_sqrt_dk",
                             "nonpositive", "positive_unit_interval", "unit_interval", "log", "linear",
                             "d_k", "d_v", "heads", "batch", "time", "online_gd", "gd", "closed_form", "step_size",
                             "steps", "2", "1"])
_v2_scalars = st.one_of(_v2_words, scalars, st.sampled_from([0, -1, 0.125, 2, 1, 1.0, math.inf, math.nan]))
_v2_values = st.one_of(_v2_scalars, st.lists(_v2_scalars, max_size=5), st.dictionaries(_v2_words, _v2_scalars, max_size=3))


@settings(max_examples=300, **FUZZ)
@given(st.data())
def test_v2_mutations_load_or_refuse_cleanly(data):
    from mesagen.errors import SpecError
    from mesagen.spec.loader import parse_spec

    name = data.draw(st.sampled_from(SHIPPED_V2))
    tree = copy.deepcopy(TREES_V2[name])
    for _ in range(data.draw(st.integers(1, 3))):
        tree = _mutate(data, tree, _v2_values, _v2_scalars)
    try:
        parse_spec(_dump(tree), "fuzz.yaml")
    except SpecError as err:
        assert err.problems
        for problem in err.problems:
            line = problem.format()
            assert "\n" not in line and re.match(r"^fuzz\.yaml(:\d+:\d+)?: \S", line), line


def test_fuzzing_covers_both_outcomes():
    """The property is not vacuous: the shipped specs build through the same harness and a mutation is refused."""
    assert _check(TEXTS["ridge"]) == 0
    assert _check(TEXTS["ridge"].replace("lam: {", "lam: [")) == 2
    assert _check(b"name: \xff\n") == 2
    assert _check("deep: " + "[" * 20000 + "]" * 20000 + "\n" + TEXTS["linear"]) == 2
