"""Prompt templates (no torch): a template holds one ``{source}`` placeholder that each example's source
fills in; the model learns to continue the rendered prompt with the target."""

from __future__ import annotations

from string import Formatter


def check_template(template: str) -> str:
    """``template`` itself, or ValueError saying what is wrong with it and how to write it. Its only
    replacement field is ``{source}`` (no attribute, index, conversion or format spec); other braces are
    written doubled (``{{`` and ``}}``)."""
    if not isinstance(template, str):
        raise ValueError(f"prompt template must be text, got {type(template).__name__}")
    plain = ("source", "", None)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(template) if name is not None]
    except ValueError as err:  # a lone brace
        raise ValueError(f"prompt template {template!r} may only use the {{source}} placeholder (write literal "
                         f"braces as {{{{ }}}}): {err}") from None
    others = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
              for name, spec, conv in fields if (name, spec, conv) != plain]
    if others:
        raise ValueError(f"prompt template {template!r} may only use the {{source}} placeholder (write literal "
                         f"braces as {{{{ }}}}): found {', '.join(others)}")
    if plain not in fields:
        raise ValueError(
            f"prompt template {template!r} has no {{source}} placeholder, e.g. 'Table: {{source}}\\nSentence:'"
        )
    return template


def render(template: str, source: str) -> str:
    return template.format(source=source)
