"""The one command, end to end on a tiny model: dataset -> DPO -> evaluation, with the headline printed; and every
other road (--method) wired to its script, recipe and evaluation, with the stage runner replaced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from datasets import load_dataset
from test_train_dpo import tiny_model_dir

from poemdpo import pipeline
from poemdpo.training.sft import RECORDED_SETTINGS

SPLITS = ["--validation_size", "0.2", "--test_size", "0.2"]


def tiny_base(tmp_path, corpus_dir) -> str:
    """A tiny Llama whose vocabulary comes from the same corpus the pipeline reads, split as SPLITS."""
    import build_dataset

    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "vocab"), *SPLITS])
    return tiny_model_dir(tmp_path / "base", "llama", tmp_path / "vocab")


def test_pipeline_runs_every_stage_and_prints_the_headline(tmp_path, corpus_dir, capsys):
    splits, model_dir = SPLITS, tiny_base(tmp_path, corpus_dir)
    out = tmp_path / "dpo"
    result = pipeline.main([
        "--method", "dpo", "--corpus", str(corpus_dir), "--pairs_dir", str(tmp_path / "pairs"), "--base_model",
        model_dir, "--output_dir", str(out), "--num_titles", "4", "--poems_per_title", "2", *splits,
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


def test_the_reward_model_road_runs_and_prints_the_accuracy_train_reward_recorded(tmp_path, corpus_dir, capsys):
    splits, model_dir = SPLITS, tiny_base(tmp_path, corpus_dir)
    out = tmp_path / "rm"
    result = pipeline.main([
        "--method", "reward_model", "--corpus", str(corpus_dir), "--pairs_dir", str(tmp_path / "pairs"),
        "--base_model", model_dir, "--output_dir", str(out), *splits,
        # the rest goes to train_reward.py
        "--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
    ])
    assert (out / "model.safetensors").is_file() and not (out / "eval").exists()
    recorded = json.loads((out / "poemdpo.json").read_text(encoding="utf-8"))
    assert result["reward_accuracy"] == recorded["reward_accuracy"]
    assert set(result["seconds"]) == {"dataset", "reward_model"}
    printed = capsys.readouterr().out
    test = recorded["reward_accuracy"]["test"]
    assert f"test       accuracy {test['accuracy']:.1%}  mean margin {test['margin']:.3f}  ({test['pairs']} pairs)" \
        in printed


# --- every road (--method): the stages and their arguments, with the stage runner replaced ---------------------


class Stages:
    """Records each stage's command instead of running it, and leaves behind what the real script would write:
    a reward model's config.json and poemdpo.json (its accuracy), evaluate.py's report.json."""

    def __init__(self, root):
        self.root, self.commands = root, []

    def __call__(self, name: str, command: list[str]) -> float:
        self.commands.append((name, command))
        if command[0] == "train_reward.py":
            out = self.root / command[command.index("--output_dir") + 1]
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text("{}", encoding="utf-8")
            accuracy = {"validation": {"accuracy": 0.75, "margin": 1.5, "pairs": 8, "dropped": 0},
                        "test": {"accuracy": 0.875, "margin": 2.0, "pairs": 8, "dropped": 0}}
            (out / "poemdpo.json").write_text(json.dumps({"reward_accuracy": accuracy}), encoding="utf-8")
        if command[0] == "evaluate.py":
            out = self.root / command[command.index("--model") + 1] / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps({"rule": "five_char"}), encoding="utf-8")
        return 0.0

    def scripts(self) -> list[str]:
        return [command[0] for _, command in self.commands]

    def command(self, script: str) -> list[str]:
        return next(command for _, command in self.commands if command[0] == script)


@pytest.fixture
def stages(tmp_path, monkeypatch) -> Stages:
    """Relative paths resolve under tmp_path; the base model exists, so its stage is skipped."""
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    (tmp_path / "data" / "base_model").mkdir(parents=True)
    (tmp_path / "data" / "base_model" / "config.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(pipeline, "headline", lambda report: f"HEADLINE of {report['rule']}")
    recorder = Stages(tmp_path)
    monkeypatch.setattr(pipeline, "run_stage", recorder)
    return recorder


def parse_training_command(command: list[str]):
    """A training stage's command as its script parses it (recipe, then the command line): the flags must be the
    script's own, and the values must land in the fields the script reads."""
    from trl import ModelConfig, RewardConfig, SFTConfig, TrlParser

    import train_rl
    from poemdpo.training import methods
    from poemdpo.training.recipe import read_recipe
    from poemdpo.training.reward import RewardScriptArguments
    from poemdpo.training.rl import METHODS, RLScriptArguments, method_of
    from poemdpo.training.sft import SFTScriptArguments

    argv = command[1:]
    classes = {
        "train_dpo.py": lambda: methods.parser_classes(methods.method_of(argv, read_recipe(argv)))[:2],
        "train_reward.py": lambda: (RewardScriptArguments, RewardConfig),
        "train_rl.py": lambda: (RLScriptArguments, METHODS[method_of(argv, train_rl.read_recipe(argv))][0]),
        "train_sft.py": lambda: (SFTScriptArguments, SFTConfig),
    }[command[0]]()
    return TrlParser((*classes, ModelConfig)).parse_args_and_config(args=argv)


