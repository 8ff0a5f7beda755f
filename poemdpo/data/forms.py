"""Poem forms: lines, line lengths, and the classical labels 五言/七言/杂言 × 绝句/律诗/排律."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Full-width (and a few half-width) marks that end a line of verse.
LINE_BREAKS = "，。？！；：、,.?!;:\n"
_SPLIT = re.compile("[" + re.escape(LINE_BREAKS) + "]+")
PUNCTUATION = set(LINE_BREAKS) | set("「」『』《》（）()〈〉…·—")
# Marks inside a line that are not characters of the verse: quotation and book-title brackets, spaces.
_NOT_CHARACTERS = re.compile(r"[「」『』《》〈〉（）()…·—\s]")
# A token a model wrote that is not text -- a prompt marker such as <RES>, a chat model's turn token -- stays in its
# poem as written (`generation.decode_poem`). No corpus poem holds one; a line that does is no verse line at all.
_MARKUP = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class Form:
    line_lengths: tuple[int, ...]

    @property
    def n_lines(self) -> int:
        return len(self.line_lengths)

    @property
    def meter(self) -> str:
        """五言 / 七言 when every line has 5 / 7 characters, otherwise 杂言."""
        lengths = set(self.line_lengths)
        if lengths == {5}:
            return "五言"
        if lengths == {7}:
            return "七言"
        return "杂言"

    @property
    def shape(self) -> str:
        """绝句 (4 lines), 律诗 (8 lines), 排律 (more, even), or 其他."""
        if self.n_lines == 4:
            return "绝句"
        if self.n_lines == 8:
            return "律诗"
        if self.n_lines > 8 and self.n_lines % 2 == 0:
            return "排律"
        return "其他"

    @property
    def label(self) -> str:
        return self.meter + self.shape


def split_lines(text: str) -> list[str]:
    """Verse lines of a poem: the text between line-ending punctuation and newlines, without the brackets
    and spaces inside a line (「春眠不覺曉」 is a five-character line)."""
    lines = (_NOT_CHARACTERS.sub("", line) for line in _SPLIT.split(text))
    return [line for line in lines if line]


def classify(text: str) -> Form:
    """The poem's form from its line lengths; a line with a special token in it (`_MARKUP`) has length 0, so a poem
    holding one has no meter (<RES> is five characters long, but no five-character line)."""
    return Form(tuple(0 if _MARKUP.search(line) else len(line) for line in split_lines(text)))


def is_strict_five(text: str) -> bool:
    """Strict 五言: at least one line, and every line exactly 5 characters."""
    return classify(text).meter == "五言"


def is_well_formed(text: str) -> bool:
    """All lines the same length, an even number of lines, and the poem ends in punctuation; no line holds a
    special token (length 0 in `classify`)."""
    form = classify(text)
    stripped = text.rstrip()
    return (
        form.n_lines > 0
        and form.n_lines % 2 == 0
        and len(set(form.line_lengths)) == 1
        and form.line_lengths[0] > 0
        and stripped[-1] in PUNCTUATION
    )


def is_degenerate(text: str) -> bool:
    """Empty, a single line with no break, a line repeated, or punctuation only."""
    lines = split_lines(text)
    if not lines:
        return True
    if "\n" not in text.strip() and len(lines) < 2:
        return True
    return len(set(lines)) < len(lines)
