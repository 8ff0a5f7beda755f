"""The one loader: a causal LM and its tokenizer from a local directory or a Hub id, for any stage.

Every stage (DPO, evaluation, on-policy sampling, benches, the demo page) loads a model here, so a missing
directory, a directory without a tokenizer or a Hub id while offline reads the same everywhere. Nothing in a
model directory is executed: no `trust_remote_code` unless the caller passes it, no pickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from poemdpo.errors import PoemDPOError

DEFAULT_BASE_MODEL = "data/base_model"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (a 0.5B model in fp32 on a CPU takes hours to evaluate); fp32 on a CPU, whose bf16 sampling
    would change the measured figures from one CPU to the next."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def looks_local(name_or_path: str) -> bool:
    """A path rather than a Hub id: it exists, or it is spelled like a path (`data/x`, `./x`, `/x`, `~/x`)."""
    return Path(name_or_path).exists() or name_or_path.startswith(("data/", ".", "/", "~")) or name_or_path.count(
        "/"
    ) != 1


def check_model_path(name_or_path: str | None, what: str = "model") -> str:
    """A clear message for a missing local model, the embedded default above all."""
    if not name_or_path:
        raise PoemDPOError(f"no {what} given (set model_name_or_path in the recipe or on the command line)")
    if looks_local(name_or_path) and not Path(name_or_path).is_dir():
        if name_or_path.rstrip("/") == DEFAULT_BASE_MODEL:
            raise PoemDPOError(
                f"the embedded base model {name_or_path!r} does not exist yet; train it with: python train_base.py "
                "(about 15 minutes on 2 CPU cores)"
            )
        raise PoemDPOError(f"{what} directory {name_or_path!r} does not exist")
    return name_or_path


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, what: str = "model"
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model; pad falls back to eos (decoder-only models often have no pad)."""
    path = check_model_path(name_or_path, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:  # no tokenizer files, offline Hub id, unknown class
        first = (str(e).strip().splitlines() or [""])[0]
        raise PoemDPOError(
            f"{what} {path!r} has no tokenizer that loads ({type(e).__name__}: {first}); save it beside the model "
            "with tokenizer.save_pretrained"
        ) from None
    if len(tokenizer) == 0 or tokenizer.eos_token_id is None:
        raise PoemDPOError(f"{what} {path!r}: its tokenizer has an empty vocabulary or no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    what: str = "model",
) -> PreTrainedModel:
    """The model (a PEFT adapter directory loads onto its base). `device=None` leaves it where transformers puts
    it (the CPU; the Trainer moves it); `dtype=None` is the checkpoint's own dtype ("auto")."""
    path = check_model_path(name_or_path, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", revision=revision, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PoemDPOError(f"could not load a causal LM from {what} {path!r} ({type(e).__name__}: {first})") from None
    return model.to(device) if device is not None else model


def load_for_inference(
    name_or_path: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    trust_remote_code: bool = False, what: str = "model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode on `device` (cuda when present) in `dtype` (bf16 on cuda, fp32 on a CPU), and tokenizer."""
    device = torch.device(device) if device is not None else default_device()
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, what=what)
    model = load_causal_lm(
        name_or_path, dtype=dtype or default_dtype(device), device=device, trust_remote_code=trust_remote_code,
        what=what,
    )
    return model.eval(), tokenizer