@pytest.mark.parametrize("method, script, recipe, script_method", [
    ("dpo", "train_dpo.py", "configs/dpo_tiny_cpu.yaml", None),
    ("chapter_unlikelihood", "train_dpo.py", "configs/dpo_chapter_unlikelihood_cpu.yaml", None),
    ("chapter_linear", "train_dpo.py", "configs/dpo_chapter_linear_cpu.yaml", None),
    ("simpo", "train_dpo.py", "configs/simpo_tiny_cpu.yaml", "simpo"),
    ("orpo", "train_dpo.py", "configs/orpo_tiny_cpu.yaml", "orpo"),
    ("kto", "train_dpo.py", "configs/kto_tiny_cpu.yaml", "kto"),
    ("grpo", "train_rl.py", "configs/grpo_tiny_cpu.yaml", "grpo"),
    ("rloo", "train_rl.py", "configs/rloo_tiny_cpu.yaml", "rloo"),
    ("online_dpo", "train_rl.py", "configs/online_dpo_tiny_cpu.yaml", "online_dpo"),
    ("dpo_sigmoid", "train_dpo.py", "configs/dpo_tiny_cpu.yaml", None),
])
def test_a_policy_method_trains_with_its_recipe_then_evaluates_its_output(stages, capsys, method, script, recipe,
                                                                          script_method):
    result = pipeline.main(["--method", method, "--rule", "seven_char", "--max_steps", "3"])
    assert stages.scripts() == ["build_dataset.py", script, "evaluate.py"]
    assert set(result["seconds"]) == {"dataset", method, "evaluation"}
    command = stages.command(script)
    assert command[command.index("--config") + 1] == recipe
    assert command[-2:] == ["--max_steps", "3"]  # unknown arguments go to the training script, last
    if method == "dpo_sigmoid":  # the DPO recipe with its SFT term taken out
        assert command[1:5] == ["--loss_type", "sigmoid", "--loss_weights", "1.0"]

    script_args, args, model_args = parse_training_command(command)
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("data/base_model", "data/pairs_seven_char")
    assert script_args.rule == "seven_char"  # the RL recipes name five_char: the pipeline's rule must win
    assert args.output_dir == f"data/{method}_seven_char" and args.max_steps == 3
    if script_method:  # the script's own --method picks its trainer and config class
        assert command[:3] == [script, "--method", script_method] and script_args.method == script_method
    else:
        assert getattr(script_args, "method", "dpo") == "dpo" and type(args).__name__ == "DPOConfig"
    if script == "train_rl.py":
        assert script_args.reward_model is None  # the rule is the reward
    evaluate = stages.command("evaluate.py")
    assert evaluate[evaluate.index("--model") + 1] == f"data/{method}_seven_char"
    assert evaluate[evaluate.index("--reference") + 1] == "data/base_model"
    assert "HEADLINE of five_char" in capsys.readouterr().out


