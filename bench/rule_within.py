"""One rule's rate among the poems that meet another, from evaluations already run (their poems.jsonl).

    python bench/rule_within.py --evals data/v7/test_rg1_slot_grpo5r data/v7/test_s1_rg1_slot_grpo5r   # pooled

Issue #13's target is a pair of rates: strict 五言 (≥ 95%) and rhyme among those 五言 poems (≥ 80%). evaluate.py
counts one rule over every poem; this reads its poems back and counts, strictly (a poem counts only if it
finished), how many meet `--within`, and how many of those also meet `--rule`, with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poemdpo.data.rules import RULES, preferred  # noqa: E402
from poemdpo.evaluation.evaluate import _eval_dir  # noqa: E402
from poemdpo.evaluation.metrics import rate_with_interval  # noqa: E402


def rule_within(evals: list[str], rule: str, within: str, model: str = "aligned") -> dict:
    """Pooled over `evals`: the share of `model`'s poems meeting `within`, and of those the share meeting `rule`."""
    poems = [json.loads(line)[model] for path in evals
             for line in (_eval_dir(path) / "poems.jsonl").read_text(encoding="utf-8").splitlines() if line]
    inside = [p["text"] for p in poems if p["finished"] and preferred(p["text"], within)]
    both = sum(preferred(text, rule) for text in inside)
    return {"within": rate_with_interval(len(inside), len(poems)), "rule_among": rate_with_interval(both, len(inside))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", nargs="+", required=True, help="evaluate.py output directories (or their models).")
    parser.add_argument("--rule", default="rhyme", choices=sorted(RULES), help="The rule counted among them.")
    parser.add_argument("--within", default="five_char", choices=sorted(RULES), help="The poems counted in.")
    parser.add_argument("--model", default="aligned", choices=["aligned", "reference"], help="Whose poems.")
    args = parser.parse_args(argv)
    result = rule_within(args.evals, args.rule, args.within, args.model)
    for name, label in (("within", f"{args.within}, strict"), ("rule_among", f"{args.rule} among them")):
        r = result[name]
        print(f"{label}: {100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] "
              f"({r['count']}/{r['n']})")
    return result


if __name__ == "__main__":
    main()
