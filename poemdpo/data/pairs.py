"""Preference pairs: each preferred poem meets one non-preferred poem under the chosen poem's title."""

from __future__ import annotations

import bisect
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from poemdpo.data import prosody
from poemdpo.data.corpus import Poem
from poemdpo.data.forms import LINE_BREAKS, classify
from poemdpo.data.prompts import build_prompt
from poemdpo.data.rules import RULES, preferred, prosody_report, rejected
from poemdpo.errors import PoemDPOError

STRATEGIES = ("random", "length_matched")
# 五言 poems are shorter than most rejected ones: with random partners DPO can partly win by length.
# Length-matched pairs were part of the recipe that reached the 95% target (docs/recipes.md).
DEFAULT_PAIRING = "length_matched"
# Share of training pairs whose rejected poem is the chosen one with one line a character off (near_miss), or, for
# the prosody rules, with one rhyme character swapped (rhyme_near_miss).
DEFAULT_NEAR_MISS_SHARE = 0.0
# Characters a rhyme near miss may put in: the commonest rhyme characters of the poems being paired.
RHYME_CANDIDATES = 300

_LINE = re.compile("[^\\s" + re.escape(LINE_BREAKS) + "]+")
_VERSE_LINE = re.compile("[^" + re.escape(LINE_BREAKS) + "]+")  # as forms.split_lines cuts them


def near_miss(text: str, rng: random.Random) -> str:
    """`text` with one slip an aligned model still makes: a verse line a character shorter or longer (a third each),
    or a line left out, which leaves an odd number of lines (a third).

    A character is deleted from a random line, or one of the poem's own characters is inserted into it; a left-out
    line goes with the punctuation before it (its couplet partner's), or after it when it is the first line.
    """
    lines = list(_LINE.finditer(text))
    if not lines:
        raise ValueError(f"no verse line to change in {text!r}")
    slip = rng.random()
    if len(lines) >= 2 and slip < 1 / 3:
        i = rng.randrange(len(lines))
        if i == 0:
            return text[lines[1].start() :]
        return text[: lines[i - 1].end()] + text[lines[i].end() :]
    line = rng.choice(lines)
    if len(line.group()) > 1 and slip < 2 / 3:
        at = rng.randrange(line.start(), line.end())
        return text[:at] + text[at + 1 :]
    at = rng.randrange(line.start(), line.end() + 1)
    return text[:at] + rng.choice("".join(m.group() for m in lines)) + text[at:]


def rhyme_candidates(texts: Sequence[str], top: int = RHYME_CANDIDATES) -> Counter:
    """The `top` characters that most often end an even line of a rhyming poem among `texts`, with their counts,
    keeping only level-tone ones (平, not ○): the likeliest wrong rhymes, so the hard ones."""
    counts: Counter = Counter()
    for text in texts:
        report = prosody_report(text)
        if report.applicable and report.rhyme:
            counts.update(line[-1] for line in prosody.verse_lines(text)[1::2])
    return Counter({c: n for c, n in counts.most_common(top) if prosody.tone(c) == prosody.PING})


def default_rhyme_candidates() -> Counter:
    """Without a corpus: the first characters of each level group, which rhyme books list commonest first."""
    return Counter({c: 1 for group in prosody.level_groups_all() for c in prosody.group_characters(group)[:20]
                    if prosody.tone(c) == prosody.PING})


def line_end_positions(text: str) -> list[int]:
    """Where each verse line's last character sits in `text` (a line may end in a bracket or a space)."""
    ends = [max((i for i in range(m.start(), m.end()) if text[i] not in prosody.NOT_VERSE), default=-1)
            for m in _VERSE_LINE.finditer(text)]
    return [i for i in ends if i >= 0]


def rhyme_near_miss(text: str, rng: random.Random, candidates: Mapping[str, int] | None = None) -> str:
    """`text` with the last character of one even line swapped for a 平 character of another rhyme group.

    The tone pattern stays the same, so only 押韵 (and 合律) fails. The new character is drawn from `candidates`
    (weights: how often it ends a line; `rhyme_candidates`), never one of the poem's own characters. The swapped
    line is a later even line (4, 6, 8), never line 2: line 2 sets the group, and a pair that differs there
    teaches that the new character is bad wherever it stands, not that it breaks a rhyme already set.
    """
    report = prosody_report(text)
    if not (report.applicable and report.rhyme):
        raise ValueError(f"not a rhyming regulated poem: {text!r}")
    ends = line_end_positions(text)
    if len(ends) != len(report.tones):
        raise ValueError(f"cannot place the rhyme characters of {text!r}")
    pool = candidates or default_rhyme_candidates()
    groups = {group for line in prosody.verse_lines(text) for group in prosody.level_groups(line[-1])}
    choices = [c for c in pool if c not in text and not prosody.level_groups(c) & groups]
    if not choices:
        raise ValueError(f"no candidate character outside the rhyme groups of {text!r}")
    at = rng.choice(ends[3::2])
    new = rng.choices(choices, weights=[pool[c] for c in choices])[0]
    return text[:at] + new + text[at + 1 :]