def test_grpo_reward_model_trains_the_reward_model_first_then_grpo_against_it(stages, tmp_path):
    pipeline.main(["--method", "grpo_reward_model"])
    assert stages.scripts() == ["build_dataset.py", "train_reward.py", "train_rl.py", "evaluate.py"]
    reward_args, reward_config, _ = parse_training_command(stages.command("train_reward.py"))
    assert stages.command("train_reward.py")[2] == "configs/reward_tiny_cpu.yaml"
    assert reward_config.output_dir == "data/reward_model_five_char"
    assert reward_args.dataset_name == "data/pairs_five_char"

    rl = stages.command("train_rl.py")
    assert rl[rl.index("--config") + 1] == "configs/grpo_tiny_cpu.yaml"
    script_args, args, _ = parse_training_command(rl)
    assert script_args.method == "grpo" and script_args.reward_model == "data/reward_model_five_char"
    assert args.output_dir == "data/grpo_reward_model_five_char"
    assert stages.command("evaluate.py")[2] == "data/grpo_reward_model_five_char"

    # A reward model that exists is used as it is; --reward_model names another.
    stages.commands.clear()
    pipeline.main(["--method", "grpo_reward_model", "--output_dir", "data/again"])
    assert stages.scripts() == ["build_dataset.py", "train_rl.py", "evaluate.py"]
    stages.commands.clear()
    pipeline.main(["--method", "grpo_reward_model", "--reward_model", "data/my_judge", "--output_dir", "data/mine"])
    assert stages.scripts() == ["build_dataset.py", "train_reward.py", "train_rl.py", "evaluate.py"]
    assert parse_training_command(stages.command("train_rl.py"))[0].reward_model == "data/my_judge"
    assert (tmp_path / "data" / "my_judge" / "poemdpo.json").is_file()


def test_the_default_trains_dpo_then_grpo_on_the_dpo_model_and_evaluates_against_the_base(stages):
    pipeline.main(["--rule", "seven_char", "--max_steps", "3"])  # the default method: dpo_grpo
    assert stages.scripts() == ["build_dataset.py", "train_dpo.py", "train_rl.py", "evaluate.py"]
    dpo = stages.command("train_dpo.py")
    assert dpo[dpo.index("--config") + 1] == "configs/dpo_tiny_cpu.yaml" and "--max_steps" not in dpo
    _, dpo_args, dpo_model = parse_training_command(dpo)
    assert (dpo_model.model_name_or_path, dpo_args.output_dir) == ("data/base_model", "data/dpo_seven_char")

    rl = stages.command("train_rl.py")
    assert rl[rl.index("--config") + 1] == "configs/grpo_after_dpo_cpu.yaml"
    script_args, args, model_args = parse_training_command(rl)
    assert model_args.model_name_or_path == "data/dpo_seven_char"  # goes on from the DPO model
    assert (script_args.method, script_args.rule, script_args.reward_model) == ("grpo", "seven_char", None)
    assert (args.output_dir, args.max_steps) == ("data/dpo_grpo_seven_char", 3)  # extra arguments: the last stage
    evaluate = stages.command("evaluate.py")
    assert evaluate[evaluate.index("--model") + 1] == "data/dpo_grpo_seven_char"
    assert evaluate[evaluate.index("--reference") + 1] == "data/base_model"  # the whole way from the base model

    # Without them, the rule's own setting: 七言's GRPO stage runs 100 steps (chosen on validation), 五言's 50.
    # The user's --max_steps 3 above won over it.
    for rule, steps in (("seven_char", 100), ("five_char", 50)):
        stages.commands.clear()
        pipeline.main(["--rule", rule])
        assert parse_training_command(stages.command("train_rl.py"))[1].max_steps == steps

    stages.commands.clear()  # --dpo_config is the first stage's recipe, --config the second's
    pipeline.main(["--method", "dpo_grpo", "--dpo_config", "configs/dpo_chapter_linear_cpu.yaml",
                   "--config", "configs/grpo_tiny_cpu.yaml"])
    assert stages.command("train_dpo.py")[1:3] == ["--config", "configs/dpo_chapter_linear_cpu.yaml"]
    assert stages.command("train_rl.py")[3:5] == ["--config", "configs/grpo_tiny_cpu.yaml"]


def test_iterated_dpo_trains_dpo_then_dpo_again_on_pairs_of_its_own_poems(stages):
    from transformers import HfArgumentParser

    from build_dataset import BuildArguments

    pipeline.main(["--method", "iterated_dpo", "--rule", "seven_char", "--test_size", "0.1", "--max_steps", "3"])
    assert stages.scripts() == ["build_dataset.py", "train_dpo.py", "build_dataset.py", "train_dpo.py",
                                "evaluate.py"]
    corpus_build, on_policy_build = (HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=c[1:])[0]
                                     for _, c in stages.commands if c[0] == "build_dataset.py")
    assert on_policy_build.on_policy_model == "data/dpo_seven_char" and corpus_build.on_policy_model is None
    assert on_policy_build.output_dir == "data/pairs_seven_char_on_policy" and on_policy_build.rule == "seven_char"
    assert on_policy_build.test_size == corpus_build.test_size == 0.1  # one split of titles for every stage

    first, second = (parse_training_command(c) for _, c in stages.commands if c[0] == "train_dpo.py")
    assert (first[2].model_name_or_path, first[0].dataset_name) == ("data/base_model", "data/pairs_seven_char")
    assert first[1].max_steps != 3  # extra arguments go to the last stage only
    assert (second[2].model_name_or_path, second[0].dataset_name) == ("data/dpo_seven_char",
                                                                      "data/pairs_seven_char_on_policy")
    assert (second[1].output_dir, second[1].max_steps) == ("data/iterated_dpo_seven_char", 3)
    evaluate = stages.command("evaluate.py")  # test titles and corpus pairs, as every other road's
    assert evaluate[evaluate.index("--dataset") + 1] == "data/pairs_seven_char"
    assert evaluate[evaluate.index("--reference") + 1] == "data/base_model"


