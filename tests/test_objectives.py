"""The chapter's objectives (poemdpo/training/objectives.py): values by hand and as TRL logs them, the step they take,
the reference they need or not, with sft, and through train_dpo.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from test_train_dpo import tiny_model_dir
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

import build_dataset
import train_dpo
from poemdpo.data.prompts import build_prompt
from poemdpo.errors import PoemDPOError
from poemdpo.models.tokenizer import train_char_tokenizer
from poemdpo.run_info import read_run_info
from poemdpo.training.objectives import ChapterDPOTrainer, chapter_linear_loss, trainer_class
from poemdpo.training.samples import PoemDPOTrainer

ROWS = [
    {"prompt": build_prompt("月"), "chosen": "白日依山盡，黃河入海流。", "rejected": "君不見，黃河之水天上來。"},
    {"prompt": build_prompt("山中"), "chosen": "空山新雨後，天氣晚來秋。\n明月松間照，清泉石上流。",
     "rejected": "朝辭白帝彩雲間，千里江陵一日還。"},
    {"prompt": build_prompt("秋夜"), "chosen": "床前明月光，疑是地上霜。",
     "rejected": "月落烏啼霜滿天，江楓漁火對愁眠。"},
]
SEPARABLE = [{"prompt": build_prompt("月"), "chosen": "山山山山山，山山山山山。",
              "rejected": "水水水水水，水水水水水。"}]
BETA = 0.5


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row[key] for row in ROWS + SEPARABLE for key in ("prompt", "chosen", "rejected")]
    return train_char_tokenizer(texts, min_frequency=1)


def tiny_model(tokenizer, seed: int) -> LlamaForCausalLM:
    """Built in memory and never saved: TRL could not load a reference copy of it from a path."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def config(tmp_path, loss_type, weights=None, **extra) -> DPOConfig:
    values = dict(output_dir=str(tmp_path), beta=BETA, loss_type=loss_type, loss_weights=weights, use_cpu=True,
                  bf16=False, report_to="none", save_strategy="no", per_device_train_batch_size=len(ROWS),
                  max_length=256, activation_checkpointing=False, logging_steps=1, seed=0)
    return DPOConfig(**{**values, **extra})


