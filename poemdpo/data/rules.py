"""Preference rules: which poems are chosen, which are rejected."""

from __future__ import annotations

from collections.abc import Callable

from poemdpo.data.forms import Form, classify


def _regular(form: Form) -> bool:
    return form.meter in ("五言", "七言")


# Each rule says whether a poem is preferred; every other poem is a rejected candidate.
RULES: dict[str, Callable[[Form], bool]] = {
    "five_char": lambda f: f.meter == "五言",
    "seven_char": lambda f: f.meter == "七言",
    "jueju": lambda f: _regular(f) and f.shape == "绝句",
    "lushi": lambda f: _regular(f) and f.shape == "律诗",
}


def preferred(text: str, rule: str) -> bool:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    return RULES[rule](classify(text))
