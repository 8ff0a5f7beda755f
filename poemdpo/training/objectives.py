"""The chapter's two objectives before DPO, as loss types of TRL's DPOTrainer: `loss_type: chapter_unlikelihood`
and `loss_type: chapter_linear`, alone or in a list with TRL's own types (`[chapter_linear, sft]`).

With ℓ(θ, y) = −log π_θ(y | prompt) summed over the poem's tokens (TRL's per-sequence log-probs, `ld_alpha`
included), p the preferred (chosen) poem, n the rejected one and θ₀ the frozen reference:

    chapter_unlikelihood (a)   ℓ(θ,p) − ℓ(θ,n)
    chapter_linear       (b)   (ℓ(θ,p) − ℓ(θ₀,p)) + (ℓ(θ₀,n) − ℓ(θ,n))  =  −margin
    DPO (sigmoid)              −log σ(β·margin),   margin = log-ratio of p to θ₀ − log-ratio of n to θ₀

Names: `chapter_unlikelihood` because (a) is the chapter's first attempt, likelihood for p plus *unlikelihood* for n
with nothing else; `chapter_linear` because (b) is DPO's own margin entering the loss linearly, before the sigmoid.

Neither has a β (the chapter writes none, and under Adam a constant factor on a linear loss changes no step): β only
scales the logged rewards, which stay TRL's (β·log-ratio to the reference, so comparable with DPO runs); a run with
no reference at all logs β·log-prob, TRL's former `reference_free` rewards.

(b) minus (a) is ℓ(θ₀,n) − ℓ(θ₀,p), a constant of the data: the two have the same gradient and train the same
weights from the same seed. The reference moves the loss's zero to "as likely as θ₀", never a step; it starts to
anchor only inside a function of the margin that flattens, DPO's sigmoid.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig

from poemdpo.errors import PoemDPOError
from poemdpo.training.samples import PoemDPOTrainer, setting

CHAPTER_LOSS_TYPES = ("chapter_unlikelihood", "chapter_linear")
WITHOUT_REFERENCE = {"chapter_unlikelihood", "sft"}  # loss types that never read θ₀


def chapter_unlikelihood_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """(a) ℓ(θ,p) − ℓ(θ,n) per pair. Lowering it as fast as possible means making the rejected poem unlikely, and
    nothing stops the preferred poem's likelihood from falling with it: the difference keeps growing while both
    fall, the mass goes to text that is neither poem, and the language degrades (the chapter's warning)."""
    return rejected_logps - chosen_logps


def chapter_linear_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    """(b) (ℓ(θ,p) − ℓ(θ₀,p)) + (ℓ(θ₀,n) − ℓ(θ,n)) per pair, i.e. −margin. Linear, so unbounded: every pair pushes
    with the same force however far it is already separated, and the loss falls forever by pushing n's
    log-prob to −∞, taking the language with it. DPO's −log σ(β·margin) saturates: once a pair is separated its
    gradient fades, and the reference then bounds how far θ moves."""
    return (ref_chosen_logps - chosen_logps) + (rejected_logps - ref_rejected_logps)


OBJECTIVES = {
    "chapter_unlikelihood": lambda chosen, rejected, ref_chosen, ref_rejected: chapter_unlikelihood_loss(
        chosen, rejected),
    "chapter_linear": chapter_linear_loss,
}


def uses_chapter_objective(loss_types: list[str] | str) -> bool:
    return any(t in CHAPTER_LOSS_TYPES for t in ([loss_types] if isinstance(loss_types, str) else loss_types))


def trainer_class(loss_types: list[str] | str) -> type[PoemDPOTrainer]:
    """The trainer train_dpo.py builds: ChapterDPOTrainer when a chapter objective is asked for, else PoemDPOTrainer."""
    return ChapterDPOTrainer if uses_chapter_objective(loss_types) else PoemDPOTrainer


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor,
                   ld_alpha: float | None) -> torch.Tensor:
    """Per-sequence log-probs exactly as DPOTrainer._compute_loss sums them (tested against its logged
    logps/chosen|rejected): the completion's tokens, or with `ld_alpha` the part of the longer completion past the
    shorter one's length weighted by ld_alpha. The batch is [chosen..., rejected...]."""
    shift_mask = completion_mask[..., 1:]
    per_token_logps = per_token_logps[:, -shift_mask.size(1):]
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    positions = shift_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
    shared_mask = (positions > 0) & (positions <= shared)
    tail_mask = positions > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


class _LogProbRecorder:
    """Calls the policy exactly as DPOTrainer does and keeps the per-token log-probs (with their graph) of its
    scoring forward, so the chapter terms reuse TRL's one forward instead of running another."""

    def __init__(self, model):
        self.model, self.log_probs = model, None

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if kwargs.get("fused_lm_head") and self.log_probs is None:
            self.log_probs = outputs.log_probs
        return outputs


