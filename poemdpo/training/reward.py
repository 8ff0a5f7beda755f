"""The reward model: the base model's backbone with a one-number head, trained by TRL's `RewardTrainer`.

The chapter's "a reward model replaces the judge": it learns from the same preference pairs as DPO, by the
Bradley-Terry loss `-log σ(r(prompt+chosen) − r(prompt+rejected))`, and `train_rl.py` can then use it as the
reward in place of the rule it was trained to imitate. Its score of a text is the head's output at the last
token that is not padding, so the config's `pad_token_id` must be the tokenizer's pad: with another id the
head would read a padding position of every shorter row in a batch (`align_pad_token`, tested). TRL appends
eos to every plain-text row, so the score is read at the eos after the poem; `score` does the same for new
texts, and `train_rl.py` scores the policy's poems through it, not through TRL's own path (which drops eos).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, RewardConfig
from trl.data_utils import _tokenize
from trl.trainer.reward_trainer import suppress_seqcls_warning
from trl.trainer.utils import pad

from poemdpo.data.rules import RULES
from poemdpo.errors import PoemDPOError
from poemdpo.models import loading
from poemdpo.training.dpo import DEFAULT_DATASET, REQUIRED_COLUMNS

DEFAULT_OUTPUT = "data/reward_five_char"


@dataclass
class RewardScriptArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Preference pairs written by build_dataset.py (a directory), or a Hub dataset name."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Held-out split evaluated while training (eval_steps); recipe choices are made on it."},
    )
    accuracy_splits: list[str] = field(
        default_factory=lambda: ["validation", "test"],
        metadata={"help": "Splits whose reward accuracy (every pair) is printed and recorded at the end."},
    )
    max_train_pairs: int | None = field(
        default=None, metadata={"help": "Train on the first N pairs of the (shuffled) train split; all if unset."}
    )
    max_eval_pairs: int | None = field(
        default=256, metadata={"help": "Pairs of dataset_test_split evaluated while training (the final accuracy "
                               "uses every pair)."}
    )
    rule: str | None = field(
        default=None,
        metadata={"help": "The rule the pairs were built by, for the card (default: the dataset's stats.json, else "
                  "five_char).", "choices": sorted(RULES)},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "instruction: the seed's <INS>..<RES> prompts; chat: conversational rows through the "
                  "tokenizer's chat template; auto: chat when the tokenizer has a template.",
                  "choices": ["auto", "instruction", "chat"]},
    )
    score_batch_size: int = field(default=64, metadata={"help": "Rows per forward pass for the final accuracy."})


def check_settings(args: RewardConfig, script_args: RewardScriptArguments, model_args: ModelConfig) -> None:
    if model_args.use_peft and "score" not in (model_args.lora_modules_to_save or []):
        raise PoemDPOError(
            "use_peft: true leaves the new reward head at its random start unless it is trained too: add "
            "--lora_modules_to_save score"
        )
    if script_args.score_batch_size < 1:
        raise PoemDPOError(f"score_batch_size must be at least 1, got {script_args.score_batch_size}")
    if args.center_rewards_coefficient is not None and args.center_rewards_coefficient < 0:
        raise PoemDPOError("center_rewards_coefficient must be >= 0 (it penalises the rewards' squared mean)")


def check_splits(dataset: DatasetDict, name: str, splits: Sequence[str]) -> None:
    """The splits beyond the two `dpo.load_pairs` checks, held to the same conditions."""
    for split in splits:
        if split not in dataset:
            raise PoemDPOError(f"dataset {name!r} has no split {split!r}; it has {sorted(dataset)}")
        if len(dataset[split]) == 0:
            raise PoemDPOError(f"dataset {name!r} split {split!r} is empty")
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset[split].column_names]
        if missing:
            raise PoemDPOError(f"dataset {name!r} split {split!r} lacks column(s) {missing}")


def align_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The head reads the rightmost token that is not `config.pad_token_id`: it must be the id the rows are
    padded with. (A tokenizer without pad pads with eos, and the score is then read at the token before eos,
    the same way in training and scoring.)"""
    if tokenizer.pad_token_id is None:
        raise PoemDPOError("the tokenizer has neither a pad nor an eos token; a reward model must pad its batches")
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def load_reward_model(name_or_path: str, tokenizer: PreTrainedTokenizerBase, *, dtype=None, revision=None,
                      trust_remote_code: bool = False, what: str = "model") -> PreTrainedModel:
    """A sequence-classification model with one output, from a causal LM checkpoint (a new head on its backbone)
    or from a saved reward model (its trained head)."""
    path = loading.check_model_path(name_or_path, what)
    try:
        with suppress_seqcls_warning():  # "score.weight newly initialised", "lm_head.weight unused": both expected
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype or "float32", revision=revision, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PoemDPOError(
            f"could not load a sequence-classification model from {what} {path!r} ({type(e).__name__}: {first})"
        ) from None
    align_pad_token(model, tokenizer)
    return model


