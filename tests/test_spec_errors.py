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
    "lambda_shape_heads_dk.yaml": (12, 9, "parameters.lam.shape", "a per-key-channel ridge coefficient [heads, d_k] needs spec_version: 2"),
    "step_size_shape_heads_dk.yaml": (12, 9, "parameters.eta.shape", "a step size is one scalar per head"),
    "kernel_weights_linear_model.yaml": (6, 13, "objective.weights.kind", "kernel weights (query-dependent, softmax attention) need model kind 'constant'"),
    "constant_model_uniform_weights.yaml": (6, 13, "objective.weights.kind", "a constant model needs kernel weights"),
    "constant_model_gd_solver.yaml": (9, 1, "solver", "solved by solver {kind: closed_form, recurrence: kv_cache}"),
    "kv_cache_linear_model.yaml": (9, 29, "solver.recurrence", "the kv_cache recurrence solves a constant model"),
    "kernel_gate_per_channel.yaml": (12, 7, "inputs.g.shape", "the forget gate of kernel weights is one scalar per token and head"),
    "v1_kernel_weights.yaml": (8, 11, "objective.model.kind", "kernel regression (a constant model, kernel weights, the kv_cache recurrence) needs spec_version: 2"),
    "constant_model_ridge.yaml": (7, 17, "objective.regularizer.kind", "kernel regression takes no regulariser"),
    "closed_form_without_ridge.yaml": (9, 10, "solver.kind", "unsupported combination: the closed_form solver needs a ridge"),
    "gd_step_size_input.yaml": (9, 30, "solver.step_size", "must be a parameter, not a per-token input"),
    "log_space_step_size.yaml": (12, 39, "inputs.beta.space", "unsupported combination: a step size is used in linear space"),
    "one_input_two_roles.yaml": (10, 27, "solver.step_size", "'beta' is already the objective.weights.gate; one input or parameter has one role"),
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
    # v2 (compiler v2 part 1): one file per new error
    "unknown_feature_map.yaml": (10, 25, "objective.model.feature_map", "Input should be 'identity', 'l2_normalize' or 'elu_plus_one' (got 'softmax')"),
    "unknown_weights_kind.yaml": (8, 13, "objective.weights.kind", "Input should be 'uniform', 'decayed' or 'kernel' (got 'exponential')"),
    "input_shape_batch_time_dk.yaml": (14, 7, "inputs.g.shape", "or [batch, time, heads, d_v] (per value channel), not [batch, time, d_k]"),
    "scale_zero.yaml": (12, 24, "readout.scale", "the readout scale is a finite number greater than 0 (e.g. 0.125) or 'inverse_sqrt_dk' (d_k^(-1/2), fla's default) (got 0)"),
    "scale_negative.yaml": (12, 24, "readout.scale", "greater than 0 (e.g. 0.125) or 'inverse_sqrt_dk' (d_k^(-1/2), fla's default) (got -1)"),
    "scale_sqrt.yaml": (12, 24, "readout.scale", "or 'inverse_sqrt_dk' (d_k^(-1/2), fla's default) (got 'sqrt')"),
    "v1_feature_map.yaml": (10, 25, "objective.model.feature_map", "the feature map 'l2_normalize' needs spec_version: 2"),
    "v1_readout_scale.yaml": (12, 24, "readout.scale", "a readout scale needs spec_version: 2"),
    "v1_per_channel_input.yaml": (14, 10, "inputs.beta.shape", "a per-channel input [batch, time, heads, d_v] needs spec_version: 2"),
    "v1_domain_positive_unit_interval.yaml": (14, 54, "inputs.beta.domain", "the domain 'positive_unit_interval' needs spec_version: 2"),
    "v1_domain_nonpositive.yaml": (14, 37, "parameters.eta.domain", "the domain 'nonpositive' needs spec_version: 2"),
    "v1_importance.yaml": (8, 28, "objective.weights.importance", "importance weights need spec_version: 2"),
    "v1_gd_without_step_size.yaml": (11, 1, "solver", "the gd solver needs a 'step_size' in spec_version 1 (a parameter name); omitting it for a step size of 1 needs spec_version: 2"),
    "decayed_without_gate.yaml": (8, 3, "objective.weights", "decayed weights need a 'gate': the name of a forget-gate input"),
    "gate_not_declared.yaml": (8, 28, "objective.weights.gate", "'h' is neither a declared parameter nor an input (declared: ['g'])"),
    "log_gate_unit_interval.yaml": (14, 48, "inputs.g.domain", "a forget gate in log space (g = log α ≤ 0) must have domain 'nonpositive', not 'unit_interval'"),
    "linear_gate_unit_interval.yaml": (14, 51, "inputs.g.domain", "a forget gate in linear space (α ∈ (0, 1]) must have domain 'positive_unit_interval', not 'unit_interval'"),
    "gate_shape_dv.yaml": (14, 7, "inputs.g.shape", "not per value channel [batch, time, heads, d_v]"),
    "channel_gate_gd_steps.yaml": (14, 7, "inputs.g.shape", "unsupported combination: a per-key-channel gate"),
    "gate_parameter_domain.yaml": (14, 42, "parameters.gamma.domain", "domain must be 'positive_unit_interval' ((0, 1]), not 'unit_interval'"),
    "gate_parameter_shape.yaml": (14, 11, "parameters.gamma.shape", "a forget-gate parameter is one scalar per head: shape must be [heads], not ['heads', 'd_k']"),
    "decayed_closed_form.yaml": (11, 29, "solver.recurrence", "no rank-one recursion keeps the exact solution: with decayed weights Sherman–Morrison needs the regulariser to decay with the data"),
    "importance_not_input.yaml": (8, 37, "objective.weights.importance", "'w' is a parameter; an importance weight β_i is a per-token input [batch, time, heads]"),
    "importance_shape_dk.yaml": (15, 3, "inputs.w", "must be an input [batch, time, heads] in linear space with domain 'positive' or 'unit_interval', not [batch, time, heads, d_k]"),
    "importance_online_gd.yaml": (8, 37, "objective.weights.importance", "unsupported combination: importance weights need the gd, closed_form or conjugate_gradient solver, not online_gd"),
    "uniform_weights_with_gate.yaml": (8, 28, "objective.weights.gate", "uniform weights take no gate (use kind: decayed)"),
    "online_gd_without_step_size.yaml": (11, 1, "solver.step_size", "required field is missing"),
    "step_size_input_dk.yaml": (15, 10, "inputs.beta.shape", "not [batch, time, heads, d_k]: a per-key-channel shape is only for forget gates"),
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
        (13, 9, "parameters.lam.shape", "a per-key-channel ridge coefficient [heads, d_k] needs spec_version: 2"),
        (13, 42, "parameters.lam.domain", "must have domain 'positive'"),
    ],
    # v2: v2 keys in a v1 file, broken v2 cross-field rules, and misspelled v2 values, each all in one run
    "v2_keys_in_v1_file.yaml": [
        (7, 13, "objective.weights.kind", "decayed weights need spec_version: 2"),
        (7, 37, "objective.weights.importance", "importance weights need spec_version: 2"),
        (9, 25, "objective.model.feature_map", "the feature map 'l2_normalize' needs spec_version: 2"),
        (10, 1, "solver", "omitting it for a step size of 1 needs spec_version: 2"),
        (11, 24, "readout.scale", "a readout scale needs spec_version: 2"),
        (13, 7, "inputs.g.shape", "a per-channel input [batch, time, heads, d_k] needs spec_version: 2"),
        (13, 53, "inputs.g.domain", "the domain 'nonpositive' needs spec_version: 2"),
    ],
    "several_v2_rule_violations.yaml": [
        (7, 37, "objective.weights.importance", "importance weights need the gd, closed_form or conjugate_gradient solver, not online_gd"),
        (13, 7, "inputs.g.shape", "not per value channel [batch, time, heads, d_v]"),
        (13, 53, "inputs.g.domain", "must have domain 'nonpositive', not 'unit_interval'"),
        (14, 10, "inputs.beta.shape", "a per-key-channel shape is only for forget gates"),
        (14, 44, "inputs.beta.space", "a step size is used in linear space"),
        (15, 3, "inputs.w", "not [batch, time, heads] in log space with domain 'real'"),
    ],
    "several_v2_vocabulary_mistakes.yaml": [
        (7, 13, "objective.weights.kind", "(got 'decaying')"),
        (9, 25, "objective.model.feature_map", "(got 'softmax')"),
        (11, 24, "readout.scale", "(got 'sqrt')"),
        (13, 7, "inputs.g.shape", "not [batch, time, d_k]"),
        (13, 46, "inputs.g.domain", "(got 'negative')"),
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
    for name in ("linear", "gd", "delta", "ridge", "simple_gla", "retention", "gla", "gated_delta", "kda"):
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
SIMPLE_GLA = (SPECS / "simple_gla.yaml").read_text()
GATED_DELTA = (SPECS / "gated_delta.yaml").read_text()
SCALE = "scale: inverse_sqrt_dk"
SCALE_RULE = "readout.scale: the readout scale is a finite number greater than 0"
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
    "spec_version_3": (LINEAR.replace("spec_version: 1", "spec_version: 3"),
                       "x.yaml:3:1: spec_version: ", "Input should be 1 or 2 (the versions of the spec language) (got 3)"),
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
    # v2 values: one line each, at the field itself (not at pydantic's union members)
    "scale_true": (SIMPLE_GLA.replace(SCALE, "scale: true"), f"x.yaml:13:24: {SCALE_RULE}", "(got true)"),
    "scale_inf": (SIMPLE_GLA.replace(SCALE, "scale: .inf"), f"x.yaml:13:24: {SCALE_RULE}", "(got inf)"),
    "scale_nan": (SIMPLE_GLA.replace(SCALE, "scale: .nan"), f"x.yaml:13:24: {SCALE_RULE}", "(got nan)"),
    "scale_huge_integer": (SIMPLE_GLA.replace(SCALE, "scale: 1" + "0" * 400), f"x.yaml:13:24: {SCALE_RULE}",
                           "(got a 401-digit integer)"),
    "scale_list": (SIMPLE_GLA.replace(SCALE, "scale: [1.0]"), f"x.yaml:13:24: {SCALE_RULE}", "fla's default"),
    "scale_misspelled": (SIMPLE_GLA.replace(SCALE, "scale: inverse_sqrt_d_k"), f"x.yaml:13:24: {SCALE_RULE}",
                         "(got 'inverse_sqrt_d_k')"),
    "input_shape_five_axes": (SIMPLE_GLA.replace("[batch, time, heads]", "[batch, time, heads, d_k, d_v]"),
                              "x.yaml:15:7: inputs.g.shape: ", "not [batch, time, heads, d_k, d_v]"),
    "input_shape_axis": (SIMPLE_GLA.replace("[batch, time, heads]", "[batch, time, heads, dk]"),
                         "x.yaml:15:35: inputs.g.shape[3]: ", "Input should be 'batch', 'time', 'heads', 'd_k' or 'd_v' (got 'dk')"),
    "input_shape_time_first": (SIMPLE_GLA.replace("[batch, time, heads]", "[time, batch, heads]"),
                               "x.yaml:15:7: inputs.g.shape: ", "not [time, batch, heads]"),
    "unknown_domain": (SIMPLE_GLA.replace("domain: nonpositive", "domain: negative"),
                       "x.yaml:15:48: inputs.g.domain: ", "'nonpositive' or 'positive_unit_interval' (got 'negative')"),
    "importance_undeclared": (SIMPLE_GLA.replace("gate: g}", "gate: g, importance: w}"),
                              "x.yaml:9:37: objective.weights.importance: ", "'w' is not a declared input (declared inputs: ['g'])"),
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
    for name in ("linear", "gd", "delta", "ridge", "simple_gla", "retention", "gla", "gated_delta", "kda"):
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


V2_EXAMPLES = ("simple_gla", "retention", "gla", "gated_delta", "kda")


def test_docs_v2_snippets_run(monkeypatch):
    """The Python snippet of each v2 worked example in docs/specs.md §6 runs as written from the checkout's
    root, and its `o` has the layout [B, T, H, V] its recurrence promises (the values are checked against
    mesagen.reference by the layer tests)."""
    import numpy as np

    monkeypatch.chdir(ROOT)
    doc = (ROOT / "docs" / "specs.md").read_text()
    for name in V2_EXAMPLES:
        section = doc.split(f"### `specs/{name}.yaml`", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        code = section.split("```python\n", 1)[1].split("```", 1)[0]
        assert f'"generated/{name}/layer_jax.py"' in code, name
        ns: dict = {}
        exec(compile(code, f"docs/specs.md ({name})", "exec"), ns)
        B, T, H, V = ns["B"], ns["T"], ns["H"], ns["V"]
        assert ns["o"].shape == (B, T, H, V) and np.isfinite(np.asarray(ns["o"])).all(), name
        if "o2" in ns:  # the closed (parallel) form agrees with the recurrent one
            assert np.allclose(np.asarray(ns["o2"]), np.asarray(ns["o"]), rtol=1e-4, atol=1e-5), name


def test_deeply_nested_file_is_refused_quickly():
    """A file of nothing but '[' up to the size limit is refused at the 33rd level, not after ruamel's scanner
    has spent time quadratic in the depth on it (5000 levels took seconds, 120 000 would take hours)."""
    import time

    text = "x: " + "[" * (MAX_SPEC_BYTES // 2 - 10) + "]" * (MAX_SPEC_BYTES // 2 - 10)
    start = time.perf_counter()
    with pytest.raises(SpecError, match="nests deeper than 32 levels"):
        parse_spec(text, "x.yaml")
    assert time.perf_counter() - start < 5.0
