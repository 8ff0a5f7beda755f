"""The methods table of issue #14: every road that trains a policy, each trained with several seeds, measured by
evaluate.py's protocol on the test split, in one Markdown table (docs/methods_table.md) and a plot of each method's
rule rate against its KL to the reference and its training minutes (docs/methods_table.png: --output's name, .png).

    python build_dataset.py                  # data/pairs_five_char, if missing
    python train_base.py                     # data/base_model, if missing
    python bench/methods_table.py            # every method of poemdpo.pipeline.METHODS but the reward model alone
                                             # x 3 training seeds -> docs/methods_table.md
    python bench/methods_table.py --methods dpo,grpo --seeds 1 --output /tmp/methods_table.md
    python bench/methods_table.py --methods dpo,chapter_linear --seeds 1 --extra '--max_steps 2' \\
        --num_titles 8 --poems_per_title 2 --work_dir /tmp/methods --output /tmp/methods_table.md   # a smoke run
    python bench/methods_table.py --resume   # after a crash: runs with a run.json are read, not trained again

How long it takes is unknown until measured: nobody has run the whole table, and one row is --seeds x (training +
evaluation) of its method. Each run's training minutes (wall time of the training script) land in the table,
and each run's evaluation seconds in <run>/eval/report.json ("seconds"); read them off the first row before
waiting for the rest. Parts measured elsewhere, for orientation only: the README's one pipeline run (DPO 6.4 min,
evaluation 7.2 min on a quiet 2-core CPU, before evaluation scored the KL) and the GRPO recipe's trial (150 steps,
5.7 min, configs/grpo_tiny_cpu.yaml).

Each run is the method's training script and recipe exactly as `python -m poemdpo.pipeline --method M` runs it
(poemdpo.pipeline.METHODS: same script, recipe, model, dataset and rule flags, and RULE_OVERRIDES), plus `--seed s`
and then --extra, in a child process whose output goes to <work_dir>/<method>/seed_<s>/train.log; grpo_reward_model
first trains its judge (train_reward.py, the same seed and --extra) into <run>/judge, and its minutes and pairs are
counted in the row. dpo_grpo and iterated_dpo go on from the dpo run of the same seed; iterated_dpo first samples
its pairs from that model (build_dataset.py --on_policy_model, split and pairing as --dataset's stats.json records
them) into <run>/pairs, and the sampling minutes and poems are counted in the row. slot_sft_grpo goes on from the
slot_sft run of the same seed; slot_sft reads --sft_dataset's poems under the rule rhyme, whatever --rule is, as the
pipeline's fine-tune does (start it from data/base_model_rhyme, as the pipeline does, with --base_model).
Training seeds are --first_seed, --first_seed + 1, ... (42 is the recipes' own, but for the slot fine-tune's: 0). Then
`poemdpo.evaluation.evaluate.run` on the **test** split against --base_model: the same random titles (title seed 0),
--poems_per_title poems each, sampling seed 0 for every run, so every run's poems pair slot by slot with dpo's.

A row pools its seeds: the strict rate from the pooled counts (`evaluate.pooled_rule_rate`) with its Wilson
interval; well-formed and degenerate from pooled counts; distinct-2, loss per character, training minutes and what
was consumed as means over seeds; KL over every scored poem of every seed (± its standard error); the exact McNemar
test against dpo on the discordant slots of every seed together (`recipe_sweep.pooled_test`: seed s of a method
against seed s of dpo, slots of different seeds taken as independent). Consumed: pairs for the train_dpo.py methods
(the final trainer_state.json's epoch × the pairs in poemdpo.json; n/a when a run saved no checkpoint), poems
written for the RL methods (poemdpo.json's completions), corpus poems read for train_sft.py (epoch × its train
poems). The reference row is the base model's poems for the same
slots (the same in every run), tested against dpo the same way. dpo always runs: every row is tested against it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recipe_sweep import _num, _paired, _pct, _rate, pooled_test  # noqa: E402
from poemdpo.data.rules import RULES  # noqa: E402
from poemdpo.data.splits import DEFAULT_SPLITS, SplitSpec, split_flags  # noqa: E402
from poemdpo.errors import PoemDPOError  # noqa: E402
from poemdpo.evaluation.evaluate import EvalArguments, compare, pooled_rule_rate, run, training_log  # noqa: E402
from poemdpo.evaluation.plots import plot_methods  # noqa: E402
from poemdpo.evaluation.tables import markdown_table  # noqa: E402
from poemdpo.models.loading import looks_local  # noqa: E402
from poemdpo.pipeline import (  # noqa: E402
    METHODS,
    ON_POLICY_PAIRS,
    RULE_OVERRIDES,
    SFT_RULE,
    STARTS_FROM,
    training_inputs,
)
from poemdpo.run_info import read_run_info  # noqa: E402

BASELINE = "dpo"
JUDGE = "reward_model"  # the method whose script trains grpo_reward_model's judge
SLOT_SFT = "slot_sft"  # reads --sft_dataset under SFT_RULE, as the pipeline's fine-tune does, whatever --rule is
POLICY_METHODS = [m for m in METHODS if m != JUDGE]  # the reward model alone writes no poems
TITLE_SEED, SAMPLING_SEED = 0, 0  # the same test titles and sample slots for every run
RUN_RECORD = "run.json"
HEADER = ("method", "{rule}, strict, seeds pooled [95% Wilson]", "well-formed", "degenerate", "distinct-2",
          "held-out loss/char (preferred)", "KL to reference, nats/poem ± s.e. (per token)", "training min / seed",
          "consumed / seed", "method only / dpo only", "McNemar p vs dpo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(POLICY_METHODS),
                        help=f"comma-separated, from {POLICY_METHODS}; dpo always runs (the paired tests' baseline)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--first_seed", type=int, default=42,
                        help="the first training seed (42 is the recipes' own, but for the slot fine-tune's: 0)")
    parser.add_argument("--rule", default="five_char", choices=sorted(RULES), help="the rule trained for and counted")
    parser.add_argument("--base_model", default="data/base_model", help="the starting model and the reference")
    parser.add_argument("--dataset", default=None, help="pairs from build_dataset.py (default: data/pairs_<rule>)")
    parser.add_argument("--sft_dataset", default=f"data/pairs_{SFT_RULE}",
                        help=f"slot_sft's poems (the chosen ones of these pairs, under --rule {SFT_RULE}), whatever "
                             f"--rule is: as the pipeline fine-tunes. Start slot_sft from a base with rhyme-group "
                             f"embeddings (--base_model data/base_model_rhyme), as the pipeline does")
    parser.add_argument("--work_dir", default="data/methods",
                        help="runs go to <work_dir>/<method>/seed_<s> (a run there is replaced, unless --resume)")
    parser.add_argument("--extra", default="",
                        help="overrides for every training run, e.g. '--max_steps 2' (one flag alone: --extra=--flag)")
    parser.add_argument("--num_titles", type=int, default=300, help="random test titles")
    parser.add_argument("--poems_per_title", type=int, default=4, help="poems per title (K)")
    parser.add_argument("--output", default="docs/methods_table.md", help="where the Markdown table goes")
    parser.add_argument("--resume", action="store_true",
                        help="read runs that finished (their run.json) instead of training them again")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="keep each run's checkpoint-* directories (default: deleted once its figures are read)")
    args = parser.parse_args(argv)
    args.dataset = args.dataset or f"data/pairs_{args.rule}"
    try:
        args.methods = methods_of(args.methods)
        check_inputs(args)
    except PoemDPOError as e:
        parser.error(str(e))
    # Children run in the repository root (the recipes' relative paths); local paths are absolute for them.
    for name in ("base_model", "dataset", "sft_dataset", "work_dir"):
        value = getattr(args, name)
        if looks_local(value):
            setattr(args, name, str(Path(value).resolve()))
    return args


def methods_of(text: str) -> list[str]:
    """The --methods list, dpo first and always, each method after the one it goes on from; unknown names and the
    reward model (no policy) refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICY_METHODS]
    if unknown:
        hint = " (it trains no policy: python -m poemdpo.pipeline --method reward_model reports its accuracy)" \
            if JUDGE in unknown else ""
        raise PoemDPOError(f"--methods: unknown method(s) {unknown}{hint}; choose from {POLICY_METHODS}")
    # A method that goes on from another's model comes after that method, which runs too (slot_sft_grpo: slot_sft).
    ordered = [m for n in names for m in (STARTS_FROM.get(n), n) if m is not None]
    return [BASELINE, *dict.fromkeys(n for n in ordered if n != BASELINE)]


