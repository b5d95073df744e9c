"""The fixed frames of generated modules live in real template modules (mesagen/backends/templates/): they lint,
and filling a section checks its placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyflakes.api import check
from pyflakes.reporter import Reporter

from mesagen.backends import templates
from mesagen.backends.templates import PLACEHOLDER, TemplateError, fill, sections

TEMPLATES = sorted(p.stem for p in Path(templates.__file__).parent.glob("*.py") if p.stem != "__init__")


class _Collect:
    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_module_lints(name):
    """pyflakes finds nothing but the intended alternatives (one section per backward or form redefines a name)."""
    path = Path(templates.__file__).parent / f"{name}.py"
    out, err = _Collect(), _Collect()
    check(path.read_text(encoding="utf-8"), str(path), Reporter(out, err))
    problems = [line for line in "".join(out.lines + err.lines).splitlines() if "redefinition of unused" not in line]
    assert not problems, problems


def test_fill_checks_placeholders():
    text = sections("jax_layer")["frame"]
    names = {m.lower() for m in PLACEHOLDER.findall(text)}
    assert names == {"step_head_axes", "step_batch_axes"}
    with pytest.raises(TemplateError, match=r"placeholders without a value \['step_batch_axes'\]"):
        fill("jax_layer", "frame", step_head_axes="(0,)")
    with pytest.raises(TemplateError, match=r"values without a placeholder \['typo'\]"):
        fill("jax_layer", "frame", step_head_axes="(0,)", step_batch_axes="(0,)", typo=1)
    with pytest.raises(TemplateError, match="has no section 'nope'"):
        fill("jax_layer", "nope")
    filled = fill("jax_layer", "frame", step_head_axes="(0, 1)", step_batch_axes="(0, None)")
    assert "in_axes=(0, 1)" in filled and not PLACEHOLDER.search(filled)


def test_every_section_is_used_by_some_shipped_spec():
    """No dead template text: each section appears in at least one generated layer_jax.py."""
    root = Path(__file__).resolve().parents[1] / "generated"
    generated = "\n".join(p.read_text() for p in root.glob("*/layer_jax.py"))
    for name, text in sections("jax_layer").items():
        probe = next((ln for ln in text.splitlines() if ln.strip() and not PLACEHOLDER.search(ln)), None)
        assert probe is None or probe in generated, (name, probe)
