"""train_reward.py on a tiny char-level Llama and hand-made pairs: it learns, saves, reloads, and scores as TRL trains.

Also home of the tiny pairs/base-model helpers that tests/test_rl.py imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

import train_reward
from conftest import make_corpus_poems
from poemdpo.data.forms import classify
from poemdpo.data.prompts import build_prompt
from poemdpo.models.tokenizer import train_char_tokenizer
from poemdpo.training.reward import (
    _row_ids,
    align_pad_token,
    load_reward_model,
    reward_accuracy,
    score,
    score_ids,
)

SPLIT_OF = {0: "validation", 1: "test"}  # poem index % 5; the rest train


def make_pairs_dir(path: Path, n_poems: int = 420) -> Path:
    """Pairs in the layout build_dataset.py writes (parquet per split under data/, stats.json): a 五言 poem
    chosen, any other form rejected, each split from its own titles. Built here, not by build_dataset, so the
    tests do not move when the pairing does."""
    rows: dict[str, dict[str, list]] = {}
    for split in ("train", "validation", "test"):
        poems = [p for i, p in enumerate(make_corpus_poems(n_poems)) if SPLIT_OF.get(i % 5, "train") == split]
        texts = [(p["title"], "\n".join(p["paragraphs"])) for p in poems]
        chosen = [(t, x) for t, x in texts if classify(x).meter == "五言"]
        rejected = [(t, x) for t, x in texts if classify(x).meter != "五言"]
        rows[split] = {
            "prompt": [build_prompt(t) for t, _ in chosen], "chosen": [x for _, x in chosen],
            "rejected": [rejected[i % len(rejected)][1] for i in range(len(chosen))],
            "title": [t for t, _ in chosen],
        }
    (path / "data").mkdir(parents=True)
    for split, columns in rows.items():
        Dataset.from_dict(columns).to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    (path / "stats.json").write_text(json.dumps({"rule": "five_char"}), encoding="utf-8")
    return path


def tiny_base_dir(path: Path, pairs: Path, seed: int = 0) -> str:
    """A random tiny char-level Llama (context 256) saved with its tokenizer, as train_base.py saves one."""
    from datasets import load_dataset

    rows = load_dataset(str(pairs), split="train")
    tokenizer = train_char_tokenizer(list(rows["prompt"]) + list(rows["chosen"]) + list(rows["rejected"]),
                                     min_frequency=1)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return make_pairs_dir(tmp_path_factory.mktemp("reward") / "pairs")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, pairs_dir) -> str:
    return tiny_base_dir(tmp_path_factory.mktemp("reward") / "base", pairs_dir)


def run(out: Path, base_dir: str, pairs_dir: Path, *extra: str):
    return train_reward.main([
        "--config", "configs/reward_tiny_cpu.yaml", "--model_name_or_path", base_dir, "--dataset_name",
        str(pairs_dir), "--output_dir", str(out), "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--eval_steps", "10", "--logging_steps", "5", "--save_strategy", "no",
        "--report_to", "none", *extra,
    ])


def test_reward_model_learns_the_rule_saves_and_reloads(tmp_path, base_dir, pairs_dir, capsys):
    from datasets import load_dataset

    test_pairs = load_dataset(str(pairs_dir), split="test")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    before = reward_accuracy(load_reward_model(base_dir, tokenizer), tokenizer, test_pairs)["accuracy"]

    trainer = run(tmp_path / "rm", base_dir, pairs_dir, "--num_train_epochs", "6")
    printed = capsys.readouterr().out
    assert "reward accuracy on validation:" in printed and "reward accuracy on test:" in printed

    # Held-out titles: well above chance, and above the untrained head.
    info = json.loads((tmp_path / "rm" / "poemdpo.json").read_text(encoding="utf-8"))
    after = info["reward_accuracy"]["test"]["accuracy"]
    assert info["stage"] == "reward_model" and info["reward_accuracy"]["test"]["pairs"] == len(test_pairs)
    assert after >= 0.8 and after > before, (before, after)
    assert info["reward_accuracy"]["validation"]["accuracy"] >= 0.7

    # The rows scored are the rows TRL trained on (prompt + chosen + eos, same ids).
    row = trainer.train_dataset[0]
    source = load_dataset(str(pairs_dir), split="train")
    match = next(r for r in source if _row_ids(tokenizer, r["prompt"], r["chosen"]) == row["chosen_ids"])
    assert match["chosen"] and row["chosen_ids"][-1] == tokenizer.eos_token_id

    # Saved and reloaded with plain transformers: same head, pad id that of the tokenizer, same scores.
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == loaded_tokenizer.pad_token_id
    prompts, poems = test_pairs["prompt"][:6], test_pairs["chosen"][:6]
    trained = trainer.accelerator.unwrap_model(trainer.model)
    assert score(loaded, loaded_tokenizer, prompts, poems) == pytest.approx(score(trained, tokenizer, prompts, poems),
                                                                             abs=1e-5)
    assert reward_accuracy(loaded, loaded_tokenizer, test_pairs)["accuracy"] == after

    card = (tmp_path / "rm" / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    assert f"base_model: {base_dir}" in header and "library_name: transformers" in header and "tags:" in header
    assert "| test |" in card and "five_char" in card


def test_padding_never_moves_a_score(base_dir, pairs_dir):
    """The head reads the last non-pad token: scores of a padded batch equal those of each row alone only when
    the config's pad id is the tokenizer's (align_pad_token)."""
    from datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_reward_model(base_dir, tokenizer)
    pairs = load_dataset(str(pairs_dir), split="validation")
    prompts, poems = pairs["prompt"][:5], [pairs["chosen"][0], *pairs["rejected"][:4]]
    alone = [score(model, tokenizer, [p], [c])[0] for p, c in zip(prompts, poems, strict=True)]
    assert score(model, tokenizer, prompts, poems, batch_size=5) == pytest.approx(alone, abs=1e-5)
    model.config.pad_token_id = tokenizer.unk_token_id  # a config that disagrees with the tokenizer
    assert score(model, tokenizer, prompts, poems, batch_size=5) != pytest.approx(alone, abs=1e-5)
    align_pad_token(model, tokenizer)
    assert score(model, tokenizer, prompts, poems, batch_size=5) == pytest.approx(alone, abs=1e-5)


def test_accuracy_leaves_out_pairs_training_leaves_out_and_scores_never_pass_the_context(base_dir, pairs_dir):
    from datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_reward_model(base_dir, tokenizer)
    pairs = load_dataset(str(pairs_dir), split="validation")
    longest = [max(len(_row_ids(tokenizer, r["prompt"], r["chosen"])), len(_row_ids(tokenizer, r["prompt"],
                                                                                      r["rejected"]))) for r in pairs]
    limit = sorted(longest)[len(longest) // 2]
    result = reward_accuracy(model, tokenizer, pairs, max_length=limit)
    assert result["pairs"] == sum(n <= limit for n in longest) and result["dropped"] == len(pairs) - result["pairs"]
    # A row past the 256-token context is scored on its first 256 tokens (no untrained position is read).
    prompt, poem = pairs["prompt"][0], pairs["chosen"][0] * 20
    ids = _row_ids(tokenizer, prompt, poem)
    assert len(ids) > 256
    assert score(model, tokenizer, [prompt], [poem]) == pytest.approx(
        score_ids(model, [ids[:256]], tokenizer.pad_token_id), abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset_name", "data/no_such_pairs"], "dataset 'data/no_such_pairs' does not exist"),
        (["--model_name_or_path", "data/no_such_model"], "'data/no_such_model' does not exist"),
        (["--accuracy_splits", "validation", "dev"], "has no split 'dev'"),
        (["--use_peft", "true"], "add --lora_modules_to_save score"),
        (["--no_such_option", "1"], "no_such_option"),
    ],
)
def test_bad_input_is_one_clear_sentence(tmp_path, base_dir, pairs_dir, capsys, extra, message):
    with pytest.raises(SystemExit):
        run(tmp_path / "rm", base_dir, pairs_dir, "--max_steps", "1", *extra)
    assert message in capsys.readouterr().err