def _random_partners(chosen: list[Poem], rejected: list[Poem], rng: random.Random) -> list[Poem]:
    pool = rejected[:]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(len(chosen))]


def _length_matched_partners(chosen: list[Poem], rejected: list[Poem], rng: random.Random) -> list[Poem]:
    """The unused rejected poem nearest in length, so DPO cannot win by length alone."""
    partners = []
    pool: list[tuple[int, float, int]] = []
    for poem in chosen:
        if not pool:  # refill once every rejected poem has been used
            pool = sorted((len(r.text), rng.random(), i) for i, r in enumerate(rejected))
        at = bisect.bisect_left(pool, (len(poem.text), -1.0, -1))
        candidates = [j for j in (at - 1, at) if 0 <= j < len(pool)]
        best = min(candidates, key=lambda j: abs(pool[j][0] - len(poem.text)))
        partners.append(rejected[pool.pop(best)[2]])
    return partners


def _same_shape_partners(
    chosen: list[Poem], rejected: list[Poem], match: Callable, rng: random.Random
) -> list[Poem | None]:
    """Partners found within each form (五言绝句 with 五言绝句, ...); None where the shape has no rejected poem."""
    by_shape: dict[str, list[Poem]] = defaultdict(list)
    for poem in rejected:
        by_shape[classify(poem.text).label].append(poem)
    wanted: dict[str, list[int]] = defaultdict(list)
    for i, poem in enumerate(chosen):
        wanted[classify(poem.text).label].append(i)
    partners: list[Poem | None] = [None] * len(chosen)
    for shape in sorted(wanted):
        if by_shape[shape]:
            found = match([chosen[i] for i in wanted[shape]], by_shape[shape], rng)
            for i, partner in zip(wanted[shape], found, strict=True):
                partners[i] = partner
    return partners


def build_pairs(
    poems: Sequence[Poem], rule: str, strategy: str, seed: int, near_miss_share: float = 0.0
) -> list[dict]:
    """Rows with `prompt`/`chosen`/`rejected` plus titles and form labels; deterministic in `seed`.

    The rejected side comes from `rules.rejected`; a prosody rule pairs poems of the same form only, and a chosen
    poem whose form has no rejected poem gets no corpus partner. With `near_miss_share`, that share of the chosen
    poems is paired instead with a near miss of itself, which the rule rejects: one line a character off
    (`near_miss`) or, for the prosody rules, one rhyme character swapped (`rhyme_near_miss`). Column
    `rejected_source` says which rows: "corpus" or "near_miss".
    """
    if strategy not in STRATEGIES:
        raise PoemDPOError(f"unknown pairing strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if not 0.0 <= near_miss_share <= 1.0:
        raise PoemDPOError(f"near_miss_share must be between 0 and 1, got {near_miss_share}")
    chosen = [p for p in poems if preferred(p.text, rule)]
    losers = [p for p in poems if rejected(p.text, rule)]
    if not chosen or not losers:
        return []
    spec = RULES[rule]
    if spec.near_miss == "rhyme" and near_miss_share:
        pool = rhyme_candidates([p.text for p in chosen])

        def make_miss(text: str, rng: random.Random) -> str | None:
            try:
                return rhyme_near_miss(text, rng, pool)
            except ValueError:  # no candidate outside the poem's rhyme groups: the corpus partner stays
                return None
    else:
        make_miss = near_miss
    rng = random.Random(seed)
    rng.shuffle(chosen)
    match = _random_partners if strategy == "random" else _length_matched_partners
    partners = _same_shape_partners(chosen, losers, match, rng) if spec.same_shape else match(chosen, losers, rng)
    rows = []
    for good, bad in zip(chosen, partners, strict=True):
        rejected_text, rejected_title, source = (bad.text, bad.title, "corpus") if bad else (None, None, None)
        if near_miss_share and rng.random() < near_miss_share:
            miss = make_miss(good.text, rng)
            # A rule blind to line lengths could still prefer the changed poem: then the corpus partner stays.
            if miss is not None and rejected(miss, rule) and not preferred(miss, rule):
                rejected_text, rejected_title, source = miss, good.title, "near_miss"
        if rejected_text is None:
            continue
        rows.append(
            {
                "prompt": build_prompt(good.title),
                "chosen": good.text,
                "rejected": rejected_text,
                "title": good.title,
                "rejected_title": rejected_title,
                "chosen_form": classify(good.text).label,
                "rejected_form": classify(rejected_text).label,
                "rejected_source": source,
            }
        )
    return rows
