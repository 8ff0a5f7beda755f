"""Metrics: Wilson intervals, form rates, distinct-n, loss per character, DPO reward statistics and the KL to the
reference on sampled poems (against an exact KL enumerated over every poem of a tiny vocabulary)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_generation import tiny_lm, tiny_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from poemdpo.data.prompts import build_prompt
from poemdpo.errors import PoemDPOError
from poemdpo.evaluation.metrics import (
    completion_logprobs,
    counts_for_rule,
    degenerate_rate,
    distinct_n,
    dpo_reward_stats,
    form_distribution,
    format_p,
    kl_to_reference,
    loss_per_character,
    mcnemar_exact,
    monte_carlo_kl,
    rate_of,
    score_completions,
    strict_five_rate,
    well_formed_rate,
    wilson_interval,
)
from poemdpo.models.generation import generate_samples

FIVE_JUEJU = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
FIVE_LUSHI = "空山新雨後，天氣晚來秋。\n明月松間照，清泉石上流。\n竹喧歸浣女，蓮動下漁舟。\n隨意春芳歇，王孫自可留。"
SEVEN_JUEJU = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
MIXED = "君不見，黃河之水天上來。\n奔流到海不復回。"
ONE_COUPLET = "白日依山盡，黃河入海流。"  # 五言, two lines on one text line: not degenerate
NO_BREAK = "白日依山盡黃河入海流欲窮千里目"  # a single line, no break at all
REPEATED = "山高月小明，水落石出清。\n山高月小明，水落石出清。"
EMPTY = ""
PUNCT_ONLY = "，。\n！？"
POEMS = [FIVE_JUEJU, FIVE_LUSHI, SEVEN_JUEJU, MIXED, ONE_COUPLET, REPEATED, EMPTY, PUNCT_ONLY, NO_BREAK]


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (50, 100, (0.4038, 0.5962)), (10, 10, (0.7225, 1.0))],
)
def test_wilson_interval_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(8, 10, z=1.0)[0] > wilson_interval(8, 10)[0]  # lower confidence, narrower
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_rates_on_hand_made_poems():
    # strict 五言: the jueju, the lushi, the one couplet and the repeated one.
    assert strict_five_rate(POEMS) == pytest.approx(4 / 9)
    # well-formed (equal lengths, even line count, ends in punctuation): those four and the 七言 jueju.
    assert well_formed_rate(POEMS) == pytest.approx(5 / 9)
    # degenerate: repeated line, empty, punctuation only, no line break.
    assert degenerate_rate(POEMS) == pytest.approx(4 / 9)
    assert rate_of(lambda p: len(p) > 40, POEMS) == pytest.approx(1 / 9)
    with pytest.raises(ValueError):
        strict_five_rate([])


def test_form_distribution_counts_every_cell():
    dist = form_distribution(POEMS)
    assert dist["n"] == 9
    assert dist["counts"]["五言"] == {"绝句": 2, "律诗": 1, "other": 1}  # jueju + repeated; lushi; one couplet
    assert dist["counts"]["七言"] == {"绝句": 1, "律诗": 0, "other": 0}
    assert dist["counts"]["杂言"] == {"绝句": 0, "律诗": 0, "other": 4}  # mixed, empty, punctuation, no break
    assert dist["meter_counts"] == {"五言": 4, "七言": 1, "杂言": 4}
    assert dist["rates"]["五言"]["绝句"] == pytest.approx(2 / 9)
    assert sum(dist["meter_rates"].values()) == pytest.approx(1.0)


def test_distinct_n_by_hand():
    # lines 山水山 and 水山: unigrams 山水山水山 -> 2 distinct / 5; bigrams 山水 水山 水山 -> 2 / 3.
    poems = ["山水山，\n", "水山。"]
    assert distinct_n(poems, 1) == pytest.approx(2 / 5)
    assert distinct_n(poems, 2) == pytest.approx(2 / 3)
    # No bigram spans the line break or the comma; punctuation is never a gram.
    assert distinct_n(["山，水\n月"], 2) == 0.0
    assert distinct_n([EMPTY, PUNCT_ONLY], 1) == 0.0
    assert distinct_n([FIVE_JUEJU, FIVE_JUEJU], 1) == pytest.approx(distinct_n([FIVE_JUEJU], 1) / 2)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm(tok, seed=0)


def test_loss_per_character_matches_a_hand_computation(tok, model):
    prompt, poem = build_prompt("無題1"), "山水風月，\n雲花春秋。"
    ids = tok(prompt + poem + tok.eos_token, return_tensors="pt")["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    nll = -sum(logps[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))  # poem chars + eos
    expected = nll / len(poem)

    got = loss_per_character(model, tok, [prompt], [poem])
    assert math.isfinite(got) and got > 0
    assert got == pytest.approx(expected, rel=1e-5)
    # A random model over this vocabulary is about uniform: close to log(vocab) nats per token.
    assert got == pytest.approx(math.log(len(tok)) * (len(poem) + 1) / len(poem), rel=0.1)


def test_scores_do_not_depend_on_batching_or_padding(tok, model):
    prompts = [build_prompt(t) for t in ("月", "秋夜長思故鄉", "山中")]
    poems = ["山水，\n風月。", "雲花春秋日夜人天，\n江河長城。", "白"]
    one_by_one = completion_logprobs(model, tok, prompts, poems, batch_size=1)
    batched = completion_logprobs(model, tok, prompts, poems, batch_size=3)
    assert torch.allclose(one_by_one, batched, atol=1e-4)
    assert (batched < 0).all()


def test_max_length_scores_only_the_kept_completion_tokens(tok, model):
    prompt, poem = build_prompt("月"), "山水風月雲花春秋"
    n_prompt = len(tok(prompt)["input_ids"])
    ((_, full_ids),) = score_completions(model, tok, [prompt], [poem])
    ((_, cut_ids),) = score_completions(model, tok, [prompt], [poem], max_length=n_prompt + 3)
    assert len(full_ids) == len(poem) + 1 and full_ids[-1] == tok.eos_token_id
    assert cut_ids == full_ids[:3]


ROWS = [
    {"prompt": build_prompt("月"), "chosen": FIVE_JUEJU, "rejected": MIXED},
    {"prompt": build_prompt("山中"), "chosen": FIVE_LUSHI, "rejected": SEVEN_JUEJU},
]


def test_reward_stats_of_a_policy_equal_to_its_reference(tok, model):
    stats = dpo_reward_stats(model, copy.deepcopy(model), tok, ROWS, beta=0.1)
    assert stats["n_pairs"] == 2
    assert stats["mean_margin"] == 0.0 and stats["reward_accuracy"] == 0.0


def test_reward_stats_equal_trl_own_on_one_batch(tok, model, tmp_path):
    """The rewards the report prints are the ones DPO optimised: TRL's own eval metrics, ld_alpha included."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = tiny_lm(tok, seed=1)
    for ld_alpha in (None, 0.5):
        ours = dpo_reward_stats(policy, model, tok, ROWS, beta=0.5, ld_alpha=ld_alpha, batch_size=3)
        args = DPOConfig(output_dir=str(tmp_path), beta=0.5, ld_alpha=ld_alpha, loss_type=["sigmoid"],
                         per_device_eval_batch_size=len(ROWS), report_to=[], use_cpu=True, bf16=False,
                         max_length=256)
        trainer = DPOTrainer(model=policy, ref_model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                             eval_dataset=Dataset.from_list(ROWS), processing_class=tok)
        trl_metrics = trainer.evaluate()
        # Float32 sums over different batch shapes round differently on different CPUs: compare at that precision.
        for key, theirs in (("mean_chosen_reward", "eval_rewards/chosen"), ("mean_rejected_reward",
                            "eval_rewards/rejected"), ("mean_margin", "eval_rewards/margins"),
                            ("reward_accuracy", "eval_rewards/accuracies")):
            assert ours[key] == pytest.approx(trl_metrics[theirs], rel=1e-4, abs=1e-4), (ld_alpha, key)
    assert ours["mean_margin"] != 0.0
    # Swapping policy and reference flips every margin's sign.
    swapped = dpo_reward_stats(model, policy, tok, ROWS, beta=0.5, ld_alpha=0.5)
    assert swapped["mean_margin"] == pytest.approx(-ours["mean_margin"], rel=1e-4, abs=1e-5)


