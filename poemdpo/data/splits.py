"""The one place that knows the splits: train / validation / test by title, decided by a hash.

A hash, not a shuffle, so every stage (base model, pairs, DPO, evaluation) agrees on a title's split
without sharing state. Series titles such as `帝京篇十首 一` and `帝京篇十首 二` share their part before
the space and go to the same split: a held-out title is never a sibling of a trained one.

The protocol: the base model and DPO train on `train`; every sweep and recipe choice reads `validation`;
the headline is reported on `test`. Each artefact records its `SplitSpec`, and a stage refuses to mix
artefacts built with different ones (`check_same_splits`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TypeVar

from poemdpo.errors import PoemDPOError

SPLITS = ("train", "validation", "test")
T = TypeVar("T")
DEFAULT_VALIDATION_SIZE = 0.05
DEFAULT_TEST_SIZE = 0.05
DEFAULT_SPLIT_SEED = 42


@dataclass(frozen=True)
class SplitSpec:
    """Shares of titles held out for validation and test, and the seed of the title hash."""

    validation_size: float = DEFAULT_VALIDATION_SIZE
    test_size: float = DEFAULT_TEST_SIZE
    seed: int = DEFAULT_SPLIT_SEED

    def __post_init__(self) -> None:
        for name in ("validation_size", "test_size"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise PoemDPOError(f"{name} must be in [0, 1), got {value}")
        if self.validation_size + self.test_size >= 1.0:
            raise PoemDPOError(
                f"validation_size + test_size must leave titles to train on, got "
                f"{self.validation_size} + {self.test_size}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> SplitSpec | None:
        if not data:
            return None
        return cls(**{k: data[k] for k in ("validation_size", "test_size", "seed") if k in data})


DEFAULT_SPLITS = SplitSpec()


def split_flags(validation_size: float, test_size: float, seed: int) -> list[str]:
    """The command-line flags every stage's script takes for the split (build_dataset.py, train_base.py, ...): how a
    parent process hands one split of titles to its children."""
    return ["--validation_size", str(validation_size), "--test_size", str(test_size), "--split_seed", str(seed)]


def title_key(title: str) -> str:
    return title.split(" ", 1)[0]


def split_of(title: str, spec: SplitSpec = DEFAULT_SPLITS) -> str:
    """`train`, `validation` or `test`. Test takes the lowest hash values, so growing validation_size never
    moves a test title, and the test titles are those of the earlier two-way split with the same test_size."""
    digest = hashlib.blake2b(f"{spec.seed}:{title_key(title)}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < spec.test_size:
        return "test"
    if u < spec.test_size + spec.validation_size:
        return "validation"
    return "train"


def check_same_splits(expected: SplitSpec | None, found: SplitSpec | None, what: str) -> None:
    """Stop when two artefacts were built with different splits (a held-out title may have been trained on).

    An artefact that records no split (a Hub model, a dataset built elsewhere) is taken as it is.
    """
    if expected is not None and found is not None and expected != found:
        raise PoemDPOError(
            f"{what} was built with splits {found.to_dict()}, but this run uses {expected.to_dict()}: its "
            "held-out titles would not be held out here. Rebuild one of them with the same --validation_size, "
            "--test_size and --split_seed."
        )


def split_poems(poems: Iterable[T], spec: SplitSpec = DEFAULT_SPLITS) -> dict[str, list[T]]:
    """Poems (anything with a `.title`) grouped by the split of their title, in input order."""
    splits: dict[str, list[T]] = {name: [] for name in SPLITS}
    for poem in poems:
        splits[split_of(poem.title, spec)].append(poem)
    return splits
