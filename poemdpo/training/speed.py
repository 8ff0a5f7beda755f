"""Training speed on a CPU: what TRL's DPOTrainer has no switch for (bench/bench_dpo.py measures it).

Two pieces, both wired into train_dpo.py (the compact head also into train_sft.py's trainer):

* `with_lengths`: a `length` column, so that `train_sampling_strategy: group_by_length` can batch pairs of
  similar length. The Trainer's LengthGroupedSampler looks for `length` (or `input_ids`, which DPO rows do not
  have). With random batches most of a batch is padding: a few poems of several hundred characters set the width.
* `use_compact_lm_head`: TRL scores log-probs through a "fused LM head" that, off CUDA/XPU (no Triton), projects
  *every* position through the LM head -- prompt and padding included -- computes entropy, mean logit and
  top-1 on each of them, and recomputes the projection in the backward. Here the head projects only the
  positions that have a label (the completions), in one matmul, and computes those metrics without grad.
  On CUDA/XPU TRL's Triton kernel already scores only labelled positions; it is left in place there.
"""

from __future__ import annotations

import functools
import types

import torch
from datasets import Dataset
from trl.trainer.utils import FusedCausalLMOutput

LENGTH_COLUMN = "length"  # TrainingArguments.length_column_name's default
# Config attributes that change the logits after the projection; TRL's head handles them, this one does not.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def _text_length(value: str | list[dict]) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(str(message.get("content", ""))) for message in value)  # conversational rows


def with_lengths(dataset: Dataset) -> Dataset:
    """Add `length` = prompt + the longer completion, in characters: the width this pair adds to its batch
    (chosen and rejected are padded to one width). Characters stand in for tokens; grouping only needs the order."""

    def length(row: dict) -> dict:
        return {LENGTH_COLUMN: _text_length(row["prompt"])
                + max(_text_length(row["chosen"]), _text_length(row["rejected"]))}

    return dataset.map(length, desc="pair lengths")


def supports_compact_head(model: torch.nn.Module) -> bool:
    text_config = model.config.get_text_config()
    return all(getattr(text_config, name, None) in (None, 1.0) for name in LOGIT_TRANSFORMS)


def add_compact_lm_head(model: torch.nn.Module, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Give `model` the calling convention of TRL's `add_fused_lm_head`: `model(..., labels=labels,
    fused_lm_head=True)` returns a `FusedCausalLMOutput`. Only positions whose next-token label is not -100 are
    projected; `outputs` other than log_probs are computed without grad (TRL logs them, nothing trains on them)."""
    original_forward = types.MethodType(type(model).forward, model)

    @functools.wraps(type(model).forward)  # `generate` checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()  # [labelled positions, vocab]
        log_softmax = torch.log_softmax(logits, dim=-1)
        picked = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

        def spread(values: torch.Tensor) -> torch.Tensor:  # back to [batch, seq], zero where there is no label
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        extra = {}
        with torch.no_grad():
            if "entropy" in outputs:
                extra["entropy"] = spread(-(log_softmax.exp() * log_softmax).sum(-1))
            if "mean_logits" in outputs:
                extra["mean_logits"] = spread(logits.mean(-1))
            if "is_top1" in outputs:
                extra["is_top1"] = spread((logits.argmax(-1) == targets).float()).bool()
            if "log_sum_sq_probs" in outputs:
                extra["log_sum_sq_probs"] = spread(torch.logsumexp(2 * log_softmax, dim=-1))
        log_probs = spread(picked)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **extra)

    model.forward = types.MethodType(forward, model)


def use_compact_lm_head(trainer, outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1"),
                        ) -> bool:
    """Swap TRL's fused LM head for the compact one on the policy (computing `outputs`) and the reference if the
    trainer has one, off CUDA/XPU. Returns whether it did (False on GPUs, for PEFT models and for models whose
    logits are rescaled)."""
    from trl.kernels.chunked_logprob import _use_triton

    model = trainer.model
    if _use_triton(trainer.accelerator.device) or hasattr(model, "peft_config") or not supports_compact_head(model):
        return False
    if getattr(trainer, "use_weighting", False):  # DPO's WPO weighting
        outputs += ("log_sum_sq_probs",)
    add_compact_lm_head(model, outputs)
    if getattr(trainer, "ref_model", None) is not None:
        add_compact_lm_head(trainer.ref_model)
    return True
