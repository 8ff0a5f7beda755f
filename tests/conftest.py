"""Shared fixtures: a small corpus in the chinese-poetry JSON format, written to a temp dir."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

# Common characters of the corpus, enough for varied lines.
CHARS = (
    "山水風月雲花春秋日夜人天江河長城空寒白青紅金玉清明高遠歸來去時年不見有無中上下東西南北"
    "行路客心愁思故鄉家國城樓門前後知君相逢別離送酒歌舞孤舟煙雨雪霜草木林鳥聲落葉秋光"
)


def make_poem(rng: random.Random, line_len: int, n_lines: int) -> list[str]:
    lines = ["".join(rng.choice(CHARS) for _ in range(line_len)) for _ in range(n_lines)]
    return [f"{lines[i]}，{lines[i + 1]}。" for i in range(0, n_lines, 2)]


def make_corpus_poems(n: int = 120, seed: int = 0) -> list[dict]:
    """Poems of every form the rules care about, with distinct titles."""
    rng = random.Random(seed)
    shapes = [(5, 4), (5, 8), (7, 4), (7, 8), (5, 12), (None, 4), (None, 6)]
    poems = []
    for i in range(n):
        line_len, n_lines = shapes[i % len(shapes)]
        if line_len is None:  # 杂言: mixed line lengths
            paragraphs = [f"{''.join(rng.choice(CHARS) for _ in range(rng.choice([3, 5, 7])))}，"
                          f"{''.join(rng.choice(CHARS) for _ in range(rng.choice([4, 6, 9])))}。"
                          for _ in range(n_lines // 2)]
        else:
            paragraphs = make_poem(rng, line_len, n_lines)
        poems.append({"author": "佚名", "title": f"無題{i}", "paragraphs": paragraphs, "id": str(i)})
    return poems


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Two corpus files (like poet.tang.0.json, poet.tang.1000.json) plus an unrelated file."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    poems = make_corpus_poems()
    (directory / "poet.tang.0.json").write_text(json.dumps(poems[:60], ensure_ascii=False), encoding="utf-8")
    (directory / "poet.tang.1000.json").write_text(json.dumps(poems[60:], ensure_ascii=False), encoding="utf-8")
    (directory / "README.md").write_text("not a corpus file", encoding="utf-8")
    return directory