def test_reward_model_reports_its_accuracy_and_samples_no_poems(stages, capsys):
    result = pipeline.main(["--method", "reward_model"])
    assert stages.scripts() == ["build_dataset.py", "train_reward.py"]  # no policy: no evaluate.py
    assert stages.command("train_reward.py")[2] == "configs/reward_tiny_cpu.yaml"
    assert parse_training_command(stages.command("train_reward.py"))[1].output_dir == "data/reward_model_five_char"
    assert result["reward_accuracy"]["test"]["accuracy"] == 0.875 and "report" not in result
    printed = capsys.readouterr().out
    assert "validation accuracy 75.0%" in printed and "test       accuracy 87.5%" in printed
    assert "HEADLINE" not in printed


def test_config_and_the_old_dpo_config_name(stages):
    pipeline.main(["--method", "dpo", "--dpo_config", "configs/dpo_chapter_linear_cpu.yaml"])
    assert stages.command("train_dpo.py")[1:3] == ["--config", "configs/dpo_chapter_linear_cpu.yaml"]
    stages.commands.clear()
    pipeline.main(["--method", "chapter_unlikelihood", "--config", "configs/dpo_tiny_cpu.yaml"])
    assert stages.command("train_dpo.py")[1:3] == ["--config", "configs/dpo_tiny_cpu.yaml"]
    stages.commands.clear()
    pipeline.main(["--method", "dpo", "--config", "configs/dpo_tiny_cpu.yaml", "--dpo_config",
                   "configs/dpo_tiny_cpu.yaml"])
    assert stages.command("train_dpo.py")[1:3] == ["--config", "configs/dpo_tiny_cpu.yaml"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "grpo", "--dpo_config", "configs/dpo_tiny_cpu.yaml"], "pass its recipe as --config"),
    (["--method", "dpo", "--config", "configs/dpo_tiny_cpu.yaml", "--dpo_config",
      "configs/dpo_chapter_linear_cpu.yaml"],
     "give one of them"),
    (["--method", "grpo", "--reward_model", "data/rm"], "--reward_model is the judge of --method grpo_reward_model"),
    (["--rule", "gelv", "--dpo_config", "configs/dpo_tiny_cpu.yaml"], "--method slot_sft_grpo has none"),
])
def test_arguments_that_do_not_fit_the_method_stop_before_any_stage(stages, argv, message):
    with pytest.raises(SystemExit, match=message):
        pipeline.main(argv)
    assert stages.commands == []


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "{" + ",".join(pipeline.METHODS) + "}" in printed
    for method in pipeline.METHODS:
        assert method in printed
    for script, recipe, _ in pipeline.METHODS.values():
        assert (pipeline.ROOT / script).is_file() and (pipeline.ROOT / recipe).is_file()


