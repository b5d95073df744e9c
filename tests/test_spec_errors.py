"""Bad specs are refused with one located line: ``file:line:column: field: reason`` -- never a traceback.

Every file in ``tests/bad_specs/`` has one row in :data:`EXPECTED` (and vice versa): the line, column and
dotted field path the error must name (``None`` where a part does not apply, e.g. a file that is not UTF-8
has no field) and a phrase of the reason. The same corpus is run through ``mesagen build`` in-process and,
for a sample, as a subprocess: exit status 2, one ``mesagen: error:`` line on stderr, nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesagen.cli import main
from mesagen.errors import SpecError
from mesagen.spec.loader import MAX_SPEC_BYTES, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]  # the checkout this test file belongs to
BAD = ROOT / "tests" / "bad_specs"
SPECS = ROOT / "specs"

# file: (line, column, field, phrase of the reason)
EXPECTED: dict[str, tuple[int | None, int | None, str | None, str]] = {
    "yaml_syntax_error.yaml": (7, 14, None, "YAML syntax error: expected ',' or '}', but got ':' (while parsing a flow mapping at line 6, column 12)"),
    "tab_indentation.yaml": (5, 1, None, "indent YAML with spaces, not tabs"),
    "duplicate_key.yaml": (9, 3, None, 'found duplicate key "loss"'),
    "unknown_top_level_key.yaml": (13, 1, "optimiser", "unknown key 'optimiser'"),
    "unknown_nested_key.yaml": (7, 30, "objective.regularizer.coefficent", "unknown key 'coefficent'"),
    "steps_string.yaml": (9, 20, "solver.steps", "valid integer (got '3')"),
    "init_bool.yaml": (12, 25, "parameters.eta.init", "valid number (got true)"),
    "name_list.yaml": (2, 1, "name", "valid string"),
    "missing_readout.yaml": (1, 1, "readout", "required field is missing"),
    "name_path_separator.yaml": (2, 1, "name", "'../escape' is not a valid name"),
    "name_with_space.yaml": (2, 1, "name", "'linear attention' is not a valid name"),
    "reserved_name.yaml": (12, 3, "parameters.lambda", "name 'lambda' is reserved in generated code"),
    "undeclared_coefficient.yaml": (7, 30, "objective.regularizer.coefficient", "'lamda' is not a declared parameter (declared: ['lam'])"),
    "ridge_domain_real.yaml": (12, 36, "parameters.lam.domain", "must have domain 'positive'"),
    "negative_lambda_init.yaml": (12, 25, "parameters.lam.init", "init -0.5 is outside the domain 'positive'"),
    "beta_init_out_of_unit_interval.yaml": (14, 5, "parameters.beta.init", "init 2.0 is outside the domain 'unit_interval'"),
    "nan_init.yaml": (12, 25, "parameters.eta.init", "init must be a finite number, not nan"),
    "inf_init.yaml": (12, 25, "parameters.lam.init", "init must be a finite number, not inf"),
    "lambda_shape_heads_dk.yaml": (12, 9, "parameters.lam.shape", "shape must be [heads], not ['heads', 'd_k']"),
    "step_size_shape_heads_dk.yaml": (12, 9, "parameters.eta.shape", "a step size is one scalar per head"),
    "closed_form_without_ridge.yaml": (9, 10, "solver.kind", "unsupported combination: the closed_form solver needs a ridge"),
    "gd_step_size_input.yaml": (9, 30, "solver.step_size", "must be a parameter, not a per-token input"),
    "log_space_step_size.yaml": (12, 39, "inputs.beta.space", "unsupported combination: a step size is used in linear space"),
    "unused_parameter.yaml": (12, 3, "parameters.gamma", "'gamma' is declared but no axis of the objective or solver uses it"),
    "python_object_tag.yaml": (3, 14, "description", "explicit YAML tag '!!python/object/apply:os.system' is not allowed"),
    "top_level_list.yaml": (1, 1, None, "must be a YAML mapping at the top level, not a sequence"),
    "empty.yaml": (None, None, None, "the spec is empty"),
    "not_utf8.yaml": (2, 10, None, "not valid UTF-8 (byte 0xe9 at offset 25)"),
    # found by tests/test_spec_fuzz.py: 5000 nested '[' took ruamel's scanner seconds (quadratic in depth)
    "deep_nesting.yaml": (15, 39, None, "the YAML nests deeper than 32 levels"),
    # found by tests/test_spec_fuzz.py: a key "\r" printed raw split the error line in two
    # found by tests/test_spec_fuzz.py: these were accepted by the loader as Python objects (bytes, date) and
    # refused later with their Python repr (``got b'1.0'``, ``got datetime.date(2024, 1, 1)``, 400 digits)
    "binary_tag.yaml": (16, 31, "parameters.eta.init", "explicit YAML tag '!!binary' is not allowed"),
    "date_value.yaml": (6, 14, "description", "2024-01-01 reads as a date, which no spec key takes; quote it"),
    "huge_integer.yaml": (16, 25, "parameters.eta.init", "a 401-digit integer is too large to be a number"),
    # found by tests/test_spec_fuzz.py: ruamel raised AttributeError (a traceback) constructing this key
    "collection_key.yaml": (15, 1, None, "keys must be strings, got a sequence"),
    "key_with_line_break.yaml": (15, 1, "'\\r'", "unknown key '\\r'"),
}


# Files with several mistakes: every problem is reported in the same run, one line each, sorted by position.
MULTI: dict[str, list[tuple[int | None, int | None, str | None, str]]] = {
    "several_mistakes.yaml": [
        (10, 20, "solver.steps", "valid integer (got '3')"),
        (13, 25, "parameters.eta.init", "valid number (got true)"),
        (14, 1, "optimiser", "unknown key 'optimiser'"),
    ],
    "several_rule_violations.yaml": [
        (4, 1, "description", "may not contain backslashes, double quotes or control characters"),
        (13, 9, "parameters.lam.shape", "shape must be [heads], not ['heads', 'd_k']"),
        (13, 42, "parameters.lam.domain", "must have domain 'positive'"),
    ],
}


def _prefix(path: str, line: int | None, column: int | None, field: str | None) -> str:
    where = path + (f":{line}" if line is not None else "") + (f":{column}" if column is not None else "")
    return f"{where}: " + (f"{field}: " if field else "")


def test_corpus_and_table_agree():
    on_disk = {p.name for p in BAD.glob("*.yaml")}
    assert on_disk == set(EXPECTED) | set(MULTI), (on_disk ^ (set(EXPECTED) | set(MULTI)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_spec_is_located(name):
    line, column, field, phrase = EXPECTED[name]
    rel = f"tests/bad_specs/{name}"
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / rel)
    err = info.value
    assert err.path == str(ROOT / rel)
    assert (err.line, err.column, err.field or None) == (line, column, field)
    assert phrase in err.reason
    assert "\n" not in str(err)
    assert str(err) == _prefix(str(ROOT / rel), line, column, field) + err.reason


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_refuses_bad_spec_in_process(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line, column, field, phrase = EXPECTED[name]
    out = tmp_path / "out"
    assert main(["build", f"tests/bad_specs/{name}", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mesagen: error: " + _prefix(f"tests/bad_specs/{name}", line, column, field))
    assert phrase in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(MULTI))
def test_every_mistake_is_reported_in_one_run(name, tmp_path, capsys, monkeypatch):
    """A spec with several mistakes lists them all (it used to report the first one per run)."""
    monkeypatch.chdir(ROOT)
    rel = f"tests/bad_specs/{name}"
    with pytest.raises(SpecError) as info:
        load_spec(rel)
    problems = info.value.problems
    assert [(p.line, p.column, p.field or None) for p in problems] == [e[:3] for e in MULTI[name]]
    assert all(phrase in p.reason for p, (*_, phrase) in zip(problems, MULTI[name]))
    out = tmp_path / "out"
    assert main(["build", rel, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == len(MULTI[name]), captured.err
    for got, (line, column, field, phrase) in zip(lines, MULTI[name]):
        assert got.startswith("mesagen: error: " + _prefix(rel, line, column, field)) and phrase in got, got
    assert captured.out == "" and not out.exists()


def test_every_bad_spec_on_the_command_line_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    argv = ["build", "tests/bad_specs/nan_init.yaml", "specs/linear.yaml", "tests/bad_specs/several_mistakes.yaml"]
    assert main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2].split(":")[0] for line in lines] == ["tests/bad_specs/nan_init.yaml"] + [
        "tests/bad_specs/several_mistakes.yaml"] * 3
    assert not out.exists()


def test_misspelled_reference_is_one_mistake():
    """An undeclared coefficient also leaves the declared parameter unused: only the reference is reported."""
    with pytest.raises(SpecError) as info:
        load_spec(BAD / "undeclared_coefficient.yaml")
    assert [p.field for p in info.value.problems] == ["objective.regularizer.coefficient"]


def test_shipped_specs_load():
    for name in ("linear", "gd", "delta", "ridge"):
        assert load_spec(SPECS / f"{name}.yaml").name == name


def test_huge_spec_is_refused_before_parsing(tmp_path):
    huge = tmp_path / "huge.yaml"
    good = (SPECS / "linear.yaml").read_text()
    huge.write_text(good + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    assert huge.stat().st_size > MAX_SPEC_BYTES
    with pytest.raises(SpecError) as info:
        load_spec(huge)
    assert str(info.value) == f"{huge}: spec is larger than {MAX_SPEC_BYTES} bytes"
    with pytest.raises(SpecError, match="larger than"):
        parse_spec(huge.read_text(), huge)


# More refusals, inline: a variation of linear.yaml, what replaces what, and the expected prefix + phrase.
LINEAR = (SPECS / "linear.yaml").read_text()
PARAM = "parameters:\n  eta: {shape: [heads], init: 1.0, domain: real}"
INLINE = {
    # a parameter named like a solver kind is still cited at its own path (pydantic's union tag is dropped only after 'solver')
    "param_named_gd": (LINEAR.replace("step_size: eta", "step_size: gd").replace("eta: {shape: [heads], init: 1.0", "gd: {shape: [heads], init: yes"),
                       "x.yaml:15:24: parameters.gd.init: ", "valid number (got 'yes')"),
    "invalid_parameter_name": (LINEAR.replace("eta: {shape", "bad name: {shape"),
                               "x.yaml:15:3: parameters.bad name: ", "'bad name' is not a valid name"),
    "merge_key": (LINEAR.replace(PARAM, "parameters:\n  _d: &d {shape: [heads], domain: real}\n  eta:\n    <<: *d\n    init: 1.0"),
                  "x.yaml:17:5: parameters.eta: ", "merge keys ('<<') are not supported"),
    "python_scalar_tag": (LINEAR.replace("init: 1.0", "init: !!python/float 1.0"),
                          "x.yaml:15:31: parameters.eta.init: ", "explicit YAML tag '!!python/float'"),
    "local_tag": (LINEAR.replace("readout: {kind: query}", "readout: !foo {kind: query}"),
                  "x.yaml:13:10: readout: ", "explicit YAML tag '!foo'"),
    "two_documents": (LINEAR + "---\nname: again\n", "x.yaml:16:1: ",
                      "expected a single document in the stream, but found another document"),
    "missing_nested_field": (LINEAR.replace("  model: {kind: linear, feature_map: identity}\n", ""),
                             "x.yaml:7:1: objective.model: ", "required field is missing"),
    "spec_version_bool": (LINEAR.replace("spec_version: 1", "spec_version: true"),
                          "x.yaml:3:1: spec_version: ", "valid integer (got true)"),
    "spec_version_float": (LINEAR.replace("spec_version: 1", "spec_version: 1.0"),
                           "x.yaml:3:1: spec_version: ", "valid integer (got 1.0)"),
    "spec_version_2": (LINEAR.replace("spec_version: 1", "spec_version: 2"),
                       "x.yaml:3:1: spec_version: ", "Input should be 1 (the only version"),
    "missing_top_level_field": (LINEAR.replace("readout: {kind: query}\n", ""),
                                "x.yaml:3:1: readout: ", "required field is missing"),
    "non_string_key": (LINEAR + "1: 2\n", "x.yaml:16:1: ", "keys must be strings, got 1"),
    "scalar_top_level": ("hello\n", "x.yaml: ", "not the scalar 'hello'"),
    "comments_only": ("# nothing here\n", "x.yaml: ", "the spec is empty"),
    "steps_out_of_range": (LINEAR.replace("steps: 1", "steps: 100"),
                           "x.yaml:12:20: solver.steps: ", "less than or equal to 32 (got 100)"),
    "unknown_solver": (LINEAR.replace("kind: gd,", "kind: adam,"), "x.yaml:12:1: solver: ", "'adam'"),
    "shape_axis": (LINEAR.replace("shape: [heads]", "shape: [heads, dk]"),
                   "x.yaml:15:24: parameters.eta.shape[1]: ", "(got 'dk')"),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                             for p, c in zip("abcdef", "bcdefg")),
                   "x.yaml: ", "more than 100000 YAML nodes"),
}


@pytest.mark.parametrize("case", sorted(INLINE))
def test_inline_refusals(case):
    text, prefix, phrase = INLINE[case]
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.yaml")
    message = str(info.value)
    assert message.startswith(prefix), message
    assert phrase in message
    assert "\n" not in message


def test_core_tags_are_accepted():
    text = LINEAR.replace("description: >-", "description: !!str >-").replace("init: 1.0", "init: !!float 1")
    spec = parse_spec(text, "x.yaml")
    assert spec.parameters["eta"].init == 1.0 and isinstance(spec.description, str)


# ---------------------------------------------------------------- the real command, as a subprocess

def _cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "mesagen.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SUBPROCESS_SAMPLE = ("yaml_syntax_error.yaml", "python_object_tag.yaml", "not_utf8.yaml")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start every subprocess case at once (each pays ~1 s of imports), then collect them."""
    base = tmp_path_factory.mktemp("cli")
    huge = base / "huge.yaml"
    huge.write_text(LINEAR + "#\n" * (MAX_SPEC_BYTES // 2 + 1))
    drifted = base / "drifted"
    assert main(["build", str(SPECS / "ridge.yaml"), "--out", str(drifted)]) == 0
    with open(drifted / "ridge" / "layer_jax.py", "a") as fh:
        fh.write("# edited by hand\n")
    cases = {f"bad:{n}": (["build", f"tests/bad_specs/{n}", "--out", str(base / f"out_{n}")], base / f"out_{n}")
             for n in SUBPROCESS_SAMPLE}
    cases["huge"] = (["build", str(huge), "--out", str(base / "out_huge")], base / "out_huge")
    cases["good_then_bad"] = (["build", "specs/linear.yaml", "tests/bad_specs/unused_parameter.yaml",
                               "--out", str(base / "out_mixed")], base / "out_mixed")
    cases["check_drift"] = (["build", "specs/ridge.yaml", "--check", "--out", str(drifted)], drifted)
    procs = {k: (_cli(*argv), out) for k, (argv, out) in cases.items()}
    results = {}
    for k, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[k] = (proc.returncode, stdout, stderr, out)
    return results


def _assert_refused(result, expected_start: str, phrase: str):
    rc, stdout, stderr, out = result
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mesagen: error: " + expected_start), lines[0]
    assert phrase in lines[0]
    assert stdout == ""
    assert not out.exists()  # not even the out folder is created


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_cli_subprocess_refuses_bad_spec(cli_runs, name):
    line, column, field, phrase = EXPECTED[name]
    _assert_refused(cli_runs[f"bad:{name}"], _prefix(f"tests/bad_specs/{name}", line, column, field), phrase)


def test_cli_subprocess_refuses_huge_spec(cli_runs):
    _assert_refused(cli_runs["huge"], "", f"spec is larger than {MAX_SPEC_BYTES} bytes")


def test_cli_good_and_bad_spec_together_write_nothing(cli_runs):
    _assert_refused(cli_runs["good_then_bad"], "tests/bad_specs/unused_parameter.yaml:12:3: parameters.gamma: ",
                    "declared but no axis")


def test_cli_check_fresh_exits_0(tmp_path, capsys):
    specs = [str(SPECS / f"{n}.yaml") for n in ("linear", "delta", "ridge")]
    assert main(["build", *specs, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["build", *specs, "--check", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    from mesagen.backends import BACKENDS

    n_files = len(specs) * len(BACKENDS)
    assert captured.out.startswith(f"ok: {n_files} generated file(s) are up to date") and captured.err == ""


def test_cli_check_drift_exits_1_and_names_the_file(cli_runs):
    rc, stdout, stderr, out = cli_runs["check_drift"]
    assert rc == 1, stderr
    assert "Traceback" not in stderr
    assert f"drift: {out / 'ridge' / 'layer_jax.py'} differs" in stderr
    assert "DERIVATION.md" not in stderr  # only the edited file drifts
    assert (out / "ridge" / "layer_jax.py").read_text().endswith("# edited by hand\n")  # --check writes nothing


def test_cli_check_missing_file_is_drift(tmp_path, capsys):
    out = tmp_path / "partial"
    assert main(["build", str(SPECS / "linear.yaml"), "--out", str(out)]) == 0
    (out / "linear" / "DERIVATION.md").unlink()
    capsys.readouterr()
    assert main(["build", str(SPECS / "linear.yaml"), "--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"drift: {out / 'linear' / 'DERIVATION.md'}" in err
    assert not (out / "linear" / "DERIVATION.md").exists()


def test_docs_quote_the_shipped_specs_verbatim():
    """docs/specs.md shows each shipped spec as a worked example: the quoted YAML must be the file itself."""
    doc = (ROOT / "docs" / "specs.md").read_text()
    for name in ("linear", "gd", "delta", "ridge"):
        section = doc.split(f"### `specs/{name}.yaml`", 1)[1]
        quoted = section.split("```yaml\n", 1)[1].split("```", 1)[0]
        assert quoted == (SPECS / f"{name}.yaml").read_text(), name
    for name, (line, column, field, _) in EXPECTED.items():  # the messages quoted in §8 are the real ones
        if f"mesagen: error: tests/bad_specs/{name}:" in doc:
            assert "mesagen: error: " + _prefix(f"tests/bad_specs/{name}", line, column, field) in doc, name
    for name in MULTI:  # a spec with several mistakes is quoted with every line, in order, exactly as printed
        if f"mesagen build tests/bad_specs/{name}\n" in doc:
            quoted = doc.split(f"$ mesagen build tests/bad_specs/{name}\n", 1)[1].split("```", 1)[0]
            with pytest.raises(SpecError) as info:
                load_spec(BAD / name)
            printed = [f"mesagen: error: {p.format()}".replace(str(BAD), "tests/bad_specs") for p in info.value.problems]
            assert quoted.splitlines() == printed, name


def test_deeply_nested_file_is_refused_quickly():
    """A file of nothing but '[' up to the size limit is refused at the 33rd level, not after ruamel's scanner
    has spent time quadratic in the depth on it (5000 levels took seconds, 120 000 would take hours)."""
    import time

    text = "x: " + "[" * (MAX_SPEC_BYTES // 2 - 10) + "]" * (MAX_SPEC_BYTES // 2 - 10)
    start = time.perf_counter()
    with pytest.raises(SpecError, match="nests deeper than 32 levels"):
        parse_spec(text, "x.yaml")
    assert time.perf_counter() - start < 5.0
