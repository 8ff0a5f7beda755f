"""The one command, end to end on a tiny model: dataset -> DPO -> evaluation, with the headline printed."""

from __future__ import annotations

import json

from datasets import load_dataset
from test_train_dpo import tiny_model_dir

from poemdpo import pipeline


def test_pipeline_runs_every_stage_and_prints_the_headline(tmp_path, corpus_dir, capsys):
    import build_dataset

    # The tiny model's vocabulary comes from the same corpus the pipeline reads.
    splits = ["--validation_size", "0.2", "--test_size", "0.2"]
    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "vocab"), *splits])
    model_dir = tiny_model_dir(tmp_path / "base", "llama", tmp_path / "vocab")
    out = tmp_path / "dpo"
    result = pipeline.main([
        "--corpus", str(corpus_dir), "--pairs_dir", str(tmp_path / "pairs"), "--base_model", model_dir,
        "--output_dir", str(out), "--num_titles", "4", "--poems_per_title", "2", *splits,
        # the rest goes to train_dpo.py
        "--max_train_pairs", "16", "--max_steps", "2", "--sample_titles", "2", "--sample_max_new_tokens", "16",
        "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
    ])
    assert len(load_dataset(str(tmp_path / "pairs"))["train"]) > 0
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    assert len(report["titles"]) == 4 and report["settings"]["split"] == "test"
    assert report["splits"] == {"validation_size": 0.2, "test_size": 0.2, "seed": 42}
    assert set(result["seconds"]) == {"dataset", "dpo", "evaluation"}  # the base model existed
    printed = capsys.readouterr().out
    # The headline is evaluate.py's own (headline(report)), printed again at the end.
    assert "five_char on 4 random test titles (title seed 0), strict counting:" in printed
    assert f"report    {out}/eval/report.md" in printed
