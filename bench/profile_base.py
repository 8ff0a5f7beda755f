"""Where a base-training step's time goes: the plain loop on the recipe's batches, eager or compiled, timed or
profiled. Prints figures only (docs/throughput.md, issue 16).

    flock /tmp/poemdpo-heavy.lock python bench/profile_base.py --mode eager     # steps/s, tokens/s
    flock /tmp/poemdpo-heavy.lock python bench/profile_base.py --mode compile   # the same under torch.compile
    flock /tmp/poemdpo-heavy.lock python bench/profile_base.py --mode profile   # torch.profiler table of 5 steps

fp32 (--bf16: bf16 autocast, fp32 weights, as the recipe where the CPU has bf16 units), --threads torch threads
(default 2), --attn the attention implementation, the first --poems training poems, batches of --batch_size bfd
blocks as train_base.py packs them (compile: every batch padded to the full block, one shape).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from poemdpo.models.base_model import BaseModelArguments, load_training_texts, make_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["eager", "compile", "profile"], default="eager")
    parser.add_argument("--poems", type=int, default=4000, help="training poems to pack batches from")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per step (the recipe's)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling, allocations)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (profile: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    parser.add_argument("--bf16", action="store_true", help="forward under torch.autocast(cpu, bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_args = BaseModelArguments(max_poems=args.poems)
    training_args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                                      use_cpu=True, bf16=False, report_to=[], seed=42,
                                      torch_compile=args.mode == "compile")  # one batch width
    trainer = make_trainer(model_args, training_args, load_training_texts(model_args))
    trainer.model.set_attn_implementation(args.attn)
    steps = 5 if args.mode == "profile" else args.steps
    batches = [b for _, b in zip(range(args.warmup + steps), trainer.get_train_dataloader(), strict=False)]
    model = torch.compile(trainer.model) if args.mode == "compile" else trainer.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for batch in batches[: args.warmup]:
        step(batch)
    print(f"batch {tuple(batches[0]['input_ids'].shape)}; warm-up {args.warmup} steps: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    timed = batches[args.warmup :]
    if args.mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in timed:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - start
    tokens = sum(int((b["input_ids"] != trainer.processing_class.pad_token_id).sum()) for b in timed)
    precision = "bf16" if args.bf16 else "fp32"
    print(f"{args.mode} {precision} {args.attn}: {len(timed) / seconds:.2f} steps/s, "
          f"{tokens / seconds:,.0f} tokens/s (padding aside)")


if __name__ == "__main__":
    main()
