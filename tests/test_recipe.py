"""Every stage script reads its recipe the same way (poemdpo/training/recipe.py): YAML first, command line over it,
and a key nobody knows refused by name before any work starts."""

import importlib

import pytest
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from poemdpo.errors import PoemDPOError
from poemdpo.training.recipe import parse_recipe, with_default_recipe
from poemdpo.training.sft import SFTScriptArguments

RECIPES = {"train_base": "configs/base_tiny_cpu.yaml", "train_sft": "configs/sft_rhyme_slots_cpu.yaml",
           "train_dpo": "configs/dpo_tiny_cpu.yaml", "train_reward": "configs/reward_tiny_cpu.yaml",
           "train_rl": "configs/grpo_tiny_cpu.yaml"}


@pytest.mark.parametrize("script", RECIPES)
def test_a_misspelt_recipe_key_is_refused_by_name(script, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    with open(RECIPES[script], encoding="utf-8") as f:
        shipped = yaml.safe_load(f)
    recipe.write_text(yaml.safe_dump({**shipped, "learning_rat": 1e-3, "output_dir": str(tmp_path / "out")}))
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(["--config", str(recipe)])
    assert exit_info.value.code == 2 and "learning_rat" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


def test_the_command_line_overrides_the_recipe_and_the_default_recipe_comes_first(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.001\nslot_weight: 7\noutput_dir: from_yaml\nbf16: false\nuse_cpu: true\n")
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    argv = with_default_recipe(["--slot_weight", "3"], str(recipe))
    assert argv == ["--config", str(recipe), "--slot_weight", "3"]
    script_args, args, _ = parse_recipe(parser, argv)
    assert (script_args.slot_weight, args.learning_rate, args.output_dir) == (3, 1e-3, "from_yaml")
    assert with_default_recipe(["--config", "mine.yaml"], str(recipe)) == ["--config", "mine.yaml"]
    assert with_default_recipe(["--help"], str(recipe)) == ["--help"]  # --help shows the options, not a recipe's


def test_a_bad_value_is_a_poemdpo_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bf16: false\nuse_cpu: true\nlr_scheduler_type: fastest\n")
    with pytest.raises(PoemDPOError, match="fastest"):
        parse_recipe(TrlParser((SFTScriptArguments, SFTConfig, ModelConfig)), ["--config", str(recipe)])
