"""Benchmark the base-model recipe; prints figures, asserts nothing.

(a) speed: tokens/s of a plain PyTorch loop (transformers' own loss) and of our trainer (the recipe's, e.g. its
    chunked loss) on the same initial weights and the same batches (the trainer's own dataloader), side by side,
    alternating, and their ratio; each with its GFLOP/s and share of the matmul bound measured in the run, in the
    precision it trains in (bf16 where the CPU has bf16 units and the recipe asks for it, else fp32);
(b) --full_epoch: train the whole recipe (writes --output_dir, default data/base_model) and time it;
(c) quality of the model in --model_dir (default: the output dir): poems sampled at temperature 1.0 for
    held-out titles, their well-formed / 五言 / 七言 rates, and the held-out loss per character.

    flock /tmp/poemdpo-heavy.lock python bench/bench_base.py --config configs/base_tiny_cpu.yaml
    flock /tmp/poemdpo-heavy.lock python bench/bench_base.py --config configs/base_tiny_cpu.yaml --full_epoch

Any recipe key can be overridden to see what a switch costs, e.g. `--chunked_loss false`, `--bf16 true` or
`--per_device_train_batch_size 32`; `--sft_trainer true` times TRL's SFTTrainer instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import TrlParser  # noqa: E402

from poemdpo.data import forms  # noqa: E402
from poemdpo.data.corpus import read_corpus  # noqa: E402
from poemdpo.data.prompts import build_prompt  # noqa: E402
from poemdpo.data.splits import split_poems  # noqa: E402
from poemdpo.evaluation.metrics import loss_per_character, well_formed_rate  # noqa: E402
from poemdpo.models.base_model import (  # noqa: E402
    BaseModelArguments,
    build_model,
    fall_back_to_fp32,
    load_training_texts,
    make_trainer,
    splits_of,  # noqa: E402
    train_base,
)
from poemdpo.models.generation import generate_poems  # noqa: E402
from poemdpo.models.tokenizer import train_char_tokenizer  # noqa: E402


@dataclass
class BenchArguments:
    steps: int = field(default=60, metadata={"help": "(a): timed optimizer steps per side, after the warm-up."})
    warmup: int = field(default=3, metadata={"help": "(a): untimed steps first (allocations, caches)."})
    rounds: int = field(
        default=3, metadata={"help": "(a): alternate plain loop and trainer this many times; the median ratio counts."}
    )
    skip_speed: bool = field(default=False, metadata={"help": "Skip (a)."})
    sft_trainer: bool = field(
        default=False, metadata={"help": "(a): time TRL's SFTTrainer (recipe data, fused LM head) instead."}
    )
    full_epoch: bool = field(default=False, metadata={"help": "(b): train the full recipe into --output_dir, timed."})
    model_dir: str | None = field(
        default=None, metadata={"help": "(c): the model to evaluate; default --output_dir; 'none' skips (c)."}
    )
    samples: int = field(default=200, metadata={"help": "(c): held-out titles to write one poem each for."})
    loss_poems: int = field(default=1000, metadata={"help": "(c): held-out poems scored for the loss per character."})
    sample_seed: int = field(default=0, metadata={"help": "(c): seed for choosing titles and for sampling."})


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


class RecordingCollator:
    """Wraps the trainer's collator and keeps every batch it makes, to check both sides train on the same."""

    def __init__(self, collate) -> None:
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append(batch)
        return batch


def _digest(batch: dict) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]


def _tokens(batch: dict, pad_token_id: int) -> int:
    """Tokens the model reads, padding aside (labels skip each poem's first token, and prompts under prompt_loss)."""
    return int((batch["input_ids"] != pad_token_id).sum())


def plain_loop(model, batches: list[dict], trainer: Trainer, warmup: int) -> float:
    """The textbook loop: forward with labels, backward, clip, optimizer step. Returns timed tokens/s.

    Same optimizer as the trainer builds (class, hyper-parameters, no weight decay on norms), same
    precision (bf16 autocast when the recipe asks for it).
    """
    training_args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": training_args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if training_args.bf16 else contextlib.nullcontext()
    model.train()
    tokens, start = 0, time.perf_counter()
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += _tokens(batch, trainer.processing_class.pad_token_id)
    return tokens / (time.perf_counter() - start)


def _sft_trainer(args: BaseModelArguments, training_args: TrainingArguments, texts: list[str]):
    """TRL's SFTTrainer on the same data and model (for comparison only): wrapped packing, no padding-free."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = train_char_tokenizer(texts, args.min_frequency, model_max_length=args.max_length)
    shared = {k: v for k, v in training_args.to_dict().items() if k in SFTConfig.__dataclass_fields__}
    config = SFTConfig(
        **shared,
        max_length=args.max_length,
        packing=True,
        packing_strategy="wrapped",
        shuffle_dataset=True,
    )
    dataset = Dataset.from_dict({"text": [t + tokenizer.eos_token for t in texts]})
    model = build_model(args, tokenizer)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def matmul_weights(model: torch.nn.Module) -> int:
    """Weights that multiply every token (the LM head included, counted once when tied); training does ~6 FLOPs each
    per token. Attention scores are left out, so GFLOP/s from it is a lower bound."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _rate(tokens_per_s: float, flops_per_token: int, bound: float) -> str:
    gflops = tokens_per_s * flops_per_token / 1e9
    return f"{tokens_per_s:,.0f} tokens/s ({gflops:.0f} GFLOP/s, {100 * gflops / bound:.0f}% of the bound)"


