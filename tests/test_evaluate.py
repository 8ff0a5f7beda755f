"""evaluate.py end to end on tiny models: report.json figures, report.md, plots, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from test_generation import tiny_lm, tiny_tokenizer
from trl import DPOConfig

import build_dataset
import evaluate
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.evaluate import EvalArguments, find_training_file, recorded_base_model, select_titles

LOG_HISTORY = [
    {"step": 2, "loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.5},
    {"step": 2, "eval_loss": 0.68, "eval_rewards/margins": 0.02, "eval_rewards/accuracies": 0.55},
    {"step": 4, "loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.75},
    {"step": 4, "eval_loss": 0.62, "eval_rewards/margins": 0.15, "eval_rewards/accuracies": 0.7},
]


@pytest.fixture
def run_dirs(tmp_path: Path, corpus_dir: Path) -> dict[str, Path]:
    """A tiny dataset, a reference model and an 'aligned' one that records its base, beta and training log."""
    dataset = tmp_path / "pairs"
    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(dataset), "--test_size", "0.2"])
    tok = tiny_tokenizer()
    reference, aligned = tmp_path / "reference", tmp_path / "aligned"
    for seed, directory in ((0, reference), (1, aligned)):
        tiny_lm(tok, seed=seed).save_pretrained(directory)
        tok.save_pretrained(directory)
    # What train_dpo.py leaves behind: a model card naming the base, training args, a checkpoint's state.
    (aligned / "README.md").write_text(f"---\nbase_model: {reference}\nlibrary_name: transformers\n---\n# m\n")
    config = DPOConfig(output_dir=str(tmp_path / "unused"), beta=0.3, bf16=False, report_to="none")
    torch.save(config, aligned / "training_args.bin")
    (aligned / "checkpoint-4").mkdir()
    (aligned / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": LOG_HISTORY}))
    return {"dataset": dataset, "reference": reference, "aligned": aligned, "tmp": tmp_path}


def test_end_to_end_report(run_dirs, capsys):
    aligned = run_dirs["aligned"]
    report = evaluate.main(["--model", str(aligned), "--dataset", str(run_dirs["dataset"]), "--num_titles", "6",
                            "--max_new_tokens", "24", "--batch_size", "4", "--num_samples", "3"])
    out = aligned / "eval"
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["reference"] == str(run_dirs["reference"])  # found through the model card
    assert saved["settings"]["beta"] == 0.3 and saved["settings"]["temperature"] == 1.0
    assert saved["settings"]["num_titles"] == 6 and saved["settings"]["max_new_tokens"] == 24
    for name in ("aligned", "reference"):
        m = saved["models"][name]
        assert m["n_poems"] == 6
        five = m["strict_five"]
        assert 0 <= five["ci95"][0] <= five["rate"] <= five["ci95"][1] <= 1
        assert sum(m["form_distribution"]["meter_counts"].values()) == 6
        for key in ("well_formed_rate", "degenerate_rate", "distinct_1", "distinct_2"):
            assert 0 <= m[key] <= 1
        # Random tiny models: about log(vocab) nats per token, far from 0.
        assert 1.0 < m["loss_per_char_five"] < 20 and 1.0 < m["loss_per_char_other"] < 20
        assert m["n_held_out_five"] > 0 and m["n_held_out_other"] > 0
    rewards = saved["rewards"]
    assert rewards["n_pairs"] > 0 and 0 <= rewards["reward_accuracy"] <= 1 and rewards["mean_margin"] != 0
    assert len(saved["samples"]) == 3 and set(saved["samples"][0]) == {"title", "aligned", "reference"}
    # Two different random models sample different poems.
    assert [s["aligned"] for s in saved["samples"]] != [s["reference"] for s in saved["samples"]]

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | aligned | reference |" in md and "strict 五言 rate" in md
    assert md.count("\n| 無題") == 3  # one sample row per title, newlines as <br>
    for png in ("form_distribution.png", "training_rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "poems.jsonl").read_text(encoding="utf-8").splitlines()) == 6
    printed = capsys.readouterr().out
    assert "strict 五言" in printed and str(out / "report.md") in printed
    assert report["rewards"] == saved["rewards"]



def test_default_poem_length_is_the_models_own_within_its_context(run_dirs):
    """Without --max_new_tokens each model writes as long as its generation config says, within its context:
    a fixed short cap would cut long poems and count them as not well-formed."""
    from transformers import AutoModelForCausalLM

    for name, wanted in (("aligned", 1000), ("reference", 20)):
        model = AutoModelForCausalLM.from_pretrained(run_dirs[name])
        model.generation_config.max_new_tokens = wanted
        model.save_pretrained(run_dirs[name])
    report = evaluate.main(["--model", str(run_dirs["aligned"]), "--dataset", str(run_dirs["dataset"]),
                            "--num_titles", "4", "--batch_size", "4", "--num_samples", "2"])
    assert report["models"]["reference"]["max_new_tokens"] == 20
    assert report["models"]["aligned"]["max_new_tokens"] == 1000
    markdown = (run_dirs["aligned"] / "eval" / "report.md").read_text(encoding="utf-8")
    assert "max_new_tokens 1000 (aligned) / 20 (reference)" in markdown
    tokenizer = tiny_tokenizer()
    rows = [json.loads(line) for line in (run_dirs["aligned"] / "eval" / "poems.jsonl").read_text("utf-8").splitlines()]
    for row in rows:
        used = len(tokenizer(build_prompt(row["title"]) + row["aligned"])["input_ids"])
        assert used <= 256  # within the context, though 1000 were allowed
        assert len(row["reference"]) <= 20


def test_explicit_reference_beta_and_skipped_reward_plot(run_dirs):
    # The reference as its own policy: rewards are exactly zero; it has no trainer_state.json.
    reference = run_dirs["reference"]
    output = run_dirs["tmp"] / "out"
    report = evaluate.main(["--model", str(reference), "--reference", str(reference), "--dataset",
                            str(run_dirs["dataset"]), "--num_titles", "2", "--max_new_tokens", "8",
                            "--max_eval_pairs", "3", "--output_dir", str(output)])
    assert report["settings"]["beta"] == 0.1 and report["settings"]["beta_source"] == "default"
    assert report["rewards"]["n_pairs"] == 3
    assert report["rewards"]["mean_margin"] == 0.0 and report["rewards"]["reward_accuracy"] == 0.0
    assert report["models"]["aligned"]["strict_five"] == report["models"]["reference"]["strict_five"]
    assert not (output / "training_rewards.png").exists()
    assert report["plots"]["training rewards"].startswith("skipped")


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--model", "model directory"), ("--dataset", "dataset directory"), ("--titles", "titles file")],
)
def test_clear_errors_for_missing_inputs(run_dirs, capsys, flag, message):
    argv = {"--model": str(run_dirs["aligned"]), "--dataset": str(run_dirs["dataset"])}
    argv[flag] = str(run_dirs["tmp"] / "missing")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([x for kv in argv.items() for x in kv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "missing" in err and "does not exist" in err


def test_reference_required_when_not_recorded(run_dirs, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(run_dirs["reference"]), "--dataset", str(run_dirs["dataset"])])
    assert "--reference is required" in capsys.readouterr().err


def test_title_selection_and_training_files(run_dirs, tmp_path):

    split = load_from_disk(str(run_dirs["dataset"]))["test"]
    sorted_titles = sorted(set(split["title"]))
    assert select_titles(EvalArguments(model="m", num_titles=3), split) == sorted_titles[:3]
    titles_file = tmp_path / "titles.txt"
    titles_file.write_text("春曉\n\n" + sorted_titles[0] + "\n", encoding="utf-8")
    added = select_titles(EvalArguments(model="m", titles=str(titles_file), num_titles=100), split)
    assert added == ["春曉", *sorted_titles]  # file first, no duplicate
    replaced = EvalArguments(model="m", titles=str(titles_file), titles_mode="replace")
    assert select_titles(replaced, split) == ["春曉", sorted_titles[0]]

    aligned = run_dirs["aligned"]
    assert recorded_base_model(aligned) == str(run_dirs["reference"])
    (aligned / "checkpoint-10").mkdir()
    (aligned / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert find_training_file(aligned, "trainer_state.json") == aligned / "checkpoint-10" / "trainer_state.json"
    assert find_training_file(aligned, "nothing.json") is None
