"""Evaluation metrics: form rates with confidence intervals, diversity, held-out loss, DPO rewards.

The text metrics are pure functions of poem strings. The model metrics share one scorer,
`completion_logprobs`, which tokenizes exactly as TRL's DPOTrainer does (prompt, then
prompt + completion + eos; the completion starts where the two token lists diverge), so the
rewards measured here are the rewards DPO optimised.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from trl.data_utils import common_prefix_length
from trl.trainer.utils import pad, selective_log_softmax

from poemdpo.data.forms import classify, is_degenerate, is_strict_five, is_well_formed, split_lines

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


def _tokenize_pair(tokenizer, prompt: str, completion: str, add_eos: bool) -> tuple[list[int], int]:
    """Ids of prompt + completion (+ eos) and where the completion starts, as TRL's DPOTrainer does."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion + (tokenizer.eos_token if add_eos else ""))["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)


@torch.no_grad()
def score_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 16,
    add_eos: bool = True,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, list[int]]]:
    """For each (prompt, completion): the summed log-prob of its completion tokens and those token ids.

    eos is appended as in DPO training (`add_eos`), so "knowing when to stop" is scored too.
    Sequences longer than `max_length` are cut at the end (TRL's keep_start), and only the completion
    tokens that survive are scored and returned. Batches are built from length-sorted examples to
    waste little compute on padding; results come back in input order.
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
    results: list[tuple[float, list[int]]] = [(0.0, [])] * len(encoded)

    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            rows = [torch.tensor(encoded[i][0]) for i in batch]
            input_ids = pad(rows, padding_value=pad_id).to(device)
            attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0).to(device)
            # Position t of the shifted tensors holds log p(token t+1 | tokens <= t).
            completion_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                ids, completion_start = encoded[i]
                completion_mask[row, completion_start : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_logps = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
            sums = (token_logps * completion_mask[:, 1:]).sum(dim=1)
            for row, i in enumerate(batch):
                ids, completion_start = encoded[i]
                results[i] = (sums[row].item(), ids[completion_start:])
    finally:
        model.train(was_training)
    return results


def completion_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], **kwargs) -> torch.Tensor:
    """Summed log π(completion + eos | prompt) per example, shape (N,). kwargs: see `score_completions`."""
    scores = score_completions(model, tokenizer, prompts, completions, **kwargs)
    return torch.tensor([logp for logp, _ in scores], dtype=torch.float64)


def loss_per_character(
    model,
    tokenizer,
    prompts: Sequence[str],
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
    nll = -sum(logp for logp, _ in scores)
    characters = sum(len(tokenizer.decode(ids, skip_special_tokens=True)) for _, ids in scores)
    if characters == 0:
        raise ValueError("no completion characters to score")
    return nll / characters


def dpo_reward_stats(
    policy,
    reference,
    tokenizer,
    dataset_rows: Iterable[Mapping[str, str]],
    beta: float,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """DPO's implicit rewards on preference rows (`prompt`, `chosen`, `rejected`).

    reward(y) = β·(log π(y|x) − log π_ref(y|x)) with summed completion log-probs (TRL's "sigmoid"
    loss convention); margin = reward(chosen) − reward(rejected). Accuracy counts margins > 0
    strictly, as TRL's `rewards/accuracies` does, so a policy equal to its reference scores 0.
    """
    rows = list(dataset_rows)
    if not rows:
        raise ValueError("no preference rows to score")
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    kwargs = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    policy_logps = completion_logprobs(policy, tokenizer, prompts, completions, desc="policy log-probs", **kwargs)
    reference_logps = completion_logprobs(
        reference, tokenizer, prompts, completions, desc="reference log-probs", **kwargs
    )
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards[: len(rows)], rewards[len(rows) :]
    margins = chosen - rejected
    return {
        "n_pairs": len(rows),
        "beta": beta,
        "reward_accuracy": (margins > 0).double().mean().item(),
        "mean_margin": margins.mean().item(),
        "mean_chosen_reward": chosen.mean().item(),
        "mean_rejected_reward": rejected.mean().item(),
    }
