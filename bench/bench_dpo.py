"""DPO training throughput: a plain PyTorch loop (the bound), our train_dpo.py, and stock TRL defaults.

    flock /tmp/poemdpo-heavy.lock python bench/bench_dpo.py            # ~7 min: 3 repetitions + sweep
    flock /tmp/poemdpo-heavy.lock python bench/bench_dpo.py --quick    # ~1 min: 1 repetition, small sweep

Same model (data/base_model, else the same architecture with random weights), the same pairs (the recipe's
shuffle of the train split), the same batch size and max length, fp32, 2 torch threads. Each variant runs in
its own subprocess, so its peak RSS is its own:

  plain  the loop a person writes for the benchmark: policy forward/backward on chosen+rejected concatenated in
         one right-padded batch, reference log-probs under no_grad, -logsigmoid(beta * margin), AdamW, clipping.
  plain_grouped  the same loop on length-grouped batches (transformers' get_length_grouped_indices): the bound
         for a loop that batches the way our recipe does (group_by_length).
  ours   train_dpo.main() with configs/dpo_tiny_cpu.yaml, sampling/eval/saving off, and the loss switched to
         sigmoid alone (--loss_type sigmoid --loss_weights 1.0) so that all three compute the same loss.
  stock  DPOTrainer(model=<path>, args=DPOConfig(...)) as TRL's `trl dpo` script runs it: every default except
         the batch size and, on a machine without a bf16 GPU, bf16=False (the default bf16=True stops with
         "Your setup doesn't support bf16/gpu").

Each child first runs `warmup` untimed steps on other pairs (one-time allocations, kernel set-up), then trains
one timed epoch over steps * batch pairs, whole (length-grouped batches come longest first: skipping the first
steps of the epoch would flatter them). Data preparation is not timed; TRL's reference precompute, when on, is.
Throughput counts pairs and non-padding tokens (prompt + completion + eos, both sequences of a pair), and the
GFLOP/s of the work the loss needs (`dpo_gflops`: a lower bound) beside the fp32 matmul bound measured in the same
run. Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "dpo_tiny_cpu.yaml"
BASE_RECIPE = ROOT / "configs" / "base_tiny_cpu.yaml"
VARIANTS = ("plain", "plain_grouped", "ours", "stock")
# The recipe's speed keys (docs/throughput.md); added on the command line while the recipe lacks them.
TARGETS = {"tokens/s ours / plain": 0.9, "tokens/s ours / stock": 1.5, "peak RSS ours / plain (max)": 1.1}


# --------------------------------------------------------------------------------------------------------------
# Set-up shared by every variant: the pairs, the model directory, the device.


def recipe() -> dict:
    import yaml

    return yaml.safe_load(RECIPE.read_text(encoding="utf-8"))


def ensure_pairs(dataset_dir: str) -> str:
    if not os.path.isdir(dataset_dir):
        subprocess.run([sys.executable, str(ROOT / "build_dataset.py"), "--output_dir", dataset_dir], check=True)
    return dataset_dir


def ensure_model(model_dir: str | None, cache_dir: Path) -> tuple[str, str]:
    """data/base_model when it exists; else the same architecture, random weights (speed does not depend on them)."""
    if model_dir:
        return model_dir, "given"
    if (ROOT / "data" / "base_model" / "config.json").is_file():
        return str(ROOT / "data" / "base_model"), "trained (data/base_model)"
    path = cache_dir / "random_base"
    if not (path / "config.json").is_file():
        import yaml
        from transformers import LlamaConfig, LlamaForCausalLM

        from poemdpo.data.corpus import read_corpus
        from poemdpo.data.prompts import build_prompt
        from poemdpo.models.tokenizer import train_char_tokenizer

        base = yaml.safe_load(BASE_RECIPE.read_text(encoding="utf-8"))
        poems, _ = read_corpus()
        tokenizer = train_char_tokenizer((build_prompt(p.title) + p.text for p in poems), base["min_frequency"],
                                         model_max_length=base["max_length"])
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=base["hidden_size"], intermediate_size=base["intermediate_size"],
            num_hidden_layers=base["num_hidden_layers"], num_attention_heads=base["num_attention_heads"],
            num_key_value_heads=base["num_attention_heads"], max_position_embeddings=base["max_length"],
            tie_word_embeddings=base["tie_word_embeddings"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        import torch

        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path), "random weights, base_tiny_cpu.yaml architecture (data/base_model not trained yet)"


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_pairs(dataset_dir: str, n: int, seed: int):
    """The pairs every variant trains on: train_dpo.py's own selection (shuffle with the recipe seed, first n)."""
    from poemdpo.data.dataset import load_pairs_dir
    from poemdpo.training.dpo import select_pairs

    return select_pairs(load_pairs_dir(dataset_dir)[0]["train"], n, seed)


