"""Where a DPO step's time goes: torch.profiler over steps of train_dpo.py as bench_dpo.py's `ours` variant runs it.

    flock /tmp/poemdpo-heavy.lock python bench/profile_dpo.py             # ~2 min on 2 CPU cores
    flock /tmp/poemdpo-heavy.lock python bench/profile_dpo.py --shapes    # the top ops by input shape

The recipe (configs/dpo_tiny_cpu.yaml) with bench_dpo.py's changes (no sampling, evaluation or saving; sigmoid
loss alone), batch 16, max length 256, fp32; --warmup untimed steps, then --steps profiled. Prints the profiler's
table sorted by self CPU time; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(ROOT / "data" / "base_model"))
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "pairs_five_char"))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before profiling")
    parser.add_argument("--steps", type=int, default=12, help="steps profiled")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", action="store_true", help="group the table by input shape")
    args = parser.parse_args()

    import torch
    from bench_dpo import ours_argv
    from torch.profiler import ProfilerActivity, profile

    import train_dpo
    from poemdpo.training import methods

    torch.set_num_threads(args.threads)
    original = methods.trainer_class

    def profiled(loss_types):
        class Profiled(original(loss_types)):
            def training_step(self, *a, **k):
                self.n_steps = getattr(self, "n_steps", 0) + 1
                if self.n_steps == args.warmup + 1:
                    self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes)
                    self.profiler.__enter__()
                    self.started = time.perf_counter()
                out = super().training_step(*a, **k)
                if self.n_steps == args.warmup + args.steps:
                    seconds = time.perf_counter() - self.started
                    self.profiler.__exit__(None, None, None)
                    print(f"{args.steps} steps profiled in {seconds:.2f} s")
                    table = self.profiler.key_averages(group_by_input_shape=args.shapes)
                    print(table.table(sort_by="self_cpu_time_total", row_limit=25))
                return out

        return Profiled

    methods.trainer_class = profiled
    try:
        with tempfile.TemporaryDirectory() as out:
            pairs = args.batch_size * (args.warmup + args.steps)
            train_dpo.main(ours_argv(args.model_dir, args.dataset_dir, pairs, args.batch_size, 256, out))
    finally:
        methods.trainer_class = original


if __name__ == "__main__":
    main()