def _row_ids(tokenizer: PreTrainedTokenizerBase, prompt, completion) -> list[int]:
    """Token ids exactly as RewardTrainer makes them: plain text gets eos appended, chat turns go through the
    chat template (which ends the turn itself)."""
    if isinstance(prompt, str):
        text = prompt + completion
        if not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        return _tokenize(tokenizer, text)["input_ids"]
    return _tokenize(tokenizer, list(prompt) + list(completion))["input_ids"]


@torch.no_grad()
def score_ids(model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_token_id: int,
              batch_size: int = 64) -> list[float]:
    """The reward of each row of token ids, in order; rows are batched with others of their length (less padding)
    and right-padded. The model's mode is restored after."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    was_training = model.training
    model.eval()
    rewards = [0.0] * len(rows)
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = [torch.tensor(rows[i]) for i in indices]
            input_ids = pad(batch, padding_value=pad_token_id, padding_side="right").to(device)
            attention_mask = pad([torch.ones_like(r) for r in batch], padding_value=0, padding_side="right")
            logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device), use_cache=False).logits
            for i, reward in zip(indices, logits[:, 0].float().tolist(), strict=True):
                rewards[i] = reward
    finally:
        model.train(was_training)
    return rewards


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence, completions: Sequence,
          batch_size: int = 64) -> list[float]:
    """The reward of each prompt+completion, tokenized as RewardTrainer tokenizes its rows. A row longer than the
    model's context (a poem cut off at the length limit, plus eos) is cut to it: no position past it was trained."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    context = getattr(model.config, "max_position_embeddings", None)
    rows = [_row_ids(tokenizer, p, c)[:context] for p, c in zip(prompts, completions, strict=True)]
    return score_ids(model, rows, tokenizer.pad_token_id, batch_size)


def reward_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Dataset,
                    batch_size: int = 64, max_length: int | None = None) -> dict[str, float]:
    """Share of pairs whose chosen poem scores above the rejected one (a tie counts as wrong), over every pair
    RewardTrainer would keep: as in training, a pair with a row longer than `max_length` is left out (`dropped`).

    TRL's `evaluate` averages per-batch accuracies, which weighs a short last batch like a full one; this does not.
    """
    chosen = [_row_ids(tokenizer, p, c) for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)]
    rejected = [_row_ids(tokenizer, p, r) for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)]
    kept = [i for i in range(len(chosen)) if max_length is None or max(len(chosen[i]), len(rejected[i])) <= max_length]
    if not kept:
        raise PoemDPOError(f"no pair fits max_length={max_length} tokens")
    scores = score_ids(model, [chosen[i] for i in kept] + [rejected[i] for i in kept], tokenizer.pad_token_id,
                       batch_size)
    margins = [c - r for c, r in zip(scores[: len(kept)], scores[len(kept) :], strict=True)]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "pairs": len(margins),
        "dropped": len(chosen) - len(kept),
    }


# Settings a reader needs to re-run the recipe.
CARD_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "center_rewards_coefficient",
    "weight_decay", "bf16", "seed",
)


def write_reward_card(output_dir: str | Path, *, base_model: str, dataset: str, rule: str, args: RewardConfig,
                      train_pairs: int, accuracy: dict[str, dict]) -> Path:
    settings = {key: getattr(args, key) for key in CARD_SETTINGS}
    rows = "\n".join(f"| {split} | {a['accuracy']:.3f} | {a['margin']:.3f} | {a['pairs']} | {a['dropped']} |"
                     for split, a in accuracy.items())
    card = f"""---
base_model: {base_model}
library_name: transformers
pipeline_tag: text-classification
tags: [trl, reward-model, reward-trainer, poem-dpo, poetry]
language: [lzh]
---
# {Path(output_dir).name}

A reward model (TRL `RewardTrainer`, poem-dpo's `train_reward.py`): `{base_model}`'s backbone with a one-output
head, trained on {train_pairs} pairs of `{dataset}` to score poems the rule **`{rule}`** prefers above those it
rejects. Use it as `train_rl.py --reward_model {output_dir}`.

## Use

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("{output_dir}")
    tokenizer = AutoTokenizer.from_pretrained("{output_dir}")
    text = "<INS>請用以下題目寫一首詩<INP>{{title}}<RES>" + poem + tokenizer.eos_token
    reward = model(**tokenizer(text, return_tensors="pt")).logits[0, 0]

The score is read at the final eos, as in training: append it to the poem.

## Reward accuracy (every pair of the split that fits max_length, as in training; a tie counts as wrong)

| split | accuracy | mean margin | pairs | left out (longer than max_length) |
|---|---|---|---|---|
{rows}

## Hyperparameters

```json
{json.dumps(settings, ensure_ascii=False, indent=2, default=str)}
```
"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
