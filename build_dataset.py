"""Build the poem preference dataset: corpus JSON files -> `datasets.DatasetDict` on disk.

    python build_dataset.py                                   # default corpus, rule five_char
    python build_dataset.py --rule seven_char --pairing random --output_dir data/pairs_7
    python build_dataset.py --on_policy_model data/base_model --output_dir data/pairs_on_policy

The output directory is a Hub-layout dataset: `datasets.load_dataset(dir)` reads the pairs (train / validation /
test), `load_dataset(dir, "poems")` every held-out poem; `trl dpo --dataset_name dir` trains on it as it is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from poemdpo.data.corpus import DEFAULT_CORPUS, read_corpus
from poemdpo.data.dataset import build_preference_dataset, held_out_poems, push_to_hub, save
from poemdpo.data.on_policy import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLES,
    DEFAULT_TITLES,
    harden_rhyme_near_misses,
    load_sampler,
    with_on_policy_train,
)
from poemdpo.data.pairs import DEFAULT_NEAR_MISS_SHARE, DEFAULT_PAIRING, STRATEGIES
from poemdpo.data.rules import RULES
from poemdpo.data.splits import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_SIZE,
    DEFAULT_VALIDATION_SIZE,
    SplitSpec,
    split_poems,
)
from poemdpo.errors import PoemDPOError


@dataclass
class BuildArguments:
    corpus: str = field(
        default=str(DEFAULT_CORPUS),
        metadata={"help": "A directory of chinese-poetry JSON files (poet.tang.*.json / poet.song.*.json) "
                  "or a single such file."},
    )
    output_dir: str = field(
        default=None, metadata={"help": "Where to save the DatasetDict (default: data/pairs_<rule>)."}
    )
    rule: str = field(
        default="five_char",
        metadata={"help": "Which poems are preferred; all others are rejected.", "choices": sorted(RULES)},
    )
    pairing: str = field(
        default=DEFAULT_PAIRING,
        metadata={"help": "random: any rejected poem; length_matched: the rejected poem nearest in length, "
                  "so DPO cannot win by length alone.", "choices": list(STRATEGIES)},
    )
    near_miss_share: float = field(
        default=DEFAULT_NEAR_MISS_SHARE,
        metadata={"help": "Share of train pairs whose rejected poem is the chosen poem with one line a character "
                  "shorter or longer (the slip an aligned model still makes), or, for the prosody rules, with the "
                  "rhyme character of a later even line swapped for a 平 character of another group; test pairs "
                  "are never near misses."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for the pairing (which poems meet)."})
    split_seed: int = field(
        default=DEFAULT_SPLIT_SEED,
        metadata={"help": "Seed of the title hash that splits train / validation / test. The base model must be "
                  "trained with the same split (train_dpo.py and evaluate.py refuse a mix)."},
    )
    validation_size: float = field(
        default=DEFAULT_VALIDATION_SIZE,
        metadata={"help": "Share of titles held out for validation: every recipe choice is made on these."},
    )
    test_size: float = field(
        default=DEFAULT_TEST_SIZE,
        metadata={"help": "Share of titles held out for test: the headline is measured on these only."},
    )
    to_simplified: bool = field(
        default=False, metadata={"help": "Convert to simplified characters with OpenCC (default: keep traditional)."}
    )
    skip_bad: bool = field(
        default=False,
        metadata={"help": "Count and skip unreadable files and malformed poems instead of stopping at the first."},
    )
    push_to_hub: str = field(
        default=None, metadata={"help": "A Hub dataset repo id to push to, with a dataset card."}
    )
    on_policy_model: str = field(
        default=None,
        metadata={"help": "A local causal LM directory (e.g. data/base_model). When set, the train split is "
                  "on-policy: pairs of the model's own poems, sampled at temperature 1.0 for training titles and "
                  "labelled by the rule. The test split stays the corpus pairs."},
    )
    near_miss_model: str = field(
        default=None,
        metadata={"help": "Prosody rules (rhyme, gelv) with --near_miss_share > 0: a local causal LM directory whose "
                  "own likeliest 平 character of another group replaces each train near miss's swapped rhyme "
                  "character (a hard negative: it fits the line as well as the model's own choice would)."},
    )
    on_policy_samples: int = field(
        default=DEFAULT_SAMPLES,
        metadata={"help": "Poems sampled per title (K). A title gives pairs only if its samples include both a "
                  "preferred and a rejected poem; each preferred one is chosen once."},
    )
    on_policy_titles: int = field(
        default=DEFAULT_TITLES,
        metadata={"help": "How many training titles to sample for, drawn with --seed (all of them if fewer)."},
    )
    on_policy_batch_size: int = field(
        default=DEFAULT_BATCH_SIZE, metadata={"help": "Prompts per generate call when sampling."}
    )
    on_policy_max_new_tokens: int = field(
        default=None,
        metadata={"help": "Longest sampled poem in tokens (default: the model's generation_config.max_new_tokens, "
                  "else 128); always cut so prompt + poem fit the model's max_position_embeddings."},
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=argv)
    output_dir = args.output_dir or f"data/pairs_{args.rule}"
    start = time.perf_counter()
    try:
        splits = SplitSpec(args.validation_size, args.test_size, args.split_seed)
        if args.near_miss_model and (args.rule not in RULES or RULES[args.rule].near_miss != "rhyme"
                                     or args.near_miss_share <= 0):
            raise PoemDPOError(f"--near_miss_model hardens rhyme near misses: it needs a prosody rule (--rule rhyme "
                               f"or gelv) and --near_miss_share > 0, got --rule {args.rule} and --near_miss_share "
                               f"{args.near_miss_share}")
        # Loaded first, so a wrong model path fails before the corpus is read.
        sampler = load_sampler(args.on_policy_model) if args.on_policy_model else None
        hardener = load_sampler(args.near_miss_model) if args.near_miss_model else None
        poems, corpus_stats = read_corpus(args.corpus, skip_bad=args.skip_bad, to_simplified=args.to_simplified)
        dataset, stats = build_preference_dataset(
            poems,
            args.rule,
            args.pairing,
            args.seed,
            splits,
            corpus_stats,
            near_miss_share=args.near_miss_share,
        )
        if hardener:
            model, tokenizer = hardener
            dataset, stats = harden_rhyme_near_misses(
                dataset, stats, model, tokenizer, args.near_miss_model, rule=args.rule, progress=True
            )
        if sampler:
            model, tokenizer = sampler
            dataset, stats = with_on_policy_train(
                dataset,
                stats,
                split_poems(poems, splits)["train"],
                model,
                tokenizer,
                args.on_policy_model,
                rule=args.rule,
                strategy=args.pairing,
                seed=args.seed,
                samples_per_title=args.on_policy_samples,
                num_titles=args.on_policy_titles,
                batch_size=args.on_policy_batch_size,
                max_new_tokens=args.on_policy_max_new_tokens,
                progress=True,
            )
        poems_held_out = held_out_poems(poems, splits)
    except ValueError as e:  # PoemDPOError, and generate_samples' checks of the on-policy settings
        sys.exit(f"build_dataset.py: error: {e}")
    save(dataset, stats, output_dir, poems_held_out)
    print(json.dumps(stats, ensure_ascii=False, indent=2))
    print(f"saved {dataset} to {output_dir} in {time.perf_counter() - start:.1f}s")
    if args.push_to_hub:
        try:
            push_to_hub(output_dir, args.push_to_hub)
        except PoemDPOError as e:
            sys.exit(f"build_dataset.py: error: {e}")
    return stats


if __name__ == "__main__":
    main()
