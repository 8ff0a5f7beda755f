"""train_dpo.py end to end on tiny models built here: Llama and GPT-2 configs, full copy and LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

import build_dataset
import train_dpo
from poemdpo.models.tokenizer import train_char_tokenizer

TINY = {
    "llama": lambda v: LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                   tie_word_embeddings=True),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    from conftest import make_corpus_poems

    root = tmp_path_factory.mktemp("dpo")
    (root / "corpus").mkdir()
    (root / "corpus" / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(200), ensure_ascii=False))
    build_dataset.main(["--corpus", str(root / "corpus"), "--output_dir", str(root / "pairs"), "--test_size", "0.2"])
    return root / "pairs"


def tiny_model_dir(path, arch: str, pairs_dir) -> str:
    from datasets import load_dataset

    rows = load_dataset(str(pairs_dir))["train"]  # the pairs directory is a Hub-layout dataset
    tokenizer = train_char_tokenizer(list(rows["prompt"]) + list(rows["chosen"]) + list(rows["rejected"]),
                                     min_frequency=1)
    torch.manual_seed(0)
    config = TINY[arch](len(tokenizer))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run(tmp_path, model_dir, pairs_dir, *extra):
    out = tmp_path / "out"
    argv = ["--config", "configs/dpo_tiny_cpu.yaml", "--model_name_or_path", model_dir,
            "--dataset_name", str(pairs_dir), "--output_dir", str(out), "--max_train_pairs", "32",
            "--per_device_train_batch_size", "8", "--max_eval_pairs", "16", "--eval_steps", "2",
            "--save_steps", "2", "--logging_steps", "1", "--sample_titles", "4", "--sample_max_new_tokens", "24",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--report_to", "none", *extra]
    return train_dpo.main(argv), out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_margin_grows_reference_frozen_and_artefacts_load(tmp_path, pairs_dir, arch):
    model_dir = tiny_model_dir(tmp_path / "base", arch, pairs_dir)
    before = load_file(f"{model_dir}/model.safetensors")
    trainer, out = run(tmp_path, model_dir, pairs_dir, "--num_train_epochs", "3", "--loss_type", "sigmoid",
                       "--loss_weights", "1.0")
    margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    assert margins[-1] > 0.05 and margins[-1] > margins[0]
    # The reference is a separate frozen copy whose weights did not move.
    reference = trainer.ref_model.state_dict()
    for name, tensor in before.items():
        if name in reference:
            assert torch.equal(reference[name], tensor), name
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    # The saved model and tokenizer load with plain transformers, and the card was written.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("<INS>山水<RES>")["input_ids"]) == "<INS>山水<RES>"
    assert not torch.equal(loaded.state_dict()[next(iter(before))], next(iter(before.values())))
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "five_char" in card and "rewards/margins" in card and "| title | aligned | reference |" in card
    assert (out / "samples.md").is_file()
    logged = [e for e in trainer.state.log_history if "samples/five_char_rate" in e]
    assert logged and 0.0 <= logged[-1]["samples/five_char_rate"] <= 1.0


def test_lora_uses_the_base_without_adapter_as_reference(tmp_path, pairs_dir):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    trainer, out = run(tmp_path, model_dir, pairs_dir, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                       "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2")
    assert trainer.ref_model is None
    assert (out / "adapter_config.json").is_file()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_prompt_length", "64"], "'max_prompt_length' is not a DPO setting in TRL 1.x"),
        (["--padding_free", "true"], "padding_free: true is ignored"),
        (["--no_such_option", "1"], "not used by the HfArgumentParser: ['--no_such_option', '1']"),
        (["--dataset_name", "data/nowhere"], "dataset 'data/nowhere' does not exist; build it with"),
        (["--dataset_train_split", "training"], "has no split 'training'"),
        (["--model_name_or_path", "data/base_model_missing"], "does not exist"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1, got 0"),
        (["--resume_from_checkpoint", "data/no_such_checkpoint"], "is not a checkpoint directory"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, pairs_dir, capsys, extra, message):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, pairs_dir, *extra)
    assert message in capsys.readouterr().err


def test_plain_trl_columns_resume_false_and_mixed_splits(tmp_path, pairs_dir, capsys):
    """TRL's plain prompt/chosen/rejected rows train (sample titles read from the prompts); resume false means from
    scratch; an empty split, or a base model that held out other titles, stops with one sentence."""
    from datasets import load_dataset

    from poemdpo.run_info import write_run_info

    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    plain = load_dataset(str(pairs_dir)).select_columns(["prompt", "chosen", "rejected"])
    plain_dir = tmp_path / "plain"  # parquet files in the Hub's default layout, no card, no stats
    (plain_dir / "data").mkdir(parents=True)
    for name, split in plain.items():
        split.to_parquet(str(plain_dir / "data" / f"{name}-00000-of-00001.parquet"))
    trainer, out = run(tmp_path, model_dir, plain_dir, "--max_steps", "2", "--resume_from_checkpoint", "false",
                       "--sample_titles", "3")
    assert trainer.state.global_step == 2 and (out / "model.safetensors").is_file()
    assert "春夜喜雨" in (out / "samples.md").read_text(encoding="utf-8")

    empty_dir = tmp_path / "empty"
    (empty_dir / "data").mkdir(parents=True)
    for name, split in plain.items():
        split.select(range(0 if name == "validation" else len(split))).to_parquet(
            str(empty_dir / "data" / f"{name}-00000-of-00001.parquet"))
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, empty_dir, "--max_steps", "1")
    # datasets itself refuses a directory with an empty split; the sentence names the directory and the split.
    err = capsys.readouterr().err
    assert f"dataset directory '{empty_dir}' holds no readable dataset" in err and '"validation"' in err

    write_run_info(model_dir, {"splits": {"validation_size": 0.1, "test_size": 0.2, "seed": 42}})
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, pairs_dir, "--max_steps", "1")
    assert "was built with splits" in capsys.readouterr().err


def test_unknown_key_in_recipe_and_wrong_columns(tmp_path, pairs_dir, capsys):
    from datasets import load_dataset

    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\nbf16: false\nlearning_rate: 1.0e-4\nbetta: 0.1\n")
    with pytest.raises(SystemExit):
        train_dpo.main(["--config", str(recipe)])
    assert "Unknown arguments from config file: ['--betta', '0.1']" in capsys.readouterr().err
    renamed = load_dataset(str(pairs_dir)).rename_column("chosen", "preferred")
    for split, rows in renamed.items():  # a Hub-layout directory, as build_dataset.py writes one
        rows.to_parquet(str(tmp_path / "renamed" / "data" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, tmp_path / "renamed")
    assert "lacks column(s) ['chosen']" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def dpo_command(model_dir, pairs_dir, out, *extra) -> list[str]:
    """train_dpo.py's arguments for a subprocess (absolute paths: the test may run from anywhere)."""
    return [str(REPO / "train_dpo.py"), "--config", str(REPO / "configs" / "dpo_tiny_cpu.yaml"),
            "--model_name_or_path", model_dir, "--dataset_name", str(pairs_dir), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_eval_pairs", "8", "--logging_steps", "1",
            "--sample_titles", "2", "--sample_max_new_tokens", "16", "--report_to", "none", *extra]