def test_strict_counting_needs_eos_and_an_even_number_of_lines():
    assert counts_for_rule(FIVE_JUEJU, True, "five_char")
    assert not counts_for_rule(FIVE_JUEJU, False, "five_char")  # cut off at the token limit
    assert not counts_for_rule("山水風月雲。", True, "five_char")  # one line
    assert not counts_for_rule("山水風月雲，\n江河長城空，\n白青紅金玉。", True, "five_char")  # three lines
    assert not counts_for_rule(SEVEN_JUEJU, True, "five_char") and counts_for_rule(SEVEN_JUEJU, True, "seven_char")
    assert counts_for_rule("「山水風月雲」，\n江河長城空。", True, "five_char")  # brackets are not characters


def test_mcnemar_exact_known_values():
    # 5 discordant pairs all one way: two-sided p = 2 / 2**5.
    test = mcnemar_exact([True] * 5 + [True, False] * 3, [False] * 5 + [True, False] * 3)
    assert (test["a_only"], test["b_only"]) == (5, 0) and test["p_value"] == pytest.approx(0.0625)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    balanced = mcnemar_exact([True, False] * 4, [False, True] * 4)
    assert balanced["p_value"] == 1.0 and balanced["a_only"] == balanced["b_only"] == 4
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_a_p_value_that_underflows_is_shown_as_a_bound_not_as_zero():
    lopsided = mcnemar_exact([True] * 2070, [False] * 2070)  # the chapter's objective (a) against DPO, roughly
    assert lopsided["p_value"] == 0.0 and format_p(lopsided["p_value"]) == "< 1e-300"
    assert format_p(0.0123456) == "0.0123" and format_p(1.0) == "1"