# --------------------------------------------------------------------------------------------------------------
# (1) The plain PyTorch loop.


def plain_batches(pairs, tokenizer, batch_size: int, max_length: int, seed: int, grouped: bool = False) -> list[dict]:
    """Right-padded [chosen; rejected] batches in a random (or length-grouped) order, tokenized as TRL does (prompt +
    completion + eos, cut at max_length keeping the start)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token
    prompt_texts, chosen_texts, rejected_texts = (list(pairs[c]) for c in ("prompt", "chosen", "rejected"))
    prompts = ids(prompt_texts)
    chosen = ids([p + c + eos for p, c in zip(prompt_texts, chosen_texts, strict=True)])
    rejected = ids([p + r + eos for p, r in zip(prompt_texts, rejected_texts, strict=True)])
    generator = torch.Generator().manual_seed(seed)
    if grouped:
        widths = [min(max(len(c), len(r)), max_length) for c, r in zip(chosen, rejected, strict=True)]
        order = get_length_grouped_indices(widths, batch_size, generator=generator)
    else:
        order = torch.randperm(len(prompts), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [chosen[i][:max_length] for i in rows] + [rejected[i][:max_length] for i in rows]
        prompt_lens = [len(prompts[i]) for i in rows] * 2
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        completion = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens, strict=True)):
            input_ids[j, : len(seq)] = torch.tensor(seq)
            attention[j, : len(seq)] = 1
            completion[j, n_prompt : len(seq)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion})
    return batches


def sequence_logps(model, batch: dict):
    """Sum of log p(token) over each sequence's completion tokens, from the full logits."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    per_token = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(-1)


def run_plain(model_dir: str, pairs, warm_pairs, batch_size: int, max_length: int, settings: dict,
              grouped: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device_name()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings["learning_rate"])
    beta = settings["beta"]
    warm = plain_batches(warm_pairs, tokenizer, batch_size, max_length, settings["seed"], grouped)
    batches = plain_batches(pairs, tokenizer, batch_size, max_length, settings["seed"], grouped)
    times, tokens, completion_tokens = [], [], []
    for i, batch in enumerate(warm + batches):
        if i == len(warm):
            start, times, tokens, completion_tokens = time.perf_counter(), [], [], []
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = sequence_logps(policy, batch)
        with torch.no_grad():
            ref_logps = sequence_logps(reference, batch)
        chosen, rejected = (logps - ref_logps).chunk(2)
        loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        tokens.append(int(batch["attention_mask"].sum()))
        completion_tokens.append(int(batch["completion_mask"].sum()))
    return window(start, times, tokens, completion_tokens, batch_size)


def dpo_gflops(result: dict, backbone: int, head: int) -> float:
    """GFLOP/s of the work the DPO loss needs: policy forward + backward (6 FLOPs per weight) and reference forward
    (2) for every non-padding token through the backbone, and through the LM head for the completion tokens only.
    Attention left out, and the plain loop's head over every position counted as waste: a lower bound."""
    return 8 * (backbone * result["tokens_per_s"] + head * result["completion_tokens_per_s"]) / 1e9


def weight_counts(model_dir: str) -> tuple[int, int]:
    """(backbone weights that multiply, LM head weights) of the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    backbone = sum(p.numel() for p in model.parameters() if p is not head and p is not embed and p.dim() > 1)
    return backbone, head.numel()


def window(start: float, step_ends: list[float], tokens: list[int], completion_tokens: list[int], batch_size: int,
           extra_seconds: float = 0.0):
    """Throughput over the whole timed epoch (completion tokens: those whose log-probs the loss reads)."""
    seconds = step_ends[-1] - start + extra_seconds
    pairs = batch_size * len(step_ends)
    return {"pairs_per_s": pairs / seconds, "tokens_per_s": sum(tokens) / seconds, "seconds": seconds,
            "timed_steps": len(step_ends), "completion_tokens_per_s": sum(completion_tokens) / seconds}


# --------------------------------------------------------------------------------------------------------------
# (2) and (3): trainers, timed from the inside by a callback and a collator that counts tokens.


class Clock:
    """Trainer callback + collator wrapper: the end time of every step and the non-padding tokens of every batch."""

    def __init__(self) -> None:
        self.start = 0.0
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.completion_tokens: list[int] = []
        self.collate = None

    def wrap(self, collate):
        self.collate = collate
        return self

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.completion_tokens.append(int(batch["completion_mask"].sum()))
        return batch

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepEnd(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.start, clock.times, clock.tokens, clock.completion_tokens = time.perf_counter(), [], [], []

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.times.append(time.perf_counter())

        return StepEnd()


def timed(trainer_class, clock: Clock):
    """A subclass that installs the clock and times the reference precompute (when on), which is charged to the
    run: with one epoch, every pair's reference pass is paid either way."""

    class Timed(trainer_class):
        def __init__(self, *args, **kwargs):
            self.precompute_seconds = 0.0
            super().__init__(*args, **kwargs)
            self.data_collator = clock.wrap(self.data_collator)
            self.add_callback(clock.callback())

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.precompute_seconds += time.perf_counter() - start
            return out

    return Timed


