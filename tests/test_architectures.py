"""Swapping the base model: Qwen2, Llama and Gemma 2 stand-ins (tests/tiny_models.py) through train_dpo.py.

Each family has its released chat template and special tokens and a byte-level BPE trained on the corpus, so
what breaks with a real checkpoint (a tokenizer class swapped on reload, a template whose prompt is not a token
prefix, eos vs end-of-turn, the card showing a prompt the model never saw) breaks here first, in seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from tiny_models import FAMILIES, dpo_argv, make_pairs_dir, make_tiny_model, train_tokenizer
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_dpo
from poemdpo.data.prompts import build_prompt, conversational
from poemdpo.errors import PoemDPOError
from poemdpo.models.generation import generate_poems, prompt_texts
from poemdpo.training.dpo import check_token_boundaries
from poemdpo.training.samples import SamplePoemsCallback

# What transformers 5 loads for each saved family: Qwen2's own class replaces the declared one (and must encode
# the same), the others keep the generic tokenizers-backed class.
LOADED_AS = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Tokenizer"),
    "llama": ("LlamaForCausalLM", "TokenizersBackend"),
    "gemma2": ("Gemma2ForCausalLM", "TokenizersBackend"),
}
# How an assistant turn ends in each template: the completion TRL trains on ends with it.
END_OF_TURN = {"qwen2": "<|im_end|>\n", "llama": "<|eot_id|>", "gemma2": "<end_of_turn>\n"}


def prompt_leaks(tokenizer, titles, poems) -> bool:
    """Whether a poem holds a prompt as rendered by the tokenizer's chat template: a poem is the completion only.
    (A special token the model itself wrote stays in its poem, `decode_poem`: a random tiny model writes some.)"""
    prompts = prompt_texts(tokenizer, titles)
    return any(prompt in poem for prompt in prompts for poem in poems)


@pytest.fixture(scope="module")
def texts():
    from tiny_models import corpus_texts

    return corpus_texts()


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_pairs_dir(tmp_path_factory.mktemp("arch"))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, texts):
    return {name: make_tiny_model(tmp_path_factory.mktemp(name) / "base", name, texts) for name in FAMILIES}


def test_chat_templates_are_the_released_ones():
    from trl import chat_template_utils as released

    assert FAMILIES["qwen2"].template == released.qwen2_5_chat_template
    assert FAMILIES["llama"].template == released.llama3_chat_template
    assert FAMILIES["gemma2"].template == released.gemma_chat_template


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_reloads_and_encodes_as_trained(base_dirs, family):
    model_dir = base_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(tokenizer).__name__ == LOADED_AS[family][1]
    trained = Tokenizer.from_file(f"{model_dir}/tokenizer.json")  # what was saved, before any class swap
    poem = "山水風月好，雲花春秋長。\n𠀋字不在語料中。"  # the second line has a character outside the training slice
    for text in (poem, build_prompt("春日") + poem):
        assert tokenizer(text)["input_ids"] == trained.encode(text).ids
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    conversation = conversational("春日") + [{"role": "assistant", "content": poem}]
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):] == poem + END_OF_TURN[family]
    for token in FAMILIES[family].special_tokens:  # each special token stays one id inside a rendered chat
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]


def lora_args() -> list[str]:
    return ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(conversational("春日"), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dpo_on_a_swapped_base_model(tmp_path, base_dirs, pairs_dir, family, lora):
    base_dir, out = base_dirs[family], tmp_path / "out"
    trainer = train_dpo.main(dpo_argv(base_dir, pairs_dir, out, "--max_steps", "2", *(lora_args() if lora else [])))
    tokenizer = trainer.processing_class
    assert trainer.state.global_step == 2

    # Rows went through the family's chat template; the prompt is exactly the generation prompt.
    row = trainer.train_dataset[0]
    assert isinstance(row["prompt"], list)
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(row["chosen_ids"]) == row["chosen"][0]["content"] + END_OF_TURN[family]

    # The reference: a frozen copy, or with LoRA the same weights with the adapter off.
    if lora:
        assert trainer.ref_model is None
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert not any(p.requires_grad for p in trainer.ref_model.parameters())

    # Sample poems: the reference's are the untouched base model's (same titles, seed, prompt format), and no
    # special token leaks into a poem.
    samples = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SamplePoemsCallback))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert samples.reference_poems == generate_poems(base, tokenizer, samples.titles, max_new_tokens=16, seed=42)
    assert samples.last["step"] == 2 and len(samples.last["poems"]) == 3
    assert not prompt_leaks(tokenizer, samples.titles, samples.last["poems"] + samples.reference_poems)
    assert "## step 2" in (out / "samples.md").read_text(encoding="utf-8")
    assert any("samples/five_char_rate" in entry for entry in trainer.state.log_history)

    # The card shows the prompt as trained: the family's rendered template, not the seed's <INS> format.
    card = (out / "README.md").read_text(encoding="utf-8")
    assert tokenizer.apply_chat_template(conversational("{title}"), add_generation_prompt=True, tokenize=False) in card
    assert "<INS>" not in card
    metadata = ModelCard.load(out / "README.md").data
    assert metadata.library_name == ("peft" if lora else "transformers") and "dpo" in metadata.tags

    # Reloaded with plain transformers / PEFT: the trained weights, the family's classes and template, and the
    # same poems the run's last samples were.
    reloaded = (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out) if lora
                else AutoModelForCausalLM.from_pretrained(out))
    assert type(reloaded.get_base_model() if lora else reloaded).__name__ == LOADED_AS[family][0]
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(reloaded_tokenizer).__name__ == LOADED_AS[family][1]
    assert reloaded_tokenizer.chat_template == FAMILIES[family].template
    trained = trainer.accelerator.unwrap_model(trainer.model)
    assert torch.allclose(logits(reloaded, reloaded_tokenizer), logits(trained, tokenizer), atol=1e-5)
    assert not torch.allclose(logits(reloaded, reloaded_tokenizer), logits(base, tokenizer), atol=1e-5)
    assert generate_poems(reloaded, reloaded_tokenizer, samples.titles, max_new_tokens=16, seed=42) == \
        samples.last["poems"]
    if lora:
        # The trained adapter changed the policy (above); the reference is still the base, the adapter off.
        assert samples.poems(trainer.model_wrapped, reference=True) == samples.reference_poems
        # transformers alone also loads the adapter directory onto its base
        assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out), reloaded_tokenizer),
                              logits(trained, tokenizer), atol=1e-5)


def test_instruction_prompts_stop_when_a_byte_level_bpe_merges_across_the_boundary(tmp_path, pairs_dir, texts,
                                                                                     capsys):
    """Qwen2's and Llama 3's pre-tokenizers glue a punctuation mark to the letters after it, so a BPE that saw
    `<RES>` followed by poems learns `>` + the poem's first character: the `<INS>` prompt is then not a token
    prefix of prompt + poem. The chat template ends on a newline and special tokens instead, and passes."""
    seen_with_prompts = [build_prompt(text.split("\n")[0]) + text.split("\n", 1)[-1] for text in texts]
    merged = train_tokenizer(FAMILIES["qwen2"], seen_with_prompts)
    from datasets import load_dataset

    rows = load_dataset(str(pairs_dir))["train"]
    with pytest.raises(PoemDPOError, match="the tokenized prompt is not a prefix of the tokenized prompt"):
        check_token_boundaries(merged, rows, 64)
    model_dir = make_tiny_model(tmp_path / "qwen2", "qwen2", seen_with_prompts)
    with pytest.raises(SystemExit):
        train_dpo.main(dpo_argv(model_dir, pairs_dir, tmp_path / "out", "--prompt_format", "instruction"))
    assert "the tokenized prompt is not a prefix of the tokenized prompt+" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # The same tokenizer with the chat template: the run starts (boundary check passed) and trains.
    trainer = train_dpo.main(dpo_argv(model_dir, pairs_dir, tmp_path / "chat", "--max_steps", "1"))
    assert trainer.state.global_step == 1


def test_instruction_format_on_a_chat_model_samples_and_documents_that_format(tmp_path, base_dirs, pairs_dir):
    """`prompt_format: instruction` on a tokenizer with a chat template (Gemma's GPT-2-style pre-tokenizer keeps
    `>` apart from the poem, so the boundary check passes): training, samples and card all use `<INS>` prompts."""
    from copy import deepcopy

    out = tmp_path / "out"
    trainer = train_dpo.main(dpo_argv(base_dirs["gemma2"], pairs_dir, out, "--max_steps", "1",
                                      "--prompt_format", "instruction"))
    assert isinstance(trainer.train_dataset[0]["prompt"], str)
    samples = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SamplePoemsCallback))
    plain = deepcopy(trainer.processing_class)
    plain.chat_template = None  # generate_poems then builds the seed's <INS> prompts
    base = AutoModelForCausalLM.from_pretrained(base_dirs["gemma2"])
    assert samples.reference_poems == generate_poems(base, plain, samples.titles, max_new_tokens=16, seed=42)
    assert trainer.processing_class.chat_template == FAMILIES["gemma2"].template  # restored after sampling
    card = (out / "README.md").read_text(encoding="utf-8")
    assert build_prompt("{title}") in card and "<start_of_turn>" not in card


def test_evaluate_a_chat_model_through_its_template(tmp_path, base_dirs, pairs_dir):
    """evaluate.py on a chat model: poems, held-out loss and rewards all go through the chat template the run
    trained with, the model's own sampling settings are overridden and named, and no prompt leaks."""
    import evaluate

    out = tmp_path / "out"
    train_dpo.main(dpo_argv(base_dirs["qwen2"], pairs_dir, out, "--max_steps", "2"))
    report = evaluate.main(["--model", str(out), "--dataset", str(pairs_dir), "--num_titles", "3",
                            "--poems_per_title", "2", "--max_new_tokens", "16", "--max_eval_pairs", "4",
                            "--max_held_out_poems", "4", "--output_dir", str(tmp_path / "eval")])
    assert report["prompt_format"] == "chat" and report["reference"] == base_dirs["qwen2"]
    # Qwen's generation_config (repetition_penalty 1.1, top_p 0.8, top_k 20) would reshape plain sampling.
    expected = {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}
    assert report["overridden_settings"] == {"aligned": expected, "reference": expected}
    assert report["rewards"]["n_pairs"] == 4 and report["rewards"]["mean_margin"] != 0.0
    for name in ("aligned", "reference"):
        assert 0 < report["models"][name]["loss_per_char_preferred"] < 50
    kl = report["models"]["aligned"]["kl_to_reference"]  # each poem under the chat prompt it was sampled with
    assert kl["n"] == 6 and kl["mean"] != 0.0 and math.isfinite(kl["mean"]) and kl["n_tokens"] >= 6
    rows = [json.loads(line) for line in (tmp_path / "eval" / "poems.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == 6 and not prompt_leaks(AutoTokenizer.from_pretrained(out), [r["title"] for r in rows],
                                               [r[m]["text"] for r in rows for m in ("aligned", "reference")])