# Runs a script with the Trainer killed (SIGKILL: nothing gets to clean up) at a chosen step and point, so the kill
# lands where the test says, not wherever a polling loop happens to catch the run.
KILLER = """
import os, runpy, signal, sys
from transformers import Trainer

step, where = int(os.environ["KILL_AT_STEP"]), os.environ["KILL_WHERE"]
patched = "_save_rng_state" if where == "mid_checkpoint" else "_maybe_log_save_evaluate"
original = getattr(Trainer, patched)

def kill_then(self, *args, **kwargs):
    # mid_checkpoint: model and optimizer written, rng state and trainer_state.json not yet.
    # between_checkpoints: right after the step, its checkpoint (if any) not begun.
    if self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

setattr(Trainer, patched, kill_then)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_resume_after_sigkill_mid_checkpoint_continues_from_the_last_finished_one(tmp_path, pairs_dir):
    """Killed while writing checkpoint-8 (after checkpoint-4 was finished), `--resume_from_checkpoint true` goes on
    from checkpoint-4: transformers alone would pick the half-written checkpoint-8."""
    where, kill_at, resumes_at = "mid_checkpoint", 8, 4
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    out = tmp_path / "out"
    command = dpo_command(model_dir, pairs_dir, out, "--max_steps", "12", "--save_steps", "4", "--save_total_limit",
                          "2", "--eval_steps", "12")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER, encoding="utf-8")
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "KILL_WHERE": where}
    killed = subprocess.run([sys.executable, str(killer), *command], env=env, cwd=REPO, capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    assert finished == [resumes_at]
    assert (out / "checkpoint-8" / "model.safetensors").is_file()  # half-written: weights, no trainer state
    assert not (out / "checkpoint-8" / "trainer_state.json").exists()

    resumed = subprocess.run([sys.executable, *command, "--resume_from_checkpoint", "true"], cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-4: checkpoint-8 was not finished" in resumed.stdout
    # Only the steps after the finished checkpoint are trained again, each logged once.
    assert resumed.stdout.count("'loss':") == 12 - resumes_at
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 13))
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def accelerate_launch(config: str, *options: str) -> list[str]:
    """accelerate's launcher from the running interpreter: no `accelerate` on PATH needed (an un-activated venv).
    Port 0: accelerate picks a free one for each launch (a port from the pid was the same for every launch of a run)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
            "--main_process_port", "0", *options]


