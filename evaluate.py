"""Evaluate an aligned poem model against its reference on held-out titles, and write a report.

    python evaluate.py --model data/dpo_five_char                 # test split, reference read from poemdpo.json
    python evaluate.py --model data/dpo_five_char --split validation --seeds 3    # for recipe choices
    python evaluate.py --model data/dpo_five_char --titles my_titles.txt         # titles from outside the corpus
    python evaluate.py --compare data/run_a/eval data/run_b/eval                 # paired test of two recipes

Writes report.json, report.md, poems.jsonl and PNG plots to --output_dir (default <model>/eval). The protocol
(random titles of the split, K poems per title, strict counting, intervals) is described in
poemdpo/evaluation/evaluate.py; `--help` lists every option.
"""

from __future__ import annotations

import argparse

from transformers import HfArgumentParser

from poemdpo.errors import PoemDPOError
from poemdpo.evaluation.evaluate import EvalArguments, compare, headline, run
from poemdpo.evaluation.metrics import format_p


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvalArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        if args.compare:
            result = compare(*args.compare)
            print(f"{args.compare[0]}: {result['rate_a']:.1%}  {args.compare[1]}: {result['rate_b']:.1%}  on "
                  f"{result['n_pairs']} paired slots; only the first {result['a_only']}, only the second "
                  f"{result['b_only']}; exact McNemar p = {format_p(result['p_value'])}")
            return result
        report = run(args)
    except PoemDPOError as e:
        parser.error(str(e))
    print(headline(report))
    print(f"report: {report['output_dir']}/report.md")
    return report


if __name__ == "__main__":
    main()
