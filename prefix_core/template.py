"""Prompt templates (no torch): a template holds one ``{source}`` placeholder that each example's source
fills in; the model learns to continue the rendered prompt with the target."""

from __future__ import annotations


def check_template(template: str) -> str:
    """``template`` itself, or ValueError saying what is wrong with it and how to write it."""
    if "{source}" not in template:
        raise ValueError(
            f"prompt template {template!r} has no {{source}} placeholder, e.g. 'Table: {{source}}\\nSentence:'"
        )
    try:
        template.format(source="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"prompt template {template!r} may only use the {{source}} placeholder "
            f"(write literal braces as {{{{ }}}}): {err}"
        ) from err
    return template


def render(template: str, source: str) -> str:
    return template.format(source=source)
