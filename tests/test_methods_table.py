"""bench/methods_table.py end to end on a tiny base model and corpus: two cheap methods, one seed, two steps each;
the table has its rows, numbers in its cells, and figures read back from the runs' own reports and records."""

from __future__ import annotations

import json
import re

import pytest
from test_train_dpo import tiny_model_dir
from tiny_models import make_pairs_dir

from bench import methods_table

NUMBER = r"-?\d[\d,]*(\.\d+)?"


def cells(markdown: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first` (the first such row: the pooled table)."""
    for line in markdown.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and row[0] == first:
            return row
    raise AssertionError(f"no row {first!r} in:\n{markdown}")


def test_two_methods_one_seed_end_to_end(tmp_path, capsys):
    pairs = make_pairs_dir(tmp_path)
    base = tiny_model_dir(tmp_path / "base", "llama", pairs)
    output, work = tmp_path / "methods_table.md", tmp_path / "runs"
    # Two steps, at a learning rate that moves the tiny model away from its reference.
    extra = ("--max_steps 2 --max_train_pairs 16 --per_device_train_batch_size 4 --learning_rate 1e-2 "
             "--warmup_steps 0 --max_eval_pairs 8 --eval_strategy no --sample_titles 0 --report_to none")
    result = methods_table.main([
        "--methods", "chapter_linear", "--seeds", "1", "--base_model", base, "--dataset", str(pairs),
        "--work_dir", str(work), "--extra", extra, "--num_titles", "3", "--poems_per_title", "2",
        "--output", str(output),
    ])
    markdown = output.read_text(encoding="utf-8")
    assert markdown == result["markdown"] and markdown in capsys.readouterr().out
    assert list(result["runs"]) == ["dpo", "chapter_linear"]  # dpo always runs, first
    plot = output.with_suffix(".png")  # rate against KL and minutes, beside the table and linked from it
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot.name})" in markdown

    header = cells(markdown, "method")
    assert len(header) == 11 and header[1] == "five_char, strict, seeds pooled [95% Wilson]"
    reference, dpo, linear = (cells(markdown, name) for name in ("reference (the base model)", "dpo",
                                                                 "chapter_linear"))
    for row in (reference, dpo, linear):
        assert len(row) == len(header)
        assert re.fullmatch(rf"{NUMBER}% \[{NUMBER}, {NUMBER}\] \(\d+/6\)", row[1]), row  # 3 titles × 2 poems
        for value in row[2:4]:
            assert re.fullmatch(rf"{NUMBER}%", value), row
        for value in row[4:6]:
            assert re.fullmatch(NUMBER, value), row
    for row in (dpo, linear):
        assert re.fullmatch(rf"{NUMBER} ± {NUMBER} \({NUMBER}\)", row[6]), row  # KL ± s.e. (per token)
        assert re.fullmatch(NUMBER, row[7]) and float(row[7]) > 0, row  # training minutes
        assert row[8] == "8 pairs", row  # 2 steps of 4 pairs
    assert dpo[9:] == ["—", "—"]
    assert re.fullmatch(r"\d+ / \d+", linear[9]) and re.fullmatch(NUMBER, linear[10]), linear
    assert re.fullmatch(r"\d+ / \d+", reference[9]) and reference[6] == "0 (itself)"

    # The figures are the runs' own: the report's KL, the record's minutes; checkpoints deleted once read.
    for method in ("dpo", "chapter_linear"):
        run_dir = work / method / "seed_42"
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
        kl = report["models"]["aligned"]["kl_to_reference"]
        assert kl["n"] == 6 and kl["mean"] != 0.0  # trained: no longer the reference
        assert cells(markdown, method)[6].startswith(f"{kl['mean']:.3f} ± {kl['stderr']:.3f}")
        assert record["consumed"] == {"pairs": 8.0} and record["judge_seconds"] is None
        assert "--seed 42" in " ".join(record["commands"][-1]) and "--max_steps 2" in " ".join(record["commands"][-1])
        assert (run_dir / "train.log").is_file() and (run_dir / "model" / "model.safetensors").is_file()
        assert not list((run_dir / "model").glob("checkpoint-*"))
    # The paired test is evaluate.py's own comparison of the two runs' poems.
    test = methods_table.compare(*(str(work / method / "seed_42" / "eval") for method in ("chapter_linear", "dpo")))
    assert linear[9] == f"{test['a_only']} / {test['b_only']}"


def test_bad_arguments_stop_before_any_training(tmp_path, capsys):
    pairs = make_pairs_dir(tmp_path)
    for argv, message in (
        (["--methods", "reward_model"], "it trains no policy"),
        (["--methods", "ppo"], "unknown method(s) ['ppo']"),
        (["--dataset", str(tmp_path / "missing")], "does not exist; build it with"),
        (["--dataset", str(pairs), "--methods", "grpo", "--base_model", str(tmp_path / "nobase")],
         "has no config.json"),
        (["--dataset", str(pairs), "--methods", "slot_sft", "--sft_dataset", str(tmp_path / "missing")],
         "--sft_dataset"),
        (["--dataset", str(pairs), "--seeds", "0"], "must each be at least 1"),
    ):
        with pytest.raises(SystemExit):
            methods_table.main(["--work_dir", str(tmp_path / "runs"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def fake_training(tmp_path, monkeypatch, scripts: dict[str, tuple[dict, float]], epoch: float) -> None:
    """Replace the training scripts and the evaluation: each script (by name: its poemdpo.json and seconds) leaves
    what the real one leaves, poemdpo.json and a final checkpoint at `epoch`; pairs and a base model exist."""
    from poemdpo.evaluation.metrics import rate_with_interval

    (tmp_path / "pairs").mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}", encoding="utf-8")

    def fake_script(command, log):
        out = tmp_path / command[command.index("--output_dir") + 1]
        (out / "checkpoint-7").mkdir(parents=True)
        (out / "checkpoint-7" / "trainer_state.json").write_text(json.dumps({"epoch": epoch}), encoding="utf-8")
        info, seconds = scripts[command[0]]
        (out / ("stats.json" if command[0] == "build_dataset.py" else "poemdpo.json")).write_text(
            json.dumps(info), encoding="utf-8")
        return seconds

    monkeypatch.setattr(methods_table, "run_script", fake_script)
    monkeypatch.setattr(methods_table, "run", lambda args: {"seconds": 2.0, "models": {
        "aligned": {"rule_rate": rate_with_interval(1, 2)}}})


def test_grpo_reward_model_trains_its_judge_first_and_counts_both(tmp_path, monkeypatch):
    """The RL roads' wiring, with the scripts and the evaluation replaced: the judge is trained first with the same
    seed, the policy is rewarded by it, each command parses with its script's own parser, and both are counted."""
    from test_pipeline import parse_training_command

    fake_training(tmp_path, monkeypatch, {"train_reward.py": ({"train_pairs": 100}, 60.0),
                                          "train_rl.py": ({"completions": 256}, 120.0)}, epoch=1.5)
    args = methods_table.parse_args(["--dataset", str(tmp_path / "pairs"), "--base_model", str(tmp_path / "base"),
                                     "--work_dir", str(tmp_path / "runs"), "--methods", "grpo_reward_model,rloo"])
    assert args.methods == ["dpo", "grpo_reward_model", "rloo"]
    record = methods_table.train_and_evaluate("grpo_reward_model", 43, args, ["--max_steps", "2"])

    judge_command, policy_command = (command[1:] for command in record["commands"])
    assert [judge_command[0], policy_command[0]] == ["train_reward.py", "train_rl.py"]
    judge_args, judge_config, _ = parse_training_command(judge_command)
    policy_args, policy_config, model_args = parse_training_command(policy_command)
    run_dir = tmp_path / "runs" / "grpo_reward_model" / "seed_43"
    assert judge_config.output_dir == str(run_dir / "judge") and judge_config.seed == 43
    assert judge_config.max_steps == 2 and judge_args.rule == "five_char"
    assert policy_args.method == "grpo" and policy_args.reward_model == str(run_dir / "judge")
    assert policy_config.seed == 43 and policy_config.max_steps == 2 and policy_config.output_dir == str(
        run_dir / "model")
    assert model_args.model_name_or_path == str(tmp_path / "base")
    assert record["consumed"] == {"poems": 256, "judge_pairs": 150.0}  # poems written; 1.5 epochs of 100 pairs
    assert methods_table.seconds_total(record) == 180.0 and methods_table.consumed_cell([record]) == \
        "256 poems + 150 judge pairs"
    assert not list(run_dir.glob("*/checkpoint-*"))  # read, then deleted

    # --resume reads a finished run instead of training it again.
    monkeypatch.setattr(methods_table, "run_script", lambda command, log: pytest.fail("trained again"))
    args.resume = True
    assert methods_table.train_and_evaluate("grpo_reward_model", 43, args, ["--max_steps", "2"]) == record


def test_dpo_grpo_goes_on_from_the_dpo_run_of_the_same_seed(tmp_path, monkeypatch):
    """GRPO starts from dpo's model of the same training seed, and the row counts dpo's minutes and pairs too."""
    from test_pipeline import parse_training_command

    fake_training(tmp_path, monkeypatch, {"train_dpo.py": ({"train_pairs": 40}, 300.0),
                                          "train_rl.py": ({"completions": 1600}, 330.0)}, epoch=1.0)
    args = methods_table.parse_args(["--dataset", str(tmp_path / "pairs"), "--base_model", str(tmp_path / "base"),
                                     "--work_dir", str(tmp_path / "runs"), "--methods", "dpo_grpo"])
    assert args.methods == ["dpo", "dpo_grpo"]
    dpo = methods_table.train_and_evaluate("dpo", 44, args, [])
    record = methods_table.train_and_evaluate("dpo_grpo", 44, args, ["--max_steps", "2"])
    (command,) = (command[1:] for command in record["commands"])
    script_args, config, model_args = parse_training_command(command)
    assert command[0] == "train_rl.py" and script_args.method == "grpo" and config.max_steps == 2
    assert model_args.model_name_or_path == dpo["model"] == str(tmp_path / "runs" / "dpo" / "seed_44" / "model")
    assert config.seed == 44 and config.output_dir == str(tmp_path / "runs" / "dpo_grpo" / "seed_44" / "model")
    assert methods_table.seconds_total(record) == 630.0  # dpo's 300 s and GRPO's 330 s
    assert methods_table.consumed_cell([record]) == "40 pairs + 1,600 poems"


def test_iterated_dpo_samples_pairs_from_the_dpo_run_of_the_same_seed_then_trains_on_them(tmp_path, monkeypatch):
    """Round two: the dpo run's own poems become pairs (split as --dataset was), DPO goes on from that model on
    them, and the row counts both rounds' pairs, the poems sampled and every stage's minutes."""
    from test_pipeline import parse_training_command
    from transformers import HfArgumentParser

    from build_dataset import BuildArguments

    fake_training(tmp_path, monkeypatch, {"train_dpo.py": ({"train_pairs": 40}, 300.0),
                                          "build_dataset.py": ({"on_policy": {"samples": 800}}, 90.0)}, epoch=1.0)
    (tmp_path / "pairs" / "stats.json").write_text(json.dumps({
        "strategy": "length_matched", "near_miss_share": 0.25,
        "splits": {"validation_size": 0.05, "test_size": 0.1, "seed": 7}}), encoding="utf-8")
    args = methods_table.parse_args(["--dataset", str(tmp_path / "pairs"), "--base_model", str(tmp_path / "base"),
                                     "--work_dir", str(tmp_path / "runs"), "--methods", "iterated_dpo"])
    assert args.methods == ["dpo", "iterated_dpo"]
    dpo = methods_table.train_and_evaluate("dpo", 44, args, [])
    record = methods_table.train_and_evaluate("iterated_dpo", 44, args, ["--max_steps", "2"])
    build, train = (command[1:] for command in record["commands"])
    assert (build[0], train[0]) == ("build_dataset.py", "train_dpo.py")
    built = HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=build[1:])[0]
    run_dir = tmp_path / "runs" / "iterated_dpo" / "seed_44"
    assert built.on_policy_model == dpo["model"] and built.output_dir == str(run_dir / "pairs") and built.seed == 44
    assert (built.test_size, built.split_seed, built.near_miss_share) == (0.1, 7, 0.25)
    script_args, config, model_args = parse_training_command(train)
    assert model_args.model_name_or_path == dpo["model"] and script_args.dataset_name == str(run_dir / "pairs")
    assert config.seed == 44 and config.max_steps == 2 and config.output_dir == str(run_dir / "model")
    assert methods_table.seconds_total(record) == 690.0  # dpo 300 s, sampling the pairs 90 s, round two 300 s
    assert methods_table.consumed_cell([record]) == "80 pairs + 800 poems"


def test_slot_sft_reads_the_rhyme_rules_poems_and_slot_sft_grpo_goes_on_from_it(tmp_path, monkeypatch):
    """As the pipeline runs the rhyme road: the fine-tune reads --sft_dataset under the rule rhyme whatever --rule
    is, GRPO goes on from it with the table's own pairs and rule, and the row counts both stages."""
    from test_pipeline import parse_training_command

    fake_training(tmp_path, monkeypatch, {"train_dpo.py": ({"train_pairs": 40}, 300.0),
                                          "train_sft.py": ({"train_poems": 50}, 600.0),
                                          "train_rl.py": ({"completions": 1600}, 120.0)}, epoch=2.0)
    (tmp_path / "rhyme_pairs").mkdir()
    argv = ["--dataset", str(tmp_path / "pairs"), "--base_model", str(tmp_path / "base"), "--rule", "five_char_rhyme",
            "--work_dir", str(tmp_path / "runs"), "--methods", "slot_sft_grpo"]
    with pytest.raises(SystemExit):  # the fine-tune's poems are missing: stop before any training
        methods_table.parse_args([*argv, "--sft_dataset", str(tmp_path / "missing")])
    args = methods_table.parse_args([*argv, "--sft_dataset", str(tmp_path / "rhyme_pairs")])
    assert args.methods == ["dpo", "slot_sft", "slot_sft_grpo"]  # the fine-tune it goes on from runs first

    sft = methods_table.train_and_evaluate("slot_sft", 43, args, [])
    (command,) = (command[1:] for command in sft["commands"])
    script_args, config, model_args = parse_training_command(command)
    assert command[0] == "train_sft.py" and script_args.rule == "rhyme"
    assert script_args.dataset_name == str(tmp_path / "rhyme_pairs") and config.seed == 43
    assert model_args.model_name_or_path == str(tmp_path / "base")

    record = methods_table.train_and_evaluate("slot_sft_grpo", 43, args, ["--max_steps", "2"])
    (command,) = (command[1:] for command in record["commands"])
    script_args, config, model_args = parse_training_command(command)
    assert command[0] == "train_rl.py" and script_args.rule == "five_char_rhyme" and config.max_steps == 2
    assert script_args.dataset_name == str(tmp_path / "pairs") and model_args.model_name_or_path == sft["model"]
    assert methods_table.seconds_total(record) == 720.0  # the fine-tune's 600 s and GRPO's 120 s
    assert methods_table.consumed_cell([sft]) == "100 corpus poems"  # two epochs of 50
    assert methods_table.consumed_cell([record]) == "100 corpus poems + 1,600 poems"
