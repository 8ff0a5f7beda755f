"""Sampling throughput: the evaluation's poems per second, today's settings against the old ones, same run.

    flock /tmp/poemdpo-heavy.lock python bench/bench_sampling.py                 # ~2 min on 2 CPU cores
    flock /tmp/poemdpo-heavy.lock python bench/bench_sampling.py --num_prompts 1200 --threads 1

Every variant samples the same prompts (validation titles of --dataset, each --poems_per_title times) with
`generate_samples` at temperature 1.0, plain sampling, the same seed. Variants:

  dynamic@64     the first default: transformers' dynamic KV cache (concatenated every step), 64 poems at once,
                 tokens drawn by torch.multinomial
  dynamic@256    the same cache, 256 at once
  static@64      a static KV cache (preallocated, written in place), 64 at once
  static@256     the static cache, 256 at once (generation.SAMPLE_BATCH_SIZE, CACHE_IMPLEMENTATION)
  all-pinned     static@256 as it ran before generation.plain_sampling: every PLAIN_SAMPLING setting passed to
                 generate, so min_p=0.0 and min_new_tokens=0 built logits processors that change nothing
  static@256+cdf static@256, each token drawn by inverse CDF (generation.DEFAULT_SAMPLER)
  dynamic@32+cdf how the RL trainers sample (TRL's generate call, 32 poems a step, its default dynamic cache)
  drop@256+cdf   256 at once, inverse CDF, decoded by generation.sample_dropping_finished (a static KV cache;
                 finished poems leave the batch instead of waiting for the batch's longest), the cache full-length
  drop@B+cdf+growC  the same, B poems at once, the cache C positions past the prompts, grown by C when full
                 (generation.CACHE_CHUNK)

Reported: poems/s, generated tokens/s, and the achieved GFLOP/s of the forward passes (2 FLOPs per weight per
generated token, the LM head included, attention left out: a lower bound) beside the fp32 matmul bound measured
in the same process (a 2048x2048 matmul), and the process's peak RSS so far (run one variant per process to read
each variant's own). Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poemdpo.data.dataset import load_held_out_poems  # noqa: E402
from poemdpo.models import generation  # noqa: E402
from poemdpo.models.generation import generate_samples  # noqa: E402
from poemdpo.models.loading import load_for_inference  # noqa: E402

# name -> generate_samples settings
GENERATE = {"drop_finished": False}  # transformers' generate, every finished poem kept until the batch's longest ends
VARIANTS = {
    "dynamic@64": {**GENERATE, "cache_implementation": None, "batch_size": 64, "sampler": "multinomial"},
    "dynamic@256": {**GENERATE, "cache_implementation": None, "batch_size": 256, "sampler": "multinomial"},
    "static@64": {**GENERATE, "cache_implementation": "static", "batch_size": 64, "sampler": "multinomial"},
    "static@256": {**GENERATE, "cache_implementation": "static", "batch_size": 256, "sampler": "multinomial"},
    "all-pinned": {**GENERATE, "cache_implementation": "static", "batch_size": 256, "sampler": "multinomial"},
    "static@256+cdf": {**GENERATE, "cache_implementation": "static", "batch_size": 256, "sampler": "inverse_cdf"},
    "dynamic@32+cdf": {**GENERATE, "cache_implementation": None, "batch_size": 32, "sampler": "inverse_cdf"},
    "drop@32+cdf+grow32": {"drop_finished": True, "batch_size": 32, "sampler": "inverse_cdf", "cache_chunk": 32},
    "drop@256+cdf": {"drop_finished": True, "batch_size": 256, "sampler": "inverse_cdf", "cache_chunk": None},
    "drop@256+cdf+grow32": {"drop_finished": True, "batch_size": 256, "sampler": "inverse_cdf", "cache_chunk": 32},
    "drop@256+cdf+grow64": {"drop_finished": True, "batch_size": 256, "sampler": "inverse_cdf", "cache_chunk": 64},
    "drop@512+cdf+grow32": {"drop_finished": True, "batch_size": 512, "sampler": "inverse_cdf", "cache_chunk": 32},
    "drop@1024+cdf+grow32": {"drop_finished": True, "batch_size": 1024, "sampler": "inverse_cdf", "cache_chunk": 32},
}


def all_pinned(model, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
    """generation.plain_sampling as it was: every PLAIN_SAMPLING setting passed, neutral or not."""
    return {**generation.PLAIN_SAMPLING, "temperature": temperature, "top_k": top_k, "top_p": top_p}


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/base_model", help="model directory (sampled from)")
    parser.add_argument("--dataset", default="data/pairs_five_char", help="dataset whose validation titles to use")
    parser.add_argument("--num_prompts", type=int, default=512, help="poems per variant")
    parser.add_argument("--poems_per_title", type=int, default=4, help="poems per title, as in evaluate.py")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler's table for one batch of the first variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_for_inference(args.model, device="cpu")
    titles = sorted(set(load_held_out_poems(args.dataset, "validation")["title"]))
    prompts = [t for t in titles for _ in range(args.poems_per_title)][: args.num_prompts]
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if getattr(model.config, "tie_word_embeddings", False):
        weights += model.get_output_embeddings().weight.numel()  # the tied LM head multiplies too
    bound = matmul_gflops()
    print(f"model {args.model}: {weights / 1e6:.2f}M multiplying weights; {len(prompts)} prompts; "
          f"{args.threads} threads; fp32 matmul bound {bound:.0f} GFLOP/s")
    lean = generation.plain_sampling
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        settings = VARIANTS[args.variants.split(",")[0]]
        batch = settings["batch_size"]
        generate_samples(model, tokenizer, prompts[:batch], max_new_tokens=16, **settings)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_samples(model, tokenizer, prompts[:batch], max_new_tokens=60, seed=0, **settings)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    print("| variant | seconds | poems/s | tokens/s | GFLOP/s (share of bound) | unfinished | peak RSS MB so far |")
    print("|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        settings = VARIANTS[name]
        generation.plain_sampling = all_pinned if name == "all-pinned" else lean
        warm_up = prompts[: settings["batch_size"]]  # allocations
        generate_samples(model, tokenizer, warm_up, max_new_tokens=16, **settings)
        start = time.perf_counter()
        samples = generate_samples(model, tokenizer, prompts, seed=0, **settings)
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) + s.finished for s in samples)
        gflops = 2 * weights * tokens / seconds / 1e9
        print(f"| {name} | {seconds:.1f} | {len(samples) / seconds:.1f} | {tokens / seconds:.0f} | "
              f"{gflops:.1f} ({100 * gflops / bound:.1f}%) | {sum(not s.finished for s in samples)} | "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
