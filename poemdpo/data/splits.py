"""Train/test split by title, decided by a hash so every stage agrees without sharing state.

Series titles such as `帝京篇十首 一` and `帝京篇十首 二` share their part before the space,
and go to the same side: a held-out title is never a sibling of a trained one.
"""

from __future__ import annotations

import hashlib

DEFAULT_TEST_SIZE = 0.05
DEFAULT_SPLIT_SEED = 42


def title_key(title: str) -> str:
    return title.split(" ", 1)[0]


def is_test_title(title: str, test_size: float = DEFAULT_TEST_SIZE, seed: int = DEFAULT_SPLIT_SEED) -> bool:
    if not 0.0 <= test_size < 1.0:
        raise ValueError(f"test_size must be in [0, 1), got {test_size}")
    digest = hashlib.blake2b(f"{seed}:{title_key(title)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < test_size
