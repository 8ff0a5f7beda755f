"""Sample poems from a causal LM for a list of titles: batched, left-padded, seeded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from poemdpo.data.prompts import build_prompt, conversational

# Used when neither the caller nor the model's generation config says how long a poem may be.
DEFAULT_MAX_NEW_TOKENS = 128
# Poems sampled at once. A static KV cache (preallocated, written in place) is what makes a large batch pay: with
# transformers' default dynamic cache, which concatenates every step, 256 poems at once were slower than 64 (4.1 vs
# 5.5 poems/s); with the static cache, 7.6 poems/s (`bench/bench_sampling.py --threads 1`, the base model).
SAMPLE_BATCH_SIZE = 256
CACHE_IMPLEMENTATION = "static"
# Decode with sample_dropping_finished (finished poems leave the batch, the cache grows with the poems) rather than
# generate: with the inverse-CDF draw, 4.3x the poems/s of sampling as it ran before issue 16, in one run
# (bench/bench_sampling.py, docs/throughput.md); the same distribution, other poems for a seed. False: transformers'
# generate, as every figure before 2026-11-28 was sampled.
DROP_FINISHED = True
# sample_dropping_finished's KV cache starts this many positions past the prompts and grows by as much when full:
# attention reads every position of a static cache, written or not (1.25x the poems/s of a full-length cache).
CACHE_CHUNK = 32
# How an unknown token reads in a sampled poem: the mark texts use for a missing character. Skipped like the
# other special tokens, a line of five tokens with one rare character would count as a four-character line.
UNKNOWN_CHARACTER = "□"


# Plain ancestral sampling: every setting that could reshape the distribution, pinned. transformers fills any
# setting left unset from the model's own generation_config (a Hub chat model's repetition_penalty 1.1, top_k 20,
# ...), which would silently change what "the model's poems" are.
PLAIN_SAMPLING = {
    "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
}


# How a token is drawn from the next-token distribution. "inverse_cdf" (the default): one uniform number per poem,
# looked up in the running sum of the probabilities. "multinomial": torch.multinomial, what transformers calls. Both
# draw from the same distribution, but not the same tokens for a seed. On a CPU torch.multinomial draws one
# exponential variate per vocabulary entry: 45 ms a draw for 256 poems x 4,157 tokens here, more than the decoding
# step's matmuls. With the lookup the evaluation's sampling ran 1.70x the poems/s (bench/bench_sampling.py).
SAMPLERS = ("inverse_cdf", "multinomial")
DEFAULT_SAMPLER = "inverse_cdf"
_TORCH_MULTINOMIAL = torch.multinomial


def inverse_cdf_sample(probs: torch.Tensor, block: int = 64) -> torch.Tensor:
    """One index per row of `probs` (rows of non-negative weights, as torch.multinomial takes), shape (rows, 1):
    index i with probability probs[i] / sum(probs), from one uniform number per row.

    The running sums are float64, so each token's share of the line is its probability to ~1e-16 (a float32 sum
    over 4,157 tokens could misplace ~3e-8 of probability per token). A float64 cumsum of the whole row was
    slow here (14 ms for 256 x 4,157, timed by hand), so it is two lookups: first the block of `block` tokens,
    then the token within it. A draw that lands on a token of probability 0 (only by rounding at a block's end)
    is redrawn by torch.multinomial."""
    rows, vocabulary = probs.shape
    blocks = -(-vocabulary // block)
    weights = torch.nn.functional.pad(probs, (0, blocks * block - vocabulary)).double().view(rows, blocks, block)
    block_sums = weights.sum(dim=-1)
    block_cdf = block_sums.cumsum(dim=-1)
    total = block_cdf[:, -1]
    if not bool(((total > 0) & total.isfinite()).all()):
        raise RuntimeError("inverse_cdf_sample: a row of probabilities sums to 0, inf or nan")
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * total.unsqueeze(-1)
    # The first block (then token) whose running sum passes u: a token of probability 0 adds nothing to the sum,
    # so it is never the first to pass.
    chosen = torch.searchsorted(block_cdf, u, right=True).clamp_(max=blocks - 1)
    u_within = u - (block_cdf.gather(-1, chosen) - block_sums.gather(-1, chosen))
    token_cdf = weights[torch.arange(rows, device=probs.device), chosen.squeeze(-1)].cumsum(dim=-1)
    within = torch.searchsorted(token_cdf, u_within, right=True).clamp_(max=block - 1)
    index = (chosen * block + within).clamp_(max=vocabulary - 1)
    off = (probs.gather(-1, index) <= 0).squeeze(-1)
    if bool(off.any()):
        index[off] = _TORCH_MULTINOMIAL(probs[off], 1)
    return index


@contextlib.contextmanager
def token_sampler(sampler: str = DEFAULT_SAMPLER) -> Iterator[None]:
    """Within the block, `torch.multinomial(probs, 1)` on a 2-D CPU tensor -- the call with which transformers'
    `generate` (and so TRL's RL trainers) draws each next token -- draws by `inverse_cdf_sample` when `sampler` is
    "inverse_cdf". Every other call (several samples, a generator, CUDA) goes to torch.multinomial unchanged.

    A patch, not a logits processor: `generate` has no switch for how it draws (transformers 5.x)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "multinomial":
        yield
        return

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):  # noqa: A002
        if num_samples == 1 and input.dim() == 2 and input.device.type == "cpu" and generator is None and out is None:
            return inverse_cdf_sample(input)
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = _TORCH_MULTINOMIAL


@dataclass(frozen=True)
class Sample:
    """A sampled poem and whether it finished: the model wrote eos before the length limit or the context end."""

    text: str
    finished: bool


def overridden_settings(model) -> dict:
    """The model's own generation_config values that plain sampling overrides (to say so in a report)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    found = {}
    for key, plain in PLAIN_SAMPLING.items():
        value = getattr(config, key, None)
        if value is not None and value != plain and not (key == "top_k" and value in (0, 50)):
            found[key] = value
    return found


def plain_sampling(model, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
    """`generate` kwargs for plain sampling: temperature, top_k and top_p, plus each PLAIN_SAMPLING setting that the
    model's own generation_config sets otherwise. Only those: a setting passed at its neutral value still builds its
    logits processor (min_p=0.0 a MinPLogitsWarper, min_new_tokens=0 a MinLengthLogitsProcessor), which then works
    through the whole vocabulary at every token to change nothing."""
    pinned = {key: PLAIN_SAMPLING[key] for key in overridden_settings(model)}
    return {**pinned, "temperature": temperature, "top_k": top_k, "top_p": top_p}


def decode_poem(tokenizer, ids: Sequence[int]) -> str:
    """`ids` as text, each unknown token written as UNKNOWN_CHARACTER and every other token as written, special
    ones too (callers cut the eos first). A prompt marker the model wrote (<RES>) stays in the poem: dropped, it
    would shorten a line unseen and the text would no longer re-encode to the ids sampled, which the KL estimate
    scores (a degenerate model writing <RES> read as -279 nats per poem)."""
    unk = tokenizer.unk_token_id
    pieces, start = [], 0
    for i, token in enumerate(ids):
        if token == unk:
            pieces.append(tokenizer.decode(ids[start:i]))
            start = i + 1
    pieces.append(tokenizer.decode(ids[start:]))
    return UNKNOWN_CHARACTER.join(pieces)


@torch.no_grad()
def next_token_probs(model, tokenizer, texts: Sequence[str], batch_size: int = 32, progress: bool = False,
                     desc: str = "next-token probabilities") -> torch.Tensor:
    """The model's next-token distribution after each text, one row per text (float32, on the CPU): right padding,
    read at each row's last token. A text is tokenized as `generate_samples` tokenizes a prompt."""
    add_special_tokens = not getattr(tokenizer, "chat_template", None)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    out = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(device)
            logits = model(**batch).logits.float()
            last = batch["attention_mask"].sum(dim=1) - 1
            out.append(torch.softmax(logits[torch.arange(len(last)), last], dim=-1).cpu())
    finally:
        tokenizer.padding_side = padding_side
    return torch.cat(out)


def prompt_texts(tokenizer, titles: Sequence[str]) -> list[str]:
    """The prompt for each title: the chat template when the tokenizer has one, else the seed's format."""
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(conversational(t), add_generation_prompt=True, tokenize=False)
            for t in titles
        ]
    return [build_prompt(t) for t in titles]


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a poem: the tokenizer's eos plus whatever the generation config lists."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids | _id_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))