def check_inputs(args: argparse.Namespace) -> None:
    """Stop before the first hour of training on what would stop the table later."""
    if args.seeds < 1 or args.num_titles < 1 or args.poems_per_title < 1:
        raise PoemDPOError(f"--seeds, --num_titles and --poems_per_title must each be at least 1, got {args.seeds}, "
                           f"{args.num_titles} and {args.poems_per_title}")
    if not Path(args.dataset).is_dir():
        raise PoemDPOError(f"--dataset {args.dataset!r} does not exist; build it with: python build_dataset.py "
                           f"--rule {args.rule} --output_dir {args.dataset}")
    if SLOT_SFT in args.methods and not Path(args.sft_dataset).is_dir():
        raise PoemDPOError(f"--sft_dataset {args.sft_dataset!r} does not exist; build it with: python build_dataset.py "
                           f"--rule {SFT_RULE} --output_dir {args.sft_dataset}")
    if looks_local(args.base_model) and not (Path(args.base_model) / "config.json").is_file():
        raise PoemDPOError(f"--base_model {args.base_model!r} has no config.json; train it with: python train_base.py "
                           f"--output_dir {args.base_model}")


# --- one run --------------------------------------------------------------------------------------------------------


def run_script(command: list[str], log: Path) -> float:
    """`python <command>` in the repository root, its output appended to `log`; the wall seconds it took."""
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ python {shlex.join(command)}\n")
        f.flush()
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise PoemDPOError(f"{command[0]} failed (exit code {result.returncode}); its output is in {log}")
    return seconds


