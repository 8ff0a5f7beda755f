"""The one Markdown table renderer: the evaluation report, the training-time samples, the recipe docs."""

from __future__ import annotations

from collections.abc import Sequence


def cell(text: str) -> str:
    """A poem (or any text) as one table cell: newlines as <br>, `|` escaped, an empty poem marked."""
    text = str(text).strip().replace("|", "\\|").replace("\n", "<br>")
    return text or "*(empty)*"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(
    titles: Sequence[str], aligned: Sequence[str], reference: Sequence[str], rows: int | None = None
) -> str:
    """Aligned and reference poems for the same titles, one row per title."""
    table = list(zip(titles, aligned, reference, strict=True))
    return markdown_table(("title", "aligned", "reference"), table[:rows] if rows is not None else table)
