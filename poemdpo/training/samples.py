"""Poems seen while training: aligned vs reference for the same held-out titles, and the rule's rate."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import DPOTrainer

from poemdpo.data.rules import preferred
from poemdpo.evaluation.metrics import rate_of, strict_five_rate
from poemdpo.models.generation import generate_poems


def rule_rate(poems: list[str], rule: str) -> float:
    """Share of `poems` the preference rule prefers."""
    return rate_of(lambda poem: preferred(poem, rule), poems)


def side_by_side(titles: list[str], aligned: list[str], reference: list[str], rows: int) -> str:
    """A Markdown table; newlines become <br> so a poem stays in its cell."""
    lines = ["| title | aligned | reference |", "|---|---|---|"]
    for title, a, r in list(zip(titles, aligned, reference, strict=True))[:rows]:
        cells = [c.replace("\n", "<br>").replace("|", "｜") or "(empty)" for c in (title, a, r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class PoemDPOTrainer(DPOTrainer):
    """DPOTrainer whose training logs also carry metrics that callbacks hand in (the sample poems' rates).

    Logging from inside a callback with `trainer.log` on one process desynchronises the processes of a
    multi-process run; handing the figures to the next regular log keeps every process on the same path.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending_metrics: dict[str, float] = {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.pending_metrics)
            self.pending_metrics = {}
        super().log(logs, start_time)


class SamplePoemsCallback(TrainerCallback):
    """Every `every_steps` and at the end: sample the policy, log the rule's rate, print the table.

    Reference poems are sampled once before training (the policy then *is* the reference), so no
    reference model is needed here: this works the same with LoRA and precomputed log-probs.
    """

    def __init__(self, trainer: PoemDPOTrainer, titles: list[str], reference_poems: list[str], rule: str,
                 every_steps: int, table_rows: int, max_new_tokens: int, seed: int):
        self.trainer, self.titles, self.reference_poems = trainer, titles, reference_poems
        self.rule, self.every_steps, self.table_rows = rule, every_steps, table_rows
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.last: dict = {}

    def sample(self, step: int) -> dict:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        poems = generate_poems(model, self.trainer.processing_class, self.titles,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)
        metrics = {
            f"samples/{self.rule}_rate": rule_rate(poems, self.rule),
            f"samples/{self.rule}_rate_reference": rule_rate(self.reference_poems, self.rule),
            "samples/five_char_rate": strict_five_rate(poems),
        }
        table = side_by_side(self.titles, poems, self.reference_poems, self.table_rows)
        self.last = {"step": step, "poems": poems, "metrics": metrics, "table": table}
        self.trainer.pending_metrics.update(metrics)
        if not self.trainer.is_world_process_zero():
            return self.last
        print(f"\nstep {step}: {self.rule} rate aligned {metrics[f'samples/{self.rule}_rate']:.2f} "
              f"vs reference {metrics[f'samples/{self.rule}_rate_reference']:.2f}\n{table}\n")
        output = Path(self.trainer.args.output_dir) / "samples.md"
        with open(output, "a", encoding="utf-8") as f:
            f.write(f"\n## step {step}\n\n{table}\n")
        return self.last

    # Every process samples (the same poems) and asks for a log line at this step, so all take the
    # same path through the Trainer; only process 0 prints and writes.
    def on_step_end(self, args, state, control, **kwargs):
        if self.titles and (state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps):
            self.sample(state.global_step)
            control.should_log = True
        return control