def hand_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-likelihoods summed over each completion's tokens, by a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (picked * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def one_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
@pytest.mark.parametrize("loss_type", ["chapter_unlikelihood", "chapter_linear"])
def test_loss_equals_hand_computation_and_trl_logged_logps(tmp_path, tokenizer, loss_type, ld_alpha):
    policy, reference = tiny_model(tokenizer, 1), tiny_model(tokenizer, 0)
    policy_copy, reference_copy = copy.deepcopy(policy), copy.deepcopy(reference)
    trainer = ChapterDPOTrainer(policy, reference, config(tmp_path, [loss_type], ld_alpha=ld_alpha),
                                train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    trainer.model.train()
    batch = one_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    # Against TRL's own log of the same batch: its per-sequence log-probs (ld_alpha included) and rewards.
    if loss_type == "chapter_unlikelihood":
        assert loss.item() == pytest.approx(logged["logps/rejected"] - logged["logps/chosen"], rel=1e-5)
    else:
        assert loss.item() == pytest.approx(-logged["rewards/margins"] / BETA, rel=1e-5)
    assert logged[f"loss/{loss_type}"] == pytest.approx(loss.item(), rel=1e-6)
    if ld_alpha is None:  # by hand: plain forwards of untouched copies, log-likelihood summed over the poem
        chosen, rejected = hand_logps(policy_copy, batch)
        ref_chosen, ref_rejected = hand_logps(reference_copy, batch)
        assert logged["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
        assert logged["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
        nll = {"p": -chosen, "n": -rejected, "p0": -ref_chosen, "n0": -ref_rejected}
        by_hand = nll["p"] - nll["n"] if loss_type == "chapter_unlikelihood" else \
            (nll["p"] - nll["p0"]) + (nll["n0"] - nll["n"])
        # The objectives are differences of summed log-likelihoods tens of nats each: float32 rounding (which differs
        # between CPUs) is relative to those terms, not to the small difference left.
        scale = sum(v.abs().mean() for v in nll.values()).item()
        assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-5, abs=1e-6 * scale)
        assert logged["rewards/chosen"] == pytest.approx(BETA * (chosen - ref_chosen).mean().item(), rel=1e-4)


def test_one_step_raises_chosen_lowers_rejected_and_both_objectives_step_alike(tmp_path, tokenizer):
    start, reference = tiny_model(tokenizer, 1), tiny_model(tokenizer, 0)
    stepped = {}
    for loss_type in ("chapter_unlikelihood", "chapter_linear"):
        args = config(tmp_path / loss_type, [loss_type], optim="sgd", learning_rate=0.05, max_steps=1,
                      lr_scheduler_type="constant", per_device_train_batch_size=1)
        trainer = ChapterDPOTrainer(copy.deepcopy(start), copy.deepcopy(reference), args,
                                    train_dataset=Dataset.from_list(SEPARABLE), processing_class=tokenizer)
        batch = one_batch(trainer)
        trainer.train()
        before, after = hand_logps(start, batch), hand_logps(trainer.model, batch)
        assert after[0].item() > before[0].item(), "chosen log-prob should rise"
        assert after[1].item() < before[1].item(), "rejected log-prob should fall"
        stepped[loss_type] = trainer.model.state_dict()
    # (b) − (a) is a constant of the data (the reference's terms): the same gradient, the same step.
    for name, tensor in stepped["chapter_unlikelihood"].items():
        torch.testing.assert_close(stepped["chapter_linear"][name], tensor, rtol=1e-6, atol=1e-7)


def test_linear_never_saturates_where_dpo_sigmoid_does():
    margins = torch.tensor([0.0, 2.0, 10.0, 50.0], requires_grad=True)
    zero = torch.zeros(4)
    chapter_linear_loss(margins, zero, zero, zero).sum().backward()
    assert margins.grad.tolist() == [-1.0] * 4  # the same push however far a pair is separated
    linear_grad, margins.grad = margins.grad.clone(), None
    (-F.logsigmoid(BETA * margins)).sum().backward()
    assert margins.grad.abs()[-1] < 1e-9 < margins.grad.abs()[0] < linear_grad.abs()[0]


def test_unlikelihood_with_sft_runs_without_a_reference(tmp_path, tokenizer):
    args = config(tmp_path, ["chapter_unlikelihood", "sft"], [1.0, 2.0], max_steps=2, learning_rate=1e-3)
    trainer = ChapterDPOTrainer(tiny_model(tokenizer, 1), None, args, train_dataset=Dataset.from_list(ROWS),
                                processing_class=tokenizer)
    assert trainer.ref_model is None and trainer.reference_free
    assert args.precompute_ref_log_probs is False  # said to TRL while it was built, not afterwards
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "rewards/chosen" in e)
    # No reference: rewards are β·log-prob (TRL's former reference_free), accuracy = chosen more likely.
    assert entry["rewards/chosen"] == pytest.approx(BETA * entry["logps/chosen"], rel=1e-5)
    assert entry["rewards/margins"] == pytest.approx(BETA * (entry["logps/chosen"] - entry["logps/rejected"]),
                                                     rel=1e-4, abs=1e-4)
    assert "loss/chapter_unlikelihood" in entry


@pytest.mark.parametrize("reference", ["precomputed", "lora_off"])
def test_linear_with_trl_other_references_starts_at_zero(tmp_path, tokenizer, reference):
    """θ₀ as TRL also provides it: log-probs precomputed from the starting policy, or the base with the LoRA
    adapter off. Either way the policy starts equal to its reference, so (b) starts at 0."""
    from peft import LoraConfig

    extra = {"precompute_ref_log_probs": True} if reference == "precomputed" else {}
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if reference == "lora_off" else None
    trainer = ChapterDPOTrainer(tiny_model(tokenizer, 1), None, config(tmp_path, ["chapter_linear"], **extra),
                                train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer, peft_config=peft)
    assert trainer.ref_model is None and not trainer.reference_free
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, one_batch(trainer))
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert trainer._metrics["train"]["logps/chosen"][-1] < 0  # the policy really was scored


