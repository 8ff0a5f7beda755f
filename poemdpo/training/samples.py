"""Poems seen while training (aligned vs reference for the same held-out titles, and the rule's rate), and the
DPOTrainer that train_dpo.py runs them in."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer, TrainerCallback
from trl import DPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import use_adapter

from poemdpo.data.rules import preferred
from poemdpo.errors import PoemDPOError
from poemdpo.evaluation.metrics import rate_of, strict_five_rate
from poemdpo.evaluation.tables import side_by_side
from poemdpo.models.generation import generate_poems
from poemdpo.training.speed import LENGTH_COLUMN


def rule_rate(poems: list[str], rule: str) -> float:
    """Share of `poems` the preference rule prefers."""
    return rate_of(lambda poem: preferred(poem, rule), poems)


class PoemTrainerMixin:
    """What poem-dpo adds to TRL's trainers (DPO here; CPO, ORPO and KTO in methods.py), where they would fail a user
    quietly:

    - training logs carry the metrics callbacks hand in (the sample poems' rates): logging from inside a
      callback on one process desynchronises a multi-process run, the next regular log keeps all in step;
    - a launch that does not run as launched stops (`check_engine`);
    - the final save is one whole model, and never pushes (`save_model`);
    - `resume_from_checkpoint=True` takes the last checkpoint that was finished (`last_complete_checkpoint`);
    - held-out pairs are evaluated in order of length (`_get_eval_sampler`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending_metrics: dict[str, float] = {}
        check_engine(self.accelerator)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.pending_metrics)
            self.pending_metrics = {}
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save only. The Trainer would also push here, uploading TRL's model card before ours is written;
        train_dpo.py pushes once afterwards (`hub.push_final_model`). Checkpoint pushes (`hub_strategy`) stay.

        The final model is saved whole under FSDP too: with a sharded state dict (configs/accelerate/fsdp.yaml)
        the Trainer would save nothing here at all. Checkpoints keep their shards."""
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if plugin is not None and not _internal_call and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            plugin.set_state_dict_type("FULL_STATE_DICT")  # the run is over: no checkpoint is written after this
        super().save_model(output_dir, _internal_call=True)

    def _get_eval_sampler(self, eval_dataset):
        """Pairs by length, on one process: the recipe's 256 held-out pairs pad to a third fewer positions than in
        group_by_length's shuffled groups (docs/throughput.md). Per-pair metrics (margins, accuracies, log-probs) are
        means over the same pairs either way; a token mean per batch (the SFT term of the loss) moves with batching."""
        if self.args.world_size == 1 and LENGTH_COLUMN in getattr(eval_dataset, "column_names", ()):
            lengths = eval_dataset[LENGTH_COLUMN]
            return sorted(range(len(lengths)), key=lengths.__getitem__)
        return super()._get_eval_sampler(eval_dataset)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class PoemDPOTrainer(PoemTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with PoemTrainerMixin's changes, and the reference's log-probs of each held-out batch
    computed once (`reference_log_probs`): every evaluation scores the same pairs in the same batches against a
    reference that does not move, so from the second on only the policy runs (the recipe's evaluations: 8.6-10.9 s
    each before, 5.1-5.5 s after the first, docs/throughput.md)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out_reference: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference_log_probs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's `compute_ref_log_probs` of a batch (the PEFT adapter off, ld_alpha), kept for held-out batches while
        the reference stays frozen (not with `sync_ref_model`, which moves it)."""
        reference = self.ref_model or self.model
        if self.model.training or self.args.sync_ref_model:
            return self.compute_ref_log_probs(reference, inputs)
        key = batch_digest(inputs)
        if key not in self.held_out_reference:
            self.held_out_reference[key] = self.compute_ref_log_probs(reference, inputs)
        return self.held_out_reference[key]

    def _compute_loss(self, model, inputs, return_outputs):
        """Training batches as TRL computes them; held-out ones with the kept reference log-probs, handed to TRL as
        precomputed (`ChapterDPOTrainer` hands its own the same way)."""
        if self.precompute_ref_logps or self.model.training:
            return super()._compute_loss(model, inputs, return_outputs)
        ref_chosen, ref_rejected = self.reference_log_probs(inputs)
        inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        with setting(self, "precompute_ref_logps", True):
            return super()._compute_loss(model, inputs, return_outputs)


def final_metrics(trainer: Trainer) -> dict:
    """Held-out metrics of a trained Trainer's weights ({} without held-out data): the evaluation it ran at the last
    step (eval_steps dividing the run, or eval_strategy epoch), else a new one -- never the same weights twice."""
    if trainer.eval_dataset is None:
        return {}
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()


def batch_digest(inputs: dict) -> bytes:
    """A 16-byte digest of a batch's tensors (names, shapes, dtypes, bytes): equal batches, equal digests."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in sorted(inputs.items()):
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


@contextlib.contextmanager
def setting(obj, name: str, value):
    """`obj.name = value` inside the block, restored after it."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def last_complete_checkpoint(output_dir: str | Path) -> str:
    """The newest checkpoint the Trainer finished writing. trainer_state.json is the last file it writes, so a run
    killed mid-checkpoint leaves a newer directory without one, which transformers' get_last_checkpoint would pick
    (and resume from step 0 with that step's weights, or fail on its missing optimizer state)."""
    steps = {}
    for path in Path(output_dir).glob("checkpoint-*"):
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path.is_dir():
            steps[int(match.group(1))] = path
    for step in sorted(steps, reverse=True):
        if (steps[step] / "trainer_state.json").is_file():
            skipped = [steps[s].name for s in steps if s > step]
            if skipped:
                print(f"resuming from {steps[step].name}: {', '.join(sorted(skipped))} was not finished "
                      "(no trainer_state.json)")
            return str(steps[step])
    raise PoemDPOError(f"--resume_from_checkpoint true, but {output_dir} holds no finished checkpoint "
                       "(a checkpoint-N directory with trainer_state.json); start without it")


def check_engine(accelerator) -> None:
    """Stop a launch that does not run as launched. Accelerate shards with FSDP / DeepSpeed only on accelerators:
    on a CPU it silently runs such a config as plain DDP, and without `use_cpu` the processes do not even join
    one group, each training alone over the others' output directory."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise PoemDPOError(
            f"launched as {world_size} processes, but they did not join one process group (no GPU, and use_cpu is "
            "false), so each would train alone and overwrite the others' output; on a CPU set use_cpu: true"
        )
    running = accelerator.distributed_type.value
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and running != engine:
            raise PoemDPOError(
                f"the accelerate config asks for {engine}, but accelerate runs this launch as {running} (it shards "
                "only on GPUs); launch with configs/accelerate/cpu_ddp.yaml on a CPU"
            )


def sampling_steps(requested: int | None, state) -> int:
    """Sample every `requested` steps, else every eval step, else every logging step: as the Trainer resolved them
    (`TrainerState.compute_steps` turns a fraction such as eval_steps 0.1 into a share of max_steps)."""
    return max(1, int(requested or state.eval_steps or state.logging_steps or 1))


class SamplePoemsCallback(TrainerCallback):
    """At the start: the reference's poems; every `every_steps` and at the end: the policy's, with the rule's rate.

    Both are sampled from the models the Trainer prepared (DDP, FSDP, DeepSpeed ZeRO-3 alike: TRL's
    `unwrap_model_for_generation` gathers sharded weights, and generate keeps the processes in step), so
    nothing here depends on the engine. The reference is the one DPO scores against: the frozen copy, the
    policy with its LoRA adapter off, or, with precomputed reference log-probs, the policy before its first step.
    """

    def __init__(self, trainer: PoemDPOTrainer, titles: list[str], rule: str, every_steps: int | None,
                 table_rows: int, max_new_tokens: int | None, seed: int, chat: bool = False):
        self.trainer, self.titles, self.rule, self.chat = trainer, titles, rule, chat
        self.requested_steps, self.table_rows = every_steps, table_rows
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.every_steps = 1
        self.reference_poems: list[str] | None = None
        self.last: dict = {}

    def poems(self, model, reference: bool = False) -> list[str]:
        """Poems of a prepared model for the titles; `reference`: of the policy as TRL scores its reference."""
        trainer = self.trainer
        with unwrap_model_for_generation(model, trainer.accelerator) as unwrapped:
            adapter_off = contextlib.nullcontext()
            if reference and trainer.ref_model is None and is_peft_model(unwrapped):
                # as TRL's reference: the adapter "ref" if the model has one, else no adapter at all
                adapter_off = use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
            with adapter_off, self._prompt_format():
                return generate_poems(unwrapped, trainer.processing_class, self.titles,
                                      max_new_tokens=self.max_new_tokens, seed=self.seed)

    @contextlib.contextmanager
    def _prompt_format(self):
        """Prompts as training built them: generate_poems takes the chat template whenever the tokenizer has one,
        so an instruction-format run (`prompt_format: instruction`) hides it while sampling."""
        tokenizer = self.trainer.processing_class
        template = getattr(tokenizer, "chat_template", None)
        if self.chat or not template:
            yield
            return
        tokenizer.chat_template = None
        try:
            yield
        finally:
            tokenizer.chat_template = template

    def sample_reference(self, state) -> None:
        trainer = self.trainer
        if trainer.ref_model is not None:
            self.reference_poems = self.poems(trainer.ref_model, reference=True)
        elif is_peft_model(trainer.accelerator.unwrap_model(trainer.model)) or state.global_step == 0:
            self.reference_poems = self.poems(trainer.model_wrapped, reference=True)
        else:  # resumed with precomputed reference log-probs: the weights in memory are no longer the reference
            self.reference_poems = None

    def sample(self, step: int) -> dict:
        poems = self.poems(self.trainer.model_wrapped)
        metrics = {f"samples/{self.rule}_rate": rule_rate(poems, self.rule),
                   "samples/five_char_rate": strict_five_rate(poems)}
        reference = self.reference_poems
        if reference is not None:
            metrics[f"samples/{self.rule}_rate_reference"] = rule_rate(reference, self.rule)
        else:
            reference = ["(not sampled: a resumed run without a reference model)"] * len(poems)
        table = side_by_side(self.titles, poems, reference, self.table_rows)
        self.last = {"step": step, "poems": poems, "metrics": metrics, "table": table}
        self.trainer.pending_metrics.update(metrics)
        if not self.trainer.is_world_process_zero():
            return self.last
        versus = (f" vs reference {metrics[f'samples/{self.rule}_rate_reference']:.2f}"
                  if f"samples/{self.rule}_rate_reference" in metrics else "")
        print(f"\nstep {step}: {self.rule} rate aligned {metrics[f'samples/{self.rule}_rate']:.2f}{versus}\n{table}\n")
        output = Path(self.trainer.args.output_dir) / "samples.md"
        with open(output, "a", encoding="utf-8") as f:
            f.write(f"\n## step {step}\n\n{table}\n")
        return self.last

    # Every process samples (the same poems) and asks for a log line at this step, so all take the
    # same path through the Trainer (and through FSDP / ZeRO-3 collectives); only process 0 prints and writes.
    def on_train_begin(self, args, state, control, **kwargs):
        self.every_steps = sampling_steps(self.requested_steps, state)
        if self.titles:
            self.sample_reference(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.titles and (state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps):
            self.sample(state.global_step)
            control.should_log = True
        return control
