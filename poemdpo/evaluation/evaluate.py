"""Evaluate an aligned model against its reference, by a protocol a skeptic accepts.

- Titles: a seeded random sample of the **test** split's titles (validation for recipe choices), drawn from all
  its poems whatever their form, K poems per title and per sampling seed; results overall and by the form of
  the title's own poem (a title whose poem is 七言 is the harder prompt for a 五言 rule).
- Strict counting (`metrics.counts_for_rule`): a poem counts only if it finished with eos, has an even number of
  at least two lines and meets the rule; the unfinished rate is reported on its own.
- Uncertainty: Wilson intervals on pooled counts; an exact McNemar test of aligned against reference on the same
  title and sample slots; `evaluate.py --compare A B` the same test between two evaluations.
- The report follows the rule: held-out loss per character on the poems the rule prefers and on the others; DPO
  rewards computed as the recipe computed them (β and `ld_alpha` from the model's `poemdpo.json`); none for a
  run trained without a reference (SimPO, ORPO).
- How far the aligned model moved: KL(π‖π_ref) estimated on its own sampled poems (`metrics.kl_to_reference`),
  per poem and per token, with its standard error.
Nothing in a model directory is executed: run settings come from plain JSON, never the Trainer's pickles.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset

from poemdpo.data import prosody, rules
from poemdpo.data.dataset import HELD_OUT, load_held_out_poems, load_pairs_dir
from poemdpo.data.forms import classify
from poemdpo.data.prompts import CHAPTER_TITLES, build_prompt, conversational
from poemdpo.data.rules import RULES, preferred
from poemdpo.data.splits import SplitSpec, check_same_splits
from poemdpo.errors import PoemDPOError
from poemdpo.evaluation.metrics import (
    METERS,
    counts_for_rule,
    degenerate_rate,
    distinct_n,
    dpo_reward_stats,
    form_distribution,
    format_p,
    kl_to_reference,
    loss_per_character,
    mcnemar_exact,
    rate_with_interval,
    well_formed_rate,
)
from poemdpo.evaluation.plots import plot_form_distribution, plot_training_rewards
from poemdpo.evaluation.tables import markdown_table
from poemdpo.models.generation import (
    DEFAULT_SAMPLER,
    DROP_FINISHED,
    SAMPLE_BATCH_SIZE,
    SAMPLERS,
    default_max_new_tokens,
    generate_samples,
    overridden_settings,
)
from poemdpo.models.loading import check_model_path, load_for_inference, looks_local
from poemdpo.run_info import read_run_info

DEFAULT_BETA = 0.1  # TRL's DPOConfig default, used when the model records none
# Runs trained with no reference model: their β scales a poem's mean log-prob, not a log-ratio to a reference, so DPO's
# implicit rewards β·log(π/π_ref) would be made up. (DPO, KTO, GRPO and RLOO hold the policy near the reference with
# β: theirs are computed.)
REFERENCE_FREE_STAGES = ("simpo", "orpo")
TRAINER_STATE = "trainer_state.json"
POEMS_FILE = "poems.jsonl"


@dataclass
class EvalArguments:
    model: str | None = field(
        default=None, metadata={"help": "The aligned model: a directory saved by train_dpo.py, or a Hub id."}
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "The reference (pre-alignment) model, directory or Hub id. Default: the base model "
                  "recorded in the aligned model's poemdpo.json, adapter_config.json or model card."},
    )
    dataset: str = field(
        default="data/pairs_five_char", metadata={"help": "Dataset directory written by build_dataset.py."}
    )
    split: str = field(
        default="test",
        metadata={"help": "Held-out split to sample titles from and score poems and pairs of. test for the "
                  "headline; validation for every recipe choice.", "choices": list(HELD_OUT)},
    )
    rule: str | None = field(
        default=None,
        metadata={"help": "The rule to count (default: the aligned model's recorded rule, else the dataset's, else "
                  "five_char).", "choices": sorted(RULES)},
    )
    num_titles: int = field(default=300, metadata={"help": "Titles drawn at random from the split's titles."})
    poems_per_title: int = field(default=4, metadata={"help": "Poems sampled per title and seed (K)."})
    seeds: int = field(default=1, metadata={"help": "Sampling seeds: seed, seed+1, ...; counts are pooled."})
    seed: int = field(default=0, metadata={"help": "First sampling seed (both models use the same seeds)."})
    title_seed: int = field(default=0, metadata={"help": "Seed of the title sample (same titles for every seed)."})
    titles: str | None = field(
        default=None,
        metadata={"help": "A text file of titles, one per line, sampled for instead of the split's (e.g. titles "
                  "from outside the corpus). Their own poems are unknown, so there is no breakdown by form."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (plain sampling)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest poem, in tokens. Default: each model's generation_config.max_new_tokens, cut "
                  "where prompt plus poem would pass its context. A poem that reaches it is unfinished."},
    )
    sampler: str = field(
        default=DEFAULT_SAMPLER,
        metadata={"help": "How each token is drawn: inverse_cdf (fast here) or multinomial (torch.multinomial, as "
                  "transformers draws). The same distribution; different poems for a seed.", "choices": list(SAMPLERS)},
    )
    drop_finished: bool = field(
        default=DROP_FINISHED,
        metadata={"help": "Finished poems leave the sampling batch (faster); false: transformers' generate, which "
                  "keeps them until the batch's longest poem ends, as figures before 2026-11-28 were sampled. The "
                  "same distribution; different poems for a seed."},
    )
    batch_size: int = field(default=64, metadata={"help": "Batch size for scoring (loss per character, rewards)."})
    sample_batch_size: int = field(
        default=SAMPLE_BATCH_SIZE,
        metadata={"help": "Poems sampled at once (a static KV cache makes large batches pay)."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": f"DPO β for the implicit rewards. Default: the one in the model's poemdpo.json, else "
                  f"{DEFAULT_BETA}."},
    )
    max_eval_pairs: int | None = field(
        default=1000, metadata={"help": "Score the first N pairs of the split for rewards (all if unset)."}
    )
    max_held_out_poems: int | None = field(
        default=1000, metadata={"help": "Score the first N preferred and N other held-out poems for loss."}
    )
    max_kl_poems: int | None = field(
        default=1000,
        metadata={"help": "Estimate KL(aligned ‖ reference) on the first N of the aligned model's sampled poems "
                  "(all if unset, none if 0): each is scored by both models."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest scored sequence in tokens, cut at the end like TRL's keep_start (default: the "
                  "models' max_position_embeddings)."},
    )
    num_samples: int = field(default=10, metadata={"help": "Titles shown side by side in report.md."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write the report (default: <model>/eval)."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when present)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let transformers run code shipped with a Hub model. Off unless you pass it."}
    )
    compare: list[str] | None = field(
        default=None,
        metadata={"help": "Two evaluation directories (or report.json files) of runs with the same titles, seeds "
                  "and K: prints the exact McNemar test of their aligned models instead of evaluating.",
                  "nargs": 2},
    )


# --- inputs -------------------------------------------------------------------------------------


def recorded_base_model(model: str) -> str | None:
    """The base model the aligned model was trained from: poemdpo.json, PEFT's adapter config, or the model card."""
    base = read_run_info(model).get("base_model")
    if base:
        return base
    directory = Path(model)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        if base:
            return base
    card = directory / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        value = ModelCard.load(card).data.to_dict().get("base_model")
        if isinstance(value, list):
            value = value[0] if value else None
        return value or None
    return None


