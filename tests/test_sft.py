"""train_sft.py: the rhyme slots weighted up, the loss SFTTrainer's own when every weight is 1, a run of seconds on a
tiny char-level Llama that saves a loadable model, bad settings stopped in one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import concatenate_datasets, load_dataset
from test_reward import make_pairs_dir, tiny_base_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import train_sft
from poemdpo.data.prompts import build_prompt
from poemdpo.models.tokenizer import train_char_tokenizer
from poemdpo.training.sft import WeightedSFTTrainer, poems_dataset, weighted_example

CHUN_WANG = "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。\n烽火連三月，家書抵萬金。\n白頭搔更短，渾欲不勝簪。"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_pairs_dir(tmp_path_factory.mktemp("sft") / "pairs")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, pairs_dir) -> str:
    return tiny_base_dir(tmp_path_factory.mktemp("sft") / "base", pairs_dir)


def test_the_slots_weighted_up_are_the_last_characters_of_lines_four_six_eight():
    prompt = build_prompt("春望")
    tokenizer = train_char_tokenizer([prompt + CHUN_WANG], min_frequency=1)
    row = weighted_example(tokenizer, prompt, CHUN_WANG, slot_weight=100)
    ids, weights, labels = row["input_ids"], row["loss_weights"], row["labels"]
    assert [tokenizer.decode([i]) for i, w in zip(ids, weights, strict=True) if w == 100] == ["心", "金", "簪"]
    assert tokenizer.decode([i for i, w in zip(ids, weights, strict=True) if w == 0]) == prompt
    assert ids[-1] == tokenizer.eos_token_id and weights[-1] == 1 and labels[-1] == tokenizer.eos_token_id
    assert all((lab == -100) == (w == 0) for lab, w in zip(labels, weights, strict=True))


def _trainer(cls, base_dir, train, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     report_to="none", max_length=256, activation_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return cls(model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, train_dataset=train,
               processing_class=tokenizer)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_with_every_weight_one_the_loss_is_sfttrainers_own(base_dir, pairs_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = poems_dataset(load_dataset(str(pairs_dir), split="train"), tokenizer, slot_weight=1.0, max_poems=8)
    ours = _trainer(WeightedSFTTrainer, base_dir, train, tmp_path / "ours")
    batch = _batch(ours)
    assert set(batch) >= {"input_ids", "labels", "attention_mask", "loss_weights"}
    theirs = _trainer(SFTTrainer, base_dir, train.remove_columns("loss_weights"), tmp_path / "theirs")
    plain = {k: v for k, v in batch.items() if k != "loss_weights"}
    with torch.no_grad():
        expected = theirs.compute_loss(theirs.model, dict(plain))
        got = ours.compute_loss(ours.model, dict(batch))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_slot_weight_scales_the_slot_tokens_in_a_weighted_mean(base_dir, pairs_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = poems_dataset(load_dataset(str(pairs_dir), split="train"), tokenizer, slot_weight=100.0, max_poems=8)
    trainer = _trainer(WeightedSFTTrainer, base_dir, train, tmp_path)
    batch = _batch(trainer)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels, w = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    assert (w == 100).sum() > 0  # the fixture's 五言 poems of 4 and 8 lines have slots
    assert torch.allclose(got, (nll * w).sum() / w.sum(), rtol=1e-4)
    assert not torch.allclose(got, nll.sum() / (labels != -100).sum(), rtol=1e-3)


def test_on_a_cpu_only_poem_positions_are_projected_with_the_full_heads_loss_and_gradients(base_dir, pairs_dir,
                                                                                          tmp_path):
    """The compact LM head (poemdpo.training.speed) skips prompt and padding positions; the weighted loss and every
    weight's gradient must stay those of the full logits."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = poems_dataset(load_dataset(str(pairs_dir), split="train"), tokenizer, slot_weight=100.0, max_poems=8)
    trainer = _trainer(WeightedSFTTrainer, base_dir, train, tmp_path)
    assert trainer.compact_lm_head
    batch = _batch(trainer)
    assert (batch["labels"] == -100).sum() > 0  # prompts (and padding) to skip

    def loss_and_grads(loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    def full() -> torch.Tensor:
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels, w = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")
        return (nll * w).sum() / w.sum()

    got, got_grads = loss_and_grads(lambda: trainer.compute_loss(trainer.model, dict(batch)))
    expected, expected_grads = loss_and_grads(full)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_through_trls_own_fused_head_the_loss_is_the_same(base_dir, pairs_dir, tmp_path, monkeypatch):
    """Where the compact head is not used (CUDA, PEFT models), the loss goes through the fused head SFTTrainer set up:
    same calling convention, same weighted loss."""
    import poemdpo.training.sft as sft

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = poems_dataset(load_dataset(str(pairs_dir), split="train"), tokenizer, slot_weight=100.0, max_poems=8)
    compact = _trainer(WeightedSFTTrainer, base_dir, train, tmp_path / "compact")
    monkeypatch.setattr(sft, "use_compact_lm_head", lambda *args, **kwargs: False)
    trls = _trainer(WeightedSFTTrainer, base_dir, train, tmp_path / "trl")
    assert compact.compact_lm_head and not trls.compact_lm_head
    batch = _batch(compact)
    with torch.no_grad():
        expected = compact.compute_loss(compact.model, dict(batch))
        got = trls.compute_loss(trls.model, dict(batch))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_takes_the_mean_of_its_micro_batches(base_dir, pairs_dir, tmp_path):
    """The Trainer skips its division by the accumulation steps when the model takes loss kwargs (Llama does), as
    its own loss is then a sum over the accumulated tokens. Ours is a per-micro-batch mean, so two accumulated
    copies of one poem must make the update one copy makes, not twice it (plain SGD shows the scale)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    one = poems_dataset(load_dataset(str(pairs_dir), split="train"), tokenizer, slot_weight=100.0, max_poems=1)
    start = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()

    def update(accumulation: int) -> dict[str, torch.Tensor]:
        args = SFTConfig(output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=1,
                         gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.1,
                         lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, bf16=False, report_to="none",
                         max_length=256, activation_checkpointing=False, save_strategy="no")
        trainer = WeightedSFTTrainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=args,
                                     train_dataset=concatenate_datasets([one] * accumulation),
                                     processing_class=tokenizer)
        trainer.train()
        return {k: v - start[k] for k, v in trainer.model.state_dict().items()}

    single, accumulated = update(1), update(2)
    moved = [k for k in single if single[k].abs().max() > 0]
    assert moved
    for k in moved:
        assert torch.allclose(accumulated[k], single[k], rtol=1e-3, atol=1e-7), k


def test_train_sft_trains_and_saves_a_loadable_model(base_dir, pairs_dir, tmp_path):
    out = tmp_path / "sft"
    trainer = train_sft.main([
        "--model_name_or_path", base_dir, "--dataset_name", str(pairs_dir), "--output_dir", str(out),
        "--max_train_poems", "16", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--eval_strategy", "steps", "--eval_steps", "2",
        "--max_eval_poems", "8", "--num_train_epochs", "1",
    ])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 4 and all("nll_weighted_up" in e and "nll_other" in e for e in logs)
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2, 4]  # the last step once
    start = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(loaded[k], start[k]) for k in start)
    info = json.loads((out / "poemdpo.json").read_text(encoding="utf-8"))
    assert info["stage"] == "sft" and info["slot_weight"] == 100 and info["train_poems"] == 16
    assert (info["num_train_epochs"], info["learning_rate"]) == (1, 1e-3)  # what the pipeline checks before reuse
    assert info["rule"] == "five_char" and info["base_model"] == base_dir
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "tags:" in card and "SFTTrainer" in card and '"slot_weight": 100' in card and 'Sample poems' not in card


@pytest.mark.parametrize("extra, message", [
    (["--slot_weight", "0"], "slot_weight must be positive"),
    (["--packing", "true"], "packing: true would merge poems"),
    (["--truncation_mode", "keep_end"], "truncation_mode: keep_end would cut"),
    (["--dataset_name", "data/no_such_pairs"], "does not exist"),
])
def test_bad_settings_are_one_clear_sentence(base_dir, pairs_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        train_sft.main(["--model_name_or_path", base_dir, "--dataset_name", str(pairs_dir),
                        "--output_dir", str(tmp_path), "--report_to", "none", *extra])
    assert message in capsys.readouterr().err
