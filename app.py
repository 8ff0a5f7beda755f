"""The side-by-side page: the aligned and the reference model write a poem for the same title.

    python app.py                                                    # data/dpo_grpo_five_char vs data/base_model
    python app.py --model data/dpo_seven_char --rule seven_char --port 7861
    python app.py --model you/aligned-qwen --reference Qwen/Qwen2.5-0.5B-Instruct   # Hub ids, when online
    python app.py --host 0.0.0.0                                     # reachable from other machines

Serves on http://127.0.0.1:7860 by default; --share publishes a public link only when asked.
Options are AppArguments in poemdpo/app.py; see --help.
"""

import argparse
import sys

from transformers import HfArgumentParser

from poemdpo.app import AppArguments, main
from poemdpo.errors import PoemDPOError


def run(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(AppArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        main(args)
    except PoemDPOError as e:
        sys.exit(f"app.py: {e}")


if __name__ == "__main__":
    run()