def resolve_reference(args: EvalArguments) -> str:
    if args.reference:
        return args.reference
    base = recorded_base_model(args.model)
    if base and (Path(base).is_dir() or not looks_local(base)):
        return base
    raise PoemDPOError(
        f"--reference is required: the base model recorded in {args.model!r} is "
        + (f"{base!r}, which is not a local directory" if base else "missing")
    )


def resolve_training_settings(args: EvalArguments, info: dict) -> dict:
    """β and ld_alpha as the run trained with them, from its poemdpo.json (or --beta); β None for a run with no
    reference model (REFERENCE_FREE_STAGES), which has no DPO rewards to recompute unless --beta asks for them."""
    if args.beta is not None:
        return {"beta": args.beta, "ld_alpha": info.get("ld_alpha"), "source": "--beta"}
    if info.get("stage") in REFERENCE_FREE_STAGES:
        return {"beta": None, "ld_alpha": None,
                "source": f"none: a {info['stage']} run, trained without a reference model"}
    if info.get("beta") is not None:
        return {"beta": float(info["beta"]), "ld_alpha": info.get("ld_alpha"), "source": "poemdpo.json"}
    return {"beta": DEFAULT_BETA, "ld_alpha": None, "source": "default (the model records none)"}


def read_titles_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise PoemDPOError(f"titles file {path!r} does not exist")
    titles = list(dict.fromkeys(line.strip() for line in file.read_text(encoding="utf-8").splitlines()))
    titles = [t for t in titles if t]
    if not titles:
        raise PoemDPOError(f"titles file {path!r} holds no titles")
    return titles


