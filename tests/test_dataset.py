import json
import os
import random
import re
import subprocess
import sys
from statistics import mean

import datasets
import pytest
from test_generation import tiny_lm, tiny_tokenizer

import build_dataset
from conftest import make_corpus_poems
from poemdpo.data.corpus import Poem, read_corpus
from poemdpo.data.dataset import build_preference_dataset
from poemdpo.data.forms import classify
from poemdpo.data.pairs import build_pairs, near_miss
from poemdpo.data.prompts import build_prompt
from poemdpo.data.rules import RULES, preferred, rejected
from poemdpo.data.splits import SplitSpec, split_of
from poemdpo.errors import PoemDPOError

# The fixture corpora are small: hold out a fifth of the titles for each of validation and test.
SPLITS = SplitSpec(validation_size=0.2, test_size=0.2)


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
    with pytest.raises(PoemDPOError, match="unknown rule 'eight_char'"):
        build_pairs(poems(), "eight_char", "random", 0)
    with pytest.raises(PoemDPOError, match="unknown pairing strategy 'nearest'"):
        build_pairs(poems(), "five_char", "nearest", 0)
    assert set(RULES) >= {"five_char", "seven_char", "jueju", "lushi"}


def test_length_matched_pairs_are_closer_in_length_than_random():
    def gap(rows):
        return mean(abs(len(r["chosen"]) - len(r["rejected"])) for r in rows)

    random_rows = build_pairs(poems(), "five_char", "random", seed=1)
    matched_rows = build_pairs(poems(), "five_char", "length_matched", seed=1)
    assert len(random_rows) == len(matched_rows)
    assert gap(matched_rows) < 0.5 * gap(random_rows)


def test_a_near_miss_has_one_line_a_character_off_or_one_line_left_out():
    text = "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。"
    rng = random.Random(0)
    slips = []
    for _ in range(60):
        before, after = classify(text).line_lengths, classify(near_miss(text, rng)).line_lengths
        if len(after) == len(before):
            changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
            assert len(changed) == 1 and abs(changed[0][0] - changed[0][1]) == 1
            slips.append("shorter" if changed[0][1] < changed[0][0] else "longer")
        else:
            assert len(after) == len(before) - 1 and set(after) == {5}  # an odd number of whole lines
            slips.append("line left out")
    assert {"shorter", "longer", "line left out"} == set(slips)


def test_form_rules_prefer_poems_of_couplets():
    couplet = "秦川雄帝宅，函谷壯皇居。"
    assert preferred(couplet, "five_char") and not rejected(couplet, "five_char")
    for odd in ("秦川雄帝宅。", couplet + "\n綺殿千尋起。"):
        assert not preferred(odd, "five_char") and rejected(odd, "five_char")


@pytest.mark.parametrize("rule", ["five_char", "seven_char"])
def test_near_miss_share_of_train_pairs(rule):
    plain = build_pairs(poems(), rule, "length_matched", seed=5)
    mixed = build_pairs(poems(), rule, "length_matched", seed=5, near_miss_share=0.5)
    assert [r["chosen"] for r in mixed] == [r["chosen"] for r in plain]
    misses = [r for r in mixed if r["rejected_source"] == "near_miss"]
    assert 0.25 < len(misses) / len(mixed) < 0.75
    for row in misses:
        assert row["rejected_title"] == row["title"] and not preferred(row["rejected"], rule)
        lost = len(row["chosen"]) - len(row["rejected"])
        assert abs(lost) == 1 or classify(row["rejected"]).n_lines == classify(row["chosen"]).n_lines - 1
    assert {r["rejected_source"] for r in plain} == {"corpus"}
    with pytest.raises(PoemDPOError, match="near_miss_share must be between 0 and 1, got 1.5"):
        build_pairs(poems(), rule, "random", 0, near_miss_share=1.5)


def test_near_misses_stay_out_of_the_held_out_splits():
    dataset, stats = build_preference_dataset(poems(300), "five_char", "length_matched", near_miss_share=1.0,
                                              splits=SPLITS)
    assert set(dataset["test"]["rejected_source"]) == set(dataset["validation"]["rejected_source"]) == {"corpus"}
    assert stats["near_miss_pairs"] == {"train": len(dataset["train"]), "validation": 0, "test": 0}


def test_every_preferred_poem_is_used_once():
    pool = poems()
    rows = build_pairs(pool, "five_char", "length_matched", seed=3)
    preferred = sorted(p.text for p in pool if classify(p.text).meter == "五言")
    assert sorted(r["chosen"] for r in rows) == preferred


def test_three_splits_by_title_and_pairs_stay_inside_their_split():
    dataset, stats = build_preference_dataset(poems(400), splits=SPLITS)
    titles = {name: set(ds["title"]) | set(ds["rejected_title"]) for name, ds in dataset.items()}
    assert set(dataset) == {"train", "validation", "test"} and all(len(ds) for ds in dataset.values())
    assert not titles["train"] & titles["validation"] and not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    assert all(split_of(t, SPLITS) == name for name, found in titles.items() for t in found)
    assert stats["pairs"] == {name: len(ds) for name, ds in dataset.items()}
    assert stats["splits"] == SPLITS.to_dict()


