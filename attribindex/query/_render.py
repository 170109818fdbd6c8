"""Terminal rendering of explanations, shared by the command line and the demo (both may import the query layer,
neither the other)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from attribindex.query._explain import ExplainedExample


def explained_lines(explained: ExplainedExample, width: int, colour: bool, strongest: int = 5) -> list[str]:
    """The example's text with its `strongest` tokens marked (green / red on a terminal, [+x] / [-x] otherwise),
    clipped to about two lines of `width`, and the query tokens that carry the score most."""
    marked = {id(t) for t in explained.strongest(strongest)}
    parts, length = [], 0
    for token in explained.tokens:
        text = re.sub(r"\s+", " ", token.text)  # one line: newlines and runs of spaces become one space
        core = text.strip()
        if id(token) in marked and core:
            sign = "+" if token.contribution > 0 else "-"
            shown = click.style(core, fg="green" if sign == "+" else "red", bold=True) if colour else f"[{sign}{core}]"
            text = text.replace(core, shown, 1)
        parts.append(text)
        length += len(text)
        if length >= 2 * width:
            parts.append("…")
            break

    def label(t) -> str:  # a special token (BOS) covers no text: show the tokenizer's own name for it
        return (t.text.strip() or repr(t.text)) if t.text else t.token

    query_tokens = ", ".join(f"{label(t)} {t.contribution:+.3g}" for t in explained.strongest(3, of_query=True))
    return ["".join(parts).strip(), f"query tokens: {query_tokens}"]
