"""Fixed frames of the generated modules, kept as real (lintable) template modules with checked placeholders.

A template module holds, after the marker line ``# ==== template body ====``, sections introduced by
``# ==== section: NAME ====`` lines. :func:`sections` reads them as text (the module is never imported), and
:func:`fill` substitutes the placeholders ``__NAME__`` (upper case) of one section, refusing a placeholder that
is missing from the values, a value that names no placeholder, and anything left unsubstituted.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

BODY = "# ==== template body ===="
_SECTION = re.compile(r"^# ==== section: ([a-z_]+) ====\n", re.MULTILINE)
PLACEHOLDER = re.compile(r"__([A-Z][A-Z0-9_]*)__")


class TemplateError(ValueError):
    """A template is malformed or was filled with the wrong placeholders (names template, section, names)."""


@lru_cache(maxsize=None)
def sections(template: str) -> dict[str, str]:
    """The sections of ``templates/<template>.py``: name → text, in file order.

    Raises:
        TemplateError: no body marker, or a section name repeated.
    """
    text = (Path(__file__).parent / f"{template}.py").read_text(encoding="utf-8")
    if BODY + "\n" not in text:
        raise TemplateError(f"template {template!r} has no line {BODY!r}")
    body = text.split(BODY + "\n", 1)[1]
    parts = _SECTION.split(body)
    if parts[0].strip():
        raise TemplateError(f"template {template!r}: text before the first section marker")
    out: dict[str, str] = {}
    for name, chunk in zip(parts[1::2], parts[2::2]):
        if name in out:
            raise TemplateError(f"template {template!r}: section {name!r} appears twice")
        out[name] = chunk
    return out


def fill(template: str, section: str, **values: object) -> str:
    """Section ``section`` of ``template`` with every placeholder ``__NAME__`` replaced by ``str(values[name])``.

    Args:
        template: the template module's name (``jax_layer``).
        section: the section's name.
        **values: one value per placeholder, keyed by its lower-case name (``step_head_axes`` for
            ``__STEP_HEAD_AXES__``).

    Returns:
        The filled text.

    Raises:
        TemplateError: unknown section; a placeholder without a value; a value without a placeholder.
    """
    parts = sections(template)
    if section not in parts:
        raise TemplateError(f"template {template!r} has no section {section!r} (sections: {sorted(parts)})")
    text = parts[section]
    found = {m.lower() for m in PLACEHOLDER.findall(text)}
    missing, unknown = sorted(found - set(values)), sorted(set(values) - found)
    if missing or unknown:
        raise TemplateError(f"template {template!r}, section {section!r}: placeholders without a value {missing}, "
                            f"values without a placeholder {unknown}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1).lower()]), text)
