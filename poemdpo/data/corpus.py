"""Reading and cleaning the chinese-poetry JSON files (`poet.tang.*.json`, `poet.song.*.json`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from poemdpo.data.forms import split_lines
from poemdpo.errors import PoemDPOError

# The Tang corpus ships with the project (corpus/README.md: upstream commit and licence).
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "quan-tang-shi"
CORPUS_GLOBS = ("poet.tang.*.json", "poet.song.*.json")

# Editorial notes inside lines: （一作「留時」）, 〖1〗, [一○] and the like.
_NOTES = re.compile(r"（[^（）]*）|\([^()]*\)|〖[^〖〗]*〗|\{[^{}]*\}|\[[0-9一二三四五六七八九十○]+\]")
# Brackets left behind by a note cut in two, or marking a restored character: keep the text.
_STRAY = re.compile(r"[（）()〖〗\[\]{}【】〔〕]")
_SPACE = re.compile(r"\s+")
# Editors' notes and modern commentary that upstream keeps as paragraphs of a poem, e.g.
# 見《吟窗雜錄》卷二五。 / 按：此詩末八句… / 「產巢」，一作「有窠」。 Left in, they turn a 五言 poem into a
# rejected "杂言" one and teach the base model to write prose. Verse here carries no quotation marks; book-title
# marks do occur in verse (童子解吟《長恨曲》), but then every line is verse-length.
_QUOTES = re.compile(r"[「」『』]")
_NOTE_START = re.compile(r"^(按[：:]|見《)")
_BOOK_MARKS = re.compile(r"[《》〈〉]")
# A chapter reference ending a line (…卷十七、), as in source lists; 雲卷四山雪 is verse.
_CHAPTER = re.compile(r"卷[一二三四五六七八九十百○〇]+(?:[、，。；]|$)")
LONGEST_VERSE_LINE_WITH_BOOK_TITLE = 7
_CJK = re.compile(r"[\u3400-\u9fff\U00020000-\U0002ffff]")




@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    text: str  # paragraphs (usually couplets) joined by newlines
    source: str  # "file.json#index"


@dataclass
class CorpusStats:
    files: int = 0
    poems_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    lines_with_notes_stripped: int = 0
    note_paragraphs_dropped: int = 0

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "poems_read": self.poems_read,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "lines_with_notes_stripped": self.lines_with_notes_stripped,
            "note_paragraphs_dropped": self.note_paragraphs_dropped,
        }


def clean_line(line: str) -> str:
    """Strip editorial notes and stray brackets; fold whitespace away (verse has none)."""
    cleaned = _NOTES.sub("", line)
    cleaned = _STRAY.sub("", cleaned)
    return _SPACE.sub("", cleaned)


def is_note_paragraph(paragraph: str) -> bool:
    """An editor's note or commentary kept as a paragraph (see _QUOTES above), not verse."""
    if _QUOTES.search(paragraph) or _NOTE_START.match(paragraph):
        return True
    if _BOOK_MARKS.search(paragraph):
        lines = split_lines(_BOOK_MARKS.sub("", paragraph))
        return bool(_CHAPTER.search(paragraph)) or any(len(line) > LONGEST_VERSE_LINE_WITH_BOOK_TITLE for line in lines)
    return False


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PoemDPOError(f"corpus path {str(path)!r} does not exist")
    files = sorted(f for pattern in CORPUS_GLOBS for f in path.glob(pattern))
    if not files:
        raise PoemDPOError(
            f"no corpus files ({' or '.join(CORPUS_GLOBS)}) in directory {str(path)!r}; "
            "give --corpus a clone of chinese-poetry's 全唐诗 folder or one of its JSON files"
        )
    return files


def _parse_poem(raw: object, where: str) -> tuple[str, str, list[str]]:
    if not isinstance(raw, dict):
        raise PoemDPOError(f"{where}: a poem must be a JSON object, got {type(raw).__name__}")
    for key in ("title", "paragraphs"):
        if key not in raw:
            raise PoemDPOError(f"{where}: poem has no {key!r} field")
    title, paragraphs = raw["title"], raw["paragraphs"]
    if not isinstance(title, str):
        raise PoemDPOError(f"{where}: 'title' must be a string, got {type(title).__name__}")
    if not isinstance(paragraphs, list):
        raise PoemDPOError(f"{where}: 'paragraphs' must be a list, got {type(paragraphs).__name__}")
    for i, line in enumerate(paragraphs):
        if not isinstance(line, str):
            raise PoemDPOError(f"{where}: paragraphs[{i}] must be a string, got {type(line).__name__}")
    return title, str(raw.get("author", "")), paragraphs


def read_corpus(
    path: str | Path = DEFAULT_CORPUS,
    skip_bad: bool = False,
    to_simplified: bool = False,
    progress: bool = True,
) -> tuple[list[Poem], CorpusStats]:
    """Read, clean and deduplicate every poem under `path` (a directory or one JSON file).

    Bad input raises `PoemDPOError` naming the file and poem index; with `skip_bad` it is
    counted in `stats.dropped` instead.
    """
    convert = _simplifier() if to_simplified else (lambda s: s)
    stats = CorpusStats()
    poems: list[Poem] = []
    seen_bodies: set[str] = set()
    files = corpus_files(path)
    stats.files = len(files)
    for file in tqdm(files, desc="reading corpus", unit="file", disable=not progress):
        try:
            with open(file, encoding="utf-8") as f:
                raws = json.load(f)
            if not isinstance(raws, list):
                raise PoemDPOError(f"{file}: expected a JSON array of poems, got {type(raws).__name__}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not skip_bad:
                raise PoemDPOError(f"{file}: not a valid JSON file ({e})") from None
            stats.dropped["bad_file"] += 1
            continue
        except PoemDPOError:
            if not skip_bad:
                raise
            stats.dropped["bad_file"] += 1
            continue
        for index, raw in enumerate(raws):
            stats.poems_read += 1
            where = f"{file}, poem #{index}"
            try:
                title, author, paragraphs = _parse_poem(raw, where)
            except PoemDPOError:
                if not skip_bad:
                    raise
                stats.dropped["bad_poem"] += 1
                continue
            lines = []
            for paragraph in paragraphs:
                cleaned = clean_line(paragraph)
                if cleaned != _SPACE.sub("", paragraph):
                    stats.lines_with_notes_stripped += 1
                if is_note_paragraph(cleaned):
                    stats.note_paragraphs_dropped += 1
                    continue
                cleaned = _BOOK_MARKS.sub("", cleaned)
                # A paragraph left with no character (a note on its own line) is no verse.
                if _CJK.search(cleaned):
                    lines.append(cleaned)
            if not lines:
                stats.dropped["empty"] += 1
                continue
            title = _SPACE.sub(" ", _STRAY.sub("", _NOTES.sub("", title))).strip()
            if not title:
                stats.dropped["no_title"] += 1
                continue
            text = convert("\n".join(lines))
            if text in seen_bodies:
                stats.dropped["duplicate"] += 1
                continue
            seen_bodies.add(text)
            poems.append(Poem(convert(title), author, text, f"{file.name}#{index}"))
    stats.kept = len(poems)
    return poems, stats


def _simplifier():
    try:
        import opencc
    except ImportError:
        raise SystemExit("--to_simplified needs OpenCC: pip install opencc") from None
    return opencc.OpenCC("t2s").convert
