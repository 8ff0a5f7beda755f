"""Evaluate an aligned model against its reference: sampled forms, held-out loss, DPO rewards, report.

`evaluate(model_dir, ...)` runs everything and returns the report as a dict; `evaluate.py` is its CLI.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from poemdpo.data.forms import is_strict_five
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.metrics import (
    degenerate_rate,
    distinct_n,
    dpo_reward_stats,
    form_distribution,
    loss_per_character,
    well_formed_rate,
    wilson_interval,
)
from poemdpo.evaluation.plots import plot_form_distribution, plot_training_rewards
from poemdpo.models.generation import default_max_new_tokens, generate_poems

DEFAULT_BETA = 0.1  # TRL's DPOConfig default, used when the model dir records none
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"


class EvaluationError(ValueError):
    """A bad input (missing directory or file, empty split): the CLI prints it and exits."""


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Directory of the aligned model (as saved by train_dpo.py)."})
    reference: str | None = field(
        default=None,
        metadata={"help": "Directory of the reference (pre-DPO) model. Default: the base model recorded in the "
                  "aligned model's adapter_config.json, config.json or model card, if it is an existing directory."},
    )
    dataset: str = field(
        default="data/pairs_five_char", metadata={"help": "DatasetDict directory written by build_dataset.py."}
    )
    split: str = field(default="test", metadata={"help": "Held-out split: its titles, poems and pairs are used."})
    titles: str | None = field(
        default=None, metadata={"help": "Optional text file with one title per line, used with the split's titles."}
    )
    titles_mode: str = field(
        default="add",
        metadata={"help": "add: the file's titles first, then the split's; replace: the file's titles only.",
                  "choices": ["add", "replace"]},
    )
    num_titles: int = field(
        default=300, metadata={"help": "How many titles to sample a poem for (split titles sorted by code point)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (plain sampling, no top-k/p)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest poem sampled, in tokens. Default: each model's generation_config.max_new_tokens "
                  "(else 128), fewer where prompt plus poem would pass its context. A poem cut short counts "
                  "as not well-formed, so a cap below the corpus's long poems would be measured as bad form."},
    )
    batch_size: int = field(default=64, metadata={"help": "Batch size for sampling and for scoring."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (both models use the same one)."})
    beta: float | None = field(
        default=None,
        metadata={"help": f"DPO beta for the implicit rewards. Default: the beta in the model's saved training "
                  f"args ({TRAINING_ARGS}), else {DEFAULT_BETA}."},
    )
    max_eval_pairs: int | None = field(
        default=None, metadata={"help": "Score only the first N pairs / poems of the split (default: all)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest scored sequence in tokens, cut at the end like TRL's keep_start "
                  "(default: the models' max_position_embeddings)."},
    )
    num_samples: int = field(default=10, metadata={"help": "Titles shown side by side in report.md."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write the report (default: <model>/eval)."}
    )


# --- inputs -------------------------------------------------------------------------------------


def _check_model_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise EvaluationError(f"{what} directory {path!r} does not exist")
    if not any((directory / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise EvaluationError(f"{what} directory {path!r} holds no config.json or adapter_config.json")
    return directory


def recorded_base_model(model_dir: str | Path) -> str | None:
    """The base model the aligned model was trained from, as recorded by PEFT, transformers or the model card."""
    model_dir = Path(model_dir)
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        if (model_dir / name).is_file():
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get(key)
            if value:
                return value
    card = model_dir / "README.md"
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
    if base and Path(base).is_dir():
        return base
    raise EvaluationError(
        f"--reference is required: the base model recorded in {args.model!r} is "
        + (f"{base!r}, which is not a local directory" if base else "missing")
    )


def checkpoint_dirs(model_dir: str | Path) -> list[Path]:
    """checkpoint-* subdirectories, latest step last."""
    found = [p for p in Path(model_dir).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_training_file(model_dir: str | Path, name: str) -> Path | None:
    """`name` in the model dir, else in its latest checkpoint that has it."""
    for directory in [Path(model_dir), *reversed(checkpoint_dirs(model_dir))]:
        if (directory / name).is_file():
            return directory / name
    return None


def resolve_beta(args: EvalArguments) -> tuple[float, str]:
    if args.beta is not None:
        return args.beta, "--beta"
    path = find_training_file(args.model, TRAINING_ARGS)
    if path is not None:
        # A pickled DPOConfig that our own training run wrote, hence weights_only=False.
        saved = torch.load(path, weights_only=False)
        if getattr(saved, "beta", None) is not None:
            return float(saved.beta), str(path)
    return DEFAULT_BETA, "default"


def load_split(args: EvalArguments) -> Dataset:
    if not Path(args.dataset).is_dir():
        raise EvaluationError(
            f"dataset directory {args.dataset!r} does not exist; build it with: "
            f"python build_dataset.py --output_dir {args.dataset}"
        )
    try:
        dataset = load_from_disk(args.dataset)
    except FileNotFoundError as e:
        raise EvaluationError(f"dataset directory {args.dataset!r} holds no saved dataset ({e})") from None
    if not isinstance(dataset, DatasetDict) or args.split not in dataset:
        raise EvaluationError(f"dataset {args.dataset!r} has no {args.split!r} split")
    return dataset[args.split]


def select_titles(args: EvalArguments, split: Dataset) -> list[str]:
    """File titles (if any) then the split's unique titles in code-point order, deduplicated, cut at num_titles."""
    from_file: list[str] = []
    if args.titles:
        path = Path(args.titles)
        if not path.is_file():
            raise EvaluationError(f"titles file {args.titles!r} does not exist")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from_split = sorted(set(split["title"])) if args.titles_mode == "add" or not args.titles else []
    titles = list(dict.fromkeys(from_file + from_split))[: args.num_titles]
    if not titles:
        raise EvaluationError("no titles to sample poems for")
    return titles


