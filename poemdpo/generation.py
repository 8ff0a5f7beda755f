"""Sample poems from a causal LM for a list of titles: batched, left-padded, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import build_prompt, conversational

# Used when neither the caller nor the model's generation config says how long a poem may be.
DEFAULT_MAX_NEW_TOKENS = 128


def prompt_texts(tokenizer, titles: Sequence[str]) -> list[str]:
    """The prompt for each title: the chat template when the tokenizer has one, else the seed's format."""
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(conversational(t), add_generation_prompt=True, tokenize=False)
            for t in titles
        ]
    return [build_prompt(t) for t in titles]


def _eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a poem: the tokenizer's eos plus whatever the generation config lists."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


@torch.no_grad()
def generate_poems(
    model,
    tokenizer,
    titles: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """One completion per title, in order: the decoded text after the prompt, cut at eos, specials stripped.

    Sampling is plain ancestral sampling at `temperature` by default (`top_k=0`, `top_p=1.0`):
    transformers would otherwise apply its own default top_k=50, and the evaluation should measure
    the model's distribution, not a truncated one. The same seed, titles and batch size give the same
    poems; the global torch RNG is left untouched. The model is put in eval mode (no dropout) and
    restored afterwards; the tokenizer's padding side is restored too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = prompt_texts(tokenizer, titles)
    # A chat template already writes bos when the model wants one; adding specials would double it.
    add_special_tokens = not getattr(tokenizer, "chat_template", None)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    # Decoder-only models continue from the last position, so all prompts must end at the same column.
    tokenizer.padding_side = "left"
    poems: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                ).to(device)
                output = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    do_sample=do_sample,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos_ids) or None,
                    **sampling,
                )
                for row in output[:, batch["input_ids"].shape[1] :].tolist():
                    # generate pads a finished row with pad (often = eos); cut at the first eos explicitly.
                    cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                    poems.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return poems


def max_new_tokens_within_context(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], wanted: int | None = None
) -> int:
    """`wanted` (else the model's generation default, else 128), cut so the longest prompt plus poem fits.

    Positions past `max_position_embeddings` were never trained, so text there is not the model's poem.
    """
    wanted = wanted or getattr(model.generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return wanted
    # Tokenized as generate_poems does it: a chat template already writes whatever specials the model wants.
    add_special_tokens = not getattr(tokenizer, "chat_template", None)
    lengths = {
        title: len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        for title, text in zip(titles, prompt_texts(tokenizer, titles), strict=True)
    }
    longest = max(lengths, key=lengths.__getitem__)
    room = limit - lengths[longest]
    if room < 1:
        raise ValueError(
            f"the prompt for title {longest!r} takes {lengths[longest]} tokens, leaving no room for a poem in the "
            f"model's context (max_position_embeddings={limit})"
        )
    return min(wanted, room)