def ours_argv(model_dir: str, dataset_dir: str, n_pairs: int, batch_size: int, max_length: int, out: str) -> list:
    argv = [
        "--config", str(RECIPE), "--model_name_or_path", model_dir, "--dataset_name", dataset_dir,
        "--max_train_pairs", str(n_pairs), "--per_device_train_batch_size", str(batch_size),
        "--max_length", str(max_length), "--output_dir", out,
        # the benchmark's changes: no sampling/eval/saving/reporting, and the plain loop's loss
        "--sample_titles", "0", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--loss_type", "sigmoid", "--loss_weights", "1.0",
    ]
    if device_name() == "cuda":
        argv += ["--use_cpu", "false"]  # the CPU recipe pins use_cpu; on a GPU, let it be used
    return argv


def run_ours(model_dir: str, dataset_dir: str, n_pairs: int, batch_size: int, max_length: int, warmup: int) -> dict:
    import train_dpo
    from poemdpo.training import methods

    original = methods.trainer_class  # what train_dpo's build_trainer instantiates for dpo
    try:
        for pairs in (warmup * batch_size, n_pairs):  # an untimed warm-up run, then the timed one
            clock = Clock()
            methods.trainer_class = lambda loss_types, clock=clock: timed(original(loss_types), clock)
            with tempfile.TemporaryDirectory() as out:
                trainer = train_dpo.main(ours_argv(model_dir, dataset_dir, pairs, batch_size, max_length, out))
    finally:
        methods.trainer_class = original
    result = window(clock.start, clock.times, clock.tokens, clock.completion_tokens, batch_size,
                    extra_seconds=trainer.precompute_seconds)
    return {**result, "precompute_seconds": trainer.precompute_seconds}