def test_the_pipeline_process_itself_leaves_torch_to_the_stages():
    # A new interpreter, as `python -m poemdpo.pipeline` starts: its own imports (and --help) bring no torch and no
    # trainer module, which the stages' fork server imports once.
    code = ("import sys, contextlib, io\nfrom poemdpo import pipeline\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    pipeline.main(['--help'])\n"
            "heavy = ('torch', 'poemdpo.evaluation.evaluate', 'poemdpo.training.sft')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=pipeline.PROJECT, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


def slot_sft_settings() -> dict:
    """What train_sft.py records of the fine-tune recipe's settings the pipeline checks before reusing one."""
    with open(pipeline.PROJECT / pipeline.METHODS["slot_sft"][1], encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    return {key: recipe[key] for key in RECORDED_SETTINGS}


def test_a_rhyme_rule_takes_the_rhyme_road_base_with_groups_slot_fine_tune_then_grpo(stages, tmp_path):
    from transformers import HfArgumentParser
    from trl import ModelConfig, SFTConfig, TrlParser

    from build_dataset import BuildArguments
    from poemdpo.training.sft import SFTScriptArguments

    pipeline.main(["--rule", "five_char_rhyme", "--max_steps", "3"])  # the default method for a rhyme rule
    assert stages.scripts() == ["build_dataset.py", "train_base.py", "build_dataset.py", "train_sft.py",
                                "train_rl.py", "evaluate.py"]
    base = stages.command("train_base.py")  # its own base model, trained with rhyme-group directions
    assert base[base.index("--output_dir") + 1] == "data/base_model_rhyme"
    assert base[base.index("--rhyme_group_init") + 1] == "1.0"
    assert base[base.index("--prompt_loss") + 1] == "all"  # after --config: the road's flag wins over the recipe's
    builds = [HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=c[1:])[0]
              for _, c in stages.commands if c[0] == "build_dataset.py"]
    assert [(b.rule, b.output_dir) for b in builds] == [("five_char_rhyme", "data/pairs_five_char_rhyme"),
                                                        ("rhyme", "data/pairs_rhyme")]
    sft = stages.command("train_sft.py")
    script_args, args, model_args = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(
        args=sft[1:])
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("data/base_model_rhyme", "data/pairs_rhyme")
    assert (script_args.slot_weight, args.output_dir, args.max_steps) == (100, "data/slot_sft_rhyme", -1)
    rl = stages.command("train_rl.py")
    assert rl[rl.index("--config") + 1] == "configs/grpo_after_sft_cpu.yaml"
    script_args, args, model_args = parse_training_command(rl)
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("data/slot_sft_rhyme",
                                                                         "data/pairs_five_char_rhyme")
    assert (script_args.rule, args.beta, args.max_steps) == ("five_char_rhyme", 0.08, 3)
    evaluate = stages.command("evaluate.py")
    assert evaluate[evaluate.index("--reference") + 1] == "data/base_model_rhyme"
    assert evaluate[evaluate.index("--dataset") + 1] == "data/pairs_five_char_rhyme"

    # The fine-tune does not depend on the rule: a second rhyme rule goes on from it without training it again.
    (tmp_path / "data" / "slot_sft_rhyme").mkdir(parents=True)
    (tmp_path / "data" / "slot_sft_rhyme" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "data" / "slot_sft_rhyme" / "poemdpo.json").write_text(
        json.dumps({"base_model": "data/base_model_rhyme", **slot_sft_settings()}), encoding="utf-8")
    (tmp_path / "data" / "base_model_rhyme").mkdir(parents=True)
    (tmp_path / "data" / "base_model_rhyme" / "config.json").write_text("{}", encoding="utf-8")
    stages.commands.clear()
    pipeline.main(["--rule", "gelv"])
    assert stages.scripts() == ["build_dataset.py", "train_rl.py", "evaluate.py"]
    assert parse_training_command(stages.command("train_rl.py"))[0].rule == "gelv"
    stages.commands.clear()
    pipeline.main(["--rule", "rhyme", "--method", "slot_sft"])  # the fine-tune alone, on its rule's own pairs
    assert stages.scripts() == ["build_dataset.py", "train_sft.py", "evaluate.py"]
    sft = stages.command("train_sft.py")
    assert sft[sft.index("--dataset_name") + 1] == "data/pairs_rhyme"
    assert sft[sft.index("--output_dir") + 1] == "data/slot_sft_rhyme"


def test_the_rhyme_road_refuses_its_base_if_it_learned_another_share_of_the_prompt(stages, tmp_path):
    base = tmp_path / "data" / "base_model_rhyme"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}", encoding="utf-8")
    (base / "poemdpo.json").write_text(json.dumps({"stage": "base_model", "prompt_loss": "text"}), encoding="utf-8")
    with pytest.raises(SystemExit, match="data/base_model_rhyme was trained with prompt_loss text, not the rhyme "
                                         "road's all; delete it"):
        pipeline.main(["--rule", "gelv", "--method", "slot_sft"])
    assert stages.commands == []  # refused before any stage ran
    (base / "poemdpo.json").write_text(json.dumps({"stage": "base_model", "prompt_loss": "all"}), encoding="utf-8")
    pipeline.main(["--rule", "five_char_rhyme", "--max_steps", "3"])
    assert "train_base.py" not in stages.scripts()  # the base is reused


