import json
import random
from statistics import mean

import datasets
import pytest

import build_dataset
from conftest import make_corpus_poems
from poemdpo.data.corpus import DEFAULT_CORPUS, Poem, read_corpus
from poemdpo.data.dataset import build_preference_dataset
from poemdpo.data.forms import classify
from poemdpo.data.pairs import build_pairs, near_miss
from poemdpo.data.prompts import build_prompt
from poemdpo.data.rules import RULES, preferred


def poems(n=140, seed=0):
    return [Poem(p["title"], "", "\n".join(p["paragraphs"]), p["id"]) for p in make_corpus_poems(n, seed)]


@pytest.mark.parametrize(
    "rule, ok",
    [
        ("five_char", lambda f: f.meter == "五言"),
        ("seven_char", lambda f: f.meter == "七言"),
        ("jueju", lambda f: f.meter != "杂言" and f.n_lines == 4),
        ("lushi", lambda f: f.meter != "杂言" and f.n_lines == 8),
    ],
)
def test_each_rule_separates_chosen_from_rejected(rule, ok):
    rows = build_pairs(poems(), rule, "random", seed=0)
    assert rows
    assert all(ok(classify(r["chosen"])) for r in rows)
    assert not any(ok(classify(r["rejected"])) for r in rows)
    assert all(r["prompt"] == build_prompt(r["title"]) for r in rows)
    assert build_prompt("遣懷") == "<INS>請用以下題目寫一首詩<INP>遣懷<RES>"


def test_unknown_rule_and_strategy():
    with pytest.raises(ValueError, match="unknown rule 'eight_char'"):
        build_pairs(poems(), "eight_char", "random", 0)
    with pytest.raises(ValueError, match="unknown pairing strategy 'nearest'"):
        build_pairs(poems(), "five_char", "nearest", 0)
    assert set(RULES) >= {"five_char", "seven_char", "jueju", "lushi"}


def test_length_matched_pairs_are_closer_in_length_than_random():
    def gap(rows):
        return mean(abs(len(r["chosen"]) - len(r["rejected"])) for r in rows)

    random_rows = build_pairs(poems(), "five_char", "random", seed=1)
    matched_rows = build_pairs(poems(), "five_char", "length_matched", seed=1)
    assert len(random_rows) == len(matched_rows)
    assert gap(matched_rows) < 0.5 * gap(random_rows)


def test_a_near_miss_has_one_line_a_character_off():
    text = "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。"
    rng = random.Random(0)
    for _ in range(50):
        before, after = classify(text).line_lengths, classify(near_miss(text, rng)).line_lengths
        assert len(after) == len(before)
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1 and abs(changed[0][0] - changed[0][1]) == 1


@pytest.mark.parametrize("rule", ["five_char", "seven_char"])
def test_near_miss_share_of_train_pairs(rule):
    plain = build_pairs(poems(), rule, "length_matched", seed=5)
    mixed = build_pairs(poems(), rule, "length_matched", seed=5, near_miss_share=0.5)
    assert [r["chosen"] for r in mixed] == [r["chosen"] for r in plain]
    misses = [r for r in mixed if r["rejected_source"] == "near_miss"]
    assert 0.25 < len(misses) / len(mixed) < 0.75
    for row in misses:
        assert row["rejected_title"] == row["title"] and not preferred(row["rejected"], rule)
        assert abs(len(row["rejected"]) - len(row["chosen"])) == 1
    assert {r["rejected_source"] for r in plain} == {"corpus"}
    with pytest.raises(ValueError, match="near_miss_share must be between 0 and 1, got 1.5"):
        build_pairs(poems(), rule, "random", 0, near_miss_share=1.5)


def test_near_misses_stay_out_of_the_test_split():
    dataset, stats = build_preference_dataset(poems(300), "five_char", "length_matched", near_miss_share=1.0)
    assert set(dataset["test"]["rejected_source"]) == {"corpus"}
    assert stats["near_miss_pairs"] == {"train": dataset["train"]["rejected_source"].count("near_miss"), "test": 0}
    assert stats["near_miss_pairs"]["train"] == len(dataset["train"])


def test_every_preferred_poem_is_used_once():
    pool = poems()
    rows = build_pairs(pool, "five_char", "length_matched", seed=3)
    preferred = sorted(p.text for p in pool if classify(p.text).meter == "五言")
    assert sorted(r["chosen"] for r in rows) == preferred


def test_split_is_by_title_and_pairs_stay_inside_their_split():
    dataset, stats = build_preference_dataset(poems(400), test_size=0.2)
    train, test = dataset["train"], dataset["test"]
    assert len(test) > 0 and len(train) > len(test)
    train_titles = set(train["title"]) | set(train["rejected_title"])
    test_titles = set(test["title"]) | set(test["rejected_title"])
    assert not train_titles & test_titles
    assert stats["pairs"] == {"train": len(train), "test": len(test)}


def test_same_seed_same_rows_other_seed_other_rows():
    pool = poems(400)
    first, _ = build_preference_dataset(pool, seed=5, test_size=0.2)
    shuffled = pool[:]
    random.Random(9).shuffle(shuffled)  # reading order must not matter for the split
    again, _ = build_preference_dataset(pool, seed=5, test_size=0.2)
    other, _ = build_preference_dataset(pool, seed=6, test_size=0.2)
    assert first["train"].to_list() == again["train"].to_list()
    assert first["test"].to_list() == again["test"].to_list()
    assert first["train"].to_list() != other["train"].to_list()
    split_of_shuffled, _ = build_preference_dataset(shuffled, seed=5, test_size=0.2)
    assert set(split_of_shuffled["test"]["title"]) == set(first["test"]["title"])


def test_split_without_pairs_is_a_clear_error():
    only_five = [p for p in poems() if classify(p.text).meter == "五言"]
    with pytest.raises(ValueError, match="split has no pairs under rule 'five_char'"):
        build_preference_dataset(only_five, test_size=0.2)


def test_cli_writes_loadable_dataset_and_stats(corpus_dir, tmp_path):
    out = tmp_path / "pairs"
    stats = build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(out), "--test_size", "0.2",
                                "--pairing", "length_matched"])
    loaded = datasets.load_from_disk(str(out))
    assert set(loaded) == {"train", "test"}
    assert {"prompt", "chosen", "rejected"} <= set(loaded["train"].column_names)
    rows = loaded["train"].to_list() + loaded["test"].to_list()
    assert all(classify(r["chosen"]).meter == "五言" for r in rows)
    assert not any(classify(r["rejected"]).meter == "五言" for r in rows)
    written = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert written == stats
    assert written["corpus"]["poems_read"] == 120
    assert written["pairs"]["train"] == len(loaded["train"])


def test_cli_bad_corpus_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        build_dataset.main(["--corpus", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert "build_dataset.py: error: corpus path" in str(exit_info.value)
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_fails_fast_and_keeps_local_copy(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    out = tmp_path / "pairs"
    with pytest.raises(SystemExit) as exit_info:
        build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(out), "--test_size", "0.2",
                            "--push_to_hub", "someone/poems"])
    assert "could not push the dataset to the Hub as 'someone/poems'" in str(exit_info.value)
    assert len(datasets.load_from_disk(str(out))["train"]) > 0


@pytest.mark.skipif(not DEFAULT_CORPUS.is_dir(), reason="the shared corpus is not beside this checkout")
def test_real_corpus_reads_with_known_counts():
    _, stats = read_corpus(progress=False)
    assert stats.poems_read == 57607
    assert 50_000 < stats.kept < 57607
