"""DPO set-up around TRL's `DPOTrainer`: arguments, checks that TRL leaves as warnings, data and models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, ModelConfig
from trl.data_utils import _tokenize, common_prefix_length

from poemdpo.data.dataset import load_pairs_dir
from poemdpo.data.prompts import conversational, title_of
from poemdpo.data.rules import RULES
from poemdpo.data.splits import SplitSpec, check_same_splits
from poemdpo.errors import PoemDPOError
from poemdpo.models import loading
from poemdpo.run_info import parse_resume, recorded_splits
from poemdpo.training.recipe import argument_keys

DEFAULT_DATASET = "data/pairs_five_char"
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")

# Keys that older TRL releases (or other tutorials) take and TRL 1.x no longer does: say what to do instead.
REMOVED_KEYS = {
    "max_prompt_length": "TRL 1.x truncates prompt+completion together: set max_length only",
    "max_completion_length": "TRL 1.x truncates prompt+completion together: set max_length only",
    "rpo_alpha": "use loss_type: [sigmoid, sft] with loss_weights: [1.0, <alpha>]",
    "generate_during_eval": "poem-dpo's sample callback writes poems during training: see sample_titles",
    "warmup_ratio": "TrainingArguments in transformers 5 takes warmup_steps only",
    "reference_free": "no longer supported by TRL's DPOTrainer",
    "force_use_ref_model": "the reference model is always used; pass use_peft: false for a separate copy",
}


@dataclass
class DPOScriptArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "A DatasetDict saved by build_dataset.py (a directory), or a Hub dataset name."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Held-out split to evaluate on while training and to take sample titles from. validation: "
                  "the test split stays unseen by every choice made while training (evaluate.py reports on it)."},
    )
    max_train_pairs: int | None = field(
        default=None, metadata={"help": "Train on the first N pairs of the (shuffled) train split; all if unset."}
    )
    max_eval_pairs: int | None = field(default=256, metadata={"help": "Evaluate on the first N test pairs."})
    rule: str | None = field(
        default=None,
        metadata={"help": "The preference rule, for the sample metric (default: read from the dataset's stats.json, "
                  "else five_char).", "choices": sorted(RULES)},
    )
    sample_titles: int = field(
        default=32,
        metadata={"help": "Titles to write poems for while training (0: none): the chapter's 春夜喜雨 first, then "
                  "held-out titles."},
    )
    sample_table_rows: int = field(
        default=6, metadata={"help": "How many of those poems to print side by side with the reference's."}
    )
    sample_every_steps: int | None = field(
        default=None, metadata={"help": "Write sample poems every N steps (default: eval_steps), and at the end."}
    )
    sample_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Length limit of a sample poem, in tokens. Default: the model's "
                  "generation_config.max_new_tokens (else 128), fewer where a poem would pass its context "
                  "(as evaluate.py)."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "instruction: the seed's <INS>..<RES> prompts; chat: conversational rows through the "
                  "tokenizer's chat template; auto: chat when the tokenizer has a template.",
                  "choices": ["auto", "instruction", "chat"]},
    )
    boundary_check_rows: int = field(
        default=256, metadata={"help": "Rows checked for prompt/completion token boundaries before training."}
    )
    drop_truncated_pairs: bool = field(
        default=True,
        metadata={"help": "Leave out train pairs whose prompt + chosen or prompt + rejected (eos included) is longer "
                  "than max_length, before the max_train_pairs are drawn. TRL cuts such a poem's end off, so the "
                  "model would be taught a preferred poem that never ends."},
    )


def check_removed_keys(argv: list[str], config_class: type = DPOConfig) -> None:
    """Refuse keys TRL 1.x dropped, in the recipe or on the command line, with what to use instead."""
    known = {f.name for f in fields(config_class)}
    name = config_class.__name__.removesuffix("Config")
    for key in sorted(argument_keys(argv)):
        if key in REMOVED_KEYS and key not in known:
            raise PoemDPOError(f"{key!r} is not a {name} setting in TRL 1.x: {REMOVED_KEYS[key]}")


def check_settings(args: DPOConfig, script_args: DPOScriptArguments) -> None:
    """Settings TRL accepts but ignores, or that cannot work together (any preference config: poemdpo.training.methods
    checks each method's own)."""
    if getattr(args, "padding_free", False):
        raise PoemDPOError(
            "padding_free: true is ignored by TRL 1.x's DPOTrainer (it falls back to padding); remove it"
        )
    if script_args.sample_titles < 0 or script_args.sample_table_rows < 0:
        raise PoemDPOError("sample_titles and sample_table_rows must be >= 0")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise PoemDPOError(f"{name} must be at least 1, got {getattr(args, name)}")
    args.resume_from_checkpoint = parse_resume(args.resume_from_checkpoint)


def load_pairs(script_args: DPOScriptArguments) -> tuple[DatasetDict, dict]:
    """The preference DatasetDict and its build statistics (empty for a Hub dataset)."""
    name = script_args.dataset_name
    if os.path.isdir(name):
        dataset, stats = load_pairs_dir(name)
    elif loading.looks_local(name):
        raise PoemDPOError(
            f"dataset {name!r} does not exist; build it with: python build_dataset.py --output_dir {name}"
        )
    else:
        try:
            dataset, stats = load_dataset(name), {}
        except Exception as e:  # offline, unknown repo, no access: many exception classes
            raise PoemDPOError(f"could not load dataset {name!r} from the Hub: {type(e).__name__}: {e}") from None
    if not isinstance(dataset, DatasetDict):
        raise PoemDPOError(f"dataset {name!r} is a single split; expected a DatasetDict with train and held-out splits")
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset:
            raise PoemDPOError(f"dataset {name!r} has no split {split!r}; it has {sorted(dataset)}")
        if len(dataset[split]) == 0:
            raise PoemDPOError(f"dataset {name!r} split {split!r} is empty")
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset[split].column_names]
        if missing:
            raise PoemDPOError(
                f"dataset {name!r} split {split!r} lacks column(s) {missing}; it has {dataset[split].column_names}"
            )
    return dataset, stats


