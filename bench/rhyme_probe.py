"""Does a model track rhyme? The rhyme probe (poemdpo.evaluation.probes) on each model given, one row each.

    python bench/rhyme_probe.py --models data/base_model data/base_seed1 data/dpo_five_char     # seconds each

At line 4's rhyme slot of held-out rhyming 五言 poems (4 or 8 lines), the mean probability on line 2's rhyme
group, as written and after line 2's rhyme character is swapped into another 平 group; `shift` is how much
probability follows line 2 into the new group (0: blind to rhyme, 1: always rhymes with line 2). `true > random`
is the share of poems where the written rhyme character beats a random 平 character of another group (fluency
passes it). Every base model trained should get a row here (issue #13).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poemdpo.data.dataset import load_held_out_poems  # noqa: E402
from poemdpo.evaluation.probes import probe_table, rhyme_probe  # noqa: E402
from poemdpo.models.loading import load_for_inference  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["data/base_model"], help="Model directories or Hub ids.")
    parser.add_argument("--dataset", default="data/pairs_five_char", help="Dataset directory with held-out poems.")
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="Held-out poems to probe.")
    parser.add_argument("--num_poems", type=int, default=256, help="Rhyming poems probed (fewer if the split has "
                        "fewer).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the swapped-in and random characters.")
    parser.add_argument("--output", default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)

    poems = load_held_out_poems(args.dataset, args.split)
    results = []
    for name in args.models:
        model, tokenizer = load_for_inference(name)
        results.append((name, rhyme_probe(model, tokenizer, poems["title"], poems["poem"], n=args.num_poems,
                                          seed=args.seed, progress=True)))
    print(probe_table(results))
    rows = [{"model": name, **result.to_dict()} for name, result in results]
    if args.output:
        Path(args.output).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
