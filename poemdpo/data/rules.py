"""Preference rules: which poems are chosen, and which poems they are paired against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from poemdpo.data import prosody
from poemdpo.data.forms import Form, classify
from poemdpo.errors import PoemDPOError


@dataclass(frozen=True)
class Rule:
    """`prefers` picks the chosen poems, `rejects` the poems they may be paired against.

    The form rules reject every poem they do not prefer. The prosody rules reject only poems of the chosen shapes
    (五言/七言, 4/8 lines) that surely fail, and pair within one shape (`same_shape`): a pair then differs in rhyme
    or 格律, not in meter or length, which DPO would otherwise learn instead. `near_miss` names the near miss
    `pairs.build_pairs` makes: "line" (a line a character off) or "rhyme" (a rhyme character swapped).
    `credit` says how near a poem the rule does not prefer comes to it, in [0, 1]: the partial credit of RL's
    graded reward (`rl.rule_reward`).
    """

    prefers: Callable[[str], bool]
    rejects: Callable[[str], bool]
    credit: Callable[[str], float]
    same_shape: bool = False
    near_miss: str = "line"


def _regular(form: Form) -> bool:
    return form.meter in ("五言", "七言")


def line_length_share(text: str, lengths: tuple[int, ...]) -> float:
    """The largest share of the poem's lines that have one of `lengths` characters (0 for no lines): a poem all
    of whose lines have five characters, or all seven, scores 1 for (5, 7); a mixed one the larger part."""
    form = classify(text)
    if not form.n_lines:
        return 0.0
    return max(form.line_lengths.count(n) / form.n_lines for n in lengths)


def _form_rule(ok: Callable[[Form], bool], lengths: tuple[int, ...]) -> Rule:
    """A form rule prefers what the evaluation counts: the form, in an even number of at least two lines (a poem
    of couplets). A 五言 poem of three lines is then a rejected poem, as it is a miss when the model writes one.
    Its credit is the share of lines of a length the form asks for: one line off outranks a wreck."""

    def prefers(text: str) -> bool:
        form = classify(text)
        return form.n_lines >= 2 and form.n_lines % 2 == 0 and ok(form)

    return Rule(prefers=prefers, rejects=lambda text: not prefers(text),
                credit=lambda text: line_length_share(text, lengths))


@lru_cache(maxsize=1 << 16)
def prosody_report(text: str) -> prosody.ProsodyReport:
    """`prosody.check`, cached: a rule asks twice per poem (prefers, rejects)."""
    return prosody.check(text)


def _prosody_rule(passes: Callable[[prosody.ProsodyReport], bool],
                  nearness: Callable[[str, prosody.ProsodyReport], float], lengths: tuple[int, ...] = (5, 7)) -> Rule:
    """A prosody rule's credit is half the shape (lines of `lengths` characters) and half `nearness`, how near
    the poem comes to the prosody (0 outside the shapes the checks are for): a regulated poem with two of its
    four even lines in one group outranks one with none, and both outrank a wreck."""

    def prefers(text: str) -> bool:
        r = prosody_report(text)
        return r.applicable and passes(r)

    def rejects(text: str) -> bool:
        # Only a failure the table vouches for: with an unknown character the poem might pass after all.
        r = prosody_report(text)
        return r.applicable and not passes(r) and r.unknown == 0

    def credit(text: str) -> float:
        r = prosody_report(text)
        return 0.5 * line_length_share(text, lengths) + 0.5 * (nearness(text, r) if r.applicable else 0.0)

    return Rule(prefers, rejects, credit, same_shape=True, near_miss="rhyme")


def _five_char(r: prosody.ProsodyReport) -> bool:
    """A regulated poem (`r.applicable`) of five-character lines; the prosody checks take 五言 and 七言 alike."""
    return len(r.tones[0]) == 5


RULES: dict[str, Rule] = {
    "five_char": _form_rule(lambda f: f.meter == "五言", (5,)),
    "seven_char": _form_rule(lambda f: f.meter == "七言", (7,)),
    "jueju": _form_rule(lambda f: _regular(f) and f.shape == "绝句", (5, 7)),
    "lushi": _form_rule(lambda f: _regular(f) and f.shape == "律诗", (5, 7)),
    # 押韵 by the 平水韵: even lines end on 平, in one group (prosody.check); credit, the largest share of even
    # lines in one 平 group.
    "rhyme": _prosody_rule(lambda r: r.rhyme, lambda text, r: prosody.rhyme_share(text)),
    # 合律: every prosody check passes (押韵, 二四分明, 对, 粘, no 孤平, no 三平尾, one of the four patterns); credit,
    # the share of those checks passed.
    "gelv": _prosody_rule(lambda r: r.helv, lambda text, r: r.score),
    # A 五言 poem that rhymes: issue #13's target asks for both (rhyme on 五言 poems, strict 五言 kept). Pairs stay
    # within the 五言 shapes; credit, the share of five-character lines and of even lines in one 平 group.
    "five_char_rhyme": _prosody_rule(lambda r: r.rhyme and _five_char(r),
                                     lambda text, r: prosody.rhyme_share(text) if _five_char(r) else 0.0,
                                     lengths=(5,)),
}


def _rule(rule: str) -> Rule:
    if rule not in RULES:
        raise PoemDPOError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    return RULES[rule]


def preferred(text: str, rule: str) -> bool:
    """Whether `rule` prefers the poem; a poem outside the rule's shapes never is (a 杂言 poem does not rhyme)."""
    return _rule(rule).prefers(text)


def credit(text: str, rule: str) -> float:
    """How near the poem comes to what `rule` prefers, in [0, 1] (`Rule.credit`)."""
    return _rule(rule).credit(text)


def rejected(text: str, rule: str) -> bool:
    """Whether the poem may be the rejected side of a pair under `rule` (for the form rules: not preferred)."""
    return _rule(rule).rejects(text)