def test_the_rhyme_road_refuses_a_fine_tune_whose_base_is_gone(stages, tmp_path):
    sft = tmp_path / "data" / "slot_sft_rhyme"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}", encoding="utf-8")
    (sft / "poemdpo.json").write_text(json.dumps({"base_model": "data/base_model_rhyme", **slot_sft_settings()}),
                                      encoding="utf-8")
    with pytest.raises(SystemExit, match="fine-tuned from an earlier data/base_model_rhyme, which is gone; delete it"):
        pipeline.main(["--rule", "five_char_rhyme"])  # a new base would be trained under the fine-tune's feet
    assert stages.commands == []


def test_the_rhyme_road_refuses_a_fine_tune_of_another_base_and_trains_a_named_base_with_groups(stages, tmp_path,
                                                                                                capsys):
    (tmp_path / "data" / "slot_sft_rhyme").mkdir(parents=True)
    (tmp_path / "data" / "slot_sft_rhyme" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "data" / "slot_sft_rhyme" / "poemdpo.json").write_text(
        json.dumps({"base_model": "data/base_model_rhyme", **slot_sft_settings()}), encoding="utf-8")
    with pytest.raises(SystemExit, match="fine-tuned from 'data/base_model_rhyme', not from the base model "
                                         "'data/my_base'"):
        pipeline.main(["--rule", "five_char_rhyme", "--base_model", "data/my_base"])
    assert stages.commands == []  # refused before any stage ran
    stale = {"base_model": "data/base_model_rhyme", **slot_sft_settings(), "num_train_epochs": 0.5}
    (tmp_path / "data" / "slot_sft_rhyme" / "poemdpo.json").write_text(json.dumps(stale), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"slot_sft_rhyme was fine-tuned with num_train_epochs 0.5, not the recipe's "
                                         r"\d.*; delete it to fine-tune again"):
        pipeline.main(["--rule", "five_char_rhyme"])  # a fine-tune of an older recipe is not reused without a word
    assert stages.commands == []
    shutil.rmtree(tmp_path / "data" / "slot_sft_rhyme")
    pipeline.main(["--rule", "five_char_rhyme", "--base_model", "data/my_base", "--output_dir", "data/mine"])
    base = stages.command("train_base.py")  # a base of the user's naming still gets the rhyme groups
    assert base[base.index("--output_dir") + 1] == "data/my_base" and "--rhyme_group_init" in base
    sft = stages.command("train_sft.py")
    assert sft[sft.index("--model_name_or_path") + 1] == "data/my_base"


STAGE_SCRIPT = """import os, sys
from pathlib import Path
os.environ["STAGE_TOUCHED"] = "1"  # a fork's own memory: the pipeline never sees it
Path("ran_here.txt").write_text(" ".join(sys.argv), encoding="utf-8")
print("stage says", sys.argv[1], flush=True)
if sys.argv[1] == "raise":
    raise ValueError("a stage's own error")
if sys.argv[1] == "message":
    sys.exit("stopped: a message")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("arg, code, printed", [
    ("0", 0, ""), ("3", 3, ""), ("raise", 1, "ValueError: a stage's own error"), ("message", 1, "stopped: a message"),
])
def test_a_forked_stage_runs_as_its_own_interpreter_would(tmp_path, monkeypatch, capfd, arg, code, printed):
    """Exit code, output, working directory and argv as `python stage.py ARG` in ROOT; nothing leaks back."""
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT, encoding="utf-8")
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    cwd = pipeline.PROJECT.cwd()
    assert pipeline.run_forked(["stage.py", arg]) == code
    forked = capfd.readouterr()
    assert (tmp_path / "ran_here.txt").read_text(encoding="utf-8") == f"stage.py {arg}"
    assert pipeline.PROJECT.cwd() == cwd and "STAGE_TOUCHED" not in os.environ
    (tmp_path / "ran_here.txt").unlink()
    new_interpreter = subprocess.run([sys.executable, "stage.py", arg], cwd=tmp_path, capture_output=True, text=True)
    assert new_interpreter.returncode == code and (tmp_path / "ran_here.txt").is_file()
    assert forked.out == new_interpreter.stdout == f"stage says {arg}\n"
    assert printed in forked.err and printed in new_interpreter.stderr


def test_a_failed_forked_stage_stops_the_pipeline_with_its_exit_code(tmp_path, monkeypatch):
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT, encoding="utf-8")
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "FORK_STAGES", True)
    assert pipeline.run_stage("ok", ["stage.py", "0"]) > 0
    with pytest.raises(SystemExit, match=r"the bad stage failed \(exit code 3\)"):
        pipeline.run_stage("bad", ["stage.py", "3"])
