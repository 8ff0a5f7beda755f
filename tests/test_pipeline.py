"""The one command, end to end on a tiny model: dataset -> DPO -> evaluation, with the headline printed."""

from __future__ import annotations

import json

from datasets import load_from_disk
from test_train_dpo import tiny_model_dir

from poemdpo import pipeline


def test_pipeline_runs_every_stage_and_prints_the_headline(tmp_path, corpus_dir, capsys):
    import build_dataset

    # The tiny model's vocabulary comes from the same corpus the pipeline reads.
    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "vocab"), "--test_size", "0.3"])
    model_dir = tiny_model_dir(tmp_path / "base", "llama", tmp_path / "vocab")
    out = tmp_path / "dpo"
    result = pipeline.main([
        "--corpus", str(corpus_dir), "--pairs_dir", str(tmp_path / "pairs"), "--base_model", model_dir,
        "--output_dir", str(out), "--num_titles", "4", "--max_eval_pairs", "8",
        # the rest goes to train_dpo.py
        "--max_train_pairs", "16", "--max_steps", "2", "--sample_titles", "2", "--sample_max_new_tokens", "16",
        "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
    ])
    assert len(load_from_disk(str(tmp_path / "pairs"))["train"]) > 0
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["num_titles"] == 4
    assert set(result["seconds"]) == {"dataset", "dpo", "evaluation"}  # the base model existed
    printed = capsys.readouterr().out
    assert "aligned   five_char rate" in printed and f"report    {out}/eval/report.md" in printed
