"""The preference `DatasetDict`: train/test pairs split by title, with statistics and a dataset card."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict

from poemdpo.data.corpus import CorpusStats, Poem
from poemdpo.data.forms import classify
from poemdpo.data.pairs import build_pairs
from poemdpo.data.splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_SIZE, is_test_title

STATS_FILE = "stats.json"


def split_poems(poems: Sequence[Poem], test_size: float, seed: int) -> dict[str, list[Poem]]:
    splits: dict[str, list[Poem]] = {"train": [], "test": []}
    for poem in poems:
        splits["test" if is_test_title(poem.title, test_size, seed) else "train"].append(poem)
    return splits


def build_preference_dataset(
    poems: Sequence[Poem],
    rule: str = "five_char",
    strategy: str = "random",
    seed: int = 42,
    test_size: float = DEFAULT_TEST_SIZE,
    split_seed: int = DEFAULT_SPLIT_SEED,
    corpus_stats: CorpusStats | None = None,
    near_miss_share: float = 0.0,
) -> tuple[DatasetDict, dict]:
    """Pairs built within each split, so a test pair's two poems both have held-out titles.

    Near misses (`pairs.build_pairs`) go into the train split only: test pairs stay two corpus poems.
    """
    splits = split_poems(poems, test_size, split_seed)
    data = {}
    for name, members in splits.items():
        rows = build_pairs(members, rule, strategy, seed, near_miss_share if name == "train" else 0.0)
        if not rows:
            raise ValueError(
                f"the {name} split has no pairs under rule {rule!r}: it needs both preferred and "
                f"rejected poems ({len(members)} poems in it); use a larger corpus or test_size"
            )
        data[name] = Dataset.from_list(rows)
    dataset = DatasetDict(data)
    stats = {
        "corpus": corpus_stats.to_dict() if corpus_stats else None,
        "rule": rule,
        "strategy": strategy,
        "near_miss_share": near_miss_share,
        "near_miss_pairs": {name: ds["rejected_source"].count("near_miss") for name, ds in dataset.items()},
        "seed": seed,
        "test_size": test_size,
        "split_seed": split_seed,
        "poems_per_form": dict(Counter(classify(p.text).label for p in poems).most_common()),
        "poems_per_meter": dict(Counter(classify(p.text).meter for p in poems).most_common()),
        "poems_per_split": {name: len(members) for name, members in splits.items()},
        "pairs": {name: len(ds) for name, ds in dataset.items()},
        "titles": {name: len(set(ds["title"])) for name, ds in dataset.items()},
    }
    return dataset, stats


def save(dataset: DatasetDict, stats: dict, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    dataset.save_to_disk(str(output_dir))
    (output_dir / STATS_FILE).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")


def dataset_card(stats: dict) -> str:
    pairs = stats["pairs"]
    on_policy = stats.get("on_policy")
    source = (
        f"\nThe train split is on-policy: each pair is two poems sampled from `{on_policy['model']}` for the same "
        "title, one the rule prefers and one it does not. The test split is corpus poems.\n"
        if on_policy
        else ""
    )
    near_misses = (stats.get("near_miss_pairs") or {}).get("train")
    if near_misses:
        source += (
            f"\n{near_misses} train pairs (`rejected_source` = `near_miss`) reject the chosen poem itself with one "
            "line a character shorter or longer; the other rejected poems are corpus poems.\n"
        )
    return f"""---
language: [lzh]
license: mit
task_categories: [text-generation]
tags: [dpo, preference, poetry, trl]
---
# poem-dpo preference pairs (rule `{stats["rule"]}`, pairing `{stats["strategy"]}`)

Pairs of classical Chinese poems from the Tang part of
[chinese-poetry](https://github.com/chinese-poetry/chinese-poetry) (MIT), built by poem-dpo's
`build_dataset.py`. Each row: `prompt` (`<INS>請用以下題目寫一首詩<INP>{{title}}<RES>`),
`chosen` (a poem the rule prefers), `rejected` (one it does not), plus titles and form labels.
Train and test are split by title: no test title appears in train.
{source}
| split | pairs |
|---|---|
| train | {pairs["train"]} |
| test | {pairs["test"]} |

```json
{json.dumps(stats, ensure_ascii=False, indent=2)}
```
"""


def push_to_hub(dataset: DatasetDict, stats: dict, repo_id: str) -> None:
    """Push with a card; offline, fail fast with a clear message (the local copy is already saved)."""
    from huggingface_hub import DatasetCard

    try:
        dataset.push_to_hub(repo_id)
        DatasetCard(dataset_card(stats)).push_to_hub(repo_id, repo_type="dataset")
    except Exception as e:  # network, auth and permission errors come in many classes
        raise RuntimeError(
            f"could not push the dataset to the Hub as {repo_id!r}: {type(e).__name__}: {e}. "
            "Check the network and `hf auth login`; the local copy is intact."
        ) from e