def test_two_process_ddp_on_cpu_with_accelerate(tmp_path, pairs_dir):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    out = tmp_path / "out"
    command = dpo_command(model_dir, pairs_dir, out, "--max_train_pairs", "32", "--eval_steps", "2",
                          "--save_strategy", "no")
    result = subprocess.run(accelerate_launch("configs/accelerate/cpu_ddp.yaml") + command, cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # 32 pairs, 4 per process, 2 processes: 4 optimizer steps (one process would take 8), each logged once.
    assert result.stdout.count("'loss':") == 4
    assert result.stdout.count("step 4: five_char rate aligned") == 1  # sampled on both, printed by process 0
    assert "4/4" in result.stderr
    assert AutoModelForCausalLM.from_pretrained(out) is not None and (out / "README.md").is_file()


# accelerate (1.15) takes its FSDP path only on accelerators: on a CPU it runs an FSDP config as plain DDP
# (use_cpu) or as unconnected processes (check_engine stops both). This shim lets its FSDP2 path run over gloo on
# the CPU, so the same launch a GPU machine makes (fully_shard, sharded training, generate through FSDP
# hooks, the full-state-dict save) runs here in seconds; it changes nothing else.
FSDP_ON_CPU = """
import os, runpy, sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

original = AcceleratorState.__init__

def init(self, *args, fsdp_plugin=None, **kwargs):
    original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin

AcceleratorState.__init__ = init
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    state = AcceleratorState()
    print(f"engine: {state.distributed_type.value}, fsdp version {state.fsdp_plugin.fsdp_version}", flush=True)
"""


def test_two_process_fsdp2_trains_samples_and_saves_a_whole_model(tmp_path, pairs_dir):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    out = tmp_path / "out"
    shim = tmp_path / "fsdp_on_cpu.py"
    shim.write_text(FSDP_ON_CPU, encoding="utf-8")
    # configs/accelerate/fsdp.yaml as a GPU machine runs it, but 2 processes and fp32 (CPU).
    launch = accelerate_launch("configs/accelerate/fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no")
    command = dpo_command(model_dir, pairs_dir, out, "--max_steps", "2", "--sample_titles", "4", "--eval_steps", "2",
                          "--save_strategy", "no")
    result = subprocess.run(launch + [str(shim)] + command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("engine: FSDP, fsdp version 2") == 2
    assert result.stdout.count("'loss':") == 2  # trained
    assert result.stdout.count("step 2: five_char rate aligned") == 1  # sampled (reference at the start, then step 2)
    assert "## step 2" in (out / "samples.md").read_text(encoding="utf-8")
    # The final save is whole (the config's SHARDED_STATE_DICT would save no weights at all) and loads as it is.
    trained, base = load_file(out / "model.safetensors"), load_file(f"{model_dir}/model.safetensors")
    assert set(base) <= set(trained)  # (the full state dict also names the tied lm_head)
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize(
    "environment, processes, running, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, 2, "FSDP", "the accelerate config asks for FSDP, but accelerate runs this "
         "launch as MULTI_CPU"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, 2, "DEEPSPEED", "asks for DEEPSPEED, but accelerate runs this launch "
         "as MULTI_CPU"),
        ({"WORLD_SIZE": "2"}, 1, None, "launched as 2 processes, but they did not join one process group"),
    ],
)
def test_a_launch_that_would_not_run_as_launched_stops(monkeypatch, environment, processes, running, message):
    """What accelerate does on a CPU with the GPU configs (measured with fsdp.yaml here): FSDP / DeepSpeed run as
    plain DDP (MULTI_CPU), and without use_cpu the processes never join, each training alone."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from poemdpo.errors import PoemDPOError
    from poemdpo.training.samples import check_engine

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    fallback = DistributedType.MULTI_CPU if processes > 1 else DistributedType.NO
    with pytest.raises(PoemDPOError, match=message):
        check_engine(SimpleNamespace(num_processes=processes, distributed_type=fallback))
    if running:  # the engine asked for is the engine running: no complaint
        check_engine(SimpleNamespace(num_processes=processes, distributed_type=DistributedType[running]))


def test_fractional_eval_steps_is_a_share_of_the_run(tmp_path, pairs_dir):
    """eval_steps 0.1 means every tenth of max_steps, as transformers resolves it; samples follow the evaluations."""
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    trainer, out = run(tmp_path, model_dir, pairs_dir, "--max_steps", "20", "--eval_steps", "0.1",
                       "--save_strategy", "no", "--sample_titles", "2", "--max_eval_pairs", "4")
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    sampled = [e["step"] for e in trainer.state.log_history if "samples/five_char_rate" in e]
    assert evaluated == list(range(2, 21, 2)) and sampled == evaluated  # step 20 once: no second final pass
    assert (out / "samples.md").read_text(encoding="utf-8").count("## step") == 10


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<INS>{{ m['content'] }}<RES>"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
# The generation prompt adds a marker the full conversation never has: the boundary check must stop it.
BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<INS>{{ m['content'] }}"
    "{% else %}<INP>{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<RES>{% endif %}"
)


def with_chat_template(model_dir: str, template: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_chat_template_model_trains_on_conversational_rows(tmp_path, pairs_dir):
    model_dir = with_chat_template(tiny_model_dir(tmp_path / "base", "llama", pairs_dir), CHAT_TEMPLATE)
    trainer, out = run(tmp_path, model_dir, pairs_dir, "--max_steps", "2")
    first = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    prompt = tokenizer.decode(first["prompt_ids"])
    assert prompt.startswith("<INS>請用以下題目寫一首詩") and prompt.endswith("<RES>")
    assert tokenizer.decode(first["chosen_ids"]).endswith("</s>")
    assert (out / "model.safetensors").is_file()


def test_prompt_that_is_not_a_token_prefix_stops_before_training(tmp_path, pairs_dir, capsys):
    model_dir = with_chat_template(tiny_model_dir(tmp_path / "base", "llama", pairs_dir), BROKEN_TEMPLATE)
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, pairs_dir, "--max_steps", "1")
    assert "row 0: the tokenized prompt is not a prefix of the tokenized prompt+chosen" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in __import__("pathlib").Path("configs").glob("dpo_*.yaml")))
def test_recipes_state_their_settings_and_parse(recipe):
    import yaml
    from trl import DPOConfig, ModelConfig, TrlParser

    from poemdpo.training.dpo import DPOScriptArguments

    settings = yaml.safe_load(open(f"configs/{recipe}", encoding="utf-8"))
    deliberate = {"learning_rate", "beta", "loss_type", "activation_checkpointing", "bf16", "dtype", "max_length",
                  "output_dir", "model_name_or_path", "dataset_name"}
    assert deliberate <= set(settings), deliberate - set(settings)
    parser = TrlParser((DPOScriptArguments, DPOConfig, ModelConfig))
    # A GPU recipe is parsed as if on a CPU: every key must still be known.
    _, args, _ = parser.parse_args_and_config(["--config", f"configs/{recipe}", "--bf16", "false", "--use_cpu", "true"])
    assert args.loss_type == list(settings["loss_type"])


@pytest.mark.parametrize("losses", [["ipo"], ["hinge"], ["robust"], ["sigmoid_norm"], ["sigmoid", "sft"]])
def test_loss_types_pass_straight_to_trl(tmp_path, pairs_dir, losses):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    trainer, _ = run(tmp_path, model_dir, pairs_dir, "--max_steps", "1", "--loss_type", *losses,
                     "--loss_weights", *["1.0"] * len(losses), "--eval_strategy", "no", "--sample_titles", "0")
    assert trainer.loss_types == losses
    assert trainer.state.global_step == 1


def test_push_to_hub_offline_fails_before_training(tmp_path, pairs_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    start = time.time()
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, pairs_dir, "--push_to_hub", "true", "--hub_model_id", "someone/poem-dpo")
    assert "push_to_hub is set but the Hub cannot be used" in capsys.readouterr().err
    assert time.time() - start < 30
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["instruction", "chat"])
def test_pairs_that_max_length_would_cut_are_left_out(tmp_path, pairs_dir, template):
    """Counted as TRL tokenizes them: with the drop off, some trained rows pass max_length; with it on, none does."""
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    if template:
        model_dir = with_chat_template(model_dir, template)

    def longest(rows) -> list[int]:
        return [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]

    kept_all, _ = run(tmp_path / "all", model_dir, pairs_dir, "--max_steps", "1", "--max_length", "4096",
                      "--eval_strategy", "no", "--sample_titles", "0", "--save_strategy", "no")
    lengths = sorted(longest(kept_all.train_dataset))
    max_length = lengths[len(lengths) // 2]  # about half the pairs are longer
    cut, _ = run(tmp_path / "cut", model_dir, pairs_dir, "--max_steps", "1", "--max_length", str(max_length),
                 "--drop_truncated_pairs", "false", "--eval_strategy", "no", "--sample_titles", "0",
                 "--save_strategy", "no")
    dropped, out = run(tmp_path / "drop", model_dir, pairs_dir, "--max_steps", "1", "--max_length", str(max_length),
                       "--eval_strategy", "no", "--sample_titles", "0", "--save_strategy", "no")
    assert max(longest(cut.train_dataset)) > max_length
    assert max(longest(dropped.train_dataset)) <= max_length
    assert len(dropped.train_dataset) == 32  # the max_train_pairs are drawn from the pairs that fit
    assert json.loads((out / "poemdpo.json").read_text())["train_pairs"] == 32


def test_held_out_pairs_are_evaluated_by_length_with_the_same_metrics(tmp_path, pairs_dir, monkeypatch):
    """Sorted by length, held-out pairs pad less; the per-pair metrics are means over the same pairs, so they stay."""
    from transformers import Trainer

    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    trainer, _ = run(tmp_path, model_dir, pairs_dir, "--max_steps", "1", "--per_device_eval_batch_size", "1",
                     "--sample_titles", "0")
    order = list(trainer._get_eval_sampler(trainer.eval_dataset))
    lengths = trainer.eval_dataset["length"]
    assert len(lengths) > 2 and len(set(lengths)) > 1
    assert sorted(order) == list(range(len(lengths))) and [lengths[i] for i in order] == sorted(lengths)
    by_length = trainer.evaluate()
    monkeypatch.setattr(type(trainer), "_get_eval_sampler", Trainer._get_eval_sampler)
    assert [lengths[i] for i in trainer._get_eval_sampler(trainer.eval_dataset)] != sorted(lengths)
    grouped = trainer.evaluate()
    # Per-pair means. (The recipe's eval_loss holds the SFT term, a token mean per batch: it moves with the batching,
    # by group_by_length's shuffle before as by length now.)
    for key in ("eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected"):
        assert by_length[key] == pytest.approx(grouped[key], rel=1e-4, abs=1e-5), key


def test_held_out_reference_log_probs_are_computed_once_with_trls_metrics(tmp_path, pairs_dir, monkeypatch):
    """The frozen reference scores each held-out batch once; every evaluation's metrics stay TRL's own."""
    from trl import DPOTrainer

    from poemdpo.training.samples import final_metrics

    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    trainer, _ = run(tmp_path, model_dir, pairs_dir, "--max_steps", "2", "--per_device_eval_batch_size", "1",
                     "--sample_titles", "0", "--save_strategy", "no")
    assert final_metrics(trainer) == {k: v for k, v in trainer.state.log_history[-2].items() if k != "step"}
    calls = []
    forward = trainer.ref_model.forward
    monkeypatch.setattr(trainer.ref_model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    batches = len(trainer.get_eval_dataloader())
    first, second = trainer.evaluate(), trainer.evaluate()
    assert batches > 1 and len(calls) == 0  # the Trainer's evaluations during training scored them already
    trainer.held_out_reference.clear()
    kept = trainer.evaluate()
    assert len(calls) == batches
    monkeypatch.setattr(type(trainer), "_compute_loss", DPOTrainer._compute_loss)
    stock = trainer.evaluate()
    assert len(calls) == 2 * batches
    for metrics in (first, second, kept):
        for key, value in stock.items():
            if "runtime" not in key and "per_second" not in key:
                assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_batch_digest_tells_batches_apart_by_any_tensor_value():
    from poemdpo.training.samples import batch_digest

    batch = {"input_ids": torch.arange(12).reshape(2, 6), "completion_mask": torch.ones(2, 6, dtype=torch.long),
             "pixel_values": torch.ones(2, 3, dtype=torch.bfloat16), "scale": torch.tensor(0.5), "name": "kept out"}
    same = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    assert batch_digest(batch) == batch_digest(same) and len(batch_digest(batch)) == 16
    for key in ("input_ids", "completion_mask", "pixel_values", "scale"):
        changed = dict(batch, **{key: batch[key].clone()})
        changed[key].view(-1)[-1] += 1
        assert batch_digest(changed) != batch_digest(batch), key
    assert batch_digest(dict(batch, input_ids=batch["input_ids"].reshape(3, 4))) != batch_digest(batch)
