"""The preference dataset: train / validation / test pairs split by title, saved as the Hub stores a dataset.

A directory written here is what `datasets.load_dataset(dir)`, `load_dataset(repo_id)` after a push, TRL's own
`trl dpo --dataset_name dir` and `train_dpo.py` all read: parquet files per split under `data/`, a dataset
card (`README.md`) whose YAML lists the splits, and `stats.json`. A second config, `poems`, holds every poem
of the held-out splits (whatever its form), which the evaluation samples its titles from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from poemdpo.data.corpus import CorpusStats, Poem
from poemdpo.data.forms import classify
from poemdpo.data.pairs import build_pairs
from poemdpo.data.rules import RULES
from poemdpo.data.splits import DEFAULT_SPLITS, SPLITS, SplitSpec, split_poems
from poemdpo.errors import PoemDPOError

STATS_FILE = "stats.json"
HELD_OUT = ("validation", "test")
POEMS_CONFIG = "poems"


def held_out_poems(poems: Sequence[Poem], splits: SplitSpec = DEFAULT_SPLITS) -> DatasetDict:
    """Every poem of the validation and test splits: the title it was written for, the poem, and its form."""
    members = split_poems(poems, splits)
    data = {}
    for name in HELD_OUT:
        rows = []
        for poem in members[name]:
            form = classify(poem.text)
            rows.append({"title": poem.title, "poem": poem.text, "author": poem.author, "meter": form.meter,
                         "shape": form.shape, "n_lines": form.n_lines})
        data[name] = Dataset.from_list(rows)
    return DatasetDict(data)


def build_preference_dataset(
    poems: Sequence[Poem],
    rule: str = "five_char",
    strategy: str = "random",
    seed: int = 42,
    splits: SplitSpec = DEFAULT_SPLITS,
    corpus_stats: CorpusStats | None = None,
    near_miss_share: float = 0.0,
) -> tuple[DatasetDict, dict]:
    """Pairs built within each split, so a held-out pair's two poems both have held-out titles.

    Near misses (`pairs.build_pairs`) go into the train split only: held-out pairs stay two corpus poems.
    """
    members = split_poems(poems, splits)
    data = {}
    for name in SPLITS:
        rows = build_pairs(members[name], rule, strategy, seed, near_miss_share if name == "train" else 0.0)
        if not rows:
            raise PoemDPOError(
                f"the {name} split has no pairs under rule {rule!r}: it needs both preferred and "
                f"rejected poems ({len(members[name])} poems in it); use a larger corpus or other split sizes"
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
        "splits": splits.to_dict(),
        "poems_per_form": dict(Counter(classify(p.text).label for p in poems).most_common()),
        "poems_per_meter": dict(Counter(classify(p.text).meter for p in poems).most_common()),
        "poems_per_split": {name: len(m) for name, m in members.items()},
        "pairs": {name: len(ds) for name, ds in dataset.items()},
        "titles": {name: len(set(ds["title"])) for name, ds in dataset.items()},
    }
    return dataset, stats


def _card_configs(files: dict[str, dict[str, str]]) -> str:
    """The YAML `configs:` block by which `load_dataset` finds each config's parquet files."""
    text = "configs:\n"
    for config, splits in files.items():
        text += f"- config_name: {config}\n  data_files:\n"
        text += "".join(f"  - split: {split}\n    path: {path}\n" for split, path in splits.items())
    return text


def _write_parquet(split: Dataset, directory: Path, name: str) -> str:
    """Write a split as `<name>-00000-of-00001-<content hash>.parquet`; returns the file name.

    The content hash is in the name because `datasets` (5.2) keys its cache of a local directory by the card's
    `configs` alone: two builds listing the same file names would load the first build's rows.
    """
    path = directory / f"{name}.parquet"
    split.to_parquet(str(path))
    digest = hashlib.blake2b(path.read_bytes(), digest_size=6).hexdigest()
    final = directory / f"{name}-00000-of-00001-{digest}.parquet"
    path.rename(final)
    return final.name


