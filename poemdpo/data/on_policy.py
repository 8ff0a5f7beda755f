"""Preference pairs that need a model: the train split built from its own samples instead of corpus poems, and
rhyme near misses made hard by its own likeliest wrong rhyme (`harden_rhyme_near_misses`).

Corpus pairs ask DPO to rank two poems by other hands, which the policy may never write. Here, for each
sampled training title, the model writes K poems at temperature 1.0; the rule labels them, and a title whose
samples include both kinds gives pairs of its own poems, so DPO pushes on what the policy actually produces.
The test split stays the corpus pairs exactly as `build_preference_dataset` makes them, so held-out reward
accuracy stays comparable with models trained on corpus pairs.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from poemdpo.data import prosody
from poemdpo.data.corpus import Poem
from poemdpo.data.forms import classify, is_degenerate
from poemdpo.data.pairs import DEFAULT_PAIRING, build_pairs
from poemdpo.data.rules import preferred, rejected
from poemdpo.errors import PoemDPOError
from poemdpo.models.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    default_max_new_tokens,
    generate_poems,
    next_token_probs,
    prompt_texts,
)
from poemdpo.models.loading import load_for_inference

DEFAULT_SAMPLES = 4
DEFAULT_TITLES = 2000
DEFAULT_BATCH_SIZE = 64
# The model's own distribution, as evaluate.py samples it: pairs at another temperature would be off-policy.
TEMPERATURE = 1.0


class OnPolicyError(PoemDPOError):
    """A model that cannot be sampled from, or samples that give no pairs; build_dataset.py reports it."""


def load_sampler(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM (eval mode; cuda in bf16 when present, else the CPU in fp32) and its tokenizer, through the
    project's one loader, with its errors naming the on-policy model."""
    return load_for_inference(str(path), what="on-policy model")


def choose_titles(poems: Sequence[Poem], n: int, seed: int) -> list[str]:
    """`n` distinct titles of `poems` (all if fewer), drawn with `seed` from their sorted set, so reproducible."""
    if n < 1:
        raise OnPolicyError(f"the number of on-policy titles must be at least 1, got {n}")
    titles = sorted({p.title for p in poems})
    return random.Random(seed).sample(titles, min(n, len(titles)))


