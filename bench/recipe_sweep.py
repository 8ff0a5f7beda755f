"""Try DPO recipes on the embedded default and print one row of figures per recipe.

    python bench/recipe_sweep.py                                  # every recipe in SWEEP below
    python bench/recipe_sweep.py --only "sigmoid alone,ipo alone" --num_titles 300

Each recipe is `configs/dpo_tiny_cpu.yaml`, then BASELINE, then its overrides; each run trains with train_dpo.py, then
samples one poem per held-out title at temperature 1.0 (the same seed for every run) and scores the
held-out 五言 poems. The reference (base model) is measured once. docs/recipes.md records the table.
A recipe's `--dataset_name` replaces --dataset for training; the held-out titles and poems always come
from --dataset's test split (corpus pairs: their titles and chosen poems are the same in every set
build_dataset.py makes). The sets the sweep uses:

    python build_dataset.py --pairing random --output_dir data/pairs_five_char_random
    python build_dataset.py --pairing length_matched --output_dir data/pairs_five_char_length_matched
    python build_dataset.py --pairing random --on_policy_model data/base_model --on_policy_titles 1500 \
        --output_dir data/pairs_five_char_on_policy
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poemdpo.data.dataset import load_pairs_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_dpo  # noqa: E402
from poemdpo.evaluation.metrics import degenerate_rate, distinct_n, loss_per_character, well_formed_rate  # noqa: E402
from poemdpo.models.generation import generate_poems  # noqa: E402
from poemdpo.training.samples import rule_rate  # noqa: E402

# The recipe the rows of docs/recipes.md were measured against: configs/dpo_tiny_cpu.yaml as it was before
# they made it length-matched, beta 0.5, ld_alpha 0.5 ([sigmoid, sft] weights [1, 2], lr 3e-4, 4,000 pairs of
# --dataset, random pairs by default). ld_alpha 1.0 weights every token fully, as no ld_alpha does.
BASELINE = ["--beta", "0.1", "--ld_alpha", "1.0"]
# name -> overrides of BASELINE. Some need their datasets built first (see the module docstring).
SWEEP: dict[str, list[str]] = {
    "baseline": [],
    "sigmoid alone": ["--loss_type", "sigmoid", "--loss_weights", "1.0"],
    "sigmoid_norm+2·sft": ["--loss_type", "sigmoid_norm", "sft", "--loss_weights", "1.0", "2.0"],
    "ipo alone": ["--loss_type", "ipo", "--loss_weights", "1.0"],
    "ipo+2·sft": ["--loss_type", "ipo", "sft", "--loss_weights", "1.0", "2.0"],
    "ld_alpha 0.5": ["--ld_alpha", "0.5"],
    "beta 0.5": ["--beta", "0.5"],
    "beta 0.05": ["--beta", "0.05"],
    "sigmoid+4·sft": ["--loss_weights", "1.0", "4.0"],
    "6000 pairs": ["--max_train_pairs", "6000"],
    "length_matched pairs": ["--dataset_name", "data/pairs_five_char_length_matched"],
    "on-policy pairs": ["--dataset_name", "data/pairs_five_char_on_policy"],
    "length_matched beta 0.5": ["--dataset_name", "data/pairs_five_char_length_matched", "--beta", "0.5"],
    "length_matched ld_alpha 0.5": ["--dataset_name", "data/pairs_five_char_length_matched", "--ld_alpha", "0.5"],
    "length_matched beta 0.5 ld_alpha 0.5": ["--dataset_name", "data/pairs_five_char_length_matched", "--beta", "0.5",
                                             "--ld_alpha", "0.5"],
}


def measure(model_dir: str, tokenizer_dir: str, titles: list[str], held_out: tuple[list[str], list[str]],
            rule: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # As evaluate.py samples: generate_poems' default is the model's own length limit, cut to its context.
    poems = generate_poems(model, tokenizer, titles, temperature=1.0, seed=0, batch_size=64)
    return {
        "rate": rule_rate(poems, rule),
        "well_formed": well_formed_rate(poems),
        "degenerate": degenerate_rate(poems),
        "distinct_2": distinct_n(poems, 2),
        "loss_five": loss_per_character(model, tokenizer, held_out[0], held_out[1], batch_size=64),
        "example": poems[0].replace("\n", " / "),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default="data/base_model", help="reference / starting model")
    parser.add_argument("--dataset", default="data/pairs_five_char_random",
                        help="random pairs from build_dataset.py (the baseline's training set)")
    parser.add_argument("--rule", default="five_char", help="the rule whose rate is reported")
    parser.add_argument("--num_titles", type=int, default=300, help="held-out titles to sample for")
    parser.add_argument("--only", default=None, help="comma-separated recipe names from SWEEP")
    parser.add_argument("--extra", default="", help="overrides added to every run, e.g. '--max_train_pairs 500'")
    parser.add_argument("--work_dir", default="data/sweep", help="where runs are written (deleted after)")
    args = parser.parse_args()

    test = load_pairs_dir(args.dataset)[0]["validation"]
    titles = sorted(set(test["title"]))[: args.num_titles]
    held_out = (list(test["prompt"]), list(test["chosen"]))
    names = args.only.split(",") if args.only else list(SWEEP)
    reference = measure(args.base_model, args.base_model, titles, held_out, args.rule)
    print(f"| recipe | {args.rule} rate | well-formed | degenerate | distinct-2 | held-out 五言 loss/char | train s "
          "| rewards/chosen / rejected (last 5 logs) | example |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| reference (base) | {reference['rate']:.1%} | {reference['well_formed']:.1%} | "
          f"{reference['degenerate']:.1%} | {reference['distinct_2']:.3f} | {reference['loss_five']:.3f} | - | - | "
          f"{reference['example']} |", flush=True)
    for name in names:
        out = Path(args.work_dir) / name.replace(" ", "_")
        start = time.perf_counter()
        trainer = train_dpo.main(["--config", "configs/dpo_tiny_cpu.yaml", "--model_name_or_path", args.base_model,
                        "--dataset_name", args.dataset, "--output_dir", str(out), "--save_strategy", "no",
                        "--eval_strategy", "no", "--sample_titles", "0", "--report_to", "none",
                        *BASELINE, *SWEEP[name], *args.extra.split()])
        seconds = time.perf_counter() - start
        # The known failure: the margin grows while the chosen poems' likelihood falls too. rewards/chosen is
        # beta * (policy - reference) log-prob of the chosen poems; logps/chosen itself swings with the batch's
        # poem lengths (length-grouped batches come longest first), so it cannot show a trend.
        history = trainer.state.log_history
        chosen = [h["rewards/chosen"] for h in history if "rewards/chosen" in h][-5:]
        rejected = [h["rewards/rejected"] for h in history if "rewards/rejected" in h][-5:]
        drift = f"{sum(chosen) / len(chosen):+.2f} / {sum(rejected) / len(rejected):+.2f}" if chosen else "-"
        m = measure(str(out), str(out), titles, held_out, args.rule)
        print(f"| {name} {' '.join(SWEEP[name] + args.extra.split())} | {m['rate']:.1%} | {m['well_formed']:.1%} | "
              f"{m['degenerate']:.1%} | "
              f"{m['distinct_2']:.3f} | {m['loss_five']:.3f} | {seconds:.0f} | {drift} | {m['example']} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
