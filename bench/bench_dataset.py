"""Time the full corpus -> preference dataset build (reading, cleaning, pairing, saving).

    python bench/bench_dataset.py [--corpus PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import build_dataset  # noqa: E402
from poemdpo.data.corpus import DEFAULT_CORPUS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="corpus directory or file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pairing strategy; the median is shown")
    args = parser.parse_args()
    for pairing in ("random", "length_matched"):
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                stats = build_dataset.main(["--corpus", args.corpus, "--output_dir", out, "--pairing", pairing])
                times.append(time.perf_counter() - start)
        print(
            f"BENCH pairing={pairing}: {stats['corpus']['poems_read']} poems read, "
            f"{stats['pairs']['train']} train / {stats['pairs']['test']} test pairs, "
            f"median {statistics.median(times):.2f}s over {args.repeats} runs (target <= 15 s)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