# --- KL to the reference on sampled poems -----------------------------------------------------------------------


def test_monte_carlo_kl_by_hand():
    kl = monte_carlo_kl([1.0, 2.0, 3.0], [1, 1, 2])
    assert (kl["mean"], kl["per_token"], kl["n"], kl["n_tokens"]) == (2.0, 1.5, 3, 4)
    assert kl["stderr"] == pytest.approx(1 / math.sqrt(3))  # sample sd 1, over √3
    assert monte_carlo_kl([-0.5], [2]) == {"mean": -0.5, "stderr": None, "per_token": -0.25, "n": 1, "n_tokens": 2}
    with pytest.raises(PoemDPOError, match="no sampled poems"):
        monte_carlo_kl([], [])
    with pytest.raises(PoemDPOError, match="2 log-ratios but 1 token counts"):
        monte_carlo_kl([1.0, 2.0], [3])


def test_kl_of_a_policy_equal_to_its_reference_is_zero(tok, model):
    titles = ["月", "山中", "秋夜長思故鄉"] * 3
    samples = generate_samples(model, tok, titles, max_new_tokens=24, seed=0)
    kl = kl_to_reference(model, copy.deepcopy(model), tok, [build_prompt(t) for t in titles],
                         [s.text for s in samples], [s.finished for s in samples], batch_size=4)
    assert kl["n"] == 9 and kl["n_tokens"] > 9
    assert kl["mean"] == 0.0 and kl["stderr"] == 0.0 and kl["per_token"] == 0.0
    with pytest.raises(PoemDPOError, match="1 prompts, 2 completions and 2 finished flags"):
        kl_to_reference(model, model, tok, ["x"], ["a", "b"], [True, True])


# A vocabulary small enough to enumerate every poem of up to MAX_TOKENS tokens, where every token the model can
# sample reads back as itself: <unk> is written □ and re-encodes to <unk>, eos ends the poem, pad is eos.
ENUM_VOCAB = {"<unk>": 0, "</s>": 1, "山": 2, "水": 3, "。": 4}
EOS, MAX_TOKENS = 1, 4