def held_out_poems(split: Dataset, limit: int | None) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, poems) of the split's 五言 poems (chosen column) and other poems (rejected column).

    Each poem is paired with its own title (a rejected poem with `rejected_title`, not the pair's
    prompt) and counted once, though a rejected poem can sit in several pairs.
    """
    groups = {"five": ("title", "chosen"), "other": ("rejected_title", "rejected")}
    result = {}
    for name, (title_col, poem_col) in groups.items():
        unique = list(dict.fromkeys(zip(split[title_col], split[poem_col], strict=True)))[:limit]
        result[name] = ([build_prompt(t) for t, _ in unique], [p for _, p in unique])
    return result


def load_model(path: str):
    """A causal LM and its tokenizer from a directory; a PEFT adapter dir loads onto its base model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


# --- metrics ------------------------------------------------------------------------------------


def sample_metrics(poems: list[str]) -> dict:
    n = len(poems)
    successes = sum(is_strict_five(p) for p in poems)
    low, high = wilson_interval(successes, n)
    return {
        "n_poems": n,
        "strict_five": {"count": successes, "rate": successes / n, "ci95": [low, high]},
        "well_formed_rate": well_formed_rate(poems),
        "degenerate_rate": degenerate_rate(poems),
        "distinct_1": distinct_n(poems, 1),
        "distinct_2": distinct_n(poems, 2),
        "form_distribution": form_distribution(poems),
    }


def loss_metrics(model, tokenizer, held_out: dict, args: EvalArguments, max_length: int | None) -> dict:
    return {
        f"loss_per_char_{name}": loss_per_character(
            model, tokenizer, prompts, poems, args.batch_size, max_length=max_length, progress=True,
            desc=f"loss on {name} poems",
        )
        for name, (prompts, poems) in held_out.items()
    } | {f"n_held_out_{name}": len(poems) for name, (_, poems) in held_out.items()}


