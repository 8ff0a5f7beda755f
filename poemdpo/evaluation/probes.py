"""Probes of what a model knows about rhyme, read from its next-character distribution (issue #13).

Sampling says whether a model rhymes; these probes say why not. At the slot of line 4's rhyme character in a
held-out rhyming 五言 poem of 4 or 8 lines, the model's distribution is read twice: with the poem as written,
and with line 2's rhyme character swapped for a 平 character of another group (`pairs.rhyme_near_miss`'s
candidates). A model that tracks rhyme moves its mass from line 2's old group to the new one; a model that only
knows "a line ends on a common 平 character" does not. A second probe asks whether the true rhyme character
beats a random 平 character of another group: fluency alone passes it, so it is the weak test.

Only characters that are single tokens of the tokenizer count towards a group's mass (every character is, for
the project's char-level models).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from poemdpo.data import prosody
from poemdpo.data.pairs import default_rhyme_candidates, line_end_positions
from poemdpo.evaluation.tables import markdown_table
from poemdpo.models.generation import next_token_probs, prompt_texts


@dataclass
class RhymeProbe:
    poems: int
    old_group_intact: float  # mean probability on line 2's rhyme group, poem as written
    old_group_swapped: float  # the same group, once line 2 ends in another group
    new_group_intact: float  # mean probability on the swapped-in character's group, poem as written
    new_group_swapped: float  # that group, once line 2 ends in it
    true_beats_random: float  # share of poems where p(true rhyme) > p(random 平 character of another group)
    neighbours_in_group: float  # `embedding_neighbours_in_group`: the model's own
    neighbours_by_chance: float  # and what random embeddings would score

    @property
    def shift(self) -> float:
        """How much probability follows line 2 into the new group: 0 for a model blind to rhyme, up to 1."""
        return self.new_group_swapped - self.new_group_intact

    def to_dict(self) -> dict:
        return {**asdict(self), "shift": self.shift}


PROBE_HEADER = ("model", "poems", "line 2's group, as written", "line 2's group, swapped away",
                "new group, as written", "new group, swapped in", "shift", "true > random",
                "embedding neighbour in group (chance)")


def probe_table(rows: Sequence[tuple[str, RhymeProbe]]) -> str:
    """One Markdown row per (model name, probe result), the columns of PROBE_HEADER."""
    return markdown_table(PROBE_HEADER, [
        [name, r.poems, *(f"{100 * x:.1f}%" for x in (r.old_group_intact, r.old_group_swapped, r.new_group_intact,
                                                       r.new_group_swapped)),
         f"{100 * r.shift:+.1f} pt", f"{100 * r.true_beats_random:.0f}%",
         f"{100 * r.neighbours_in_group:.1f}% ({100 * r.neighbours_by_chance:.1f}%)"] for name, r in rows])


@dataclass
class _Case:
    title: str
    intact: str  # the poem up to (not including) line 4's rhyme character
    swapped: str  # the same with line 2's rhyme character replaced
    true_char: str
    random_char: str
    old_group: str
    new_group: str


def probe_cases(titles: Sequence[str], poems: Sequence[str], n: int, seed: int = 0) -> list[_Case]:
    """Up to `n` cases from rhyming 五言 poems of 4 or 8 lines whose line 2 and line 4 share one 平 group."""
    rng = random.Random(seed)
    pool = default_rhyme_candidates()
    cases = []
    for title, text in zip(titles, poems, strict=True):
        report = prosody.check(text)
        lines = prosody.verse_lines(text)
        if not (report.applicable and report.rhyme and len(lines[0]) == 5):
            continue
        ends = line_end_positions(text)
        if len(ends) != len(lines):
            continue
        second, fourth = text[ends[1]], text[ends[3]]
        shared = sorted(prosody.level_groups(second) & prosody.level_groups(fourth))
        if len(shared) != 1:  # a character listed in two 平 groups makes "the group" ambiguous
            continue
        taken = {g for c in (second, fourth) for g in prosody.level_groups(c)}
        others = [c for c in pool if c not in text and len(prosody.level_groups(c)) == 1
                  and not prosody.level_groups(c) & taken]
        swap, other = rng.choices(others, weights=[pool[c] for c in others], k=2)
        cases.append(_Case(
            title=title, intact=text[: ends[3]], swapped=text[: ends[1]] + swap + text[ends[1] + 1 : ends[3]],
            true_char=fourth, random_char=other, old_group=shared[0],
            new_group=next(iter(prosody.level_groups(swap))),
        ))
        if len(cases) == n:
            break
    return cases


def _group_ids(vocab: dict[str, int], group: str) -> list[int]:
    return sorted({vocab[c] for c in prosody.group_characters(group) if c in vocab})


@torch.no_grad()
def embedding_neighbours_in_group(model, tokenizer) -> tuple[float, float]:
    """Share of the 平 characters with one rhyme group whose nearest input embedding (cosine) among them is of
    their own group, and the share a random embedding would reach (the chance that two draws share a group).

    A model can only copy "line 2's group" forward if its embeddings carry the group; these say whether they do.
    """
    groups = {}
    for token, row in tokenizer.get_vocab().items():
        if len(token) == 1 and len(prosody.rhyme_groups(token)) == 1:
            level = prosody.level_groups(token)
            if level:
                groups[row] = next(iter(level))
    if len(groups) < 2:
        raise ValueError("fewer than two 平 characters of one rhyme group in the vocabulary")
    rows = sorted(groups)
    vectors = torch.nn.functional.normalize(model.get_input_embeddings().weight[rows].float(), dim=-1)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(dim=1).tolist()
    hits = sum(groups[rows[i]] == groups[rows[j]] for i, j in enumerate(nearest))
    sizes = Counter(groups.values())
    n = len(rows)
    chance = sum(k * (k - 1) for k in sizes.values()) / (n * (n - 1))
    return hits / n, chance


def rhyme_probe(model, tokenizer, titles: Sequence[str], poems: Sequence[str], n: int = 256, seed: int = 0,
                batch_size: int = 32, progress: bool = False) -> RhymeProbe:
    """Both probes on up to `n` held-out poems (see the module docstring)."""
    cases = probe_cases(titles, poems, n, seed)
    if not cases:
        raise ValueError("no rhyming 五言 poem of 4 or 8 lines among the poems given")
    was_training = model.training
    model.eval()
    try:
        prompts = prompt_texts(tokenizer, [c.title for c in cases])
        intact = next_token_probs(model, tokenizer, [p + c.intact for p, c in zip(prompts, cases, strict=True)],
                                  batch_size, progress, desc="rhyme probe")
        swapped = next_token_probs(model, tokenizer, [p + c.swapped for p, c in zip(prompts, cases, strict=True)],
                                   batch_size, progress, desc="rhyme probe")
    finally:
        model.train(was_training)
    vocab = tokenizer.get_vocab()
    sums = dict.fromkeys(("old_intact", "old_swapped", "new_intact", "new_swapped", "beats"), 0.0)
    for i, case in enumerate(cases):
        old, new = _group_ids(vocab, case.old_group), _group_ids(vocab, case.new_group)
        sums["old_intact"] += intact[i, old].sum().item()
        sums["old_swapped"] += swapped[i, old].sum().item()
        sums["new_intact"] += intact[i, new].sum().item()
        sums["new_swapped"] += swapped[i, new].sum().item()
        true_id, random_id = vocab.get(case.true_char), vocab.get(case.random_char)
        if true_id is not None and random_id is not None:
            sums["beats"] += float(intact[i, true_id] > intact[i, random_id])
    k = len(cases)
    in_group, by_chance = embedding_neighbours_in_group(model, tokenizer)
    return RhymeProbe(poems=k, old_group_intact=sums["old_intact"] / k, old_group_swapped=sums["old_swapped"] / k,
                      new_group_intact=sums["new_intact"] / k, new_group_swapped=sums["new_swapped"] / k,
                      true_beats_random=sums["beats"] / k, neighbours_in_group=in_group,
                      neighbours_by_chance=by_chance)