def sample_poems(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    titles: Sequence[str],
    samples_per_title: int,
    *,
    seed: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = False,
) -> dict[str, list[str]]:
    """`samples_per_title` poems per title: one `generate_poems` call over the titles, each repeated K times."""
    if len(set(titles)) != len(titles):
        raise OnPolicyError("on-policy titles must be distinct: a title's samples are grouped by it")
    repeated = [title for title in titles for _ in range(samples_per_title)]
    poems = generate_poems(
        model,
        tokenizer,
        repeated,
        temperature=TEMPERATURE,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    samples: dict[str, list[str]] = {title: [] for title in titles}
    for title, poem in zip(repeated, poems, strict=True):
        samples[title].append(poem)
    return samples


def usable(text: str, rule: str) -> bool:
    """False for a degenerate poem the rule prefers (say one 五言 line repeated): it must not be chosen,
    and it is not a rejected poem either, since it passes the rule. A degenerate rejected poem stays."""
    return not (preferred(text, rule) and is_degenerate(text))


def pairs_from_samples(samples: dict[str, list[str]], rule: str, strategy: str, seed: int) -> list[dict]:
    """Rows like the corpus pairs', each from one title's own samples: every usable preferred sample is chosen
    once, against a rejected sample of the same title picked by `strategy` (pairs.build_pairs)."""
    rows = []
    for i, (title, texts) in enumerate(samples.items()):
        poems = [
            Poem(title=title, author="", text=text, source=f"sample {j}")
            for j, text in enumerate(texts)
            if usable(text, rule)
        ]
        # A different seed per title: with one seed, every title's samples would be paired in the same pattern.
        rows.extend(build_pairs(poems, rule, strategy, seed + i))
    return rows


def with_on_policy_train(
    dataset: DatasetDict,
    stats: dict,
    train_poems: Sequence[Poem],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    *,
    rule: str,
    strategy: str = DEFAULT_PAIRING,
    seed: int = 42,
    samples_per_title: int = DEFAULT_SAMPLES,
    num_titles: int = DEFAULT_TITLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> tuple[DatasetDict, dict]:
    """`dataset` with its train split replaced by on-policy pairs, and `stats` recording how they were made.

    `train_poems` are the corpus's training-split poems: their titles are the ones sampled for, so no
    held-out title is ever seen in training. The test split is passed through untouched.
    """
    if samples_per_title < 2:
        raise OnPolicyError(
            f"on-policy samples per title must be at least 2 (a pair needs two poems), got {samples_per_title}"
        )
    titles = choose_titles(train_poems, num_titles, seed)
    max_new_tokens = default_max_new_tokens(model, max_new_tokens)
    start = time.perf_counter()
    samples = sample_poems(
        model,
        tokenizer,
        titles,
        samples_per_title,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    texts = [text for group in samples.values() for text in group]
    rows = pairs_from_samples(samples, rule, strategy, seed)
    summary = {
        "model": model_path,
        "samples_per_title": samples_per_title,
        "titles_sampled": len(titles),
        "training_titles": len({p.title for p in train_poems}),
        "samples": len(texts),
        "temperature": TEMPERATURE,
        "max_new_tokens": max_new_tokens,
        "samples_per_meter": dict(Counter(classify(t).meter for t in texts).most_common()),
        "samples_preferred": sum(preferred(t, rule) for t in texts),
        "preferred_degenerate_dropped": sum(not usable(t, rule) for t in texts),
        "titles_with_pairs": len({row["title"] for row in rows}),
        "pairs": len(rows),
        "generation_seconds": round(seconds, 1),
    }
    if not rows:
        raise OnPolicyError(
            f"no on-policy pairs: none of the {len(titles)} titles got both a preferred and a rejected sample "
            f"under rule {rule!r} in {samples_per_title} samples (samples per meter: "
            f"{summary['samples_per_meter']}); raise --on_policy_samples or --on_policy_titles"
        )
    dataset = DatasetDict({**dataset, "train": Dataset.from_list(rows)})
    stats = {
        **stats,
        "train_split": "on_policy",
        "on_policy": summary,
        "pairs": {**stats["pairs"], "train": len(rows)},
        "titles": {**stats["titles"], "train": summary["titles_with_pairs"]},
    }
    return dataset, stats


def _level_token_groups(tokenizer: PreTrainedTokenizerBase) -> dict[int, tuple[str, frozenset[str]]]:
    """Every token that is one 平 character (not a two-reading ○ one), with the character and its 平 groups."""
    out = {}
    for token_id in sorted(set(tokenizer.get_vocab().values())):
        char = tokenizer.decode([token_id])
        if len(char) == 1 and prosody.tone(char) == prosody.PING:
            out[token_id] = (char, prosody.level_groups(char))
    return out


def harden_rhyme_near_misses(
    dataset: DatasetDict,
    stats: dict,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    *,
    rule: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> tuple[DatasetDict, dict]:
    """The train near misses of a prosody rule with their swapped rhyme character replaced by the model's own
    likeliest 平 character of another group at that slot (never one already in the poem).

    A character drawn by corpus frequency (`pairs.rhyme_near_miss`) often does not fit its line, so a model can
    reject such a near miss by fluency alone, without tracking rhyme. The model's own favourite among the wrong
    groups fits the line as well as what the model would write there: the pair then differs in rhyme and nothing
    else the model can see. Only the train split changes; `stats["hard_near_misses"]` records how many rows did
    and the model's probability of the old and new characters at the slot (the new one's is the higher)."""
    train = dataset["train"].to_list()
    rows = [r for r in train if r.get("rejected_source") == "near_miss"]
    if not rows:
        raise OnPolicyError(
            "no near-miss train pairs to harden: build with a prosody rule (rhyme, gelv) and --near_miss_share > 0"
        )
    slots = [next(i for i, (a, b) in enumerate(zip(r["chosen"], r["rejected"], strict=True)) if a != b) for r in rows]
    prompts = prompt_texts(tokenizer, [r["title"] for r in rows])
    start = time.perf_counter()
    probs = next_token_probs(model, tokenizer, [p + r["chosen"][:at] for p, r, at in zip(prompts, rows, slots,
                             strict=True)], batch_size, progress, desc="hard near misses")
    level = _level_token_groups(tokenizer)
    ids = sorted(level)
    position = {char: k for k, (char, _) in enumerate(level[i] for i in ids)}
    in_group = {}  # group -> which of `ids` are in it
    for k, i in enumerate(ids):
        for group in level[i][1]:
            in_group.setdefault(group, torch.zeros(len(ids), dtype=torch.bool))[k] = True
    ids_tensor, vocab = torch.tensor(ids), tokenizer.get_vocab()
    hardened, p_old, p_new = 0, 0.0, 0.0
    for row, at, p in zip(rows, slots, probs, strict=True):
        text = row["chosen"]
        allowed = torch.ones(len(ids), dtype=torch.bool)
        for group in {g for line in prosody.verse_lines(text) for g in prosody.level_groups(line[-1])}:
            allowed &= ~in_group.get(group, torch.zeros(len(ids), dtype=torch.bool))
        allowed[[position[c] for c in set(text) if c in position]] = False
        if not allowed.any():
            continue
        best = int(ids_tensor[allowed][p[ids_tensor[allowed]].argmax()])
        miss = text[:at] + level[best][0] + text[at + 1 :]
        if not (rejected(miss, rule) and not preferred(miss, rule)):
            continue
        old_id = vocab.get(row["rejected"][at])
        p_old += float(p[old_id]) if old_id is not None else 0.0
        p_new += float(p[best])
        row["rejected"], hardened = miss, hardened + 1
    summary = {
        "model": model_path,
        "near_misses": len(rows),
        "hardened": hardened,
        "mean_prob_frequency_drawn": round(p_old / max(hardened, 1), 5),
        "mean_prob_hard": round(p_new / max(hardened, 1), 5),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return DatasetDict({**dataset, "train": Dataset.from_list(train)}), {**stats, "hard_near_misses": summary}