def title_forms(poems: Dataset) -> dict[str, str]:
    """Each title's form: the meter of its poem (the first one, when several poems share a title)."""
    forms: dict[str, str] = {}
    for title, meter in zip(poems["title"], poems["meter"], strict=True):
        forms.setdefault(title, meter)
    return forms


def draw_titles(forms: dict[str, str], n: int, seed: int) -> list[str]:
    """`n` titles drawn at random (seeded) from the split's sorted titles: every title equally likely."""
    if n < 1:
        raise PoemDPOError(f"num_titles must be at least 1, got {n}")
    titles = sorted(forms)
    return random.Random(seed).sample(titles, min(n, len(titles)))


def scoring_rows(chat: bool, titles: list[str], completions: list[str]) -> tuple[list, list]:
    """Prompts and completions as the model was trained on them: the instruction format, or chat turns."""
    if chat:
        return ([conversational(t) for t in titles],
                [[{"role": "assistant", "content": c}] for c in completions])
    return [build_prompt(t) for t in titles], list(completions)


# --- metrics ------------------------------------------------------------------------------------


def sample_metrics(records: list[dict], rule: str, by_form: bool) -> dict:
    """Rates over one model's sampled poems (dicts with text, finished, counts, seed, title_form)."""
    texts = [r["text"] for r in records]
    result = {
        "n_poems": len(records),
        "rule_rate": rate_with_interval(sum(r["counts"] for r in records), len(records)),
        "unfinished": rate_with_interval(sum(not r["finished"] for r in records), len(records)),
        "well_formed_rate": well_formed_rate(texts),
        "degenerate_rate": degenerate_rate(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "form_distribution": form_distribution(texts),
        "by_seed": {},
    }
    for seed in sorted({r["seed"] for r in records}):
        mine = [r for r in records if r["seed"] == seed]
        result["by_seed"][str(seed)] = rate_with_interval(sum(r["counts"] for r in mine), len(mine))
    if by_form:
        result["by_title_form"] = {}
        for meter in METERS:
            mine = [r for r in records if r["title_form"] == meter]
            if mine:
                result["by_title_form"][meter] = rate_with_interval(sum(r["counts"] for r in mine), len(mine))
    return result


def prosody_metrics(records: list[dict]) -> dict:
    """格律 of the sampled poems by the 平水韵 (`poemdpo.data.prosody`): over every poem, the share that is a
    regulated shape (五言/七言, 4 or 8 lines, finished) and passes each check; and the same among those shapes."""
    reports = [rules.prosody_report(r["text"]) for r in records]
    shaped = [rep for rep, r in zip(reports, records, strict=True) if rep.applicable and r["finished"]]
    result = {"applicable": rate_with_interval(len(shaped), len(records))}
    for name in (*prosody.CHECKS, "helv"):
        passed = sum(bool(getattr(rep, name)) for rep in shaped)
        result[name] = rate_with_interval(passed, len(records)) | {"among_applicable": passed / len(shaped)
                                                                   if shaped else None}
    return result


def held_out_loss(model, tokenizer, chat: bool, poems: Dataset, rule: str, limit: int | None, batch_size: int,
                  max_length: int) -> dict:
    """Loss per character on the split's poems the rule prefers, and on the others, each under its own title."""
    groups: dict[str, list[tuple[str, str]]] = {"preferred": [], "other": []}
    for title, poem in zip(poems["title"], poems["poem"], strict=True):
        groups["preferred" if preferred(poem, rule) else "other"].append((title, poem))
    result = {}
    for name, rows in groups.items():
        rows = rows[:limit] if limit else rows
        if not rows:
            result[f"loss_per_char_{name}"], result[f"n_held_out_{name}"] = None, 0
            continue
        prompts, completions = scoring_rows(chat, [t for t, _ in rows], [p for _, p in rows])
        result[f"loss_per_char_{name}"] = loss_per_character(
            model, tokenizer, prompts, completions, batch_size, max_length=max_length, progress=True,
            desc=f"loss on {name} poems",
        )
        result[f"n_held_out_{name}"] = len(rows)
    return result


def sampled_kl(policy, reference, tokenizer, records: list[dict], limit: int | None, temperature: float,
               batch_size: int, max_length: int) -> dict | None:
    """KL(π‖π_ref) on the first `limit` of the aligned model's own poems (`metrics.kl_to_reference`), each under
    the prompt it was sampled with (the chat template when the tokenizer has one, as `generate_samples` does);
    None when `limit` is 0. Records the sampling temperature: only at 1.0 is the mean an estimate of the KL."""
    records = records[:limit] if limit is not None else records
    if not records:
        return None
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts, completions = scoring_rows(chat, [r["title"] for r in records], [r["text"] for r in records])
    kl = kl_to_reference(policy, reference, tokenizer, prompts, completions, [r["finished"] for r in records],
                         batch_size=batch_size, max_length=max_length, progress=True)
    return kl | {"temperature": temperature}


def training_log(model: str) -> tuple[list[dict], str | None]:
    """The Trainer's log history (plain JSON) from the model dir or its latest checkpoint."""
    directory = Path(model)
    if not directory.is_dir():
        return [], None
    checkpoints = sorted((p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]))
    for candidate in [directory, *reversed(checkpoints)]:
        path = candidate / TRAINER_STATE
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("log_history", []), str(path)
    return [], None