def training_log(model_dir: str) -> tuple[list[dict], str | None]:
    path = find_training_file(model_dir, TRAINER_STATE)
    if path is None:
        return [], None
    return json.loads(path.read_text(encoding="utf-8")).get("log_history", []), str(path)


# --- report -------------------------------------------------------------------------------------


def _cell(poem: str) -> str:
    text = poem.strip().replace("|", "\\|").replace("\n", "<br>")
    return text or "*(empty)*"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_report(report: dict) -> str:
    aligned, reference = report["models"]["aligned"], report["models"]["reference"]

    def five(m: dict) -> str:
        s = m["strict_five"]
        return f"{_pct(s['rate'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]"

    def shares(m: dict, *cells: tuple[str, str | None]) -> str:
        dist = m["form_distribution"]
        return " / ".join(_pct(dist["rates"][a][b] if b else dist["meter_rates"][a]) for a, b in cells)

    both = (aligned, reference)
    rows = [
        ("strict 五言 rate [95% Wilson CI]", five(aligned), five(reference)),
        ("五言绝句 / 五言律诗", *(shares(m, ("五言", "绝句"), ("五言", "律诗")) for m in both)),
        ("七言 / 杂言", *(shares(m, ("七言", None), ("杂言", None)) for m in both)),
        ("well-formed rate", _pct(aligned["well_formed_rate"]), _pct(reference["well_formed_rate"])),
        ("degenerate rate", _pct(aligned["degenerate_rate"]), _pct(reference["degenerate_rate"])),
        ("distinct-1 / distinct-2", *(f"{m['distinct_1']:.3f} / {m['distinct_2']:.3f}" for m in (aligned, reference))),
        ("held-out loss/char, 五言 poems", *(f"{m['loss_per_char_five']:.3f}" for m in (aligned, reference))),
        ("held-out loss/char, other poems", *(f"{m['loss_per_char_other']:.3f}" for m in (aligned, reference))),
    ]
    rewards, settings = report["rewards"], report["settings"]
    lines = [
        "# Evaluation report",
        "",
        f"- aligned model: `{report['model']}`",
        f"- reference model: `{report['reference']}`",
        f"- dataset: `{report['dataset']}` (split `{settings['split']}`)",
        f"- sampling: {settings['num_titles']} titles, temperature {settings['temperature']}, "
        f"max_new_tokens {report['models']['aligned']['max_new_tokens']} (aligned) / "
        f"{report['models']['reference']['max_new_tokens']} (reference), seed {settings['seed']}, no top-k/top-p",
        "",
        "| metric | aligned | reference |",
        "|---|---|---|",
        *(f"| {name} | {a} | {r} |" for name, a, r in rows),
        "",
        f"DPO implicit rewards on {rewards['n_pairs']} held-out pairs (β = {rewards['beta']}, from "
        f"{settings['beta_source']}): reward accuracy **{_pct(rewards['reward_accuracy'])}**, "
        f"mean margin **{rewards['mean_margin']:.3f}** (chosen {rewards['mean_chosen_reward']:.3f}, "
        f"rejected {rewards['mean_rejected_reward']:.3f}).",
        "",
        "Loss per character = summed NLL of poem tokens and eos / poem characters (newlines and punctuation "
        "included), each poem under its own title.",
        "",
        "## Plots",
        "",
    ]
    for name, plot in report["plots"].items():
        lines.append(f"![{name}]({plot})" if plot.endswith(".png") else f"- {name}: {plot}")
    lines += ["", "## Sample poems", "", "| title | aligned | reference |", "|---|---|---|"]
    lines += [f"| {_cell(s['title'])} | {_cell(s['aligned'])} | {_cell(s['reference'])} |" for s in report["samples"]]
    return "\n".join(lines) + "\n"