def check_splits_match(stats: dict, model_name_or_path: str, dataset_name: str) -> SplitSpec | None:
    """The pairs and the base model must hold out the same titles; returns the pairs' split."""
    splits = SplitSpec.from_dict(stats.get("splits"))
    check_same_splits(splits, recorded_splits(model_name_or_path), f"base model {model_name_or_path!r} "
                      f"(its poemdpo.json), used with dataset {dataset_name!r},")
    return splits


def held_out_titles(dataset: Dataset, n: int, first: list[str]) -> list[str]:
    """`first` (the chapter's 春夜喜雨), then held-out titles in code-point order, `n` in all.

    A dataset without a `title` column (TRL's plain prompt/chosen/rejected) gives the titles its prompts carry.
    """
    if n == 0:
        return []
    if "title" in dataset.column_names:
        found = dataset["title"]
    else:
        found = [t for t in (title_of(p) for p in dataset["prompt"] if isinstance(p, str)) if t]
    return list(dict.fromkeys([*first, *sorted(set(found))]))[:n]


def drop_truncated(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None,
                   chat: bool = False) -> Dataset:
    """The pairs whose prompt + chosen and prompt + rejected both fit in `max_length` tokens, counted as TRL's
    DPOTrainer tokenizes them (an eos appended to plain-text completions; chat rows through the template)."""
    if max_length is None:
        return dataset

    def longest(rows: dict) -> list[int]:
        """prompt + the longer completion, in tokens, for each row of a batch."""
        completions = ("chosen", "rejected")
        if chat:  # through the chat template, as TRL tokenizes conversational rows
            turns = [_chat_row(dict(zip(rows, values, strict=True))) for values in zip(*rows.values(), strict=True)]
            return [max(len(_tokenize(tokenizer, turn["prompt"] + turn[c])["input_ids"]) for c in completions)
                    for turn in turns]
        eos = tokenizer.eos_token or ""  # TRL appends it to plain-text completions, then calls the tokenizer
        texts = {c: [p + text + eos for p, text in zip(rows["prompt"], rows[c], strict=True)] for c in completions}
        lengths = [[len(ids) for ids in tokenizer(texts[c], verbose=False)["input_ids"]] for c in completions]
        return [max(pair) for pair in zip(*lengths, strict=True)]

    def fits(rows: dict) -> list[bool]:
        return [n <= max_length for n in longest(rows)]

    kept = dataset.filter(fits, batched=True, desc=f"pairs within max_length {max_length}")
    if len(kept) == 0:
        raise PoemDPOError(f"no pair fits in max_length {max_length} tokens; raise max_length or set "
                           "drop_truncated_pairs: false")
    return kept