def speed(args: BaseModelArguments, training_args: TrainingArguments, bench: BenchArguments) -> None:
    from bench_sampling import matmul_gflops

    fall_back_to_fp32(training_args)  # time what train_base.py would train with on this CPU
    # the bound of the precision the matmuls run in
    precision, dtype = ("bf16", torch.bfloat16) if training_args.bf16 else ("fp32", torch.float32)
    bound = matmul_gflops(dtype=dtype)
    texts = load_training_texts(args)
    n = bench.warmup + bench.steps
    name = "SFTTrainer" if bench.sft_trainer else "Trainer"
    print(
        f"\n(a) speed: {n} steps per side ({bench.warmup} untimed), torch threads {torch.get_num_threads()}, "
        f"bf16 {training_args.bf16}, activation checkpointing {training_args.activation_checkpointing}, "
        f"optimizer {training_args.optim}"
    )
    ratios = []
    for round_ in range(bench.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            training_args.output_dir = tmp
            training_args.max_steps = n
            training_args.report_to = []
            training_args.save_strategy = "no"
            trainer = (
                _sft_trainer(args, training_args, texts)
                if bench.sft_trainer
                else make_trainer(args, training_args, texts)
            )
            recorder = RecordingCollator(trainer.data_collator)
            trainer.data_collator = recorder
            batches = [batch for _, batch in zip(range(n), trainer.get_train_dataloader(), strict=False)]
            recorder.batches.clear()

            model = build_model(args, trainer.processing_class)
            model.load_state_dict(trainer.model.state_dict())
            plain = plain_loop(model, batches, trainer, bench.warmup)

            clock = StepClock()
            trainer.add_callback(clock)
            trainer.train()
            timed = recorder.batches[bench.warmup : n]
            pad = trainer.processing_class.pad_token_id
            ours = sum(_tokens(b, pad) for b in timed) / (clock.times[n - 1] - clock.times[bench.warmup - 1])
            same = list(map(_digest, recorder.batches[:n])) == list(map(_digest, batches))
            ratios.append(ours / plain)
            flops = 6 * matmul_weights(model)
            print(
                f"round {round_ + 1}: batch {tuple(batches[0]['input_ids'].shape)}, same batches {same} | "
                f"plain loop {_rate(plain, flops, bound)} | {name} {_rate(ours, flops, bound)} | "
                f"ratio {ours / plain:.2f}",
                flush=True,
            )
    print(f"median ratio {name}/plain over {len(ratios)} rounds: {statistics.median(ratios):.2f}; {precision} matmul "
          f"bound measured at the start {bound:.0f} GFLOP/s (a 2048² matmul)")


def full_epoch(args: BaseModelArguments, training_args: TrainingArguments) -> None:
    print(f"\n(b) full epoch into {training_args.output_dir}", flush=True)
    start = time.perf_counter()
    trainer = train_base(args, training_args)
    wall = time.perf_counter() - start
    runtime = next(h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h)
    blocks = len(trainer.train_dataset)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    print(
        f"epoch: {trainer.state.global_step} steps, {blocks:,} blocks, {tokens:,} tokens; training "
        f"{runtime / 60:.1f} min ({tokens / runtime:,.0f} tokens/s); wall time with data prep and saving "
        f"{wall / 60:.1f} min",
        flush=True,
    )


def _rates(texts: list[str]) -> str:
    meters = [forms.classify(t).meter for t in texts]
    well = well_formed_rate(texts)
    five, seven = meters.count("五言") / len(texts), meters.count("七言") / len(texts)
    return f"well-formed {well:.1%}, 五言 {five:.1%}, 七言 {seven:.1%}"


def quality(model_dir: str, args: BaseModelArguments, bench: BenchArguments) -> None:
    print(f"\n(c) quality of {model_dir}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    poems, _ = read_corpus(args.corpus, progress=False)
    test = split_poems(poems, splits_of(args))["validation"]  # choices read validation, never test
    rng = random.Random(bench.sample_seed)

    scored = rng.sample(test, min(bench.loss_poems, len(test)))
    loss = loss_per_character(
        model,
        tokenizer,
        [build_prompt(p.title) for p in scored],
        [p.text for p in scored],
        batch_size=32,
        max_length=model.config.max_position_embeddings,
    )
    print(f"held-out loss: {loss:.3f} nats/character ({len(scored)} unseen poems, eos included)")

    titles = rng.sample(sorted({p.title for p in test}), min(bench.samples, len(test)))
    config = model.generation_config
    start = time.perf_counter()
    written = generate_poems(
        model,
        tokenizer,
        titles,
        temperature=config.temperature,
        # No max_new_tokens: the saved default, cut so prompt + poem fit the context the model was trained on.
        batch_size=50,
        seed=bench.sample_seed,
    )
    print(
        f"{len(written)} samples at temperature {config.temperature} "
        f"({time.perf_counter() - start:.0f} s): {_rates(written)}"
    )
    print(f"held-out corpus poems ({len(test)}): {_rates([p.text for p in test])}")
    for title, poem in list(zip(titles, written, strict=True))[:3]:
        print(f"--- {title}\n{poem}")


def main() -> None:
    parser = TrlParser((BaseModelArguments, TrainingArguments, BenchArguments), description=__doc__)
    args, training_args, bench = parser.parse_args_and_config()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    output_dir = training_args.output_dir
    if not bench.skip_speed:
        speed(args, training_args, bench)
    if bench.full_epoch:
        # (a) changed the training arguments; train with the recipe as given.
        full_epoch(args, parser.parse_args_and_config()[1])
    model_dir = bench.model_dir or output_dir
    if model_dir != "none":
        if Path(model_dir, "config.json").is_file():
            quality(model_dir, args, bench)
        else:
            print(f"\n(c) skipped: no model in {model_dir!r} (train one, or pass --model_dir)")


if __name__ == "__main__":
    main()
