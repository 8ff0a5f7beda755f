"""Evaluation metrics: form rates with confidence intervals, diversity, held-out loss, DPO rewards, KL to the
reference on the policy's own samples.

The text metrics are pure functions of poem strings. The model metrics share one scorer,
`score_completions`, which tokenizes exactly as TRL's DPOTrainer does (prompt, then prompt + completion + eos,
or the chat template for conversational rows; the completion starts where the two token lists diverge), so the
rewards measured here are the rewards DPO optimised (`ld_alpha` included; tested against TRL's own metrics).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from trl.data_utils import _tokenize, common_prefix_length
from trl.trainer.utils import pad, selective_log_softmax

from poemdpo.data.forms import classify, is_degenerate, is_strict_five, is_well_formed, split_lines
from poemdpo.data.rules import preferred
from poemdpo.errors import PoemDPOError

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
METERS = ("五言", "七言", "杂言")
SHAPES = ("绝句", "律诗", "other")  # 排律 and 其他 are grouped: the pipeline only cares about 4 and 8 lines


# --- text metrics -------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0 (no information).

    Chosen over the normal approximation because it stays inside [0, 1] and behaves at rates near
    0 or 1, which is where a form rate starts (base model) or should end (aligned model).
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; say so rather than leave rounding dust.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate_of(predicate: Callable[[str], bool], poems: Sequence[str]) -> float:
    """Share of `poems` for which `predicate` holds."""
    if not poems:
        raise ValueError("cannot take a rate over no poems")
    return sum(bool(predicate(p)) for p in poems) / len(poems)


def strict_five_rate(poems: Sequence[str]) -> float:
    return rate_of(is_strict_five, poems)


def well_formed_rate(poems: Sequence[str]) -> float:
    return rate_of(is_well_formed, poems)


def degenerate_rate(poems: Sequence[str]) -> float:
    return rate_of(is_degenerate, poems)


def form_bucket(poem: str) -> tuple[str, str]:
    """(meter, shape) with shape folded to 绝句 / 律诗 / other. An empty poem counts as 杂言 other."""
    form = classify(poem)
    return form.meter, form.shape if form.shape in ("绝句", "律诗") else "other"


def form_distribution(poems: Sequence[str]) -> dict:
    """Counts and rates of meter × shape, plus per-meter totals; every cell present, zeros included.

    {"n": N, "counts": {"五言": {"绝句": c, "律诗": c, "other": c}, ...}, "rates": same shape,
     "meter_counts": {"五言": c, ...}, "meter_rates": {...}}
    """
    n = len(poems)
    cells = Counter(form_bucket(p) for p in poems)
    counts = {m: {s: cells[(m, s)] for s in SHAPES} for m in METERS}
    meter_counts = {m: sum(counts[m].values()) for m in METERS}
    return {
        "n": n,
        "counts": counts,
        "rates": {m: {s: (c / n if n else 0.0) for s, c in row.items()} for m, row in counts.items()},
        "meter_counts": meter_counts,
        "meter_rates": {m: (c / n if n else 0.0) for m, c in meter_counts.items()},
    }


def distinct_n(poems: Iterable[str], n: int) -> float:
    """Distinct character n-grams / all character n-grams, pooled over every poem.

    n-grams are taken inside each verse line (`forms.split_lines`), so none spans punctuation or a
    line break and neither punctuation nor newlines are counted. Pooling over all samples (rather
    than averaging per poem) measures whether the model repeats itself *across* titles. 0.0 when
    there is no n-gram at all (e.g. every poem empty).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams: Counter[str] = Counter()
    for poem in poems:
        for line in split_lines(poem):
            grams.update(line[i : i + n] for i in range(len(line) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


# --- model metrics ------------------------------------------------------------------------------


def _tokenize_pair(tokenizer, prompt: str | list, completion: str | list, add_eos: bool) -> tuple[list[int], int]:
    """Ids of prompt + completion and where the completion starts, exactly as TRL's DPOTrainer tokenizes a row:
    a string completion gets eos appended (`add_eos`); a conversational row goes through the chat template; the
    completion starts where the tokenized prompt and prompt + completion diverge."""
    if isinstance(prompt, list):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
    else:
        eos = tokenizer.eos_token if add_eos and not completion.endswith(tokenizer.eos_token) else ""
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion + eos)["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)


@torch.no_grad()
def score_completions(
    model,
    tokenizer,
    prompts: Sequence[str | list],
    completions: Sequence[str | list],
    *,
    batch_size: int = 16,
    add_eos: bool = True,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[list[float], list[int]]]:
    """For each (prompt, completion): the log-prob of each completion token, and those token ids.

    Tokenized as TRL's DPOTrainer does (`_tokenize_pair`), so "knowing when to stop" (eos) is scored too.
    Sequences longer than `max_length` are cut at the end (TRL's keep_start), and only the completion tokens
    that survive are scored and returned. Batches are built from length-sorted examples to waste little compute
    on padding; results come back in input order.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    encoded = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids, start = _tokenize_pair(tokenizer, prompt, completion, add_eos)
        ids = ids[:max_length] if max_length else ids
        encoded.append((ids, min(start, len(ids))))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[tuple[list[float], list[int]]] = [([], [])] * len(encoded)

    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            rows = [torch.tensor(encoded[i][0]) for i in batch]
            input_ids = pad(rows, padding_value=pad_id).to(device)
            attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0).to(device)
            # Only the positions from the batch's first completion token on go through the LM head and log-softmax
            # (`logits_to_keep`, which every transformers causal LM takes): the prompts' logits are never needed.
            first = max(1, min(encoded[i][1] for i in batch))
            keep = input_ids.shape[1] - first + 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=keep).logits
            # Position t of the shifted tensors holds log p(token first+t | tokens < first+t).
            token_logps = selective_log_softmax(logits[:, :-1].float(), input_ids[:, first:]).cpu()
            for row, i in enumerate(batch):
                ids, completion_start = encoded[i]
                if completion_start >= len(ids):
                    results[i] = ([], [])
                    continue
                results[i] = (token_logps[row, completion_start - first : len(ids) - first].tolist(),
                              ids[completion_start:])
    finally:
        model.train(was_training)
    return results


def completion_logprobs(model, tokenizer, prompts: Sequence, completions: Sequence, **kwargs) -> torch.Tensor:
    """Summed log π(completion + eos | prompt) per example, shape (N,). kwargs: see `score_completions`."""
    scores = score_completions(model, tokenizer, prompts, completions, **kwargs)
    return torch.tensor([sum(logps) for logps, _ in scores], dtype=torch.float64)


def loss_per_character(
    model,
    tokenizer,
    prompts: Sequence,
    completions: Sequence[str],
    batch_size: int = 16,
    *,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "loss per character",
) -> float:
    """Summed NLL of the completion tokens (eos included) / number of completion characters, pooled.

    Characters are those of the scored completion tokens decoded without special tokens, newlines
    and punctuation included (they carry the form); eos adds loss but no character. Dividing by
    characters rather than tokens keeps models with different tokenizers comparable.
    """
    scores = score_completions(
        model, tokenizer, prompts, completions, batch_size=batch_size, max_length=max_length,
        progress=progress, desc=desc,
    )
    nll = -sum(sum(logps) for logps, _ in scores)
    characters = sum(len(tokenizer.decode(ids, skip_special_tokens=True)) for _, ids in scores)
    if characters == 0:
        raise ValueError("no completion characters to score")
    return nll / characters


def _pair_logps(chosen: list[float], rejected: list[float], ld_alpha: float | None) -> tuple[float, float]:
    """Summed log-probs of a pair; with `ld_alpha` (LD-DPO, as TRL computes it) the tokens past the shorter
    completion's length are weighted by ld_alpha, so a longer poem does not win by its length alone."""
    if ld_alpha is None:
        return sum(chosen), sum(rejected)
    shared = min(len(chosen), len(rejected))
    return (sum(chosen[:shared]) + ld_alpha * sum(chosen[shared:]),
            sum(rejected[:shared]) + ld_alpha * sum(rejected[shared:]))


def dpo_reward_stats(
    policy,
    reference,
    tokenizer,
    dataset_rows: Iterable[Mapping],
    beta: float,
    *,
    ld_alpha: float | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """DPO's implicit rewards on preference rows (`prompt`, `chosen`, `rejected`), as the recipe's DPOTrainer
    computes them: reward(y) = β·(log π(y|x) − log π_ref(y|x)) with completion log-probs summed (`ld_alpha`
    weighting the tokens past the shorter completion). margin = reward(chosen) − reward(rejected); accuracy
    counts margins > 0 strictly, as TRL's `rewards/accuracies` does, so a policy equal to its reference scores 0.
    """
    rows = list(dataset_rows)
    if not rows:
        raise ValueError("no preference rows to score")
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    kwargs = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    n = len(rows)

    def pair_sums(model, desc: str) -> torch.Tensor:
        scores = score_completions(model, tokenizer, prompts, completions, desc=desc, **kwargs)
        sums = [_pair_logps(scores[i][0], scores[n + i][0], ld_alpha) for i in range(n)]
        return torch.tensor(sums, dtype=torch.float64)  # (n, 2): chosen, rejected

    rewards = beta * (pair_sums(policy, "policy log-probs") - pair_sums(reference, "reference log-probs"))
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    margins = chosen - rejected
    return {
        "n_pairs": n,
        "beta": beta,
        "ld_alpha": ld_alpha,
        "reward_accuracy": (margins > 0).double().mean().item(),
        "mean_margin": margins.mean().item(),
        "mean_chosen_reward": chosen.mean().item(),
        "mean_rejected_reward": rejected.mean().item(),
    }


def monte_carlo_kl(log_ratios: Sequence[float], n_tokens: Sequence[int]) -> dict:
    """KL(π‖π_ref) ≈ mean over poems y the policy itself sampled of log π(y|x) − log π_ref(y|x), in nats.

    This plain Monte-Carlo mean is unbiased for samples drawn from π (KL is by definition E_{y~π}[log π/π_ref]) and
    needs only the two sequence log-probs; being unbiased it can come out below 0 on few poems, which is noise.
    `stderr` is the sample standard deviation / √n (None for fewer than 2 poems); `per_token` is the summed
    log-ratio over the summed tokens, i.e. the mean KL per token of a poem (eos included).
    """
    if len(log_ratios) != len(n_tokens):
        raise PoemDPOError(f"{len(log_ratios)} log-ratios but {len(n_tokens)} token counts")
    n = len(log_ratios)
    if n == 0:
        raise PoemDPOError("no sampled poems to estimate the KL to the reference on")
    mean = math.fsum(log_ratios) / n
    stderr = math.sqrt(math.fsum((x - mean) ** 2 for x in log_ratios) / (n - 1) / n) if n > 1 else None
    tokens = sum(n_tokens)
    return {"mean": mean, "stderr": stderr, "per_token": math.fsum(log_ratios) / tokens if tokens else None,
            "n": n, "n_tokens": tokens}


def kl_to_reference(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str | list],
    completions: Sequence[str | list],
    finished: Sequence[bool],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """`monte_carlo_kl` on poems the policy sampled: each (prompt, completion) scored by both models with
    `score_completions`, summing the poem's tokens plus eos when it finished (`finished`); an unfinished poem is
    scored as the prefix it is. Pass only the policy's own samples at temperature 1: for anything else the mean
    is not KL(π‖π_ref). A conversational row (a chat model) is scored through its chat template, whose
    end-of-turn tokens stand in for the stop token, also for an unfinished poem.
    """
    if not len(prompts) == len(completions) == len(finished):
        raise PoemDPOError(f"{len(prompts)} prompts, {len(completions)} completions and {len(finished)} finished "
                           "flags: need one of each per sampled poem")
    if tokenizer.eos_token is None and any(finished):
        raise PoemDPOError("the tokenizer has no eos_token: a finished poem's stop token cannot be scored")
    # eos appended here, per poem, so an unfinished poem is not scored as if it had stopped.
    texts = [c + tokenizer.eos_token if isinstance(c, str) and done else c
             for c, done in zip(completions, finished, strict=True)]
    kwargs = {"batch_size": batch_size, "add_eos": False, "max_length": max_length, "progress": progress}
    ours = score_completions(policy, tokenizer, prompts, texts, desc="KL: policy log-probs", **kwargs)
    theirs = score_completions(reference, tokenizer, prompts, texts, desc="KL: reference log-probs", **kwargs)
    ratios = [math.fsum(p) - math.fsum(r) for (p, _), (r, _) in zip(ours, theirs, strict=True)]
    return monte_carlo_kl(ratios, [len(ids) for _, ids in ours])


# --- strict counting and paired tests -----------------------------------------------------------


def counts_for_rule(text: str, finished: bool, rule: str) -> bool:
    """The strict verdict: the poem finished (eos within the limit), has an even number of at least two lines,
    and the rule prefers it. A one-line output or a poem cut off at the token limit never counts."""
    form = classify(text)
    return finished and form.n_lines >= 2 and form.n_lines % 2 == 0 and preferred(text, rule)


def rate_with_interval(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"count": successes, "n": n, "rate": successes / n if n else 0.0, "ci95": [low, high]}


def format_p(p: float) -> str:
    """A p-value for a table: three significant digits, and "< 1e-300" where the exact test's float underflowed
    to 0 (thousands of discordant slots all one way), which a bare "0" would misstate."""
    return "< 1e-300" if p == 0 else f"{p:.3g}"


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test on paired outcomes: the same titles and sample slots under two models.

    Only discordant pairs carry information: `a_only` where A succeeded and B did not, `b_only` the reverse.
    Under "no difference" each discordant pair falls either way with probability 1/2; the two-sided p-value
    doubles the smaller tail. Chosen over comparing two Wilson intervals, which ignores the pairing and is
    far less sensitive when both models succeed on most of the same titles.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    return {"n_pairs": len(a), "a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail),
            "rate_a": sum(map(bool, a)) / len(a) if a else 0.0, "rate_b": sum(map(bool, b)) / len(b) if b else 0.0}