# --- report -------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rate(r: dict) -> str:
    return f"{_pct(r['rate'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}] ({r['count']}/{r['n']})"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def kl_text(kl: dict | None) -> str:
    """`0.123 ± 0.004 nats/poem, 0.0021/token (n = 1000)`, or n/a when it was not estimated."""
    if not kl:
        return "n/a"
    stderr = "" if kl["stderr"] is None else f" ± {kl['stderr']:.3f}"
    per_token = "n/a" if kl["per_token"] is None else f"{kl['per_token']:.4f}"
    temperature = kl.get("temperature", 1.0)
    caveat = "" if temperature == 1.0 else f", sampled at temperature {temperature}: not KL(π‖π_ref)"
    return f"{kl['mean']:.3f}{stderr} nats/poem, {per_token}/token (n = {kl['n']}{caveat})"


def markdown_report(report: dict) -> str:
    aligned, reference = report["models"]["aligned"], report["models"]["reference"]
    both = (aligned, reference)
    rule, settings = report["rule"], report["settings"]
    rows = [
        (f"{rule}, strict [95% Wilson CI]", *(_rate(m["rule_rate"]) for m in both)),
        *((f"{rule}, titles whose own poem is {meter}", *(_rate(m["by_title_form"][meter]) for m in both))
          for meter in METERS if meter in aligned.get("by_title_form", {})),
        ("unfinished (no eos within the limit)", *(_rate(m["unfinished"]) for m in both)),
        ("五言 / 七言 / 杂言", *(" / ".join(_pct(m["form_distribution"]["meter_rates"][x]) for x in METERS)
                             for m in both)),
        ("well-formed", *(_pct(m["well_formed_rate"]) for m in both)),
        ("degenerate", *(_pct(m["degenerate_rate"]) for m in both)),
        ("distinct-1 / distinct-2", *(f"{_num(m['distinct_1'])} / {_num(m['distinct_2'])}" for m in both)),
        (f"held-out loss/char, poems {rule} prefers", *(_num(m["loss_per_char_preferred"]) for m in both)),
        ("held-out loss/char, other poems", *(_num(m["loss_per_char_other"]) for m in both)),
        ("KL to the reference on the aligned model's own poems [± s.e.]",
         kl_text(aligned.get("kl_to_reference")), "0 (itself)"),
    ]
    checks = ("applicable", *prosody.CHECKS, "helv")
    labels = {"applicable": "regulated shape (五言/七言, 4 or 8 lines, finished)", **prosody.CHECKS, "helv": "合律"}
    rows += [(f"格律: {labels[name]}",
              *(_pct(m["prosody"][name]["rate"]) + ("" if name == "applicable" else
                f" ({_pct(m['prosody'][name]['among_applicable'])} of those)") for m in both)) for name in checks]
    test = report["paired_test"]
    rewards = report["rewards"]
    lines = [
        "# Evaluation report",
        "",
        f"- aligned model: `{report['model']}`; reference: `{report['reference']}`",
        f"- titles: {report['titles_source']}; {settings['poems_per_title']} poems per title and seed, seeds "
        f"{report['seeds']}, temperature {settings['temperature']}, plain sampling (no top-k/top-p/penalties; "
        f"tokens drawn by {settings.get('sampler', 'multinomial')}"
        + ("; finished poems leave the batch" if settings.get("drop_finished") else "")
        + (f"; overrode the models' own {report['overridden_settings']}" if report["overridden_settings"] else "")
        + ")",
        f"- a poem counts only if it finished (eos), has an even number ≥ 2 of lines and meets `{rule}`",
        "",
        markdown_table(("metric", "aligned", "reference"), rows),
        "",
        f"Aligned against reference on the same {test['n_pairs']} title/seed/sample slots (exact McNemar): aligned "
        f"only {test['a_only']}, reference only {test['b_only']}, p = {format_p(test['p_value'])}.",
        "",
        (f"DPO implicit rewards on {rewards['n_pairs']} {settings['split']} pairs, as the recipe computed them "
         f"(β = {rewards['beta']}, ld_alpha = {rewards['ld_alpha']}, from {report['training_settings']['source']}): "
         f"reward accuracy **{_pct(rewards['reward_accuracy'])}**, mean margin **{rewards['mean_margin']:.3f}** "
         f"(chosen {rewards['mean_chosen_reward']:.3f}, rejected {rewards['mean_rejected_reward']:.3f}).")
        if rewards else f"No DPO implicit rewards ({report['training_settings']['source']}: its β does not scale a "
                        "log-ratio to the reference); `--beta` computes them anyway.",
        "",
        "Loss per character = summed NLL of the poem's tokens and eos / the poem's characters, each poem under "
        "its own title, in the prompt format the model was trained with.",
        "",
        "KL to the reference = the mean over the aligned model's own sampled poems of log π(poem | title) − "
        "log π_ref(poem | title), summed over the poem's tokens and eos when it finished (a Monte-Carlo estimate of "
        "KL(π‖π_ref), unbiased for poems sampled from π at temperature 1); per token = summed log-ratios / tokens.",
        "",
        "## Plots",
        "",
    ]
    for name, plot in report["plots"].items():
        lines.append(f"![{name}]({plot})" if plot.endswith(".png") else f"- {name}: {plot}")
    lines += ["", "## Sample poems (the chapter's title first, not counted; then sampled titles, seed "
              f"{report['seeds'][0]}, first poem)", ""]
    lines.append(markdown_table(("title", "aligned", "reference"),
                                [(s["title"], s["aligned"], s["reference"]) for s in report["samples"]]))
    return "\n".join(lines) + "\n"


