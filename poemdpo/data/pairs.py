"""Preference pairs: each preferred poem meets one non-preferred poem under the chosen poem's title."""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence

from poemdpo.data.corpus import Poem
from poemdpo.data.forms import LINE_BREAKS, classify
from poemdpo.data.prompts import build_prompt
from poemdpo.data.rules import preferred

STRATEGIES = ("random", "length_matched")
# 五言 poems are shorter than most rejected ones: with random partners DPO can partly win by length.
# Length-matched pairs were part of the recipe that reached the 95% target (docs/recipes.md).
DEFAULT_PAIRING = "length_matched"
# Share of training pairs whose rejected poem is the chosen one with one line a character off (near_miss).
DEFAULT_NEAR_MISS_SHARE = 0.0

_LINE = re.compile("[^\\s" + re.escape(LINE_BREAKS) + "]+")


def near_miss(text: str, rng: random.Random) -> str:
    """`text` with one verse line a character shorter or longer: the slip an aligned model still makes.

    A character is deleted from a random line, or one of the poem's own characters is inserted into it.
    """
    lines = list(_LINE.finditer(text))
    if not lines:
        raise ValueError(f"no verse line to change in {text!r}")
    line = rng.choice(lines)
    if len(line.group()) > 1 and rng.random() < 0.5:
        at = rng.randrange(line.start(), line.end())
        return text[:at] + text[at + 1 :]
    at = rng.randrange(line.start(), line.end() + 1)
    return text[:at] + rng.choice("".join(m.group() for m in lines)) + text[at:]


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


def build_pairs(
    poems: Sequence[Poem], rule: str, strategy: str, seed: int, near_miss_share: float = 0.0
) -> list[dict]:
    """Rows with `prompt`/`chosen`/`rejected` plus titles and form labels; deterministic in `seed`.

    With `near_miss_share`, that share of the chosen poems is paired instead with a near miss of itself
    (`near_miss`): the same poem with one line a character off, which the rule rejects. Column
    `rejected_source` says which rows: "corpus" or "near_miss".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if not 0.0 <= near_miss_share <= 1.0:
        raise ValueError(f"near_miss_share must be between 0 and 1, got {near_miss_share}")
    chosen = [p for p in poems if preferred(p.text, rule)]
    rejected = [p for p in poems if not preferred(p.text, rule)]
    if not chosen or not rejected:
        return []
    rng = random.Random(seed)
    rng.shuffle(chosen)
    match = _random_partners if strategy == "random" else _length_matched_partners
    rows = []
    for good, bad in zip(chosen, match(chosen, rejected, rng), strict=True):
        rejected_text, rejected_title, source = bad.text, bad.title, "corpus"
        if near_miss_share and rng.random() < near_miss_share:
            miss = near_miss(good.text, rng)
            # A rule blind to line lengths could still prefer the changed poem: then the corpus partner stays.
            if not preferred(miss, rule):
                rejected_text, rejected_title, source = miss, good.title, "near_miss"
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
