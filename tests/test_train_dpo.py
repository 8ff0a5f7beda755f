"""train_dpo.py end to end on tiny models built here: Llama and GPT-2 configs, full copy and LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

import build_dataset
import train_dpo
from poemdpo.tokenizer import train_char_tokenizer

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
    from datasets import load_from_disk

    rows = load_from_disk(str(pairs_dir))["train"]
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
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, pairs_dir, capsys, extra, message):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, pairs_dir, *extra)
    assert message in capsys.readouterr().err


def test_unknown_key_in_recipe_and_wrong_columns(tmp_path, pairs_dir, capsys):
    from datasets import load_from_disk

    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs_dir)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\nbf16: false\nlearning_rate: 1.0e-4\nbetta: 0.1\n")
    with pytest.raises(SystemExit):
        train_dpo.main(["--config", str(recipe)])
    assert "Unknown arguments from config file: ['--betta', '0.1']" in capsys.readouterr().err
    renamed = load_from_disk(str(pairs_dir)).rename_column("chosen", "preferred")
    renamed.save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(SystemExit):
        run(tmp_path, model_dir, tmp_path / "renamed")
    assert "lacks column(s) ['chosen']" in capsys.readouterr().err
