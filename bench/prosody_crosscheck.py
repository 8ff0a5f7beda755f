"""Cross-check the 平水韵 tone table (poemdpo.data.prosody) against chinese-poetry's own 平仄 annotation of the same
poems, and print the corpus rate of every 格律 check.

    python bench/prosody_crosscheck.py [--corpus DIR] [--strains DIR]

The annotation (`strains/json/poet.tang.*.json`) marks each character 平, 仄, ○ (either) or ？ (unknown); it is
upstream's own table, not ground truth. Files are read raw, record by record, and matched by `id`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poemdpo.data import prosody  # noqa: E402
from poemdpo.data.corpus import DEFAULT_CORPUS, clean_line, corpus_files, read_corpus  # noqa: E402
from poemdpo.data.forms import classify  # noqa: E402

DEFAULT_STRAINS = Path("/work/shared/corpus/quan-tang-shi-strains")
_MARKS = re.compile(r"[《》〈〉「」『』]")
_CJK = re.compile(r"[\u3400-\u9fff\U00020000-\U0002ffff]")
DEFINITE = (prosody.PING, prosody.ZE)
EXAMPLES = 6


def aligned_positions(corpus: Path, strains: Path, counts: Counter):
    """(character, upstream mark) for every character of every paragraph whose cleaned text matches its annotation
    in length; notes such as （一作…） are cut first, as upstream cut them before annotating."""
    for file in corpus_files(corpus):
        poems = json.loads(file.read_text(encoding="utf-8"))
        other = strains / file.name
        if not other.exists():
            counts["files_without_annotation"] += 1
            continue
        by_id = {r["id"]: r["strains"] for r in json.loads(other.read_text(encoding="utf-8"))}
        for poem in poems:
            marks = by_id.get(poem.get("id"))
            counts["poems"] += 1
            if marks is None or len(marks) != len(poem["paragraphs"]):
                counts["poems_unmatched"] += 1
                continue
            for paragraph, annotation in zip(poem["paragraphs"], marks, strict=True):
                text = _MARKS.sub("", clean_line(paragraph))
                if len(text) != len(annotation):
                    counts["paragraphs_unaligned"] += 1
                    continue
                counts["paragraphs_aligned"] += 1
                for char, mark in zip(text, annotation, strict=True):
                    if _CJK.match(char):
                        yield char, mark


def crosscheck(corpus: Path, strains: Path) -> None:
    counts: Counter = Counter()
    pairs: Counter = Counter()  # (ours, upstream) per position
    by_char: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (ours, upstream) -> characters
    upstream: dict[str, Counter] = defaultdict(Counter)  # character -> upstream's marks for it, over the corpus
    for char, mark in aligned_positions(corpus, strains, counts):
        ours = prosody.tone(char)
        pairs[ours, mark] += 1
        upstream[char][mark] += 1
        if ours != mark:
            by_char[ours, mark][char] += 1
    total = sum(pairs.values())
    print(f"poems {counts['poems']:,} (not matched by id/paragraph count: {counts['poems_unmatched']:,}); "
          f"paragraphs aligned {counts['paragraphs_aligned']:,}, not aligned {counts['paragraphs_unaligned']:,}; "
          f"characters compared {total:,}")

    print("\nours \\ upstream   " + "".join(f"{m:>12}" for m in "平仄○？"))
    for ours in "平仄○？":
        print(f"{ours:<17}" + "".join(f"{pairs[ours, m]:>12,}" for m in "平仄○？"))

    definite = sum(pairs[o, m] for o in "平仄○？" for m in DEFINITE)
    same = sum(pairs[m, m] for m in DEFINITE)
    both = sum(pairs[o, m] for o in DEFINITE for m in DEFINITE)
    opposite = both - same
    either = sum(pairs[prosody.EITHER, m] for m in DEFINITE)
    unknown = sum(pairs[prosody.UNKNOWN, m] for m in DEFINITE)
    print(f"\nupstream definite (平/仄): {definite:,} positions")
    print(f"  same tone                 {same / definite:7.2%}   ({same:,})")
    print(f"  our table: either (○)     {either / definite:7.2%}   ({either:,})")
    print(f"  opposite tone             {opposite / definite:7.2%}   ({opposite:,})")
    print(f"  our table: unknown        {unknown / definite:7.2%}   ({unknown:,})")
    print(f"  agreement where both are definite: {same / both:.2%}; never contradicted (same or ○): "
          f"{(same + either) / definite:.2%}")
    print(f"unknown to our table: {sum(pairs[prosody.UNKNOWN, m] for m in '平仄○？') / total:.3%} of all compared "
          f"characters")

    print("\ndisagreement classes (ours -> upstream): count, commonest characters")
    classes = [
        ((prosody.PING, prosody.ZE), "opposite: we 平, upstream 仄"),
        ((prosody.ZE, prosody.PING), "opposite: we 仄, upstream 平"),
        ((prosody.EITHER, prosody.PING), "we ○ (both readings listed), upstream 平"),
        ((prosody.EITHER, prosody.ZE), "we ○ (both readings listed), upstream 仄"),
        ((prosody.PING, prosody.EITHER), "we 平, upstream ○"),
        ((prosody.ZE, prosody.EITHER), "we 仄, upstream ○"),
        ((prosody.UNKNOWN, prosody.PING), "we unknown, upstream 平"),
        ((prosody.UNKNOWN, prosody.ZE), "we unknown, upstream 仄"),
        ((prosody.PING, prosody.UNKNOWN), "we 平, upstream unknown"),
        ((prosody.ZE, prosody.UNKNOWN), "we 仄, upstream unknown"),
    ]
    for key, name in classes:
        chars = by_char[key]
        n = sum(chars.values())
        mapped = sum(c for ch, c in chars.items() if prosody.normalize(ch) != ch)
        # Upstream marks the character more than one way across the corpus: it reads it by context, or is unsure.
        mixed = sum(c for ch, c in chars.items() if sum(upstream[ch][m] > 0 for m in "平仄○") > 1)
        print(f"  {name}: {n:,} positions, {len(chars):,} characters; {mapped:,} positions through a variant; "
              f"{mixed:,} ({mixed / max(n, 1):.0%}) where upstream itself marks the character more than one way")
        for ch, c in chars.most_common(EXAMPLES):
            marks = " ".join(f"{m}{upstream[ch][m]:,}" for m in "平仄○？" if upstream[ch][m])
            groups = " ".join(sorted(prosody.rhyme_groups(ch), key=_group_order)) or "-"
            print(f"      {ch}{_via(ch)} ×{c:,}   upstream over the corpus: {marks}   ours: {groups}")


def _group_order(group: str) -> int:
    return ["上平", "下平", "上聲", "去聲", "入聲"].index(group[:2])


def _via(char: str) -> str:
    target = prosody.normalize(char)
    return f"({target})" if target != char else ""


def corpus_rates(corpus: Path) -> None:
    poems, _ = read_corpus(corpus, progress=False)
    print(f"\nunknown share over the cleaned corpus ({len(poems):,} poems): "
          f"{prosody.unknown_share(p.text for p in poems):.3%} of verse characters")
    reports = defaultdict(list)
    for poem in poems:
        report = prosody.check(poem.text)
        if report.applicable:
            reports[classify(poem.text).label].append(report)
    names = list(prosody.CHECKS)
    header = ["shape", "poems", *prosody.CHECKS.values(), "first four", "合律", "score", "has unknown"]
    print("\ncorpus rates of each check (poems of 4 or 8 lines, every line 5 or 7 characters)")
    print(" | ".join(header))
    groups = [(shape, reports[shape]) for shape in ("五言绝句", "五言律诗", "七言绝句", "七言律诗")]
    groups.append(("五言 4/8 lines", reports["五言绝句"] + reports["五言律诗"]))
    groups.append(("七言 4/8 lines", reports["七言绝句"] + reports["七言律诗"]))
    for shape, rs in groups:
        n = len(rs)
        cells = [f"{sum(getattr(r, c) for r in rs) / n:.1%}" for c in names]
        four = sum(r.rhyme and r.alternation and r.opposition and r.adhesion for r in rs) / n
        cells += [f"{four:.1%}", f"{sum(r.helv for r in rs) / n:.1%}", f"{sum(r.score for r in rs) / n:.3f}",
                  f"{sum(r.unknown > 0 for r in rs) / n:.1%}"]
        print(" | ".join([shape, f"{n:,}", *cells]))
    print("\n二四分明 failures that are only the 拗句 平平仄平仄 (七言 仄仄平平仄平仄), which 王力 counts as regular:")
    for meter in ("五言", "七言"):
        rs = reports[meter + "绝句"] + reports[meter + "律诗"]
        failing = [r for r in rs if not r.alternation]
        ao = sum(all(_ao_ju(m) for m in r.tones if not prosody.check_line_alternation(m)) for r in failing)
        print(f"  {meter}: {ao:,} of {len(failing):,} failing poems ({ao / len(failing):.0%}); 二四分明 would pass "
              f"{(len(rs) - len(failing) + ao) / len(rs):.1%} of {meter} 4/8-line poems instead of "
              f"{(len(rs) - len(failing)) / len(rs):.1%}")


def _ao_ju(marks: str) -> bool:
    """The line can read …平仄平仄: the 拗句 that swaps the third- and fourth-last tones of 平平平仄仄."""
    return all(want in prosody.readings(m) for want, m in zip("平仄平仄", marks[-4:], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="chinese-poetry 全唐诗 directory")
    parser.add_argument("--strains", default=str(DEFAULT_STRAINS), help="chinese-poetry strains/json directory")
    args = parser.parse_args()
    crosscheck(Path(args.corpus), Path(args.strains))
    corpus_rates(Path(args.corpus))


if __name__ == "__main__":
    main()