def select_pairs(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def load_tokenizer(model_args: ModelConfig) -> PreTrainedTokenizerBase:
    return loading.load_tokenizer(
        model_args.model_name_or_path, revision=model_args.model_revision,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),
    )


def load_policy(model_args: ModelConfig):
    """The policy, from a local directory or a Hub name, in the recipe's dtype; the Trainer places it."""
    return loading.load_causal_lm(
        model_args.model_name_or_path, dtype=model_args.dtype, revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),
    )


def load_frozen_reference(model_args: ModelConfig):
    """An explicit frozen copy of the starting model, loaded from the same weights."""
    reference = load_policy(model_args)
    reference.requires_grad_(False)
    return reference.eval()


def use_chat_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> bool:
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise PoemDPOError("prompt_format: chat needs a tokenizer with a chat template, and this one has none")
    return prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))


def to_conversational(dataset: Dataset) -> Dataset:
    """The same pairs as chat turns, for base models with a chat template."""
    return dataset.map(_chat_row, desc="chat format")


def _chat_row(row: dict) -> dict:
    title = row.get("title") or title_of(row["prompt"])
    if not title:
        raise PoemDPOError(
            f"a chat-format run builds prompts from titles, and this row has no 'title' column and a prompt "
            f"that is not poem-dpo's instruction format: {row['prompt'][:60]!r}"
        )
    return {
        "prompt": conversational(title),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def check_tokenizer_covers(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, rows: int = 64) -> None:
    """Stop when the tokenizer loses the text (the transformers 5 trap: a byte-level class for a char vocab)."""
    sample = dataset.select(range(min(rows, len(dataset))))
    for row in sample:
        if not isinstance(row["prompt"], str):
            return  # conversational rows are the chat template's business
        text = row["prompt"] + row["chosen"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        unknown = sum(i == tokenizer.unk_token_id for i in ids) if tokenizer.unk_token_id is not None else 0
        if len(ids) < 0.2 * len(row["chosen"]) or unknown > 0.5 * len(ids):
            raise PoemDPOError(
                f"the tokenizer ({type(tokenizer).__name__}) turns {text[:40]!r}... into {len(ids)} ids, "
                f"{unknown} of them unknown: it does not cover this text. If the model directory has a custom "
                "tokenizer, check that AutoTokenizer loads it as the class it was saved with."
            )


def check_token_boundaries(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, rows: int) -> None:
    """TRL only warns when the tokenized prompt is not a prefix of prompt+completion; we stop, naming the row."""
    for index, row in enumerate(dataset.select(range(min(rows, len(dataset))))):
        kwargs = {"add_generation_prompt": True} if isinstance(row["prompt"], list) else {}
        prompt_ids = _tokenize(tokenizer, row["prompt"], **kwargs)["input_ids"]
        for column in ("chosen", "rejected"):
            full_ids = _tokenize(tokenizer, row["prompt"] + row[column])["input_ids"]
            if common_prefix_length(prompt_ids, full_ids) < len(prompt_ids):
                raise PoemDPOError(
                    f"row {index}: the tokenized prompt is not a prefix of the tokenized prompt+{column} "
                    f"(prompt ends {tokenizer.decode(prompt_ids[-8:])!r}, prompt+{column} has "
                    f"{tokenizer.decode(full_ids[len(prompt_ids) - 8 : len(prompt_ids)])!r} there). The model would "
                    "train on a context it never sees when writing: usually a chat template that renders the prompt "
                    "differently alone, a tokenizer that adds eos/bos, or tokens merging across the boundary."
                )


def preference_rule(script_args: DPOScriptArguments, stats: dict) -> str:
    return script_args.rule or stats.get("rule") or "five_char"
