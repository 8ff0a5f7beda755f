"""The aligned model's README.md: what it was trained from, how, and what came out."""

from __future__ import annotations

import json
from pathlib import Path

from trl import DPOConfig

# Hyperparameters a reader needs to re-run the recipe.
CARD_SETTINGS = (
    "loss_type", "loss_weights", "beta", "ld_alpha", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
    "precompute_ref_log_probs", "activation_checkpointing", "bf16", "seed",
)


def write_model_card(output_dir: str | Path, *, base_model: str, dataset: str, rule: str, args: DPOConfig,
                     use_peft: bool, train_pairs: int, metrics: dict, sample_rates: dict, sample_table: str) -> Path:
    settings = {key: getattr(args, key) for key in CARD_SETTINGS}
    reward_metrics = {k: v for k, v in metrics.items() if "rewards/" in k or "logps/" in k or k.endswith("loss")}
    card = f"""---
base_model: {base_model}
library_name: transformers
tags: [trl, dpo, poem-dpo, poetry]
language: [lzh]
---
# {Path(output_dir).name}

A causal LM aligned by DPO (TRL `DPOTrainer`, poem-dpo's `train_dpo.py`) to prefer poems under the
rule **`{rule}`**, starting from `{base_model}`{" with a LoRA adapter" if use_peft else ""}, on {train_pairs}
pairs of `{dataset}`.

## Prompt

    <INS>請用以下題目寫一首詩<INP>{{title}}<RES>

## Hyperparameters

```json
{json.dumps(settings, ensure_ascii=False, indent=2, default=str)}
```

## Final metrics

```json
{json.dumps(reward_metrics, ensure_ascii=False, indent=2)}
```

Share of sampled poems (temperature 1.0, held-out titles) that satisfy the rule:

```json
{json.dumps(sample_rates, ensure_ascii=False, indent=2)}
```

## Sample poems (held-out titles)

{sample_table}
"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
