"""The main job, end to end on the embedded default: dataset -> base model (if missing) -> DPO -> evaluation.

The headline is evaluate.py's own: the rule's strict rate on random test titles (K poems each), with its 95%
interval, beside the reference's; every stage uses the same train / validation / test split of titles.

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
from poemdpo.data.splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_SIZE, DEFAULT_VALIDATION_SIZE
from poemdpo.evaluation.evaluate import headline

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
    validation_size: float = field(default=DEFAULT_VALIDATION_SIZE,
                                   metadata={"help": "Share of titles held out for validation (every stage)."})
    test_size: float = field(default=DEFAULT_TEST_SIZE,
                             metadata={"help": "Share of titles held out for test (every stage)."})
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the title hash (every stage)."})
    num_titles: int = field(default=300, metadata={"help": "Random test titles sampled for in evaluation."})
    poems_per_title: int = field(default=4, metadata={"help": "Poems per title in evaluation (K)."})
    seeds: int = field(default=1, metadata={"help": "Sampling seeds in evaluation; counts are pooled."})


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

    splits = ["--validation_size", str(args.validation_size), "--test_size", str(args.test_size), "--split_seed",
              str(args.split_seed)]
    seconds["dataset"] = run_stage("dataset", ["build_dataset.py", "--corpus", args.corpus, "--rule", args.rule,
                                               "--pairing", args.pairing, "--near_miss_share",
                                               str(args.near_miss_share), "--output_dir", pairs, *splits])
    if not (ROOT / args.base_model / "config.json").is_file():
        seconds["base model"] = run_stage("base model", ["train_base.py", "--config", args.base_config,
                                                         "--corpus", args.corpus, "--output_dir", args.base_model,
                                                         *splits])
    seconds["dpo"] = run_stage("dpo", ["train_dpo.py", "--config", args.dpo_config, "--model_name_or_path",
                                       args.base_model, "--dataset_name", pairs, "--output_dir", output_dir,
                                       *dpo_overrides])
    seconds["evaluation"] = run_stage("evaluation", ["evaluate.py", "--model", output_dir, "--reference",
                                                     args.base_model, "--dataset", pairs, "--split", "test",
                                                     "--num_titles", str(args.num_titles), "--poems_per_title",
                                                     str(args.poems_per_title), "--seeds", str(args.seeds)])

    report = json.loads((ROOT / output_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    print("\n=== poem-dpo: done")
    print(headline(report))
    print("time      " + "  ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"  total {sum(seconds.values()) / 60:.1f} min")
    print(f"report    {output_dir}/eval/report.md")
    return {"report": report, "seconds": seconds}


if __name__ == "__main__":
    main()
