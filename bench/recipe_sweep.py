"""Re-choose the DPO recipe: train each recipe in SWEEP, measure it with evaluate.py's protocol on validation
titles, and test it against the baseline recipe on the same poem slots.

    python bench/recipe_sweep.py                                          # every recipe in SWEEP, data/base_model
    python bench/recipe_sweep.py --only "beta 0.1,near misses" --seeds 3
    python bench/recipe_sweep.py --base_models data/base_model,data/base_model_2,data/base_model_3
    python evaluate.py --compare data/sweep/data_base_model/baseline/eval data/sweep/data_base_model/beta_0.1/eval

Each recipe is configs/dpo_tiny_cpu.yaml, then BASELINE, then its overrides, then --extra; the first row is always
the baseline (the recipe file as it is). Every run is scored by `poemdpo.evaluation.evaluate.run` on the
**validation** split of --dataset: the same random titles (title seed 0), K poems each, the same sampling seeds,
strict counting; each row's exact McNemar test pairs its poems with the baseline's slot by slot. Recipe choices
read validation only: the test split is for the one final report of the chosen recipe (evaluate.py's default).
With several --base_models the table repeats per base model (base retrains are the second source of variance),
then each recipe's counts are pooled over them. Each run keeps <work_dir>/<base>/<recipe>/eval (report.json,
report.md, poems.jsonl); its weights are deleted unless --keep_models. The sets and base models it reads:

    python build_dataset.py                                               # data/pairs_five_char (length_matched)
    python build_dataset.py --pairing random --output_dir data/pairs_five_char_random
    python build_dataset.py --near_miss_share 0.3 --output_dir data/pairs_five_char_near_miss
    python build_dataset.py --on_policy_model data/base_model --on_policy_titles 1500 \
        --output_dir data/pairs_five_char_on_policy          # on-policy for data/base_model only
    python train_base.py --seed 1 --output_dir data/base_model_2          # and --seed 2 ... _3: base retrains
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_dpo  # noqa: E402
from poemdpo.errors import PoemDPOError  # noqa: E402
from poemdpo.evaluation.evaluate import EvalArguments, compare, pooled_rule_rate, run  # noqa: E402
from poemdpo.evaluation.metrics import format_p, mcnemar_exact, rate_with_interval  # noqa: E402
from poemdpo.evaluation.tables import cell  # noqa: E402
from poemdpo.models.loading import looks_local  # noqa: E402

RECIPE = ROOT / "configs/dpo_tiny_cpu.yaml"
TITLE_SEED = 0  # the same validation titles for every recipe and base model
KEEP = {"eval", "poemdpo.json", "README.md"}  # what a run keeps without --keep_models: the report and the card
# Overrides every run starts from: none, the recipe file as it is, so the baseline row is today's default.
BASELINE: list[str] = []
# name -> overrides of the recipe file (length-matched pairs, [sigmoid, sft] [1, 2], β 0.5, ld_alpha 0.5, lr 3e-4,
# 4,000 pairs). Some need their datasets built first (see the module docstring).
SWEEP: dict[str, list[str]] = {
    "baseline": [],
    "beta 0.1": ["--beta", "0.1"],
    "beta 1.0": ["--beta", "1.0"],
    "ld_alpha 1.0": ["--ld_alpha", "1.0"],
    "ld_alpha 0.25": ["--ld_alpha", "0.25"],
    "sigmoid alone": ["--loss_type", "sigmoid", "--loss_weights", "1.0"],
    "sigmoid+1·sft": ["--loss_weights", "1.0", "1.0"],
    "sigmoid+4·sft": ["--loss_weights", "1.0", "4.0"],
    "sigmoid_norm+2·sft": ["--loss_type", "sigmoid_norm", "sft", "--loss_weights", "1.0", "2.0"],
    "ipo+2·sft": ["--loss_type", "ipo", "sft", "--loss_weights", "1.0", "2.0"],
    "lr 1e-4": ["--learning_rate", "1e-4"],
    "6000 pairs": ["--max_train_pairs", "6000"],
    "random pairs": ["--dataset_name", "data/pairs_five_char_random"],
    "near misses": ["--dataset_name", "data/pairs_five_char_near_miss"],
    "on-policy pairs": ["--dataset_name", "data/pairs_five_char_on_policy"],
}


def slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_") or "_"


def recipe_datasets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dataset_name"]


def check_inputs(names: list[str], bases: list[str], dataset: str, extra: list[str]) -> None:
    """Stop before the first hour of training on what would stop the sweep later."""
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise PoemDPOError(f"unknown recipe(s) {unknown}; SWEEP has {list(SWEEP)}")
    if len(set(bases)) != len(bases) or len({slug(b) for b in bases}) != len(bases):
        raise PoemDPOError(f"--base_models names a base model twice: {bases}")
    needed = {dataset: "--dataset"} | {d: n for n in names for d in recipe_datasets(SWEEP[n] + extra)}
    needed |= {b: "a base model" for b in bases}
    missing = [f"{path!r} ({who})" for path, who in needed.items() if looks_local(path) and not Path(path).is_dir()]
    if missing:
        raise PoemDPOError(f"missing: {', '.join(missing)}; the module docstring has the commands that build them")


def train_and_evaluate(name: str, base: str, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train one recipe on one base model, evaluate it on validation; training and evaluation logs go to stderr."""
    shutil.rmtree(out, ignore_errors=True)  # no leftovers of an earlier run in its report
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the Markdown table
        start = time.perf_counter()
        train_dpo.main(["--config", str(RECIPE), "--model_name_or_path", base, "--dataset_name", args.dataset,
                        "--output_dir", str(out), "--save_strategy", "no", "--eval_strategy", "no",
                        "--sample_titles", "0", "--report_to", "none", *BASELINE, *SWEEP[name], *extra])
        seconds = time.perf_counter() - start
        report = run(EvalArguments(model=str(out), reference=base, dataset=args.dataset, split="validation",
                                   rule=args.rule, num_titles=args.num_titles, poems_per_title=args.poems_per_title,
                                   seeds=args.seeds, seed=0, title_seed=TITLE_SEED, output_dir=str(out / "eval")))
    if not args.keep_models:
        for path in out.iterdir():
            if path.name in KEEP:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return {"report": report, "seconds": seconds, "eval": str(out / "eval")}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(r: dict) -> str:
    return f"{_pct(r['rate'])} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] ({r['count']}/{r['n']})"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def reward_accuracy(report: dict) -> str:
    """DPO's implicit-reward accuracy on held-out pairs; a method whose β scales no log-ratio to a reference
    (SimPO, ORPO: evaluate.py reports no rewards for them) gets a dash."""
    return _pct(report["rewards"]["reward_accuracy"]) if report.get("rewards") else "—"