def headline(report: dict) -> str:
    out = [f"{report['rule']} on {report['titles_source']}, strict counting:"]
    for name in ("aligned", "reference"):
        m = report["models"][name]
        out.append(
            f"{name:9s} {_rate(m['rule_rate'])}  unfinished {_pct(m['unfinished']['rate'])}  "
            f"well-formed {_pct(m['well_formed_rate'])}  degenerate {_pct(m['degenerate_rate'])}  "
            f"distinct-2 {_num(m['distinct_2'])}  loss/char preferred {_num(m['loss_per_char_preferred'])} "
            f"other {_num(m['loss_per_char_other'])}"
        )
    test, r = report["paired_test"], report["rewards"]
    out.append(f"paired    aligned only {test['a_only']}, reference only {test['b_only']}, McNemar p = "
               f"{format_p(test['p_value'])}")
    out.append(f"rewards   accuracy {_pct(r['reward_accuracy'])}  mean margin {r['mean_margin']:.3f}  "
               f"(β={r['beta']}, ld_alpha={r['ld_alpha']})" if r else
               f"rewards   {report['training_settings']['source']}: no DPO rewards")
    kl = report["models"]["aligned"].get("kl_to_reference")
    if kl:
        out.append(f"KL        aligned ‖ reference {kl_text(kl)}, on the aligned model's own poems")
    return "\n".join(out)


