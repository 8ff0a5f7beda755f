"""Supervised fine-tuning with some tokens weighted up: TRL's SFTTrainer, the loss a weighted mean per token.

The rhyme road (docs/prosody.md, "A model that rhymes") needs it. In plain fine-tuning a rhyme slot is one token in
twenty-five, and a base model stays blind to rhyme. With the slots after line 2 weighted ×100, line 4 follows
line 2's group (rhyme probe shift +28.9 points), and GRPO can then select rhyme. Each example carries a
`loss_weights` column beside `input_ids` and `labels`: 0 on the prompt, 1 on the poem and eos, `slot_weight` on
the last character of lines 4, 6 and 8. With every weight 1 the loss is SFTTrainer's own (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from poemdpo.data.pairs import line_end_positions
from poemdpo.data.rules import RULES
from poemdpo.errors import PoemDPOError
from poemdpo.training.model_card import card_metadata, card_results, prompt_section
from poemdpo.training.speed import use_compact_lm_head

DEFAULT_DATASET = "data/pairs_rhyme"
# Hyperparameters a reader needs to re-run the recipe.
CARD_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "max_grad_norm",
                 "max_length", "bf16", "seed")
# Recorded in poemdpo.json; the pipeline reuses a fine-tune only if these match its recipe.
RECORDED_SETTINGS = ("slot_weight", "num_train_epochs", "learning_rate")


@dataclass
class SFTScriptArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Preference pairs (build_dataset.py's directory, or a Hub dataset with prompt/chosen): "
                  "the chosen poems are the training poems, each once. The rhyme road trains on the rhyme rule's "
                  "pairs (python build_dataset.py --rule rhyme --output_dir data/pairs_rhyme): rhyming 五言 and "
                  "七言 poems, twice the rhyme slots of the 五言 ones alone."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split whose chosen poems are trained on."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Split whose chosen poems give the held-out weighted loss (with eval_strategy != no)."},
    )
    slot_weight: float = field(
        default=100.0,
        metadata={"help": "Loss weight of a rhyme slot after line 2: the last character of lines 4, 6 and 8, which "
                  "line 2 has already fixed. Every other poem token and the eos weigh 1, the prompt 0. 1 is plain "
                  "fine-tuning on the chosen poems (the control)."},
    )
    max_train_poems: int | None = field(
        default=None, metadata={"help": "Train on the first N poems (in the dataset's order); all if unset."}
    )
    max_eval_poems: int | None = field(default=512, metadata={"help": "Held-out poems for the evaluation loss."})
    rule: str | None = field(
        default=None,
        metadata={"help": "The rule the poems follow, recorded in the card (default: the dataset's stats.json).",
                  "choices": sorted(RULES)},
    )


def rhyme_slots(poem: str) -> list[int]:
    """Where the rhyme slots after line 2 sit in `poem`: the last character of lines 4, 6 and 8 (…)."""
    return line_end_positions(poem)[3::2]


def recorded_settings(script_args: SFTScriptArguments, args: SFTConfig) -> dict:
    """The RECORDED_SETTINGS of a run, from its script arguments or its SFTConfig."""
    return {key: getattr(script_args if hasattr(script_args, key) else args, key) for key in RECORDED_SETTINGS}


def weighted_example(tokenizer: PreTrainedTokenizerBase, prompt: str, poem: str, slot_weight: float) -> dict:
    """`input_ids` (prompt + poem + eos), `labels` (-100 on the prompt) and per-token `loss_weights`.

    Slots are found through the tokenizer's character offsets, so a token holding a slot character weighs
    `slot_weight` whatever the tokenizer (a fast one is needed for the offsets)."""
    if not tokenizer.is_fast:
        raise PoemDPOError(f"{type(tokenizer).__name__} gives no character offsets: the loss weights need a fast "
                           "tokenizer")
    enc = tokenizer(prompt + poem, add_special_tokens=False, return_offsets_mapping=True)
    slots = [len(prompt) + i for i in rhyme_slots(poem)]
    ids, weights = list(enc["input_ids"]), []
    for start, end in enc["offset_mapping"]:
        if start < len(prompt):
            weights.append(0.0)
        elif any(start <= s < end for s in slots):
            weights.append(float(slot_weight))
        else:
            weights.append(1.0)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    return {"input_ids": ids, "labels": [i if w > 0 else -100 for i, w in zip(ids, weights, strict=True)],
            "loss_weights": weights}


def poems_dataset(pairs: Dataset, tokenizer: PreTrainedTokenizerBase, slot_weight: float,
                  max_poems: int | None = None) -> Dataset:
    """The pairs' chosen poems, each once (a poem is chosen in several pairs), tokenized with their weights."""
    missing = {"prompt", "chosen"} - set(pairs.column_names)
    if missing:
        raise PoemDPOError(f"the dataset lacks column(s) {sorted(missing)}; it has {pairs.column_names}")
    poems = list(dict.fromkeys(zip(pairs["prompt"], pairs["chosen"], strict=True)))[:max_poems]
    if not poems:
        raise PoemDPOError("the dataset split holds no chosen poems to train on")
    if not all(isinstance(p, str) and isinstance(c, str) for p, c in poems[:8]):
        raise PoemDPOError("train_sft.py takes plain-text prompt/chosen columns (build_dataset.py's format), not "
                           "conversational ones")
    return Dataset.from_list([weighted_example(tokenizer, p, c, slot_weight) for p, c in poems])


