"""Training speed on a CPU: what TRL's DPOTrainer has no switch for (bench/bench_dpo.py measures it).

Three pieces. The first two are wired into train_dpo.py (the compact head also into train_sft.py's trainer and
train_rl.py's GRPO and RLOO), the third into train_base.py:

* `with_lengths`: a `length` column, so that `train_sampling_strategy: group_by_length` can batch pairs of
  similar length. The Trainer's LengthGroupedSampler looks for `length` (or `input_ids`, which DPO rows do not
  have). With random batches most of a batch is padding: a few poems of several hundred characters set the width.
* `use_compact_lm_head`: TRL scores log-probs through a "fused LM head" that, off CUDA/XPU (no Triton), projects
  *every* position through the LM head -- prompt and padding included -- computes entropy, mean logit and
  top-1 on each of them, and recomputes the projection in the backward. Here the head projects only the
  positions that have a label (the completions), in one matmul, and computes those metrics without grad.
  On CUDA/XPU TRL's Triton kernel already scores only labelled positions; it is left in place there.
* `use_chunked_lm_loss`: a base model's loss without its `[tokens, vocab]` logits. transformers projects every
  position, keeps the logits, and takes log-softmax and its backward over them: 34 MB of floats per step of the
  base recipe, swept several times, each sweep at memory speed. Here the projection, the loss and its gradient
  are computed 512 positions at a time, each chunk while it is still in cache.
"""

from __future__ import annotations

import functools
import types

import torch
from datasets import Dataset
from transformers.modeling_outputs import CausalLMOutputWithPast
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


def add_compact_lm_head(model: torch.nn.Module, outputs: tuple[str, ...] = ("log_probs",),
                        temperature: float = 1.0) -> None:
    """Give `model` the calling convention of TRL's `add_fused_lm_head`: `model(..., labels=labels,
    fused_lm_head=True)` returns a `FusedCausalLMOutput`, from logits divided by `temperature` as TRL's are. Only
    positions whose next-token label is not -100 are projected; `outputs` other than log_probs are computed without
    grad (TRL logs them, nothing trains on them)."""
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
        if temperature != 1.0:
            logits = logits / temperature
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
                        temperature: float = 1.0) -> bool:
    """Swap TRL's fused LM head for the compact one on the policy (computing `outputs`) and the reference if the
    trainer has one, off CUDA/XPU, both at `temperature` (the RL trainers' sampling temperature). Returns whether
    it did (False on GPUs, for PEFT models and for models whose logits are rescaled)."""
    from trl.kernels.chunked_logprob import _use_triton

    model = trainer.model
    if _use_triton(trainer.accelerator.device) or hasattr(model, "peft_config") or not supports_compact_head(model):
        return False
    if getattr(trainer, "use_weighting", False):  # DPO's WPO weighting
        outputs += ("log_sum_sq_probs",)
    add_compact_lm_head(model, outputs, temperature)
    if getattr(trainer, "ref_model", None) is not None:
        add_compact_lm_head(trainer.ref_model, temperature=temperature)
    return True


LOSS_CHUNK = 512  # positions per chunk: 1.6x faster than 128 or the whole batch at once for the base recipe's head


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (every row labelled), divided by `divisor`.

    The gradients are computed in the forward, chunk by chunk, while each chunk's logits are at hand: with d the
    divisor, d loss / d logits = (softmax - one-hot) / d. The backward only scales them by the incoming gradient, so
    this is for a loss that is backpropagated as is (a Trainer's training step).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                chunk: int) -> torch.Tensor:
        grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        # Under autocast the head's three matmuls run in its dtype, as the plain head's forward and backward would.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        for start in range(0, hidden.shape[0], chunk):
            rows, labels = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (rows @ weight.T).float()
            log_normalizer = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, labels[:, None]).squeeze(-1)
            total += (log_normalizer - picked).sum()
            # the logits become d loss / d logits, in place (no second [chunk, vocab] buffer)
            logits.sub_(log_normalizer[:, None]).exp_()
            logits.scatter_add_(-1, labels[:, None], -torch.ones_like(picked)[:, None])
            logits.mul_(1 / divisor)
            grad = logits.to(dtype)
            grad_hidden[start:start + chunk] = grad @ weight
            if dtype == weight.dtype:
                grad_weight.addmm_(grad.T, rows)
            else:  # the product in the autocast dtype, as the plain head's weight gradient; the sum in fp32
                grad_weight += grad.T @ rows.to(dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    num_items_in_batch: torch.Tensor | int | None = None, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """transformers' causal-LM loss (mean over labelled positions, or sum / `num_items_in_batch`) of the already
    shifted `hidden` [n, hidden] and `targets` [n]. Without grad it only computes the loss, chunk by chunk.
    Positions labelled -100 (padding, unlearned ones) skip the head: their loss and gradient are 0."""
    labelled = targets != -100
    divisor = labelled.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    hidden, targets = hidden[labelled], targets[labelled]
    divisor = torch.as_tensor(divisor, device=hidden.device, dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(hidden, weight, targets, divisor, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.T).float()
        total += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total / divisor


def use_chunked_lm_loss(model: torch.nn.Module, chunk: int = LOSS_CHUNK) -> bool:
    """Make `model(..., labels=labels)` compute its loss with `chunked_lm_loss` and return no logits. Other calls
    (no labels: generation, scoring) run the model's own forward. Returns False, changing nothing, for a model whose
    logits are rescaled or whose head has a bias."""
    head = model.get_output_embeddings()
    if not supports_compact_head(model) or getattr(head, "bias", None) is not None:
        return False
    original_forward = types.MethodType(type(model).forward, model)

    @functools.wraps(type(model).forward)  # the Trainer reads the signature (it accepts num_items_in_batch)
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        loss = chunked_lm_loss(hidden, self.get_output_embeddings().weight, targets, num_items_in_batch, chunk)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return True