@pytest.mark.parametrize(
    "loss_type, extra, with_reference, message",
    [
        (["chapter_linear"], {}, False, "loss_type ['chapter_linear'] compares the policy with a frozen reference"),
        (["chapter_unlikelihood", "sigmoid"], {}, False, "loss_type ['sigmoid'] compares the policy"),
        (["chapter_unlikelihood"], {"sync_ref_model": True}, False, "no reference model to sync"),
        (["chapter_linear"], {"f_divergence_type": "js_divergence"}, True, "f_divergence_type 'js_divergence'"),
        (["chapter_linear", "sft"], {"use_weighting": True}, True, "use_weighting (WPO) is not implemented"),
    ],
)
def test_refused_where_it_cannot_work(tmp_path, tokenizer, loss_type, extra, with_reference, message):
    args = config(tmp_path, loss_type, **extra)
    with pytest.raises(PoemDPOError, match=re.escape(message)):
        ChapterDPOTrainer(tiny_model(tokenizer, 1), tiny_model(tokenizer, 0) if with_reference else None, args,
                          train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


def test_combines_with_sft_like_trl_own_types(tmp_path, tokenizer):
    policy, reference = tiny_model(tokenizer, 1), tiny_model(tokenizer, 0)

    def loss(cls, loss_type, weights=None):
        trainer = cls(copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path, loss_type, weights),
                      train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
        trainer.model.train()
        return trainer, trainer.compute_loss(trainer.model, batch)

    batch = one_batch(DPOTrainer(copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path, ["sft"]),
                                 train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer))
    _, sft = loss(DPOTrainer, ["sft"])
    _, linear = loss(ChapterDPOTrainer, ["chapter_linear"])
    both_trainer, both = loss(ChapterDPOTrainer, ["chapter_linear", "sft"], [1.0, 2.0])
    assert both.item() == pytest.approx(linear.item() + 2.0 * sft.item(), rel=1e-5)
    assert both_trainer.loss_types == ["sft"] and both_trainer.loss_weights == [2.0]
    both.backward()
    assert all(p.grad is not None for p in both_trainer.model.parameters() if p.requires_grad)
    assert trainer_class(["sigmoid", "sft"]) is PoemDPOTrainer
    assert trainer_class(["chapter_linear", "sft"]) is ChapterDPOTrainer


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from conftest import make_corpus_poems

    root = tmp_path_factory.mktemp("chapter")
    (root / "corpus").mkdir()
    (root / "corpus" / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(200), ensure_ascii=False))
    build_dataset.main(["--corpus", str(root / "corpus"), "--output_dir", str(root / "pairs"), "--test_size", "0.2"])
    return root / "pairs"


def train(tmp_path, pairs, recipe: str, *extra):
    model_dir = tiny_model_dir(tmp_path / "base", "llama", pairs)
    out = tmp_path / "out"
    argv = ["--config", recipe, "--model_name_or_path", model_dir, "--dataset_name", str(pairs),
            "--output_dir", str(out), "--max_train_pairs", "16", "--per_device_train_batch_size", "8",
            "--max_eval_pairs", "8", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--sample_titles", "2", "--sample_max_new_tokens", "12", "--learning_rate", "3e-3", "--warmup_steps", "0",
            "--report_to", "none", *extra]
    return train_dpo.main(argv), out


@pytest.mark.parametrize(
    "recipe, extra, loss_type",
    [
        ("configs/dpo_chapter_linear_cpu.yaml", [], ["chapter_linear"]),
        ("configs/dpo_chapter_unlikelihood_cpu.yaml", [], ["chapter_unlikelihood"]),
        ("configs/dpo_tiny_cpu.yaml", ["--loss_type", "chapter_linear", "sft", "--loss_weights", "1.0", "2.0"],
         ["chapter_linear", "sft"]),
    ],
)
def test_train_dpo_end_to_end(tmp_path, pairs, recipe, extra, loss_type):
    trainer, out = train(tmp_path, pairs, recipe, *extra)
    assert isinstance(trainer, ChapterDPOTrainer) and trainer.ref_model is not None  # train_dpo.py loads one
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert read_run_info(out)["loss_type"] == loss_type
    entries = [e for e in trainer.state.log_history if "rewards/margins" in e and "loss" in e]
    assert entries and all(f"loss/{loss_type[0]}" in e for e in entries)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in entries[-1] and key in (out / "README.md").read_text(encoding="utf-8")
    if loss_type == ["chapter_linear"]:  # the loss is minus the margin, the rewards' margin over β
        assert entries[0]["loss"] == pytest.approx(-entries[0]["rewards/margins"] / BETA, rel=1e-4, abs=1e-5)


def test_train_dpo_refuses_with_a_clear_error(tmp_path, pairs, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path, pairs, "configs/dpo_chapter_linear_cpu.yaml", "--f_divergence_type", "js_divergence")
    assert "f_divergence_type 'js_divergence' reshapes the log-ratio" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["configs/dpo_chapter_linear_cpu.yaml", "configs/dpo_chapter_unlikelihood_cpu.yaml"])
def test_chapter_recipes_are_the_dpo_recipe_with_the_loss_swapped(recipe):
    """A methods-table row compares objectives: any other difference from the DPO recipe would be measured too."""
    def read(path):
        return yaml.safe_load(open(path, encoding="utf-8"))

    dpo, chapter = read("configs/dpo_tiny_cpu.yaml"), read(recipe)
    loss_keys = {"loss_type", "loss_weights", "ld_alpha", "output_dir"}
    differ = {k for k in dpo.keys() | chapter.keys() if k not in loss_keys and dpo.get(k) != chapter.get(k)}
    assert not differ, f"{recipe} differs from the DPO recipe beyond the loss: {sorted(differ)}"