def pairs_consumed(model_dir: Path, count: str = "train_pairs") -> float | None:
    """Pairs a train_dpo.py / train_reward.py run went through (poems for train_sft.py: count="train_poems"): the
    epochs of its last trainer_state.json (the final checkpoint's) × the count its poemdpo.json records. None
    without a checkpoint (--save_strategy no)."""
    _, state = training_log(str(model_dir))  # the model directory's trainer_state.json, else the newest checkpoint's
    epoch = json.loads(Path(state).read_text(encoding="utf-8")).get("epoch") if state else None
    pairs = read_run_info(model_dir).get(count)
    return epoch * pairs if epoch is not None and pairs is not None else None


def consumed(method: str, model_dir: Path, judge_dir: Path | None) -> dict:
    """{"pairs": n} for train_dpo.py's methods, {"poems": n} for train_rl.py's (plus "judge_pairs"),
    {"sft_poems": n} for train_sft.py's (corpus poems read: epochs × its train poems)."""
    if METHODS[method][0] == "train_rl.py":
        result = {"poems": read_run_info(model_dir).get("completions")}
    elif METHODS[method][0] == "train_sft.py":
        result = {"sft_poems": pairs_consumed(model_dir, count="train_poems")}
    else:
        result = {"pairs": pairs_consumed(model_dir)}
    if judge_dir is not None:
        result["judge_pairs"] = pairs_consumed(judge_dir)
    return result