def _row(cells: list[object]) -> None:
    print("| " + " | ".join(cell(str(c)) for c in cells) + " |", flush=True)


def _paired(test: dict | None) -> list[str]:
    return ["—", "—"] if test is None else [f"{test['a_only']} / {test['b_only']}", format_p(test["p_value"])]


def pooled_test(tests: list[dict]) -> dict:
    """The exact McNemar test on the discordant slots of every base model together (the slots are distinct)."""
    a_only, b_only = sum(t["a_only"] for t in tests), sum(t["b_only"] for t in tests)
    return mcnemar_exact([True] * a_only + [False] * b_only, [False] * a_only + [True] * b_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default="data/base_model", help="reference / starting model")
    parser.add_argument("--base_models", default=None,
                        help="comma-separated base models (e.g. 3 retrains): the table per base, then pooled counts; "
                        "replaces --base_model")
    parser.add_argument("--dataset", default="data/pairs_five_char",
                        help="pairs from build_dataset.py: the baseline's training set, and the validation titles, "
                        "poems and pairs every run is evaluated on")
    parser.add_argument("--rule", default=None, help="the rule to count (default: the one the model records)")
    parser.add_argument("--num_titles", type=int, default=300, help="validation titles drawn at random")
    parser.add_argument("--poems_per_title", type=int, default=4, help="poems per title and seed (K)")
    parser.add_argument("--seeds", type=int, default=1, help="sampling seeds 0, 1, ...; counts pooled")
    parser.add_argument("--only", default=None, help="comma-separated recipe names from SWEEP (baseline always runs)")
    parser.add_argument("--extra", default="", help="overrides added to every run, e.g. '--max_train_pairs 500'")
    parser.add_argument("--work_dir", default="data/sweep", help="runs go to <work_dir>/<base>/<recipe>")
    parser.add_argument("--keep_models", action="store_true", help="keep each run's weights (default: eval only)")
    args = parser.parse_args()

    names = ["baseline", *(n.strip() for n in args.only.split(",") if n.strip() != "baseline")] if args.only \
        else list(SWEEP)
    bases = [b.strip() for b in args.base_models.split(",") if b.strip()] if args.base_models else [args.base_model]
    extra = shlex.split(args.extra)
    try:
        check_inputs(names, bases, args.dataset, extra)
    except PoemDPOError as e:
        parser.error(str(e))

    header = ["recipe", "overrides", "rule, strict [95% Wilson]", "unfinished", "well-formed", "degenerate",
              "distinct-2", "loss/char preferred", "reward acc.", "train s", "recipe only / baseline only",
              "McNemar p"]
    runs: dict[str, dict[str, dict]] = {name: {} for name in names}
    for base in bases:
        print(f"\n## Base model `{base}`: validation of `{args.dataset}`, {args.num_titles} titles × "
              f"{args.poems_per_title} poems × {args.seeds} seed(s)" + (f", every run with `{args.extra}`"
                                                                         if extra else "") + "\n", flush=True)
        for name in names:
            result = train_and_evaluate(name, base, Path(args.work_dir) / slug(base) / slug(name), args, extra)
            runs[name][base] = result
            report = result["report"]
            if name == "baseline":
                ref = report["models"]["reference"]
                print(f"{report['rule']} on {report['titles_source']}; the reference (base model) writes "
                      f"{_rate(ref['rule_rate'])}, unfinished {_pct(ref['unfinished']['rate'])}, loss/char preferred "
                      f"{_num(ref['loss_per_char_preferred'])}\n", flush=True)
                _row(header)
                print("|" + "---|" * len(header), flush=True)
                result["test"] = None
            else:
                result["test"] = compare(result["eval"], runs["baseline"][base]["eval"])
            m = report["models"]["aligned"]
            _row([name, " ".join(SWEEP[name]) or "(the recipe file)", _rate(m["rule_rate"]),
                  _pct(m["unfinished"]["rate"]), _pct(m["well_formed_rate"]), _pct(m["degenerate_rate"]),
                  _num(m["distinct_2"]), _num(m["loss_per_char_preferred"]),
                  reward_accuracy(report), f"{result['seconds']:.0f}", *_paired(result["test"])])

    if len(bases) > 1:
        print(f"\n## Pooled over {len(bases)} base models\n", flush=True)
        reference = pooled_rule_rate([r["eval"] for r in runs["baseline"].values()])["reference"]
        print(f"The reference (base models) writes {_rate(reference)}.\n")
        pooled_header = ["recipe", "rule, strict [95% Wilson]", "unfinished", "recipe only / baseline only",
                         "McNemar p"]
        _row(pooled_header)
        print("|" + "---|" * len(pooled_header), flush=True)
        for name in names:
            results = list(runs[name].values())
            aligned = pooled_rule_rate([r["eval"] for r in results])["aligned"]
            unfinished = [r["report"]["models"]["aligned"]["unfinished"] for r in results]
            unfinished_rate = rate_with_interval(sum(u["count"] for u in unfinished), sum(u["n"] for u in unfinished))
            test = None if name == "baseline" else pooled_test([r["test"] for r in results])
            _row([name, _rate(aligned), _pct(unfinished_rate["rate"]), *_paired(test)])
    kept = "eval directories and weights" if args.keep_models else "eval directories (report.json, report.md, " \
        "poems.jsonl; weights deleted)"
    print(f"\n{kept}: {Path(args.work_dir) / '<base>' / '<recipe>'}/, e.g. {runs['baseline'][bases[0]]['eval']}; "
          "python evaluate.py --compare A B tests any two.", flush=True)


if __name__ == "__main__":
    main()
