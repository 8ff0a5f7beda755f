"""On-policy pairs (poemdpo/data/on_policy.py, build_dataset.py --on_policy_model) from a tiny Llama built here.

A randomly initialised Llama writes characters with no line structure, so all its samples would be rejected
under any rule. The test model is instead a small "poet" written into Llama weights: a Markov chain over
characters (attention and MLP outputs zeroed, so the logits depend on the last token only) that writes lines
of 5 or 7 characters, joins them with punctuation and sometimes stops. Sampled at temperature 1.0 it gives
五言 poems, mixed poems, degenerate ones (a line repeated) and poems cut by the context limit, under the real
`five_char` rule; which sample lands where is up to the sampling, not to the test.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, load_dataset
from test_prosody import CHUN_WANG, DENG_GUAN_QUE_LOU, ZAO_FA_BAI_DI, swap
from transformers import LlamaConfig, LlamaForCausalLM

import build_dataset
from conftest import make_corpus_poems
from poemdpo.data import prosody
from poemdpo.data.corpus import Poem, read_corpus
from poemdpo.data.dataset import STATS_FILE, build_preference_dataset, dataset_card
from poemdpo.data.forms import classify, is_degenerate
from poemdpo.data.on_policy import choose_titles, harden_rhyme_near_misses, load_sampler, with_on_policy_train
from poemdpo.data.pairs import DEFAULT_PAIRING, build_pairs
from poemdpo.data.prompts import build_prompt
from poemdpo.data.rules import preferred
from poemdpo.data.splits import SplitSpec, split_of, split_poems
from poemdpo.models.generation import DEFAULT_MAX_NEW_TOKENS, generate_poems
from poemdpo.models.tokenizer import train_char_tokenizer

SPLITS = SplitSpec(validation_size=0.2, test_size=0.2)
SPLIT_ARGS = ("--validation_size", "0.2", "--test_size", "0.2")

# Position k of a 五言 / 七言 line is one of two characters, so lines vary (and sometimes repeat).
FIVE = ["山水", "風月", "雲花", "春秋", "日夜"]
SEVEN = ["人天", "江河", "長城", "空寒", "白青", "紅金", "玉清"]
P_FIVE = 0.8  # a new line is 五言 with this probability, else 七言
MAX_POSITIONS = 48  # prompts take ~17 tokens: room for about two couplets, so some poems are cut
K, TITLES, BATCH, SEED = 4, 30, 16, 3


def poet_chain() -> dict[str, dict[str, float]]:
    """Next-token probabilities: a line of 5 or 7 characters, then `，` or `。`; after `。` a new line or eos."""
    starts = {c: P_FIVE / 2 for c in FIVE[0]} | {c: (1 - P_FIVE) / 2 for c in SEVEN[0]}
    chain = {"<RES>": starts, "，": starts, "\n": starts, "。": {"\n": 0.6, "</s>": 0.4}}
    for line in (FIVE, SEVEN):
        for here, after in zip(line, line[1:], strict=False):
            chain |= {c: {n: 1 / len(after) for n in after} for c in here}
        chain |= {c: {"，": 0.5, "。": 0.5} for c in line[-1]}
    return chain


def poet_llama(tokenizer, max_positions: int = MAX_POSITIONS) -> LlamaForCausalLM:
    chain = poet_chain()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    assert len(chain) <= config.hidden_size
    model = LlamaForCausalLM(config)
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is then just the last token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        for i, (state, successors) in enumerate(chain.items()):
            model.model.embed_tokens.weight[ids(state), i] = 1.0
            scale = model.model.norm(model.model.embed_tokens.weight[ids(state)])[i]
            logits = torch.full((len(tokenizer),), -30.0)
            for token, p in successors.items():
                logits[ids(token)] = math.log(p)
            model.lm_head.weight[:, i] = logits / scale
    return model


def write_model(path: Path, max_positions: int = MAX_POSITIONS, with_tokenizer: bool = True) -> str:
    texts = ["\n".join(p["paragraphs"]) + p["title"] for p in make_corpus_poems(200)] + FIVE + SEVEN
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    poet_llama(tokenizer, max_positions).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One on-policy build through the command line, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("on_policy")
    (root / "corpus").mkdir()
    (root / "corpus" / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(200), ensure_ascii=False))
    model_dir = write_model(root / "poet")
    build_dataset.main([
        "--corpus", str(root / "corpus"), "--output_dir", str(root / "pairs"), *SPLIT_ARGS,
        "--seed", str(SEED), "--on_policy_model", model_dir, "--on_policy_samples", str(K),
        "--on_policy_titles", str(TITLES), "--on_policy_batch_size", str(BATCH),
    ])  # fmt: skip
    stats = json.loads((root / "pairs" / STATS_FILE).read_text(encoding="utf-8"))
    return root, model_dir, load_dataset(str(root / "pairs")), stats


def sampled_titles(root: Path) -> list[str]:
    poems, _ = read_corpus(root / "corpus")
    return choose_titles(split_poems(poems, SPLITS)["train"], TITLES, SEED)


def model_samples(root: Path, model_dir: str, max_new_tokens: int) -> dict[str, list[str]]:
    """The poems the model writes for the sampled titles, drawn here with generate_poems directly."""
    titles = sampled_titles(root)
    model, tokenizer = load_sampler(model_dir)
    repeated = [t for t in titles for _ in range(K)]
    written = generate_poems(model, tokenizer, repeated, max_new_tokens=max_new_tokens, batch_size=BATCH, seed=SEED)
    samples: dict[str, list[str]] = {t: [] for t in titles}
    for title, poem in zip(repeated, written, strict=True):
        samples[title].append(poem)
    return samples


def test_pairs_are_the_models_own_samples_split_by_the_rule(built):
    root, model_dir, dataset, stats = built
    samples = model_samples(root, model_dir, stats["on_policy"]["max_new_tokens"])
    rows = dataset["train"].to_list()
    assert rows
    for row in rows:
        title = row["title"]
        assert row["prompt"] == build_prompt(title) and row["rejected_title"] == title
        assert preferred(row["chosen"], "five_char") and not is_degenerate(row["chosen"])
        assert not preferred(row["rejected"], "five_char")
        assert row["chosen"] in samples[title] and row["rejected"] in samples[title]
        assert row["chosen_form"] == classify(row["chosen"]).label
        assert row["rejected_form"] == classify(row["rejected"]).label
    # Every title with both kinds of samples gives pairs, and each usable preferred sample is chosen once.
    for title, texts in samples.items():
        good = [t for t in texts if preferred(t, "five_char") and not is_degenerate(t)]
        bad = [t for t in texts if not preferred(t, "five_char")]
        chosen = [r["chosen"] for r in rows if r["title"] == title]
        assert Counter(chosen) == (Counter(good) if bad else Counter())
    texts = [t for group in samples.values() for t in group]
    # The chain really produced each case the builder has to handle.
    assert any(preferred(t, "five_char") and is_degenerate(t) for t in texts)  # never chosen (checked above)
    assert any(preferred(t, "five_char") for t in texts) and any(not preferred(t, "five_char") for t in texts)


def test_generation_fits_the_models_context(built):
    root, model_dir, _, stats = built
    _, tokenizer = load_sampler(model_dir)
    max_new_tokens = stats["on_policy"]["max_new_tokens"]
    # The model's generation default (none, so 128) would run far past its 48 positions.
    assert max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    used = [
        len(tokenizer(build_prompt(title) + t)["input_ids"])
        for title, texts in model_samples(root, model_dir, max_new_tokens).items()
        for t in texts
    ]
    assert max(used) <= MAX_POSITIONS
    # Some poems ran until the context stopped them (within the few tokens a longer title in the batch takes).
    assert any(n >= MAX_POSITIONS - 3 for n in used)


def test_test_split_is_the_corpus_test_split(built):
    root, _, dataset, _ = built
    poems, corpus_stats = read_corpus(root / "corpus")
    corpus, _ = build_preference_dataset(
        poems, "five_char", DEFAULT_PAIRING, SEED, SPLITS, corpus_stats
    )
    assert dataset["test"].to_list() == corpus["test"].to_list()
    assert dataset["train"].column_names == corpus["train"].column_names
    assert all(split_of(t, SPLITS) == "train" for t in dataset["train"]["title"])


def test_stats_record_the_on_policy_train_split(built):
    root, model_dir, dataset, stats = built
    on_policy = stats["on_policy"]
    samples = model_samples(root, model_dir, on_policy["max_new_tokens"])
    texts = [t for group in samples.values() for t in group]
    assert stats["train_split"] == "on_policy" and stats["rule"] == "five_char"
    assert on_policy["model"] == model_dir
    assert on_policy["samples_per_title"] == K and on_policy["titles_sampled"] == TITLES
    assert on_policy["samples"] == K * TITLES == len(texts)
    assert on_policy["samples_per_meter"] == dict(Counter(classify(t).meter for t in texts))
    assert {"五言", "杂言"} <= set(on_policy["samples_per_meter"])
    assert on_policy["pairs"] == stats["pairs"]["train"] == len(dataset["train"])
    assert on_policy["titles_with_pairs"] == stats["titles"]["train"] == len(set(dataset["train"]["title"]))
    assert stats["pairs"]["test"] == len(dataset["test"])
    assert list((root / "pairs" / "data").glob("train-*.parquet")) and (root / "pairs" / "README.md").is_file()


def test_same_seed_same_pairs_other_seed_other_pairs(built):
    root, model_dir, dataset, _ = built
    poems, _ = read_corpus(root / "corpus")
    corpus, corpus_stats = build_preference_dataset(poems, "five_char", DEFAULT_PAIRING, SEED, SPLITS)
    model, tokenizer = load_sampler(model_dir)

    def build(seed: int) -> list[dict]:
        train = split_poems(poems, SPLITS)["train"]
        rebuilt, _ = with_on_policy_train(
            corpus,
            corpus_stats,
            train,
            model,
            tokenizer,
            model_dir,
            rule="five_char",
            seed=seed,
            samples_per_title=K,
            num_titles=TITLES,
            batch_size=BATCH,
        )
        return rebuilt["train"].to_list()

    assert build(SEED) == dataset["train"].to_list()
    assert build(SEED + 1) != dataset["train"].to_list()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "on-policy model directory '{path}' does not exist"),
        ("no_tokenizer", "on-policy model '{path}' has no tokenizer that loads"),
        ("no_room", "leaving no room for a poem in the model's context (max_position_embeddings=12)"),
        ("one_sample", "samples per title must be at least 2"),
    ],
)
def test_bad_model_is_a_clear_error(tmp_path, corpus_dir, case, message):
    path = tmp_path / "model"
    if case != "missing":
        positions = 12 if case == "no_room" else MAX_POSITIONS
        write_model(path, positions, with_tokenizer=case != "no_tokenizer")
    argv = [
        "--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "pairs"), *SPLIT_ARGS,
        "--on_policy_model", str(path), "--on_policy_samples", "1" if case == "one_sample" else "4",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        build_dataset.main(argv)
    assert str(exit_info.value).startswith("build_dataset.py: error: ")
    assert message.format(path=path) in str(exit_info.value)
    assert not (tmp_path / "pairs").exists()


# --- hard rhyme near misses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, share", [("five_char", "0.5"), ("rhyme", "0")])
def test_near_miss_model_without_rhyme_near_misses_stops_before_any_work(tmp_path, corpus_dir, rule, share):
    argv = ["--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "pairs"), *SPLIT_ARGS, "--rule", rule,
            "--near_miss_share", share, "--near_miss_model", str(tmp_path / "no_model")]
    with pytest.raises(SystemExit) as exit_info:
        build_dataset.main(argv)
    message = str(exit_info.value)
    assert message.startswith("build_dataset.py: error: --near_miss_model hardens rhyme near misses")
    assert f"--rule {rule} and --near_miss_share {float(share)}" in message  # not the missing model: checked first
    assert not (tmp_path / "pairs").exists()


def test_hard_near_misses_take_the_models_likeliest_wrong_rhyme(tmp_path):
    """Each hardened near miss changes only the frequency-drawn near miss's character, to the 平 character of
    another group, not in the poem, that the model finds likeliest there: checked by a forward pass per poem."""
    rhyming = [DENG_GUAN_QUE_LOU, CHUN_WANG, ZAO_FA_BAI_DI]
    poems = [Poem(title=f"題{i}", author="", text=t, source="") for i, t in enumerate(rhyming * 3)]
    poems += [Poem(title="不韻", author="", text=swap(DENG_GUAN_QUE_LOU, "流", "山"), source="")]
    rows = build_pairs(poems, "rhyme", "random", seed=0, near_miss_share=1.0)
    assert rows and all(r["rejected_source"] == "near_miss" for r in rows)
    extra = "東風天山花雲人歸時春秋江樓城煙家心深金簪還間山"
    tokenizer = train_char_tokenizer([p.text + p.title for p in poems] + [extra], min_frequency=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    dataset = DatasetDict({"train": Dataset.from_list(rows)})
    hard, stats = harden_rhyme_near_misses(dataset, {}, model, tokenizer, "tiny", rule="rhyme", batch_size=4)
    summary = stats["hard_near_misses"]
    assert summary["near_misses"] == len(rows) and summary["hardened"] == len(rows)
    assert summary["mean_prob_hard"] >= summary["mean_prob_frequency_drawn"]
    vocab = tokenizer.get_vocab()
    for before, after in zip(rows, hard["train"], strict=True):
        text = before["chosen"]
        (at,) = [i for i, (a, b) in enumerate(zip(text, before["rejected"], strict=True)) if a != b]
        assert [i for i, (a, b) in enumerate(zip(text, after["rejected"], strict=True)) if a != b] == [at]
        new = after["rejected"][at]
        groups = {g for line in prosody.verse_lines(text) for g in prosody.level_groups(line[-1])}
        candidates = [c for c in vocab if len(c) == 1 and prosody.tone(c) == prosody.PING
                      and not prosody.level_groups(c) & groups and c not in text]
        ids = tokenizer(build_prompt(after["title"]) + text[:at], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        assert new == max(candidates, key=lambda c: logits[vocab[c]].item())
        assert prosody.check(after["rejected"]).failed() == ["rhyme"]
    # The dataset card says what the near misses are, and which model hardened them.
    card = dataset_card({"rule": "rhyme", "strategy": "random", "pairs": {"train": len(rows)},
                         "near_miss_pairs": {"train": len(rows)}, **stats}, {"default": {"train": "x.parquet"}})
    assert f"{len(rows)} train pairs" in card and "one rhyme character swapped" in card
    assert f"in {len(rows)} of them, `tiny`'s own likeliest" in card
