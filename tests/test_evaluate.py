"""evaluate.py end to end on tiny models: the protocol (random held-out titles, K poems, strict counting, paired
tests), report figures recomputed from its own poems.jsonl, and clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from test_generation import tiny_lm, tiny_tokenizer

import build_dataset
import evaluate
from poemdpo.data.forms import classify
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.evaluate import draw_titles, recorded_base_model
from poemdpo.evaluation.metrics import counts_for_rule, kl_to_reference, wilson_interval
from poemdpo.models.loading import load_for_inference
from poemdpo.run_info import write_run_info

LOG_HISTORY = [
    {"step": 2, "loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.5},
    {"step": 2, "eval_loss": 0.68, "eval_rewards/margins": 0.02, "eval_rewards/accuracies": 0.55},
    {"step": 4, "loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.75},
    {"step": 4, "eval_loss": 0.62, "eval_rewards/margins": 0.15, "eval_rewards/accuracies": 0.7},
]
SPLITS = {"validation_size": 0.2, "test_size": 0.2, "seed": 42}


class WritesAFile:
    """A pickle that, when loaded, writes a file: what a hostile checkpoint's training_args.bin could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("pwned",))


@pytest.fixture
def run_dirs(tmp_path: Path, corpus_dir: Path) -> dict[str, Path]:
    """A tiny dataset, a reference model and an 'aligned' one that records its base, beta and training log."""
    dataset = tmp_path / "pairs"
    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(dataset), "--validation_size", "0.2",
                        "--test_size", "0.2"])
    tok = tiny_tokenizer()
    reference, aligned = tmp_path / "reference", tmp_path / "aligned"
    for seed, directory in ((0, reference), (1, aligned)):
        tiny_lm(tok, seed=seed, tie=False).save_pretrained(directory)
        tok.save_pretrained(directory)
    # What train_dpo.py leaves behind: poemdpo.json naming the base and the loss, a checkpoint's state, and the
    # Trainer's pickled arguments (here one that would write a file if anything unpickled it).
    write_run_info(aligned, {"stage": "dpo", "base_model": str(reference), "rule": "five_char", "beta": 0.3,
                             "ld_alpha": 0.5, "splits": SPLITS, "prompt_format": "instruction"})
    (aligned / "training_args.bin").write_bytes(pickle.dumps(WritesAFile(str(tmp_path / "pwned.txt"))))
    (aligned / "checkpoint-4").mkdir()
    (aligned / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": LOG_HISTORY}))
    return {"dataset": dataset, "reference": reference, "aligned": aligned, "tmp": tmp_path}


def run_eval(run_dirs, *extra):
    return evaluate.main(["--model", str(run_dirs["aligned"]), "--dataset", str(run_dirs["dataset"]),
                          "--max_new_tokens", "40", "--batch_size", "8", *extra])


def test_end_to_end_report_recomputes_from_its_own_poems(run_dirs, capsys):
    report = run_eval(run_dirs, "--num_titles", "6", "--poems_per_title", "2", "--seeds", "2", "--num_samples", "3")
    out = run_dirs["aligned"] / "eval"
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["reference"] == str(run_dirs["reference"])  # found through poemdpo.json
    assert saved["training_settings"] == {"beta": 0.3, "ld_alpha": 0.5, "source": "poemdpo.json"}
    assert saved["rewards"]["beta"] == 0.3 and saved["rewards"]["ld_alpha"] == 0.5
    assert saved["seeds"] == [0, 1] and len(saved["titles"]) == 6 and saved["rule"] == "five_char"
    rows = [json.loads(line) for line in (out / "poems.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 * 2 * 2 and {(r["seed"], r["k"]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for name in ("aligned", "reference"):
        m = saved["models"][name]
        # Every figure recomputed from the poems the report wrote.
        counted = [counts_for_rule(r[name]["text"], r[name]["finished"], "five_char") for r in rows]
        assert [r[name]["counts"] for r in rows] == counted
        assert m["rule_rate"]["count"] == sum(counted) and m["rule_rate"]["n"] == len(rows)
        assert m["rule_rate"]["ci95"] == list(wilson_interval(sum(counted), len(rows)))
        assert m["unfinished"]["count"] == sum(not r[name]["finished"] for r in rows)
        assert sum(m["by_title_form"][f]["n"] for f in m["by_title_form"]) == len(rows)
        assert m["form_distribution"]["meter_counts"]["五言"] == sum(
            classify(r[name]["text"]).meter == "五言" for r in rows)
        assert m["n_held_out_preferred"] > 0 and m["n_held_out_other"] > 0
        assert 1.0 < m["loss_per_char_preferred"] < 20 and 1.0 < m["loss_per_char_other"] < 20
    # KL to the reference on every one of the aligned model's poems (fewer than --max_kl_poems), recomputed from
    # poems.jsonl with both models loaded afresh: the right poems, prompts and models went in.
    kl = saved["models"]["aligned"]["kl_to_reference"]
    assert kl["n"] == len(rows) and kl["temperature"] == 1.0 and kl["stderr"] > 0
    (aligned, tok), (reference, _) = (load_for_inference(str(run_dirs[n]), device="cpu") for n in ("aligned",
                                                                                                   "reference"))
    again = kl_to_reference(aligned, reference, tok, [build_prompt(r["title"]) for r in rows],
                            [r["aligned"]["text"] for r in rows], [r["aligned"]["finished"] for r in rows])
    assert kl["mean"] == pytest.approx(again["mean"], rel=1e-5) and kl["n_tokens"] == again["n_tokens"]
    assert "kl_to_reference" not in saved["models"]["reference"]
    paired = saved["paired_test"]
    assert paired["a_only"] == sum(r["aligned"]["counts"] and not r["reference"]["counts"] for r in rows)
    # The chapter's title leads the side-by-side table and is not counted.
    assert saved["samples"][0]["title"] == "春夜喜雨" and saved["samples"][0]["counted"] is False
    assert len(saved["samples"]) == 1 + 3

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "five_char, strict [95% Wilson CI]" in md and "\n| 春夜喜雨 |" in md
    assert f"| KL to the reference on the aligned model's own poems [± s.e.] | {kl['mean']:.3f} ± " in md
    for png in ("form_distribution.png", "training_rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "five_char on 6 random test titles" in printed and str(out / "report.md") in printed
    assert f"KL        aligned ‖ reference {kl['mean']:.3f} ± {kl['stderr']:.3f} nats/poem" in printed
    assert report["rewards"] == saved["rewards"]
    # Nothing in the model directory was executed: the hostile pickle was never loaded.
    assert not (run_dirs["tmp"] / "pwned.txt").exists()


def test_titles_are_a_random_sample_of_every_held_out_poem(run_dirs):
    from datasets import load_dataset

    poems = load_dataset(str(run_dirs["dataset"]), "poems", split="test")
    forms = dict(zip(poems["title"], poems["meter"], strict=True))
    drawn = draw_titles(forms, 10, seed=0)
    assert drawn == draw_titles(forms, 10, seed=0) and drawn != draw_titles(forms, 10, seed=1)
    assert drawn != sorted(forms)[:10]  # not the first titles in code-point order
    every = draw_titles(forms, 10_000, seed=0)
    assert sorted(every) == sorted(forms) and {forms[t] for t in every} == {"五言", "七言", "杂言"}


def test_report_follows_the_rule(run_dirs):
    report = run_eval(run_dirs, "--num_titles", "4", "--rule", "seven_char", "--output_dir",
                      str(run_dirs["tmp"] / "seven"), "--max_kl_poems", "5")
    assert report["models"]["aligned"]["kl_to_reference"]["n"] == 5  # the first 5 of 16 poems
    rows = [json.loads(line) for line in (run_dirs["tmp"] / "seven" / "poems.jsonl").read_text("utf-8").splitlines()]
    assert report["rule"] == "seven_char"
    assert [r["aligned"]["counts"] for r in rows] == [
        counts_for_rule(r["aligned"]["text"], r["aligned"]["finished"], "seven_char") for r in rows]
    md = (run_dirs["tmp"] / "seven" / "report.md").read_text(encoding="utf-8")
    assert "seven_char, strict" in md and "poems seven_char prefers" in md and "五言 rate" not in md


def test_compare_two_evaluations_on_the_same_slots(run_dirs, capsys):
    first, second = run_dirs["tmp"] / "a", run_dirs["tmp"] / "b"
    run_eval(run_dirs, "--num_titles", "4", "--output_dir", str(first))
    run_eval(run_dirs, "--num_titles", "4", "--output_dir", str(second), "--model", str(run_dirs["reference"]),
             "--reference", str(run_dirs["reference"]))
    result = evaluate.main(["--compare", str(first), str(second)])
    a = [json.loads(x)["aligned"]["counts"] for x in (first / "poems.jsonl").read_text("utf-8").splitlines()]
    assert result["n_pairs"] == len(a) == 16 and result["rate_a"] == sum(a) / 16
    assert "McNemar" in capsys.readouterr().out
    skipped = run_eval(run_dirs, "--num_titles", "3", "--output_dir", str(run_dirs["tmp"] / "c"), "--max_kl_poems", "0")
    assert skipped["models"]["aligned"]["kl_to_reference"] is None
    assert "| KL to the reference on the aligned model's own poems [± s.e.] | n/a |" in (
        run_dirs["tmp"] / "c" / "report.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        evaluate.main(["--compare", str(first), str(run_dirs["tmp"] / "c")])
    assert "different titles, seeds or poems per title" in capsys.readouterr().err


def test_a_policy_equal_to_its_reference_has_zero_rewards(run_dirs):
    reference = run_dirs["reference"]
    report = evaluate.main(["--model", str(reference), "--reference", str(reference), "--dataset",
                            str(run_dirs["dataset"]), "--num_titles", "2", "--max_new_tokens", "8",
                            "--max_eval_pairs", "3", "--output_dir", str(run_dirs["tmp"] / "out")])
    assert report["training_settings"]["source"].startswith("default")
    assert report["rewards"]["n_pairs"] == 3
    assert report["rewards"]["mean_margin"] == 0.0 and report["rewards"]["reward_accuracy"] == 0.0
    kl = report["models"]["aligned"]["kl_to_reference"]
    assert kl["n"] == 2 * 4 and kl["mean"] == 0.0 and kl["per_token"] == 0.0  # the aligned model IS the reference
    assert report["models"]["aligned"]["rule_rate"] == report["models"]["reference"]["rule_rate"]
    assert report["paired_test"]["a_only"] == report["paired_test"]["b_only"] == 0
    assert report["plots"]["training rewards"].startswith("skipped")


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--model", "aligned model directory"), ("--dataset", "dataset directory"), ("--titles", "titles file")],
)
def test_clear_errors_for_missing_inputs(run_dirs, capsys, flag, message):
    argv = {"--model": str(run_dirs["aligned"]), "--dataset": str(run_dirs["dataset"])}
    argv[flag] = str(run_dirs["tmp"] / "missing")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([x for kv in argv.items() for x in kv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "missing" in err and "does not exist" in err


def test_refuses_what_cannot_be_compared(run_dirs, capsys, tmp_path):
    # No recorded base model.
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(run_dirs["reference"]), "--dataset", str(run_dirs["dataset"])])
    assert "--reference is required" in capsys.readouterr().err
    # A model trained with another split: its held-out titles are not held out here.
    write_run_info(run_dirs["aligned"], {"base_model": str(run_dirs["reference"]),
                                         "splits": {**SPLITS, "seed": 7}})
    with pytest.raises(SystemExit):
        run_eval(run_dirs, "--num_titles", "2")
    assert "was built with splits" in capsys.readouterr().err
    # A reference with another vocabulary.
    other = tmp_path / "other"
    tok = tiny_tokenizer()
    tok.add_tokens(["新"])
    tiny_lm(tok).save_pretrained(other)
    tok.save_pretrained(other)
    write_run_info(run_dirs["aligned"], {"base_model": str(other), "splits": SPLITS})
    with pytest.raises(SystemExit):
        run_eval(run_dirs, "--num_titles", "2")
    assert "different vocabularies" in capsys.readouterr().err
    # A model directory without a tokenizer.
    (run_dirs["reference"] / "tokenizer.json").unlink()
    with pytest.raises(SystemExit):
        run_eval(run_dirs, "--num_titles", "2", "--reference", str(run_dirs["reference"]))
    assert "has no tokenizer that loads" in capsys.readouterr().err


def test_recorded_base_model_sources(run_dirs):
    assert recorded_base_model(str(run_dirs["aligned"])) == str(run_dirs["reference"])
    (run_dirs["aligned"] / "poemdpo.json").unlink()
    (run_dirs["aligned"] / "README.md").write_text("---\nbase_model: somebody/base\n---\n# m\n")
    assert recorded_base_model(str(run_dirs["aligned"])) == "somebody/base"
