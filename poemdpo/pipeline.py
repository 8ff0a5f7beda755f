"""The main job, end to end on the embedded default: dataset -> base model (if missing) -> DPO -> evaluation.

    python -m poemdpo.pipeline                       # 五言 preferred (rule five_char)
    python -m poemdpo.pipeline --rule seven_char     # 七言 preferred
    python -m poemdpo.pipeline --max_train_pairs 500 # anything after the known options goes to train_dpo.py

Each stage is the repository's own script, run as a child process exactly as a user would run it, so
that a stage's memory is freed before the next and its output is what the script prints on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from poemdpo.data.corpus import DEFAULT_CORPUS
from poemdpo.data.pairs import DEFAULT_NEAR_MISS_SHARE, DEFAULT_PAIRING, STRATEGIES
from poemdpo.data.rules import RULES
from poemdpo.training.samples import rule_rate

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PipelineArguments:
    rule: str = field(default="five_char",
                      metadata={"help": "Which poems DPO should prefer.", "choices": sorted(RULES)})
    pairing: str = field(default=DEFAULT_PAIRING, metadata={"help": "Pairing strategy of build_dataset.py.",
                                                      "choices": list(STRATEGIES)})
    near_miss_share: float = field(
        default=DEFAULT_NEAR_MISS_SHARE, metadata={"help": "Share of near-miss train pairs (build_dataset.py)."}
    )
    corpus: str = field(default=str(DEFAULT_CORPUS), metadata={"help": "Corpus directory or file (chinese-poetry)."})
    pairs_dir: str | None = field(default=None, metadata={"help": "Where the pairs go (default: data/pairs_<rule>)."})
    base_model: str = field(default="data/base_model",
                            metadata={"help": "Base model directory; trained with train_base.py if missing."})
    base_config: str = field(default="configs/base_tiny_cpu.yaml", metadata={"help": "Recipe for train_base.py."})
    dpo_config: str = field(default="configs/dpo_tiny_cpu.yaml", metadata={"help": "Recipe for train_dpo.py."})
    output_dir: str | None = field(default=None, metadata={"help": "DPO output (default: data/dpo_<rule>)."})
    num_titles: int = field(default=300, metadata={"help": "Held-out titles to sample poems for in evaluation."})
    max_eval_pairs: int | None = field(
        default=None, metadata={"help": "Score only the first N held-out pairs in evaluation (default: all)."}
    )


def run_stage(name: str, command: list[str]) -> float:
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"pipeline: the {name} stage failed (exit code {result.returncode}); its output is above")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(PipelineArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    args, dpo_overrides = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    pairs = args.pairs_dir or f"data/pairs_{args.rule}"
    output_dir = args.output_dir or f"data/dpo_{args.rule}"
    seconds = {}

    seconds["dataset"] = run_stage("dataset", ["build_dataset.py", "--corpus", args.corpus, "--rule", args.rule,
                                               "--pairing", args.pairing, "--near_miss_share",
                                               str(args.near_miss_share), "--output_dir", pairs])
    if not (ROOT / args.base_model / "config.json").is_file():
        seconds["base model"] = run_stage("base model", ["train_base.py", "--config", args.base_config,
                                                         "--output_dir", args.base_model])
    seconds["dpo"] = run_stage("dpo", ["train_dpo.py", "--config", args.dpo_config, "--model_name_or_path",
                                       args.base_model, "--dataset_name", pairs, "--output_dir", output_dir,
                                       *dpo_overrides])
    seconds["evaluation"] = run_stage("evaluation", ["evaluate.py", "--model", output_dir, "--reference",
                                                     args.base_model, "--dataset", pairs,
                                                     "--num_titles", str(args.num_titles),
                                                     *(["--max_eval_pairs", str(args.max_eval_pairs)]
                                                       if args.max_eval_pairs else [])])

    eval_dir = ROOT / output_dir / "eval"
    report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    with open(eval_dir / "poems.jsonl", encoding="utf-8") as f:
        poems = [json.loads(line) for line in f]
    print("\n=== poem-dpo: done")
    for name in ("aligned", "reference"):
        model = report["models"][name]
        rate = rule_rate([p[name] for p in poems], args.rule)
        print(f"{name:9s} {args.rule} rate {rate:.1%}  well-formed {model['well_formed_rate']:.1%}  "
              f"degenerate {model['degenerate_rate']:.1%}  distinct-2 {model['distinct_2']:.3f}  "
              f"loss/char 五言 {model['loss_per_char_five']:.3f}")
    rewards = report["rewards"]
    print(f"rewards   accuracy {rewards['reward_accuracy']:.1%}  mean margin {rewards['mean_margin']:.3f}")
    print("time      " + "  ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"  total {sum(seconds.values()) / 60:.1f} min")
    print(f"report    {output_dir}/eval/report.md")
    return {"report": report, "seconds": seconds}


if __name__ == "__main__":
    main()