class ChapterDPOTrainer(PoemDPOTrainer):
    """PoemDPOTrainer with the chapter's objectives as loss types (see the module docstring).

    The extension point is `_compute_loss`, wrapped, not copied: the reference log-probs are computed first with
    TRL's own `compute_ref_log_probs` (or read from the batch when precomputed) and handed to TRL as if precomputed;
    TRL then runs the policy forward, its own loss types (sft, sigmoid, ...), the aux loss and every metric
    (rewards/*, logps/*, entropy); the chapter terms are added from the same forward's log-probs.

    Reference: chapter_linear compares with θ₀ and needs one; chapter_unlikelihood does not. With `ref_model=None`,
    full fine-tuning and no precomputed log-probs, a run whose loss types are all in {chapter_unlikelihood, sft}
    builds no reference at all (TRL would load a second copy); any other list is refused.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, **kwargs):
        if args is None or not uses_chapter_objective(args.loss_type):
            raise PoemDPOError("ChapterDPOTrainer needs a DPOConfig whose loss_type lists chapter_unlikelihood or "
                               "chapter_linear; use PoemDPOTrainer otherwise")
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        check_chapter_settings(args)
        peft = is_peft_model(model) or kwargs.get("peft_config") is not None
        self.reference_free = ref_model is None and not peft and not args.precompute_ref_log_probs
        if self.reference_free:
            needing = [t for t in args.loss_type if t not in WITHOUT_REFERENCE]
            if needing:
                raise PoemDPOError(
                    f"loss_type {needing} compares the policy with a frozen reference θ₀, and none was given: pass "
                    "ref_model (train_dpo.py loads a frozen copy), use_peft (the base model with the adapter off) or "
                    "precompute_ref_log_probs; only chapter_unlikelihood and sft train without a reference"
                )
            if args.sync_ref_model:
                raise PoemDPOError("sync_ref_model: true, but this run has no reference model to sync")
        asked = args.precompute_ref_log_probs
        # TRL builds no reference copy only when told the reference log-probs are precomputed; the reference-free
        # run says so while TRL is built (`_precompute_ref_logps` then adds nothing) and not afterwards.
        args.precompute_ref_log_probs = asked or self.reference_free
        try:
            super().__init__(model, ref_model, args, **kwargs)
        finally:
            args.precompute_ref_log_probs = asked
        self.precompute_ref_logps = asked
        # TRL's loop sees its own types only; the chapter terms are added in `_compute_loss`.
        self.chapter_losses = [(t, w) for t, w in zip(args.loss_type, weights, strict=True) if t in CHAPTER_LOSS_TYPES]
        kept = [(t, w) for t, w in zip(args.loss_type, weights, strict=True) if t not in CHAPTER_LOSS_TYPES]
        self.loss_types, self.loss_weights = [t for t, _ in kept], [w for _, w in kept]

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.reference_free:
            return dataset  # nothing to score: the reference-free run reads log-prob 0 in `_compute_loss`
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.precompute_ref_logps:
            if self.reference_free:
                zeros = inputs["input_ids"].new_zeros(inputs["input_ids"].size(0) // 2, dtype=torch.float32)
                ref_chosen, ref_rejected = zeros, zeros
            else:  # the forward TRL would run inline, through its own function (kept for held-out batches)
                ref_chosen, ref_rejected = self.reference_log_probs(inputs)
            inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        recorder = _LogProbRecorder(model)
        with setting(self, "precompute_ref_logps", True):
            result = super()._compute_loss(recorder, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)
        if recorder.log_probs is None:
            raise RuntimeError("DPOTrainer._compute_loss no longer scores the policy with fused_lm_head=True: "
                               "update ChapterDPOTrainer to the installed TRL")
        chosen, rejected = sequence_logps(recorder.log_probs, inputs["completion_mask"], self.ld_alpha).chunk(2)
        mode = "train" if self.model.training else "eval"
        for loss_type, weight in self.chapter_losses:
            term = OBJECTIVES[loss_type](chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            loss = loss + term.mean() * weight
            self._metrics[mode][f"loss/{loss_type}"].append(self.accelerator.gather(term.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


def check_chapter_settings(args: DPOConfig) -> None:
    """DPOConfig settings the chapter objectives cannot honour."""
    if args.f_divergence_type != "reverse_kl":
        raise PoemDPOError(
            f"f_divergence_type {args.f_divergence_type!r} reshapes the log-ratio inside DPO's sigmoid; the chapter "
            "objectives are plain log-likelihoods: use f_divergence_type reverse_kl (the default)"
        )
    if args.use_weighting:
        raise PoemDPOError("use_weighting (WPO) is not implemented for the chapter objectives: set it false")