def headline(report: dict) -> str:
    out = []
    for name in ("aligned", "reference"):
        m = report["models"][name]
        s = m["strict_five"]
        out.append(
            f"{name:9s} strict 五言 {_pct(s['rate'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]  "
            f"degenerate {_pct(m['degenerate_rate'])}  distinct-2 {m['distinct_2']:.3f}  "
            f"loss/char 五言 {m['loss_per_char_five']:.3f} other {m['loss_per_char_other']:.3f}"
        )
    r = report["rewards"]
    out.append(f"rewards   accuracy {_pct(r['reward_accuracy'])}  mean margin {r['mean_margin']:.3f}  (β={r['beta']})")
    return "\n".join(out)


# --- the whole run ------------------------------------------------------------------------------


def run(args: EvalArguments) -> dict:
    """Evaluate per `args`, write report.json / report.md / poems.jsonl / PNGs, return the report."""
    start = time.perf_counter()
    _check_model_dir(args.model, "model")
    args.reference = resolve_reference(args)
    _check_model_dir(args.reference, "reference model")
    split = load_split(args)
    titles = select_titles(args, split)
    beta, beta_source = resolve_beta(args)
    output_dir = Path(args.output_dir or Path(args.model) / "eval")
    output_dir.mkdir(parents=True, exist_ok=True)

    policy, policy_tok = load_model(args.model)
    reference, reference_tok = load_model(args.reference)
    max_length = args.max_length or min(
        getattr(m.config, "max_position_embeddings", None) or 10**9 for m in (policy, reference)
    )
    held_out = held_out_poems(split, args.max_eval_pairs)
    models, poems = {}, {}
    for name, model, tokenizer in (("aligned", policy, policy_tok), ("reference", reference, reference_tok)):
        print(f"evaluating the {name} model")
        max_new_tokens = default_max_new_tokens(model, args.max_new_tokens)
        poems[name] = generate_poems(
            model, tokenizer, titles, temperature=args.temperature, max_new_tokens=max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, progress=True,
        )
        models[name] = (
            sample_metrics(poems[name])
            | loss_metrics(model, tokenizer, held_out, args, max_length)
            | {"max_new_tokens": max_new_tokens}
        )
    pairs = split.select(range(min(len(split), args.max_eval_pairs or len(split))))
    rewards = dpo_reward_stats(
        policy, reference, policy_tok, pairs, beta, batch_size=args.batch_size, max_length=max_length, progress=True
    )

    plots = {"form distribution": plot_form_distribution(
        {k: m["form_distribution"] for k, m in models.items()}, output_dir / "form_distribution.png"
    ).name}
    log_history, state_path = training_log(args.model)
    reward_plot = plot_training_rewards(log_history, output_dir / "training_rewards.png")
    plots["training rewards"] = reward_plot.name if reward_plot else (
        f"skipped: no reward entries in {state_path}" if state_path
        else f"skipped: no {TRAINER_STATE} in {args.model} or its checkpoints"
    )

    with (output_dir / "poems.jsonl").open("w", encoding="utf-8") as f:
        for i, title in enumerate(titles):
            row = {"title": title, **{name: poems[name][i] for name in poems}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = {
        "model": args.model,
        "reference": args.reference,
        "dataset": args.dataset,
        "settings": asdict(args) | {
            "beta": beta, "beta_source": beta_source, "max_length": max_length, "num_titles": len(titles),
            "top_k": 0, "top_p": 1.0, "do_sample": True,
        },
        "models": models,
        "rewards": rewards,
        "trainer_state": state_path,
        "plots": plots,
        "samples": [{"title": t, "aligned": poems["aligned"][i], "reference": poems["reference"][i]}
                    for i, t in enumerate(titles[: args.num_samples])],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (output_dir / "report.md").write_text(markdown_report(report), encoding="utf-8")
    report["output_dir"] = str(output_dir)
    return report


def evaluate(model: str, reference: str | None = None, **options) -> dict:
    """Evaluate the aligned model in `model` against `reference`; options are `EvalArguments` fields."""
    return run(EvalArguments(model=model, reference=reference, **options))