def train_and_evaluate(method: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train `method` with `seed`, evaluate it on test, record <run>/run.json and return the record."""
    run_dir = Path(args.work_dir) / method / f"seed_{seed}"
    if args.resume and (run_dir / RUN_RECORD).is_file():
        print(f"{method} seed {seed}: read from {run_dir / RUN_RECORD}", file=sys.stderr, flush=True)
        return json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))
    shutil.rmtree(run_dir, ignore_errors=True)  # nothing of an earlier run in this one's figures
    run_dir.mkdir(parents=True)
    model_dir, log = run_dir / "model", run_dir / "train.log"
    script, recipe, method_args = METHODS[method]
    model, pairs = args.base_model, args.dataset
    commands, judge_dir, first = [], None, None
    if method in STARTS_FROM:  # dpo_grpo goes on from the dpo run of the same seed (methods_of runs dpo first)
        first = json.loads((Path(args.work_dir) / STARTS_FROM[method] / f"seed_{seed}" / RUN_RECORD).read_text(
            encoding="utf-8"))
        model = first["model"]
    if method in ON_POLICY_PAIRS:  # iterated_dpo: pairs of the dpo run's own poems, split as --dataset was
        stats = json.loads((Path(args.dataset) / "stats.json").read_text(encoding="utf-8"))
        splits = SplitSpec.from_dict(stats.get("splits")) or DEFAULT_SPLITS
        pairs = str(run_dir / "pairs")
        commands.append(["build_dataset.py", "--on_policy_model", model, "--rule", args.rule, "--seed", str(seed),
                         "--pairing", stats["strategy"], "--near_miss_share", str(stats["near_miss_share"]),
                         *split_flags(splits.validation_size, splits.test_size, splits.seed),
                         "--output_dir", pairs])
    if method == SLOT_SFT:
        common = [*training_inputs(model, args.sft_dataset, SFT_RULE), "--seed", str(seed)]
    else:
        common = [*training_inputs(model, pairs, args.rule), "--seed", str(seed)]
    if method == "grpo_reward_model":
        judge_dir = run_dir / "judge"
        judge_script, judge_recipe, _ = METHODS[JUDGE]
        commands.append([judge_script, "--config", judge_recipe, *common, "--output_dir", str(judge_dir), *extra])
        method_args = (*method_args, "--reward_model", str(judge_dir))
    commands.append([script, *method_args, "--config", recipe, *common, "--output_dir", str(model_dir),
                     *RULE_OVERRIDES.get((method, args.rule), ()), *extra])

    print(f"{method} seed {seed}: training, log in {log}", file=sys.stderr, flush=True)
    seconds = [run_script(command, log) for command in commands]
    print(f"{method} seed {seed}: evaluating", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table
        report = run(EvalArguments(model=str(model_dir), reference=args.base_model, dataset=args.dataset,
                                   split="test", rule=args.rule, num_titles=args.num_titles,
                                   poems_per_title=args.poems_per_title, seeds=1, seed=SAMPLING_SEED,
                                   title_seed=TITLE_SEED, output_dir=str(run_dir / "eval")))
    used = consumed(method, model_dir, judge_dir)
    if first:  # the first stage's pairs count too; an on-policy round adds the poems it sampled for its pairs
        for key, value in first["consumed"].items():
            used[key] = _sum(value, used.get(key, 0))
    if method in ON_POLICY_PAIRS:
        stats = json.loads((run_dir / "pairs" / "stats.json").read_text(encoding="utf-8"))
        used["poems"] = stats["on_policy"]["samples"]
    record = {
        "method": method, "seed": seed, "model": str(model_dir), "eval": str(run_dir / "eval"),
        "train_seconds": seconds[-1], "judge_seconds": seconds[0] if judge_dir else None,
        "pairs_seconds": seconds[0] if method in ON_POLICY_PAIRS else None,
        "first_seconds": first["train_seconds"] if first else None,
        "consumed": used,
        "eval_seconds": report["seconds"],
        "commands": [["python", *command] for command in commands],
    }
    if not args.keep_checkpoints:  # the figures are read: the optimizer states are the bulk of a run on disk
        for directory in (d for d in (model_dir, judge_dir) if d is not None):
            for checkpoint in directory.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
    (run_dir / RUN_RECORD).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    aligned = report["models"]["aligned"]
    print(f"{method} seed {seed}: {_rate(aligned['rule_rate'])}, trained in {seconds_total(record) / 60:.1f} min",
          file=sys.stderr, flush=True)
    return record


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def seconds_total(record: dict) -> float:
    """A run's training minutes, every stage counted: the judge, the first stage, the on-policy pairs' sampling."""
    return record["train_seconds"] + sum(record.get(k) or 0.0 for k in ("judge_seconds", "first_seconds",
                                                                         "pairs_seconds"))


# --- the table ------------------------------------------------------------------------------------------------------


def read_report(record: dict) -> dict:
    path = Path(record["eval"]) / "report.json"
    if not path.is_file():
        raise PoemDPOError(f"{path} is missing: run {record['method']} seed {record['seed']} again (without --resume)")
    return json.loads(path.read_text(encoding="utf-8"))


def pooled_share(reports: list[dict], model: str, key: str) -> float:
    """A per-poem rate of several evaluations (well-formed, degenerate) pooled by their poem counts."""
    models = [r["models"][model] for r in reports]
    return sum(m[key] * m["n_poems"] for m in models) / sum(m["n_poems"] for m in models)


def mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def pooled_kl(kls: list[dict | None]) -> dict | None:
    """KL estimates of several seeds as one over all their poems: the mean weighted by poems, its standard error
    from each seed's (independent samples), per token over all their tokens."""
    if not kls or any(k is None for k in kls):
        return None
    n = sum(k["n"] for k in kls)
    total = sum(k["mean"] * k["n"] for k in kls)
    stderrs = [k["stderr"] for k in kls]
    stderr = None if any(s is None for s in stderrs) else math.sqrt(
        sum((s * k["n"]) ** 2 for s, k in zip(stderrs, kls, strict=True))) / n
    tokens = sum(k["n_tokens"] for k in kls)
    return {"mean": total / n, "stderr": stderr, "per_token": total / tokens if tokens else None, "n": n}


def kl_cell(kl: dict | None) -> str:
    if kl is None:
        return "n/a"
    stderr = "" if kl["stderr"] is None else f" ± {kl['stderr']:.3f}"
    per_token = "" if kl["per_token"] is None else f" ({kl['per_token']:.4f})"
    return f"{kl['mean']:.3f}{stderr}{per_token}"


def consumed_cell(records: list[dict]) -> str:
    parts = []
    for key, unit in (("pairs", "pairs"), ("sft_poems", "corpus poems"), ("poems", "poems"),
                      ("judge_pairs", "judge pairs")):
        if key in records[0]["consumed"]:
            value = mean([r["consumed"][key] for r in records])
            parts.append("n/a" if value is None else f"{value:,.0f} {unit}")
    return " + ".join(parts)


def flipped(test: dict) -> dict:
    """An aligned-vs-reference paired test read the other way round: reference only, aligned only."""
    return {"a_only": test["b_only"], "b_only": test["a_only"]}


def shown(path: str) -> str:
    """A path as the table shows it: relative to the repository when inside it (the table is committed to docs/)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(ROOT))
    return path


def plot_point(name: str, rate: dict, kl: float | None, minutes: float | None) -> dict:
    low, high = rate["ci95"]
    return {"name": name, "rate": rate["rate"], "low": low, "high": high, "kl": kl, "minutes": minutes}


def render(runs: dict[str, list[dict]], args: argparse.Namespace, plot: Path | None = None) -> str:
    """The Markdown: the pooled table (reference row first), then every run; with `plot`, the rule rate against
    KL and against training minutes as a PNG there, linked from the Markdown."""
    reports = {method: [read_report(r) for r in records] for method, records in runs.items()}
    baseline = runs[BASELINE]
    rows = []
    first = reports[BASELINE][0]
    reference = first["models"]["reference"]
    points = [plot_point("reference", reference["rule_rate"], 0.0, 0.0)]
    reference_test = pooled_test([flipped(r["paired_test"]) for r in reports[BASELINE]])
    rows.append(["reference (the base model)", _rate(reference["rule_rate"]), _pct(reference["well_formed_rate"]),
                 _pct(reference["degenerate_rate"]), _num(reference["distinct_2"]),
                 _num(reference["loss_per_char_preferred"]), "0 (itself)", "—", "—", *_paired(reference_test)])
    for method, records in runs.items():
        mine = reports[method]
        test = None if method == BASELINE else pooled_test(
            [compare(r["eval"], b["eval"]) for r, b in zip(records, baseline, strict=True)])
        minutes = mean([seconds_total(r) / 60 for r in records])
        rate = pooled_rule_rate([r["eval"] for r in records])["aligned"]
        kl = pooled_kl([r["models"]["aligned"].get("kl_to_reference") for r in mine])
        points.append(plot_point(method, rate, kl and kl["mean"], minutes))
        rows.append([
            method, _rate(rate),
            _pct(pooled_share(mine, "aligned", "well_formed_rate")),
            _pct(pooled_share(mine, "aligned", "degenerate_rate")),
            _num(mean([r["models"]["aligned"]["distinct_2"] for r in mine])),
            _num(mean([r["models"]["aligned"]["loss_per_char_preferred"] for r in mine])),
            kl_cell(kl),
            f"{minutes:.1f}", consumed_cell(records), *_paired(test),
        ])
    per_run = [[r["method"], r["seed"], _rate(rep["models"]["aligned"]["rule_rate"]),
                kl_cell(rep["models"]["aligned"].get("kl_to_reference")), f"{seconds_total(r) / 60:.1f}",
                consumed_cell([r]), f"`{shown(r['eval'])}`"]
               for method, records in runs.items() for r, rep in zip(records, reports[method], strict=True)]
    seeds = [r["seed"] for r in baseline]
    if plot:
        plot_methods(points, first["rule"], plot)
    lines = [
        "# Methods table (issue #14)",
        "",
        f"- base model (start and reference): `{shown(args.base_model)}`; pairs and test titles: "
        f"`{shown(args.dataset)}`; rule `{first['rule']}`",
        f"- test split: {first['titles_source']}, {args.poems_per_title} poems each, sampling seed {SAMPLING_SEED}: "
        f"the same slots for every run; training seeds {seeds}"
        + (f"; every training run with `{args.extra}`" if args.extra else ""),
        "- each row pools its seeds: strict rate, well-formed and degenerate from pooled counts; distinct-2, loss, "
        "minutes and consumption as means per seed; KL over every seed's poems; the exact McNemar test against dpo "
        "on the discordant slots of every seed (seed s against dpo's seed s)",
        "- KL to reference: mean over the method's own sampled poems of log π(poem) − log π_ref(poem), nats per "
        "poem ± standard error (per token); training minutes: wall time of the training script (grpo_reward_model: "
        "its judge's too; dpo_grpo: the dpo run's too; iterated_dpo: the dpo run's and the sampling of its pairs; "
        "slot_sft_grpo: the slot_sft run's too); consumed: pairs gone through (train_dpo.py), corpus poems read "
        "(train_sft.py), poems written (train_rl.py) or sampled for on-policy pairs",
        "",
        markdown_table([h.format(rule=first["rule"]) for h in HEADER], rows),
        "",
        *([f"![{first['rule']} rate against KL and against training minutes]({plot.name})", ""] if plot else []),
        "## Every run",
        "",
        markdown_table(("method", "training seed", "strict [95% Wilson]", "KL ± s.e. (per token)", "training min",
                        "consumed", "evaluation"), per_run),
        "",
        f"Written by `{' '.join(['python bench/methods_table.py', shlex.join(args.argv)]).strip()}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    extra = shlex.split(args.extra)
    seeds = [args.first_seed + i for i in range(args.seeds)]
    runs: dict[str, list[dict]] = {}
    try:
        for method in args.methods:
            runs[method] = [train_and_evaluate(method, seed, args, extra) for seed in seeds]
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        markdown = render(runs, args, plot=output.with_suffix(".png"))
    except PoemDPOError as e:
        sys.exit(f"methods_table.py: error: {e}")
    output.write_text(markdown, encoding="utf-8")
    print(markdown, end="", flush=True)
    print(f"written to {output}", file=sys.stderr)
    return {"markdown": markdown, "runs": runs, "output": str(output)}


if __name__ == "__main__":
    main()