@dataclass
class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's collator, with `loss_weights` padded (0) beside `input_ids` and `labels`."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        weights = torch.zeros(output["input_ids"].shape, dtype=torch.float32)
        for row, example in enumerate(examples):
            w = example["loss_weights"][: weights.shape[1]]
            weights[row, : len(w)] = torch.tensor(w, dtype=torch.float32)
        output["loss_weights"] = weights
        return output


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is Σ w·nll / Σ w over a micro-batch's tokens (w: the `loss_weights` column).

    The mean is per micro-batch, so the Trainer divides by the accumulation steps (`loss_is_scaled_for_ga`).
    Logged beside the loss: the mean nll of the weighted-up tokens and of the others.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        processing_class = kwargs["processing_class"]
        kwargs.setdefault("data_collator", WeightedCollator(pad_token_id=processing_class.pad_token_id))
        super().__init__(*args, **kwargs)
        # Off CUDA only the poem positions go through the LM head, in one matmul: no prompt or padding positions.
        self.compact_lm_head = use_compact_lm_head(self, outputs=("log_probs",))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "loss_weights" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "loss_weights"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weights = inputs.pop("loss_weights")[:, 1:]
        # The LM head SFTTrainer set up (TRL's fused one; on a CPU the compact one): per-token log-probs of the
        # labelled positions, [batch, seq - 1], 0 elsewhere, where every labelled position has a weight > 0.
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        nll = -outputs.log_probs
        loss = (nll * weights).sum() / weights.sum().clamp(min=1e-8)
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            for name, where in (("nll_weighted_up", weights > 1), ("nll_other", (weights > 0) & (weights <= 1))):
                if where.any():
                    self._metrics[mode][name].append(nll[where].mean().item())
        return (loss, outputs) if return_outputs else loss


def write_sft_card(output_dir: str | Path, *, base_model: str, dataset: str, rule: str, args: SFTConfig,
                   script_args: SFTScriptArguments, poems: int, metrics: dict, tokenizer) -> Path:
    settings = {key: getattr(args, key) for key in CARD_SETTINGS if hasattr(args, key)}
    settings["slot_weight"] = script_args.slot_weight
    metadata = card_metadata(base_model, dataset, use_peft=False)
    metadata["tags"] = ["trl", "sft", "poem-dpo", "poetry"]
    header = yaml.safe_dump(metadata, allow_unicode=True, sort_keys=False)
    card = f"""---
{header}---
# {Path(output_dir).name}

A causal LM fine-tuned (TRL `SFTTrainer`, poem-dpo's `train_sft.py`) on the {poems} chosen poems of `{dataset}`
(rule `{rule}`, train split), starting from `{base_model}`. The loss is a weighted mean per token: the prompt 0,
the poem 1, the rhyme slots after line 2 (last character of lines 4, 6, 8) {script_args.slot_weight:g}. It is the
first step of the rhyme road; GRPO with the rule comes next (`python -m poemdpo.pipeline --rule five_char_rhyme`).

## Prompt

{prompt_section(tokenizer, chat=False)}

{card_results(settings, metrics, "Final metrics")}"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def check_settings(args: SFTConfig, script_args: SFTScriptArguments) -> None:
    if script_args.slot_weight <= 0:
        raise PoemDPOError(f"slot_weight must be positive, got {script_args.slot_weight}")
    if args.packing:
        raise PoemDPOError("packing: true would merge poems and drop their loss_weights; train_sft.py pads instead")
    if args.truncation_mode != "keep_start":
        raise PoemDPOError("truncation_mode: keep_end would cut input_ids from the front but not their loss_weights; "
                           "train_sft.py keeps the start")


def last_metrics(log_history: Sequence[dict]) -> dict:
    """The newest training log entry with a loss (its step's weighted loss and the two nll means)."""
    for entry in reversed(log_history):
        if "loss" in entry:
            return {k: v for k, v in entry.items() if k in ("loss", "nll_weighted_up", "nll_other", "epoch")}
    return {}
