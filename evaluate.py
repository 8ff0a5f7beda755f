"""Evaluate a DPO-aligned poem model against its reference and write a report.

    python evaluate.py --model out/dpo                     # reference read from the model dir
    python evaluate.py --model out/dpo --reference data/base_model --num_titles 100 --output_dir out/eval

Writes report.json, report.md, poems.jsonl and PNG plots to --output_dir (default <model>/eval).
"""

from __future__ import annotations

from transformers import HfArgumentParser

from poemdpo.evaluation.evaluate import EvalArguments, EvaluationError, headline, run


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvalArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        report = run(args)
    except EvaluationError as e:
        parser.error(str(e))
    print(headline(report))
    print(f"report: {report['output_dir']}/report.md")
    return report


if __name__ == "__main__":
    main()
