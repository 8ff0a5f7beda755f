"""Preference pairs: each preferred poem meets one non-preferred poem under the chosen poem's title."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from .corpus import Poem
from .forms import classify
from .prompts import build_prompt
from .rules import preferred

STRATEGIES = ("random", "length_matched")
# 五言 poems are shorter than most rejected ones: with random partners DPO can partly win by length.
# Length-matched pairs were part of the recipe that reached the 95% target (docs/recipes.md).
DEFAULT_PAIRING = "length_matched"


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


def build_pairs(poems: Sequence[Poem], rule: str, strategy: str, seed: int) -> list[dict]:
    """Rows with `prompt`/`chosen`/`rejected` plus titles and form labels; deterministic in `seed`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    chosen = [p for p in poems if preferred(p.text, rule)]
    rejected = [p for p in poems if not preferred(p.text, rule)]
    if not chosen or not rejected:
        return []
    rng = random.Random(seed)
    rng.shuffle(chosen)
    match = _random_partners if strategy == "random" else _length_matched_partners
    rows = []
    for good, bad in zip(chosen, match(chosen, rejected, rng), strict=True):
        rows.append(
            {
                "prompt": build_prompt(good.title),
                "chosen": good.text,
                "rejected": bad.text,
                "title": good.title,
                "rejected_title": bad.title,
                "chosen_form": classify(good.text).label,
                "rejected_form": classify(bad.text).label,
            }
        )
    return rows