def stock_config(out: str, batch_size: int, max_length: int):
    """Stock DPOConfig: defaults, the shared batch size and max length, and bf16 off only where it cannot run."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available
    from trl import DPOConfig

    changes = {"output_dir": out, "per_device_train_batch_size": batch_size, "max_length": max_length}
    if not (torch.cuda.is_available() and is_torch_bf16_gpu_available()):
        changes["bf16"] = False  # the default bf16=True raises "Your setup doesn't support bf16/gpu" here
    return DPOConfig(**changes), changes


def run_stock(model_dir: str, pairs, warm_pairs, batch_size: int, max_length: int) -> dict:
    from trl import DPOTrainer

    for train_pairs in (warm_pairs, pairs):  # an untimed warm-up run, then the timed one
        clock = Clock()
        with tempfile.TemporaryDirectory() as out:
            config, _ = stock_config(out, batch_size, max_length)
            trainer = timed(DPOTrainer, clock)(model=model_dir, args=config, train_dataset=train_pairs)
            trainer.train()
    return window(clock.start, clock.times, clock.tokens, clock.completion_tokens, batch_size)


# --------------------------------------------------------------------------------------------------------------
# Child process: one variant, one or more (batch size, max length) points; prints one JSON line.


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    settings = recipe()
    results = []
    for batch_size, max_length in opts.points:
        n_pairs = batch_size * opts.steps
        torch.manual_seed(settings["seed"])
        if opts.child == "ours":
            result = run_ours(opts.model_dir, opts.dataset_dir, n_pairs, batch_size, max_length, opts.warmup)
        else:
            # the timed pairs are train_dpo.py's selection; the warm-up pairs come from further down the shuffle
            everything = bench_pairs(opts.dataset_dir, n_pairs + opts.warmup * batch_size, settings["seed"])
            pairs = everything.select(range(n_pairs))
            warm_pairs = everything.select(range(n_pairs, len(everything)))
            if opts.child.startswith("plain"):
                result = run_plain(opts.model_dir, pairs, warm_pairs, batch_size, max_length, settings,
                                   grouped=opts.child == "plain_grouped")
            else:
                result = run_stock(opts.model_dir, pairs, warm_pairs, batch_size, max_length)
        results.append({"batch_size": batch_size, "max_length": max_length, **result})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print("BENCH_RESULT " + json.dumps({"variant": opts.child, "points": results, "peak_rss_mb": peak_mb}))


def spawn(variant: str, points: list[tuple[int, int]], opts: argparse.Namespace, model_dir: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", variant, "--model_dir", model_dir, "--dataset_dir", opts.dataset_dir,
        "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--threads", str(opts.threads),
        "--points", ",".join(f"{b}x{m}" for b, m in points),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


# --------------------------------------------------------------------------------------------------------------
# Parent: repetitions, medians, ratios, the sweep.


def padding_shares(model_dir: str, dataset_dir: str, batch_size: int, max_length: int, sizes: list[int],
                   seed: int) -> str:
    """Share of padding in random vs length-grouped batches (counted, not timed). Grouping sorts within megabatches
    of min(n // (4 * batch), 50) batches, so it groups better on the recipe's epoch than on the benchmark's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = []
    for n in sizes:
        pairs = bench_pairs(dataset_dir, n, seed)
        shares = []
        for grouped in (False, True):
            batches = plain_batches(pairs, tokenizer, batch_size, max_length, seed, grouped)
            real = sum(int(b["attention_mask"].sum()) for b in batches)
            shares.append(1 - real / sum(b["input_ids"].numel() for b in batches))
        parts.append(f"{n} pairs: random {shares[0]:.0%}, length-grouped {shares[1]:.0%}")
    return "padding share of the batches (counted): " + "; ".join(parts)


def parse_points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in point.split("x")) for point in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer steps, a small sweep (~1 min).")
    parser.add_argument("--reps", type=int, default=3, help="Repetitions of the three-way comparison (median).")
    parser.add_argument("--steps", type=int, default=8, help="Timed optimizer steps per run (one epoch).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps before each timed run.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--max_length", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--sweep_batch_sizes", default="8,16,32", help="Batch sizes of the sweep (at max_length).")
    parser.add_argument("--sweep_max_lengths", default="64,128,256", help="Max lengths of the sweep (at batch_size).")
    parser.add_argument("--no_sweep", action="store_true")
    parser.add_argument("--sweep_variants", default="plain,ours")
    parser.add_argument("--sweep_steps", type=int, default=6, help="Timed steps per sweep point.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model_dir", default=None, help="Default: data/base_model, else random weights.")
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "pairs_five_char"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="Also write every measurement here.")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--points", type=parse_points, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        return child(opts)

    settings = recipe()
    batch_size = opts.batch_size or settings["per_device_train_batch_size"]
    max_length = opts.max_length or settings["max_length"]
    if opts.quick:
        opts.reps, opts.steps, opts.warmup, opts.no_sweep = 1, 4, 1, True
    variants = opts.variants.split(",")
    ensure_pairs(opts.dataset_dir)
    cache = ROOT / "data" / "bench_cache"
    model_dir, model_kind = ensure_model(opts.model_dir, cache)
    import torch

    print(f"model: {model_dir} ({model_kind}); device {device_name()}, torch threads {opts.threads}, torch "
          f"{torch.__version__}")
    print(f"batch {batch_size} pairs, max_length {max_length}, {opts.warmup} + {opts.steps} timed steps per run, "
          f"{opts.reps} repetition(s), variants in alternating order, each in its own process")
    print(padding_shares(model_dir, opts.dataset_dir, batch_size, max_length,
                         [batch_size * opts.steps, settings["max_train_pairs"]], settings["seed"]))
    backbone, head = weight_counts(model_dir)
    from bench_sampling import matmul_gflops

    bound = matmul_gflops()
    print(f"{backbone / 1e6:.2f}M backbone weights, {head / 1e6:.2f}M LM head weights; fp32 matmul bound measured "
          f"now {bound:.0f} GFLOP/s (a 2048² matmul, {opts.threads} threads)")
    print(f"stock changes to DPOConfig(): {stock_config('-', batch_size, max_length)[1]} (output_dir aside)")
    print("ours: train_dpo.main(" + " ".join(ours_argv(model_dir, opts.dataset_dir, 0, batch_size, max_length,
                                                          "<tmp>")[:2]) +
          " + --sample_titles 0 --eval_strategy no --save_strategy no --report_to none --loss_type sigmoid "
          "--loss_weights 1.0 ...)")
    print(flush=True)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(opts.reps):
        order = variants if rep % 2 == 0 else variants[::-1]  # alternate, so drift hits every variant alike
        for variant in order:
            result = spawn(variant, [(batch_size, max_length)], opts, model_dir)
            runs[variant].append({**result["points"][0], "peak_rss_mb": result["peak_rss_mb"]})
            r = runs[variant][-1]
            gflops = dpo_gflops(r, backbone, head)
            print(f"  rep {rep + 1} {variant:5s}: {r['pairs_per_s']:6.2f} pairs/s {r['tokens_per_s']:8.0f} tokens/s "
                  f"{gflops:5.1f} GFLOP/s ({100 * gflops / bound:.0f}% of the bound) "
                  f"peak RSS {r['peak_rss_mb']:5.0f} MB", flush=True)

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print(f"\n| variant | pairs/s | tokens/s (non-padding) | GFLOP/s (share of the bound) | peak RSS MB | "
          f"pairs/s vs plain | ({opts.reps} reps, median) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for v in variants:
        spread = f"{min(r['pairs_per_s'] for r in runs[v]):.2f}–{max(r['pairs_per_s'] for r in runs[v]):.2f}"
        ratio = med(v, "pairs_per_s") / med("plain", "pairs_per_s") if "plain" in runs else float("nan")
        gflops = statistics.median(dpo_gflops(r, backbone, head) for r in runs[v])
        print(f"| {v} | {med(v, 'pairs_per_s'):.2f} | {med(v, 'tokens_per_s'):,.0f} | "
              f"{gflops:.1f} ({100 * gflops / bound:.0f}%) | {med(v, 'peak_rss_mb'):.0f} | "
              f"{ratio:.2f}× | range {spread} pairs/s |")
    if {"plain", "ours", "stock"} <= set(runs):
        figures = {
            "tokens/s ours / plain": med("ours", "tokens_per_s") / med("plain", "tokens_per_s"),
            "tokens/s ours / stock": med("ours", "tokens_per_s") / med("stock", "tokens_per_s"),
            "peak RSS ours / plain (max)": med("ours", "peak_rss_mb") / med("plain", "peak_rss_mb"),
        }
        if "plain_grouped" in runs:
            grouped = med("plain_grouped", "tokens_per_s")
            figures["tokens/s ours / plain_grouped"] = med("ours", "tokens_per_s") / grouped
        print("\n| ratio | measured | target | met |\n|---|---:|---:|---|")
        for name, value in figures.items():
            if name not in TARGETS:
                print(f"| {name} | {value:.2f} | (no target) | |")
                continue
            target = TARGETS[name]
            met = value <= target if "(max)" in name else value >= target
            print(f"| {name} | {value:.2f} | {'≤' if '(max)' in name else '≥'} {target} | {'yes' if met else 'NO'} |")

    sweep = []
    if not opts.no_sweep:
        points = [(b, max_length) for b in map(int, opts.sweep_batch_sizes.split(","))]
        points += [(batch_size, m) for m in map(int, opts.sweep_max_lengths.split(",")) if m != max_length]
        sweep_variants = opts.sweep_variants.split(",")
        print(f"\nsweep ({opts.sweep_steps} timed steps, 1 run each): pairs/s as batch size and max length grow\n\n"
              "| batch | max_length | " + " | ".join(f"{v} pairs/s" for v in sweep_variants) + " | ours / plain |")
        print("|---:|---:|" + "---:|" * (len(sweep_variants) + 1), flush=True)
        opts.steps = opts.sweep_steps
        by_variant = {v: spawn(v, points, opts, model_dir)["points"] for v in sweep_variants}
        for i, (b, m) in enumerate(points):
            rates = [by_variant[v][i]["pairs_per_s"] for v in by_variant]
            ratio = (by_variant["ours"][i]["pairs_per_s"] / by_variant["plain"][i]["pairs_per_s"]
                     if {"ours", "plain"} <= set(by_variant) else float("nan"))
            print(f"| {b} | {m} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {ratio:.2f}× |")
            sweep.append({"batch_size": b, "max_length": m, **{v: by_variant[v][i] for v in by_variant}})
    if opts.json:
        Path(opts.json).write_text(json.dumps({"runs": runs, "sweep": sweep}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