def _id_set(ids: int | Sequence[int] | None) -> set[int]:
    """A generation config's eos_token_id (one id, a list, or None) as a set."""
    return {ids} if isinstance(ids, int) else {i for i in ids or [] if i is not None}


def generate_poems(model, tokenizer, titles: Sequence[str], **kwargs) -> list[str]:
    """The text of `generate_samples`: one poem per title, in order."""
    return [sample.text for sample in generate_samples(model, tokenizer, titles, **kwargs)]


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    titles: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = SAMPLE_BATCH_SIZE,
    seed: int = 0,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    progress: bool = False,
    cache_chunk: int | None = CACHE_CHUNK,
    cache_implementation: str | None = CACHE_IMPLEMENTATION,
    sampler: str = DEFAULT_SAMPLER,
    drop_finished: bool = DROP_FINISHED,
) -> list[Sample]:
    """One completion per title, in order: the decoded text after the prompt, cut at eos, specials stripped
    (unknown tokens read as UNKNOWN_CHARACTER), and whether it finished with eos.

    Sampling is plain ancestral sampling at `temperature` by default (`top_k=0`, `top_p=1.0`, and every other
    setting in PLAIN_SAMPLING pinned): transformers would otherwise apply its own default top_k=50 and the
    model's generation_config, and the evaluation should measure the model's distribution, not a reshaped one.
    The same seed, titles and batch size give the same poems; the global torch RNG is left untouched. The model
    is put in eval mode (no dropout) and restored afterwards; the tokenizer's padding side is restored too.

    A poem gets at most `max_new_tokens` tokens (default: the model's generation config, else 128), fewer
    where prompt plus poem would pass the model's context (`max_position_embeddings`): positions past it
    were never trained: with `drop_finished`, a poem's own prompt sets its room; with generate, the batch's
    longest (prompts are batched with others of their length, so one long title shortens only the poems batched
    with it). `cache_chunk`: see `sample_dropping_finished`.

    `cache_implementation` is passed to `generate` ("static" by default, None for transformers' dynamic cache): it
    changes speed, not the distribution sampled from (a test compares the poems, greedy and seeded).
    (transformers itself falls back, with a warning, for an architecture without Cache support.) `sampler` (see
    SAMPLERS) changes how each token is drawn, not from what distribution; the poems of a seed differ between them.
    `drop_finished` (the default) decodes with `sample_dropping_finished` instead of `generate`: finished poems
    leave the batch, and `cache_implementation` (generate's) is unused. The same distribution, other poems for a
    seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not titles:
        return []
    max_new_tokens = default_max_new_tokens(model, max_new_tokens)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    texts = prompt_texts(tokenizer, titles)
    # A chat template already writes bos when the model wants one; adding specials would double it.
    add_special_tokens = not getattr(tokenizer, "chat_template", None)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    # Checked before sampling anything, so a bad title costs no generation time.
    if context is not None and lengths[order[-1]] >= context:
        raise ValueError(
            f"the prompt for title {titles[order[-1]]!r} takes {lengths[order[-1]]} tokens, leaving no room for "
            f"a poem in the model's context (max_position_embeddings={context})"
        )
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = plain_sampling(model, temperature, top_k, top_p) if do_sample else {}

    cache_setting = {"cache_implementation": cache_implementation} if cache_implementation else {}

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    # Decoder-only models continue from the last position, so all prompts must end at the same column.
    tokenizer.padding_side = "left"
    poems: list[Sample] = [Sample("", False)] * len(texts)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), token_sampler(sampler):
            torch.manual_seed(seed)
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in rows],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                ).to(device)
                if drop_finished:
                    new_tokens = sample_dropping_finished(
                        model, batch["input_ids"], batch["attention_mask"], max_new_tokens, eos_ids, context=context,
                        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        cache_chunk=cache_chunk)
                else:
                    room = max_new_tokens
                    if context is not None:
                        room = min(room, context - batch["input_ids"].shape[1])
                    output = model.generate(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        do_sample=do_sample,
                        max_new_tokens=room,
                        pad_token_id=pad_id,
                        eos_token_id=sorted(eos_ids) or None,
                        **cache_setting,
                        **sampling,
                    )
                    new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
                for i, row in zip(rows, new_tokens, strict=True):
                    # generate pads a finished row with pad (often = eos); cut at the first eos explicitly.
                    cut = next((j for j, t in enumerate(row) if t in eos_ids), None)
                    poems[i] = Sample(decode_poem(tokenizer, row[:cut]), finished=cut is not None)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return poems


def _keep_rows(cache: StaticCache, keep: torch.Tensor) -> None:
    """Shrink a static KV cache to the batch rows `keep` (transformers' static layers have no batch_select_indices)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            layer.batch_size = len(keep)


def _grow(cache: StaticCache, length: int) -> None:
    """Lengthen a static KV cache to `length` positions (zeros after the written ones)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            pad = length - layer.keys.shape[2]
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, pad))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, 0, pad))
        layer.max_cache_len = length


@torch.no_grad()
def sample_dropping_finished(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                             eos_ids: set[int], *, context: int | None = None, do_sample: bool = True,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, shrink_at: float = 0.75,
                             cache_chunk: int | None = CACHE_CHUNK) -> list[list[int]]:
    """The new tokens of each left-padded prompt, up to and including its eos: `generate`'s plain sampling loop on a
    static KV cache, except that finished poems leave the batch. `generate` keeps every finished poem in the batch
    until the longest ends: the evaluation's poems average ~50 tokens, and one run-on poem in a batch makes the
    whole batch decode to the length limit. Here, once the unfinished poems are at most `shrink_at` of the batch,
    the batch and the cache are cut to them (a copy of the cache, so not at every step).

    Each poem gets `max_new_tokens`, or fewer where its own prompt plus poem would pass `context` positions: a long
    title in the batch does not shorten the other poems (positions are per row; only the cache is shared). The cache
    starts `cache_chunk` positions past the prompts and grows by as much when full (None: full length at once):
    attention reads every position of a static cache, written or not, and most poems end long before the limit.

    Each poem's computation is its own row, so the distribution is generate's (the logits go through transformers'
    own temperature / top-k / top-p warpers, each token is drawn by `torch.multinomial`, which `token_sampler`
    routes); the tokens of a seed differ, as the draws of a shrinking batch fall to other rows."""
    warpers = LogitsProcessorList()
    if do_sample and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if do_sample and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    poem_of_row = torch.arange(input_ids.shape[0], device=input_ids.device)
    finished = torch.zeros_like(poem_of_row, dtype=torch.bool)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    limits = torch.full_like(poem_of_row, max_new_tokens)  # new tokens each poem may have
    if context is not None:
        limits = limits.clamp(max=context - attention_mask.long().sum(-1))
    steps = int(limits.max())
    full = input_ids.shape[1] + steps
    cache = StaticCache(config=model.config, max_cache_len=min(full, input_ids.shape[1] + (cache_chunk or full)))
    ids, mask = input_ids, attention_mask
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    for step in range(1, steps + 1):
        if mask.shape[1] > cache.layers[0].max_cache_len:
            _grow(cache, min(full, cache.layers[0].max_cache_len + cache_chunk))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1, :].float()
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(warpers(ids, logits), dim=-1), 1).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        writing = (~finished).nonzero().squeeze(1)
        for poem, token in zip(poem_of_row[writing].tolist(), next_tokens[writing].tolist(), strict=True):
            tokens[poem].append(token)
        finished |= torch.isin(next_tokens, eos) | (limits <= step)
        unfinished = int((~finished).sum())
        if unfinished == 0:
            break
        if unfinished <= shrink_at * len(finished):
            keep = (~finished).nonzero().squeeze(1)
            _keep_rows(cache, keep)
            poem_of_row, finished, mask, positions, next_tokens, limits = (
                poem_of_row[keep], finished[keep], mask[keep], positions[keep], next_tokens[keep], limits[keep])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        ids = next_tokens.unsqueeze(1)
    return tokens


# The GenerationConfig settings sample_dropping_finished reproduces; any other setting must be at a neutral value.
_DROPPING_SETTINGS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "pad_token_id", "bos_token_id",
                      "eos_token_id", "cache_implementation", "disable_compile", "use_cache", "transformers_version",
                      "_from_model_config"}
_NEUTRAL = {"min_p": (None, 0.0), "repetition_penalty": (None, 1.0), "num_return_sequences": (None, 1),
            "num_beams": (None, 1), "output_attentions": (None, False), "output_hidden_states": (None, False),
            "output_scores": (None, False), "output_logits": (None, False), "return_dict_in_generate": (None, False)}


def samples_like_generate(model, config: GenerationConfig) -> bool:
    """Whether `generate(generation_config=config)` on `model` is what sample_dropping_finished draws: greedy or
    plain sampling with temperature / top-k / top-p, a token limit, nothing else (the model's own generation
    config included, which generate may fall back on)."""
    if config.max_new_tokens is None:
        return False
    for source in (getattr(model, "generation_config", None), config):
        for key, value in (source.to_diff_dict() if source is not None else {}).items():
            if key not in _DROPPING_SETTINGS and value not in _NEUTRAL.get(key, ()):
                return False
    return True


@contextlib.contextmanager
def generate_dropping_finished(model) -> Iterator[None]:
    """Within, `model.generate(input_ids=..., attention_mask=..., generation_config=...)` (the call TRL's RL trainers
    make) decodes with sample_dropping_finished when `samples_like_generate` says it draws the same, and with
    generate otherwise. Its output is generate's: the prompts, then each row's new tokens up to its eos, padded
    with pad_token_id to the longest."""
    original, own = model.generate, "generate" in vars(model)

    def generate(input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        config = generation_config or model.generation_config
        if kwargs or input_ids is None or attention_mask is None or not samples_like_generate(model, config):
            return original(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                            **kwargs)
        eos_ids = _id_set(config.eos_token_id)
        rows = sample_dropping_finished(
            model, input_ids, attention_mask, config.max_new_tokens, eos_ids, do_sample=bool(config.do_sample),
            temperature=config.temperature or 1.0, top_k=config.top_k or 0,
            top_p=1.0 if config.top_p is None else config.top_p)
        pad = config.pad_token_id if config.pad_token_id is not None else min(eos_ids, default=0)
        new = input_ids.new_full((len(rows), max(map(len, rows), default=0)), pad)
        for i, row in enumerate(rows):
            new[i, : len(row)] = torch.tensor(row, dtype=new.dtype)
        return torch.cat([input_ids, new], dim=1)

    model.generate = generate
    try:
        yield
    finally:
        if own:
            model.generate = original
        else:
            del model.generate  # the class's own method again


def default_max_new_tokens(model: PreTrainedModel, wanted: int | None = None) -> int:
    """`wanted`, else the model's generation default, else 128: the most tokens generate_poems gives a poem."""
    config = getattr(model, "generation_config", None)
    return wanted or getattr(config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
