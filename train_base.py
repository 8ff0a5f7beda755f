"""Train the default base model: a small character-level Llama, from scratch, on the corpus's training split.

    python train_base.py                                   # the recipe configs/base_tiny_cpu.yaml
    python train_base.py --config my.yaml --learning_rate 1e-3
    python train_base.py --resume_from_checkpoint true     # continue from the latest checkpoint

Options are BaseModelArguments (poemdpo/models/base_model.py) and transformers' TrainingArguments; see --help.
Without --config, the recipe above is read first; command-line options override it.
"""

import logging
import sys

from transformers import Trainer, TrainingArguments
from trl import TrlParser

from poemdpo.errors import PoemDPOError
from poemdpo.models.base_model import BaseModelArguments, train_base
from poemdpo.training.recipe import parse_recipe, with_default_recipe

DEFAULT_CONFIG = "configs/base_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> Trainer:
    argv = with_default_recipe(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG)
    parser = TrlParser((BaseModelArguments, TrainingArguments), description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args, training_args = parse_recipe(parser, argv)
        trainer = train_base(args, training_args)
    except PoemDPOError as e:
        parser.error(str(e))
    print(f"saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