def test_test_titles_do_not_move_when_validation_grows():
    pool = [f"題{i}" for i in range(3000)]
    two_way = {t for t in pool if split_of(t, SplitSpec(0.0, 0.1)) == "test"}
    assert two_way == {t for t in pool if split_of(t, SplitSpec(0.2, 0.1)) == "test"}
    assert split_of("帝京篇十首 一", SPLITS) == split_of("帝京篇十首 二", SPLITS)  # a series stays together
    with pytest.raises(PoemDPOError, match="validation_size"):
        SplitSpec(1.2, 0.1)


def test_same_seed_same_rows_other_seed_other_rows():
    pool = poems(400)
    first, _ = build_preference_dataset(pool, seed=5, splits=SPLITS)
    shuffled = pool[:]
    random.Random(9).shuffle(shuffled)  # reading order must not matter for the split
    again, _ = build_preference_dataset(pool, seed=5, splits=SPLITS)
    other, _ = build_preference_dataset(pool, seed=6, splits=SPLITS)
    assert first["train"].to_list() == again["train"].to_list()
    assert first["test"].to_list() == again["test"].to_list()
    assert first["train"].to_list() != other["train"].to_list()
    split_of_shuffled, _ = build_preference_dataset(shuffled, seed=5, splits=SPLITS)
    assert set(split_of_shuffled["test"]["title"]) == set(first["test"]["title"])


def test_split_without_pairs_is_a_clear_error():
    only_five = [p for p in poems() if classify(p.text).meter == "五言"]
    with pytest.raises(PoemDPOError, match="split has no pairs under rule 'five_char'"):
        build_preference_dataset(only_five, splits=SPLITS)


def build(corpus_dir, out, *extra):
    return build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(out), "--validation_size", "0.2",
                               "--test_size", "0.2", *extra])


def test_cli_writes_a_hub_layout_dataset(corpus_dir, tmp_path):
    out = tmp_path / "pairs"
    stats = build(corpus_dir, out, "--pairing", "length_matched")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [re.sub(r"-[0-9a-f]{12}\.parquet$", ".parquet", f) for f in files] == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet", "poems/test-00000-of-00001.parquet",
        "poems/validation-00000-of-00001.parquet", "stats.json"]
    # What load_dataset(dir) reads is what load_dataset(repo_id) reads after a push: the card's configs.
    loaded = datasets.load_dataset(str(out))
    assert set(loaded) == {"train", "validation", "test"}
    rows = [r for split in loaded.values() for r in split]
    assert all(classify(r["chosen"]).meter == "五言" for r in rows)
    assert not any(classify(r["rejected"]).meter == "五言" for r in rows)
    held_out = datasets.load_dataset(str(out), "poems")
    assert set(held_out) == {"validation", "test"}
    # Every poem of a held-out split is there, whatever its form: the evaluation samples titles from them.
    assert set(held_out["test"]["meter"]) == {"五言", "七言", "杂言"}
    assert set(held_out["test"]["title"]) >= set(loaded["test"]["title"]) | set(loaded["test"]["rejected_title"])
    written = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert written == stats and written["corpus"]["poems_read"] == 120
    assert written["pairs"]["train"] == len(loaded["train"])
    # Loading wrote no cache files into the stage's output.
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    # A rebuild with other pairs loads as the new pairs, not as what the datasets cache kept of the old ones.
    build(corpus_dir, out, "--pairing", "random", "--seed", "3")
    again = datasets.load_dataset(str(out))
    assert again["train"]["rejected"] != loaded["train"]["rejected"]
    assert again["train"].to_list() == datasets.Dataset.from_parquet(
        str(next((out / "data").glob("train-*.parquet")))).to_list()


def test_a_killed_build_keeps_the_previous_dataset(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    build(corpus_dir, out)
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    calls = []

    def dies_on_the_second_file(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a Ctrl-C half-way through writing does
        return original(self, path, *args, **kwargs)

    original = datasets.Dataset.to_parquet
    monkeypatch.setattr(datasets.Dataset, "to_parquet", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        build(corpus_dir, out, "--seed", "7")
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "pairs"]  # no half-written leftovers


def test_trl_own_cli_trains_on_the_directory(corpus_dir, tmp_path):
    """`trl dpo --dataset_name <dir>`: TRL's stock script reads the directory as it reads a Hub dataset."""
    out = tmp_path / "pairs"
    build(corpus_dir, out)
    tok = tiny_tokenizer()
    tiny_lm(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from trl.cli.main import main; sys.exit(main())", "dpo",
         "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(out), "--output_dir",
         str(tmp_path / "trl_dpo"), "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true",
         "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--learning_rate", "1e-3",
         "--activation_checkpointing", "false", "--eval_strategy", "no", "--logging_steps", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "trl_dpo" / "model.safetensors").is_file()
    assert "'rewards/margins'" in run.stdout + run.stderr


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
        build(corpus_dir, out, "--push_to_hub", "someone/poems")
    assert "could not push the dataset to the Hub as 'someone/poems'" in str(exit_info.value)
    assert len(datasets.load_dataset(str(out))["train"]) > 0


def test_real_corpus_reads_with_known_counts():
    _, stats = read_corpus(progress=False)
    assert stats.poems_read == 57607
    assert 50_000 < stats.kept < 57607