def save(dataset: DatasetDict, stats: dict, output_dir: str | Path, poems: DatasetDict | None = None) -> None:
    """Write the parquet files, card and stats to a new directory, then swap it in: a build killed half-way
    leaves the previous dataset (or none), never half of one."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        files: dict[str, dict[str, str]] = {"default": {}}
        (staging / "data").mkdir(parents=True)
        for name, split in dataset.items():
            files["default"][name] = "data/" + _write_parquet(split, staging / "data", name)
        for name, split in (poems or {}).items():
            (staging / POEMS_CONFIG).mkdir(exist_ok=True)
            files.setdefault(POEMS_CONFIG, {})[name] = f"{POEMS_CONFIG}/" + _write_parquet(
                split, staging / POEMS_CONFIG, name)
        (staging / STATS_FILE).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
        (staging / "README.md").write_text(dataset_card(stats, files), encoding="utf-8")
    except BaseException:  # Ctrl-C included: leave no half-written directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    if output_dir.exists():
        output_dir.rename(previous)
    staging.rename(output_dir)
    shutil.rmtree(previous, ignore_errors=True)


def load_pairs_dir(path: str | Path) -> tuple[DatasetDict, dict]:
    """A dataset directory written by `save` (or any Hub-layout dataset directory) and its stats."""
    path = Path(path)
    try:
        dataset = load_dataset(str(path))
    except Exception as e:  # no data files, unreadable parquet: datasets raises many classes
        raise PoemDPOError(
            f"dataset directory {str(path)!r} holds no readable dataset ({type(e).__name__}: {e}); build it with: "
            f"python build_dataset.py --output_dir {path}"
        ) from None
    stats_path = path / STATS_FILE
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    return dataset, stats


def load_held_out_poems(path: str | Path, split: str) -> Dataset:
    """Every poem of a held-out split (`poems` config): title, poem, author, meter, shape, n_lines."""
    if split not in HELD_OUT:
        raise PoemDPOError(f"held-out poems exist for splits {list(HELD_OUT)}, not {split!r}")
    if not list((Path(path) / POEMS_CONFIG).glob(f"{split}-*.parquet")):
        raise PoemDPOError(
            f"dataset {str(path)!r} has no {POEMS_CONFIG}/{split} poems; rebuild it with: python build_dataset.py "
            f"--output_dir {path}"
        )
    return load_dataset(str(path), POEMS_CONFIG, split=split)


def dataset_card(stats: dict, files: dict[str, dict[str, str]]) -> str:
    """The card: YAML metadata (licence, tags, the configs' files), what the pairs are, the build statistics."""
    pairs = stats["pairs"]
    on_policy = stats.get("on_policy")
    source = (
        f"\nThe train split is on-policy: each pair is two poems sampled from `{on_policy['model']}` for the same "
        "title, one the rule prefers and one it does not. The held-out splits are corpus poems.\n"
        if on_policy
        else ""
    )
    near_misses = (stats.get("near_miss_pairs") or {}).get("train")
    if near_misses:
        change = (
            "one rhyme character swapped for a 平 character of another group"
            if RULES[stats["rule"]].near_miss == "rhyme" else "one line a character shorter or longer"
        )
        hard = stats.get("hard_near_misses")
        if hard:
            change += f" (in {hard['hardened']} of them, `{hard['model']}`'s own likeliest such character)"
        source += (
            f"\n{near_misses} train pairs (`rejected_source` = `near_miss`) reject the chosen poem itself with "
            f"{change}; the other rejected poems are corpus poems.\n"
        )
    rows = "\n".join(f"| {name} | {pairs.get(name, 0)} |" for name in files["default"])
    return f"""---
language: [lzh]
license: mit
task_categories: [text-generation]
tags: [dpo, preference, poetry, trl]
{_card_configs(files)}---
# poem-dpo preference pairs (rule `{stats["rule"]}`, pairing `{stats["strategy"]}`)

Pairs of classical Chinese poems from the Tang part of
[chinese-poetry](https://github.com/chinese-poetry/chinese-poetry) (MIT), built by poem-dpo's
`build_dataset.py`. Each row: `prompt` (`<INS>請用以下題目寫一首詩<INP>{{title}}<RES>`),
`chosen` (a poem the rule prefers), `rejected` (one it does not), plus titles and form labels.
Train, validation and test are split by title (a hash, `splits` below): no held-out title appears in train.
Recipes are chosen on validation; the headline is measured on test. The `{POEMS_CONFIG}` config holds every poem
of the held-out splits, whatever its form: the evaluation samples its titles from there.
{source}
    from datasets import load_dataset
    pairs = load_dataset("<this repo or directory>")                # train / validation / test
    poems = load_dataset("<this repo or directory>", "{POEMS_CONFIG}")     # validation / test

| split | pairs |
|---|---|
{rows}

```json
{json.dumps(stats, ensure_ascii=False, indent=2)}
```
"""


def push_to_hub(output_dir: str | Path, repo_id: str) -> None:
    """Upload the saved directory as it is, so `load_dataset(repo_id)` reads the files `load_dataset(dir)` reads.

    Offline or without access, fail with one clear sentence; the local copy is already saved.
    """
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), repo_type="dataset")
    except Exception as e:  # network, auth and permission errors come in many classes
        raise PoemDPOError(
            f"could not push the dataset to the Hub as {repo_id!r}: {type(e).__name__}: {e}. "
            f"Check the network and `hf auth login`; the local copy in {output_dir} is intact."
        ) from e
