"""poemdpo/training/speed.py: the compact LM head agrees with TRL's fused head; length columns feed group_by_length;
the chunked base-model loss agrees with transformers' own."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from poemdpo.models.tokenizer import train_char_tokenizer
from poemdpo.training.speed import (
    LENGTH_COLUMN,
    add_compact_lm_head,
    supports_compact_head,
    use_chunked_lm_loss,
    use_compact_lm_head,
    with_lengths,
)

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
PAIRS = {
    "prompt": ["<INS>請用以下題目寫一首詩<INP>山<RES>", "<INS>請用以下題目寫一首詩<INP>水月<RES>"] * 4,
    "chosen": ["白日依山盡，黃河入海流。", "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"] * 4,
    "rejected": ["千山鳥飛絕", "春眠不覺曉，處處聞啼鳥。夜來風雨聲"] * 4,
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer(["".join(v) for v in zip(*PAIRS.values(), strict=True)], min_frequency=1)


def tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def batch(tokenizer):
    """Two right-padded rows whose labels cover only the completion, as DPOTrainer builds them."""
    texts = [p + c + tokenizer.eos_token for p, c in zip(PAIRS["prompt"][:2], PAIRS["chosen"][:2], strict=True)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = encoded["input_ids"].clone()
    for row, prompt in enumerate(PAIRS["prompt"][:2]):
        labels[row, : len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100
    labels[encoded["attention_mask"] == 0] = -100
    return encoded, labels


def test_compact_head_matches_trl_fused_head(tokenizer):
    trl_model = tiny_model(tokenizer)
    ours = copy.deepcopy(trl_model)
    add_fused_lm_head(trl_model, outputs=OUTPUTS)
    add_compact_lm_head(ours, outputs=OUTPUTS)
    encoded, labels = batch(tokenizer)
    expected = trl_model(**encoded, labels=labels, fused_lm_head=True)
    got = ours(**encoded, labels=labels, fused_lm_head=True)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.is_top1, expected.is_top1)
    assert torch.equal(got.label_mask, expected.label_mask)
    torch.testing.assert_close(got.loss, expected.loss)
    assert (got.log_probs[labels[:, 1:] == -100] == 0).all()

    # Same gradients: the DPO loss trains through log_probs only.
    expected.log_probs.sum().backward()
    got.log_probs.sum().backward()
    for (name, a), (_, b) in zip(trl_model.named_parameters(), ours.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compact_head_leaves_the_plain_forward_and_generate_alone(tokenizer):
    model = tiny_model(tokenizer).eval()
    reference = copy.deepcopy(model)
    add_compact_lm_head(model)
    encoded, labels = batch(tokenizer)
    torch.testing.assert_close(model(**encoded).logits, reference(**encoded).logits)
    torch.testing.assert_close(model(**encoded, labels=labels).loss, reference(**encoded, labels=labels).loss)
    prompt = tokenizer(PAIRS["prompt"][:1], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out, reference.generate(**prompt, max_new_tokens=4, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id))


def test_supports_compact_head_refuses_rescaled_logits(tokenizer):
    model = tiny_model(tokenizer)
    assert supports_compact_head(model)
    model.config.final_logit_softcapping = 30.0
    assert not supports_compact_head(model)


def test_with_lengths_counts_prompt_and_longer_completion():
    rows = with_lengths(Dataset.from_dict({"prompt": ["abc"], "chosen": ["de"], "rejected": ["fghi"]}))
    assert rows[LENGTH_COLUMN] == [3 + 4]
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "ab"}],
                               "chosen": [{"role": "assistant", "content": "cde"}],
                               "rejected": [{"role": "assistant", "content": "f"}]}])
    assert with_lengths(chat)[LENGTH_COLUMN] == [2 + 3]


def test_trainer_with_both_switches_trains_like_trl(tokenizer, tmp_path):
    """group_by_length finds the length column; the compact head gives TRL's loss and metrics for a batch."""

    def trainer(compact: bool) -> DPOTrainer:
        model, reference = tiny_model(tokenizer), tiny_model(tokenizer)
        args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                         per_device_train_batch_size=4, max_steps=1, report_to="none", save_strategy="no",
                         train_sampling_strategy="group_by_length", remove_unused_columns=False)
        t = DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                       train_dataset=with_lengths(Dataset.from_dict(PAIRS)))
        if compact:
            assert use_compact_lm_head(t)
        return t

    trl_trainer, ours = trainer(False), trainer(True)
    assert isinstance(ours._get_train_sampler(), LengthGroupedSampler)
    inputs = next(iter(ours.get_train_dataloader()))
    losses = [t.compute_loss(t.model, inputs) for t in (trl_trainer, ours)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for key in ("entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins"):
        assert ours._metrics["train"][key] == pytest.approx(trl_trainer._metrics["train"][key], abs=1e-4), key
    ours.train()
    assert ours.state.global_step == 1


def packed_batch(tokenizer) -> dict:
    """Two rows of packed poems as train_base.py batches them: labels -100 at padding and at each poem's start."""
    texts = [p + c + tokenizer.eos_token for p, c in zip(PAIRS["prompt"], PAIRS["chosen"], strict=True)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [ids[0] + ids[1], ids[2] + ids[3] + ids[4]]
    width = max(map(len, rows)) + 3
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    labels = torch.full((2, width), -100)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = labels[r, : len(row)] = torch.tensor(row)
    labels[0, 0] = labels[0, len(ids[0])] = labels[1, 0] = -100
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("num_items_in_batch", [None, 97])
def test_chunked_loss_gives_transformers_loss_and_gradients(tokenizer, num_items_in_batch):
    theirs = tiny_model(tokenizer)
    ours = copy.deepcopy(theirs)
    assert use_chunked_lm_loss(ours, chunk=7)  # several chunks, the last one partial
    batch = packed_batch(tokenizer)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    expected, got = theirs(**batch, **kwargs).loss, ours(**batch, **kwargs).loss
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads = dict(ours.named_parameters())
    for name, parameter in theirs.named_parameters():
        torch.testing.assert_close(grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss, rtol=1e-5, atol=1e-6)
    # without labels (generation, scoring) the model's own forward, logits included
    torch.testing.assert_close(ours(input_ids=batch["input_ids"]).logits, theirs(input_ids=batch["input_ids"]).logits)


def test_chunked_loss_under_bf16_autocast_is_as_close_to_fp32_as_transformers_own(tokenizer):
    """train_base.py trains under bf16 autocast where the CPU has bf16 units. The chunked head's matmuls then run in
    bf16 like the plain head's: its loss and gradients stay within bf16 rounding of the exact fp32 ones, no farther
    than transformers' own loss under the same autocast."""
    exact = tiny_model(tokenizer)
    theirs, ours = copy.deepcopy(exact), copy.deepcopy(exact)
    assert use_chunked_lm_loss(ours, chunk=7)
    batch = packed_batch(tokenizer)
    exact_loss = exact(**batch).loss
    exact_loss.backward()
    losses = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[name] = model(**batch).loss
        losses[name].backward()
    exact_grads = dict(exact.named_parameters())

    def gradient_errors(model: torch.nn.Module) -> dict[str, float]:
        return {n: ((p.grad - exact_grads[n].grad).norm() / exact_grads[n].grad.norm()).item()
                for n, p in model.named_parameters()}

    assert losses["ours"].dtype == torch.float32
    assert abs(losses["ours"] - exact_loss) <= 2 * abs(losses["theirs"] - exact_loss) + 1e-4
    ours_errors, their_errors = gradient_errors(ours), gradient_errors(theirs)
    for name, error in ours_errors.items():  # the tied embedding / LM head included
        assert error < 0.03, name  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
        assert error <= 2 * their_errors[name] + 1e-3, name


def test_chunked_loss_trains_as_transformers_loss(tmp_path):
    """Three Trainer steps of train_base.py's trainer, the same batches, with and without the chunked loss."""
    from conftest import make_corpus_poems
    from poemdpo.models.base_model import BaseModelArguments, make_trainer

    texts = [p["title"] + "".join(p["paragraphs"]) for p in make_corpus_poems(40)]
    histories = {}
    for chunked in (False, True):
        args = BaseModelArguments(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_length=64,
                                  min_frequency=1, chunked_loss=chunked)
        training_args = TrainingArguments(output_dir=str(tmp_path / str(chunked)), per_device_train_batch_size=4,
                                          max_steps=3, learning_rate=1e-2, logging_steps=1, use_cpu=True,
                                          report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
        trainer = make_trainer(args, training_args, texts)  # seeded by training_args.seed: the same initial weights
        trainer.train()
        histories[chunked] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(histories[True]) == 3
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)