# --- the whole run ------------------------------------------------------------------------------


def sample_records(model, tokenizer, titles: list[str], forms: dict[str, str], args: EvalArguments, rule: str,
                   seeds: list[int], max_new_tokens: int) -> list[dict]:
    records = []
    prompts = [t for t in titles for _ in range(args.poems_per_title)]
    for seed in seeds:
        samples = generate_samples(
            model, tokenizer, prompts, temperature=args.temperature, max_new_tokens=max_new_tokens,
            batch_size=args.sample_batch_size, seed=seed, progress=True, sampler=args.sampler,
            drop_finished=args.drop_finished,
        )
        for i, (title, sample) in enumerate(zip(prompts, samples, strict=True)):
            records.append({
                "title": title, "title_form": forms.get(title), "seed": seed, "k": i % args.poems_per_title,
                "text": sample.text, "finished": sample.finished,
                "counts": counts_for_rule(sample.text, sample.finished, rule),
                "form": classify(sample.text).label,
            })
    return records


def run(args: EvalArguments) -> dict:
    """Evaluate per `args`, write report.json / report.md / poems.jsonl / PNGs, return the report."""
    start = time.perf_counter()
    if not args.model:
        raise PoemDPOError("--model is required (the aligned model's directory or Hub id)")
    if min(args.poems_per_title, args.seeds, args.batch_size, args.sample_batch_size) < 1:
        raise PoemDPOError("poems_per_title, seeds, batch_size and sample_batch_size must each be at least 1")
    if args.max_kl_poems is not None and args.max_kl_poems < 0:
        raise PoemDPOError(f"max_kl_poems must be 0 (no KL estimate) or more, got {args.max_kl_poems}")
    check_model_path(args.model, "aligned model")
    info = read_run_info(args.model)
    args.reference = check_model_path(resolve_reference(args), "reference model")
    if not Path(args.dataset).is_dir():
        raise PoemDPOError(f"dataset directory {args.dataset!r} does not exist; build it with: python "
                           f"build_dataset.py --output_dir {args.dataset}")
    pairs, stats = load_pairs_dir(args.dataset)
    splits = SplitSpec.from_dict(stats.get("splits"))
    for what, path, recorded in (("aligned model", args.model, info),
                                 ("reference model", args.reference, read_run_info(args.reference))):
        check_same_splits(splits, SplitSpec.from_dict(recorded.get("splits")),
                          f"{what} {path!r}, evaluated on dataset {args.dataset!r},")
    if args.split not in pairs:
        raise PoemDPOError(f"dataset {args.dataset!r} has no {args.split!r} split; it has {sorted(pairs)}")
    rule = args.rule or info.get("rule") or stats.get("rule") or "five_char"
    poems = load_held_out_poems(args.dataset, args.split)
    forms = title_forms(poems)
    if args.titles:
        titles, titles_source = read_titles_file(args.titles)[: args.num_titles], f"titles from {args.titles}"
    else:
        titles = draw_titles(forms, args.num_titles, args.title_seed)
        titles_source = f"{len(titles)} random {args.split} titles (title seed {args.title_seed})"
    seeds = list(range(args.seed, args.seed + args.seeds))
    training = resolve_training_settings(args, info)
    output_dir = Path(args.output_dir or Path(args.model) / "eval")
    output_dir.mkdir(parents=True, exist_ok=True)

    policy, policy_tok = load_for_inference(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                                            what="aligned model")
    reference, reference_tok = load_for_inference(args.reference, device=args.device,
                                                  trust_remote_code=args.trust_remote_code, what="reference model")
    if len(policy_tok) != len(reference_tok) or policy_tok.get_vocab() != reference_tok.get_vocab():
        raise PoemDPOError(
            f"the aligned model {args.model!r} and the reference {args.reference!r} have different vocabularies "
            f"({len(policy_tok)} and {len(reference_tok)} tokens): DPO rewards compare log-probs of the same tokens, "
            "so the reference must be the model the aligned one was trained from"
        )
    chat = info.get("prompt_format") == "chat" or (
        info.get("prompt_format") is None and bool(getattr(policy_tok, "chat_template", None))
    )
    max_length = args.max_length or min(
        getattr(m.config, "max_position_embeddings", None) or 10**9 for m in (policy, reference)
    )

    models, records, chapter = {}, {}, {}
    for name, model, tokenizer in (("aligned", policy, policy_tok), ("reference", reference, reference_tok)):
        print(f"evaluating the {name} model")
        max_new_tokens = default_max_new_tokens(model, args.max_new_tokens)
        records[name] = sample_records(model, tokenizer, titles, forms, args, rule, seeds, max_new_tokens)
        chapter[name] = generate_samples(model, tokenizer, list(CHAPTER_TITLES), temperature=args.temperature,
                                         max_new_tokens=max_new_tokens, seed=seeds[0], sampler=args.sampler,
                                         drop_finished=args.drop_finished)
        models[name] = (
            sample_metrics(records[name], rule, by_form=not args.titles)
            | {"prosody": prosody_metrics(records[name])}
            | held_out_loss(model, tokenizer, chat, poems, rule, args.max_held_out_poems, args.batch_size, max_length)
            | {"max_new_tokens": max_new_tokens}
        )
    models["aligned"]["kl_to_reference"] = sampled_kl(
        policy, reference, policy_tok, records["aligned"], args.max_kl_poems, args.temperature, args.batch_size,
        max_length,
    )
    pair_rows = pairs[args.split].select(range(min(len(pairs[args.split]), args.max_eval_pairs or 10**9)))
    prompts, chosen = scoring_rows(chat, pair_rows["title"], pair_rows["chosen"])
    _, rejected = scoring_rows(chat, pair_rows["title"], pair_rows["rejected"])
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    rewards = None if training["beta"] is None else dpo_reward_stats(
        policy, reference, policy_tok, rows, training["beta"], ld_alpha=training["ld_alpha"],
        batch_size=args.batch_size, max_length=max_length, progress=True)
    paired = mcnemar_exact([r["counts"] for r in records["aligned"]], [r["counts"] for r in records["reference"]])

    plots = {"form distribution": plot_form_distribution(
        {k: m["form_distribution"] for k, m in models.items()}, output_dir / "form_distribution.png"
    ).name}
    log_history, state_path = training_log(args.model)
    reward_plot = plot_training_rewards(log_history, output_dir / "training_rewards.png")
    plots["training rewards"] = reward_plot.name if reward_plot else (
        f"skipped: no reward entries in {state_path}" if state_path
        else f"skipped: no {TRAINER_STATE} in {args.model} or its checkpoints"
    )

    with (output_dir / POEMS_FILE).open("w", encoding="utf-8") as f:
        for a, r in zip(records["aligned"], records["reference"], strict=True):
            row = {key: a[key] for key in ("title", "title_form", "seed", "k")}
            row |= {name: {key: rec[key] for key in ("text", "finished", "counts", "form")}
                    for name, rec in (("aligned", a), ("reference", r))}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    first = [(a, r) for a, r in zip(records["aligned"], records["reference"], strict=True)
             if a["seed"] == seeds[0] and a["k"] == 0][: args.num_samples]
    samples = [{"title": t, "aligned": chapter["aligned"][i].text, "reference": chapter["reference"][i].text,
                "counted": False} for i, t in enumerate(CHAPTER_TITLES)]
    samples += [{"title": a["title"], "aligned": a["text"], "reference": r["text"], "counted": True} for a, r in first]
    report = {
        "model": args.model,
        "reference": args.reference,
        "dataset": args.dataset,
        "rule": rule,
        "splits": splits.to_dict() if splits else None,
        "titles_source": titles_source,
        "titles": titles,
        "seeds": seeds,
        "settings": asdict(args) | {"max_length": max_length, "top_k": 0, "top_p": 1.0, "do_sample": True},
        "overridden_settings": {name: found for name, m in (("aligned", policy), ("reference", reference))
                                if (found := overridden_settings(m))},
        "training_settings": training,
        "prompt_format": "chat" if chat else "instruction",
        "models": models,
        "paired_test": paired,
        "rewards": rewards,
        "trainer_state": state_path,
        "plots": plots,
        "samples": samples,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (output_dir / "report.md").write_text(markdown_report(report), encoding="utf-8")
    report["output_dir"] = str(output_dir)
    return report


# --- comparing two evaluations ------------------------------------------------------------------


def _eval_dir(path: str) -> Path:
    directory = Path(path)
    directory = directory.parent if directory.name == "report.json" else directory
    if not (directory / POEMS_FILE).is_file():
        raise PoemDPOError(f"{path!r} is not an evaluation directory: it has no {POEMS_FILE}")
    return directory


def compare(a: str, b: str) -> dict:
    """Exact McNemar test of two evaluations' aligned models on the same title/seed/sample slots."""
    outcomes = []
    for path in (a, b):
        with (_eval_dir(path) / POEMS_FILE).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        outcomes.append({(r["title"], r["seed"], r["k"]): r["aligned"]["counts"] for r in rows})
    if set(outcomes[0]) != set(outcomes[1]):
        raise PoemDPOError(
            f"{a!r} and {b!r} sampled different titles, seeds or poems per title ({len(outcomes[0])} and "
            f"{len(outcomes[1])} slots): evaluate both with the same --split, --num_titles, --title_seed, --seeds "
            "and --poems_per_title"
        )
    keys = sorted(outcomes[0])
    return mcnemar_exact([outcomes[0][k] for k in keys], [outcomes[1][k] for k in keys])


def pooled_rule_rate(paths: list[str]) -> dict:
    """Counts of several evaluations (e.g. 3 base retrains × 3 seeds) pooled into one rate with its interval."""
    reports = [json.loads((_eval_dir(p) / "report.json").read_text(encoding="utf-8")) for p in paths]
    pooled = {}
    for name in ("aligned", "reference"):
        rates = [r["models"][name]["rule_rate"] for r in reports]
        pooled[name] = rate_with_interval(sum(r["count"] for r in rates), sum(r["n"] for r in rates))
    return pooled