def enumerable_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=ENUM_VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def enumerable_lm(seed: int, sharpness: float) -> LlamaForCausalLM:
    """A random tiny Llama over ENUM_VOCAB; `sharpness` scales its logits, so two of them differ clearly."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(ENUM_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=EOS, pad_token_id=EOS,
    ))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval()


@torch.no_grad()
def exact_kl(policy, reference, prompt_ids: list[int]) -> float:
    """KL(π‖π_ref) over every poem the sampler can write: sequences ending in eos, or cut at MAX_TOKENS. Summed
    over the tree of prefixes: P_π(prefix) × KL of the next-token distributions, with plain forward passes."""
    total, frontier = 0.0, [((), 1.0)]  # prefixes without eos, and their probability under the policy
    for _ in range(MAX_TOKENS):
        ids = torch.tensor([prompt_ids + list(prefix) for prefix, _ in frontier])
        log_p = torch.log_softmax(policy(input_ids=ids).logits[:, -1].double(), dim=-1)
        log_q = torch.log_softmax(reference(input_ids=ids).logits[:, -1].double(), dim=-1)
        following = []
        for row, (prefix, prob) in enumerate(frontier):
            total += prob * (log_p[row].exp() * (log_p[row] - log_q[row])).sum().item()
            following += [(prefix + (v,), prob * log_p[row, v].exp().item()) for v in ENUM_VOCAB.values() if v != EOS]
        frontier = following
    return total


@torch.no_grad()
def direct_log_ratio(policy, reference, prompt_ids: list[int], text: str, finished: bool) -> float:
    """log π(poem) − log π_ref(poem) from one forward pass each, the poem's ids written by hand."""
    poem = [ENUM_VOCAB.get(c, ENUM_VOCAB["<unk>"]) for c in text] + ([EOS] if finished else [])  # □ is <unk>
    ids = torch.tensor([prompt_ids + poem])
    result = 0.0
    for model, sign in ((policy, 1.0), (reference, -1.0)):
        log_p = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        result += sign * sum(log_p[len(prompt_ids) + i - 1, t].item() for i, t in enumerate(poem))
    return result


def test_kl_on_samples_matches_the_exact_kl_of_an_enumerable_model():
    tok = enumerable_tokenizer()
    policy, reference = enumerable_lm(1, sharpness=3.0), enumerable_lm(0, sharpness=1.0)
    prompt = build_prompt("月")
    prompt_ids = tok(prompt)["input_ids"]
    exact = exact_kl(policy, reference, prompt_ids)
    assert exact > 0.05

    n = 2000
    samples = generate_samples(policy, tok, ["月"] * n, max_new_tokens=MAX_TOKENS, seed=0)
    assert 0 < sum(s.finished for s in samples) < n  # both kinds of poem: with eos, and cut at the limit
    assert any("□" in s.text for s in samples)  # <unk> sampled, and scored as itself
    texts, finished = [s.text for s in samples], [s.finished for s in samples]
    kl = kl_to_reference(policy, reference, tok, [prompt] * n, texts, finished, batch_size=256)
    assert kl["n"] == n and kl["mean"] > 0 and kl["per_token"] > 0
    # Unbiased: within 4 standard errors of the exact value (and the standard error is small against it).
    assert abs(kl["mean"] - exact) < 4 * kl["stderr"] and kl["stderr"] < exact / 5

    # Each poem's log-ratio is the plain forward passes' difference, eos counted only for a finished poem.
    few = 40
    rows = list(zip(texts[:few], finished[:few], strict=True))
    direct = [direct_log_ratio(policy, reference, prompt_ids, t, f) for t, f in rows]
    small = kl_to_reference(policy, reference, tok, [prompt] * few, texts[:few], finished[:few], batch_size=7)
    assert small["mean"] == pytest.approx(sum(direct) / few, abs=1e-5)
    assert small["n_tokens"] == sum(len(t) + f for t, f in rows)
