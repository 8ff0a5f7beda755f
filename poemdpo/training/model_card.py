"""The aligned model's README.md: what it was trained from, how, and what came out.

The YAML header is what the Hub reads: `base_model` (a Hub id only; a local directory means nothing there),
`library_name` (`peft` for an adapter, so the Hub offers to load it on its base), `tags`, `datasets` (a Hub
dataset only) and `pipeline_tag`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from trl import DPOConfig

from poemdpo.data.prompts import build_prompt, conversational
from poemdpo.models.loading import looks_local

# Hyperparameters a reader needs to re-run the recipe.
CARD_SETTINGS = (
    "loss_type", "loss_weights", "beta", "ld_alpha", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
    "precompute_ref_log_probs", "activation_checkpointing", "bf16", "seed",
)
EXAMPLE_TITLE = "{title}"


def card_metadata(base_model: str, dataset: str, use_peft: bool) -> dict:
    metadata = {}
    if base_model and not looks_local(base_model):
        metadata["base_model"] = base_model
    if dataset and not looks_local(dataset):
        metadata["datasets"] = [dataset]
    metadata.update({
        "library_name": "peft" if use_peft else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["trl", "dpo", "poem-dpo", "poetry"] + (["lora"] if use_peft else []),
        "language": ["lzh"],
    })
    return metadata


def prompt_section(tokenizer, chat: bool) -> str:
    """The prompt exactly as training and sampling built it: the chat template's text for chat runs."""
    if not chat:
        return ("The seed's instruction format (no chat template), the poem following `<RES>`:\n\n"
                f"    {build_prompt(EXAMPLE_TITLE)}")
    rows = json.dumps(conversational(EXAMPLE_TITLE), ensure_ascii=False)
    rendered = tokenizer.apply_chat_template(conversational(EXAMPLE_TITLE), add_generation_prompt=True,
                                             tokenize=False)
    return ("Conversational rows through the tokenizer's chat template; the poem is the assistant's turn.\n\n"
            f"```json\n{rows}\n```\n\nrendered (`add_generation_prompt=True`):\n\n```text\n{rendered}\n```")


def card_results(settings: dict, metrics: dict, metrics_title: str, sample_rates: dict | None = None,
                 sample_table: str = "") -> str:
    """The part every model card of the project shares: hyperparameters, final metrics, sample poems (a stage
    that writes none, such as train_sft.py, leaves the last two sections out)."""
    results = f"""## Hyperparameters

```json
{json.dumps(settings, ensure_ascii=False, indent=2, default=str)}
```

## {metrics_title}

```json
{json.dumps(metrics, ensure_ascii=False, indent=2)}
```
"""
    if sample_rates is None:
        return results
    return results + f"""
Share of sampled poems (temperature 1.0, held-out titles) that satisfy the rule:

```json
{json.dumps(sample_rates, ensure_ascii=False, indent=2)}
```

## Sample poems (held-out titles)

{sample_table}
"""


def write_model_card(output_dir: str | Path, *, base_model: str, dataset: str, rule: str, args: DPOConfig,
                     use_peft: bool, train_pairs: int, metrics: dict, sample_rates: dict, sample_table: str,
                     tokenizer=None, chat: bool = False) -> Path:
    settings = {key: getattr(args, key) for key in CARD_SETTINGS}
    reward_metrics = {k: v for k, v in metrics.items() if "rewards/" in k or "logps/" in k or k.endswith("loss")}
    header = yaml.safe_dump(card_metadata(base_model, dataset, use_peft), allow_unicode=True, sort_keys=False)
    card = f"""---
{header}---
# {Path(output_dir).name}

A causal LM aligned by DPO (TRL `DPOTrainer`, poem-dpo's `train_dpo.py`) to prefer poems under the
rule **`{rule}`**, starting from `{base_model}`{" with a LoRA adapter" if use_peft else ""}, on {train_pairs}
pairs of `{dataset}`.

## Prompt

{prompt_section(tokenizer, chat)}

{card_results(settings, reward_metrics, "Final metrics", sample_rates, sample_table)}"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
