"""What a stage records about the artefact it wrote, in plain JSON beside it (`poemdpo.json`).

Later stages read this file and nothing else of a model directory's training state: never the Trainer's
pickled `training_args.bin`, which would run whatever code a downloaded checkpoint's pickle holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from poemdpo.data.splits import SplitSpec
from poemdpo.errors import PoemDPOError

RUN_INFO = "poemdpo.json"


def write_run_info(directory: str | Path, info: dict) -> Path:
    path = Path(directory) / RUN_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_run_info(model: str | Path) -> dict:
    """The recorded run info of a local directory or a Hub repo id; {} when it records none."""
    local = Path(model)
    if local.is_dir():
        path = local / RUN_INFO
        if not path.is_file():
            return {}
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model), RUN_INFO))
        except Exception:  # offline, no such repo, no such file: nothing recorded that we can read
            return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PoemDPOError(f"{path} is not valid JSON ({e}); delete it or re-run the stage that wrote it") from None
    if not isinstance(info, dict):
        raise PoemDPOError(f"{path} must hold a JSON object")
    return info


def recorded_splits(model: str | Path) -> SplitSpec | None:
    return SplitSpec.from_dict(read_run_info(model).get("splits"))


def parse_resume(value: str | bool | None) -> bool | str | None:
    """`--resume_from_checkpoint` as the Trainer takes it: None (from scratch) for false, True for the latest
    checkpoint, else a checkpoint directory that exists. transformers would take the string "false" as a path."""
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True"):
        return True
    if not Path(value).is_dir():
        raise PoemDPOError(
            f"resume_from_checkpoint {value!r} is not a checkpoint directory; pass true for the latest checkpoint "
            "in output_dir, or false"
        )
    return str(value)
