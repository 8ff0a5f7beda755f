"""train_base.py end to end on a tiny Llama and the shared small corpus fixture (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline
from trl import TrlParser

import train_base
from poemdpo.data.forms import is_well_formed
from poemdpo.data.prompts import build_prompt
from poemdpo.data.splits import SplitSpec, split_of
from poemdpo.errors import PoemDPOError
from poemdpo.models import base_model
from poemdpo.models.base_model import (
    BaseModelArguments,
    PackedPoemsCollator,
    build_model,
    fall_back_to_fp32,
    load_training_texts,
    packed_dataset,
)
from poemdpo.models.tokenizer import train_char_tokenizer

TINY = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
    "--max_length", "64", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--warmup_steps", "0",
    "--min_frequency", "1", "--logging_steps", "1", "--save_steps", "10", "--max_new_tokens", "40",
    "--disable_tqdm", "true",
    # The recipe's bf16 autocast spends ~15 s creating CPU kernels on first use: longer than this whole run.
    "--bf16", "false",
    "--torch_threads", "1",  # a tiny model gains nothing from more, and a busy machine loses a lot
]  # fmt: skip


def run(corpus_dir: Path, output_dir: Path, *extra: str):
    argv = ["--config", "configs/base_tiny_cpu.yaml", "--corpus", str(corpus_dir), "--output_dir", str(output_dir)]
    threads = torch.get_num_threads()
    try:
        return train_base.main([*argv, *TINY, *extra])
    finally:
        torch.set_num_threads(threads)  # --torch_threads is process-wide; leave other tests as they were


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests that only read its results."""
    root = tmp_path_factory.mktemp("base")
    corpus = _write_corpus(root)
    trainer = run(corpus, root / "model", "--max_steps", "30")
    return corpus, root / "model", trainer


def _write_corpus(root: Path) -> Path:
    from conftest import make_corpus_poems

    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(120), ensure_ascii=False), "utf-8")
    return corpus


def test_training_loss_falls(trained):
    _, _, trainer = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 30
    # Starts near ln(vocab) ≈ 4.7; the fixture's lines are random characters, so the floor stays high,
    # but the prompt, the punctuation and the line lengths are learnable.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_artefact_loads_and_writes_through_pipeline(trained):
    _, model_dir, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = build_prompt("無題3")
    # The tokenizer read back through AutoTokenizer (next to a llama config.json) keeps every character.
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt
    assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    config = model.generation_config
    assert config.do_sample and config.temperature == 1.0 and config.eos_token_id == tokenizer.eos_token_id
    assert config.max_new_tokens == 40

    generator = pipeline("text-generation", model=str(model_dir))
    out = generator(prompt, return_full_text=False)[0]["generated_text"]
    assert isinstance(out, str) and out
    assert len(out) <= 40


def test_tensorboard_logs_and_checkpoints(trained):
    _, model_dir, _ = trained
    assert list(model_dir.glob("runs/*/events.out.tfevents.*"))
    # save_steps 10, save_total_limit 2: the last two checkpoints survive.
    assert sorted(p.name for p in model_dir.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]


def test_resume_from_checkpoint_continues(trained, tmp_path, monkeypatch):
    corpus, model_dir, first = trained
    copy = tmp_path / "model"
    shutil.copytree(model_dir / "checkpoint-20", copy / "checkpoint-20")
    steps_run = []
    training_step = Trainer.training_step
    monkeypatch.setattr(
        Trainer, "training_step", lambda self, *a, **k: steps_run.append(1) or training_step(self, *a, **k)
    )
    trainer = run(corpus, copy, "--max_steps", "30", "--resume_from_checkpoint", "true")
    assert trainer.state.global_step == 30 and len(steps_run) == 10

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 20}

    # Weights, optimizer, schedule and data order come back: steps 21-30 retrace the uninterrupted run.
    assert losses(trainer) == pytest.approx(losses(first), rel=0.02)


def test_trains_only_on_non_test_titles(trained):
    corpus, _, _ = trained
    args = BaseModelArguments(corpus=str(corpus), validation_size=0.2, test_size=0.3)
    texts = load_training_texts(args)
    titles = [t.split("<INP>")[1].split("<RES>")[0] for t in texts]
    assert titles and all(split_of(t, SplitSpec(0.2, 0.3)) == "train" for t in titles)
    assert len(titles) < 120  # some were held out


def test_packed_blocks_cover_every_token_once():
    texts = [build_prompt(f"題{i}") + "山水風月，雲花春秋。" * (i + 1) for i in range(20)]
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    blocks = packed_dataset(texts, tokenizer, max_length=32, strategy="wrapped", seed=0)["input_ids"]
    assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32
    flat = [i for b in blocks for i in b]
    assert flat.count(tokenizer.eos_token_id) == len(texts)
    assert len(flat) == sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)


def test_bfd_blocks_keep_each_poem_to_itself():
    """In a bfd batch every poem gets the logits it gets alone: no attention to its block-mates, positions from 0."""
    texts = [build_prompt(f"題{i}") + "山水風月，雲花春秋。" * (i % 3 + 1) for i in range(12)]
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    blocks = packed_dataset(texts, tokenizer, max_length=64, strategy="bfd", seed=0)
    assert sum(len(b) for b in blocks["seq_lengths"]) == len(texts)  # whole poems, none cut
    args = BaseModelArguments(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = build_model(args, tokenizer).eval()
    batch = PackedPoemsCollator(tokenizer.pad_token_id)([blocks[i] for i in range(len(blocks))])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        row = max(range(len(blocks)), key=lambda i: len(blocks[i]["seq_lengths"]))
        start = 0
        for length in blocks[row]["seq_lengths"]:
            ids = torch.tensor([blocks[row]["input_ids"][start : start + length]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[row, start : start + length], alone, atol=1e-5, rtol=1e-4)
            assert batch["labels"][row, start] == -100  # not predicted from the previous poem's eos
            start += length
    assert len(blocks[row]["seq_lengths"]) > 1  # the check above compared a block of several poems
    assert (batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] == -100).all()


def test_a_fixed_batch_width_only_adds_padding():
    """train_base --torch_compile pads every batch to one width (one compiled shape): the poems' logits and labels
    are those of the unpadded batch, the added columns are padding nobody learns from."""
    texts = [build_prompt(f"題{i}") + "山水風月，雲花春秋。" * (i % 3 + 1) for i in range(12)]
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    blocks = packed_dataset(texts, tokenizer, max_length=64, strategy="bfd", seed=0)
    examples = [blocks[i] for i in range(len(blocks))]
    plain = PackedPoemsCollator(tokenizer.pad_token_id)(examples)
    fixed = PackedPoemsCollator(tokenizer.pad_token_id, width=96)(examples)
    width = plain["input_ids"].shape[1]
    assert width <= 64 and fixed["input_ids"].shape == (len(examples), 96)
    assert (fixed["input_ids"][:, width:] == tokenizer.pad_token_id).all()
    assert (fixed["labels"][:, width:] == -100).all()
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(fixed[key][:, :width], plain[key])
    model = build_model(BaseModelArguments(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4), tokenizer).eval()
    with torch.no_grad():
        logits = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in (plain, fixed)]
    torch.testing.assert_close(logits[1][:, :width], logits[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompt_loss", ["all", "text", "none"])
def test_prompt_loss_chooses_what_of_the_prompt_is_learned_and_every_poem_is(prompt_loss):
    titles = [f"題{i}" for i in range(12)]
    poems = ["山水風月，雲花春秋。" * (i % 3 + 1) for i in range(12)]
    texts = [build_prompt(t) + p for t, p in zip(titles, poems, strict=True)]
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    markers = torch.tensor(tokenizer.convert_tokens_to_ids(["<INS>", "<INP>", "<RES>"]))
    blocks = packed_dataset(texts, tokenizer, 64, "bfd", seed=0, prompt_loss=prompt_loss)
    batch = PackedPoemsCollator(tokenizer.pad_token_id)([blocks[i] for i in range(len(blocks))])
    learned_poems, learned_prompts = [], []
    for row, lengths in enumerate(blocks["seq_lengths"]):
        start = 0
        for length in lengths:
            ids = batch["input_ids"][row, start : start + length]
            labels = batch["labels"][row, start : start + length]
            poem = int((ids == markers[-1]).nonzero()[0]) + 1
            assert (labels[poem:] == ids[poem:]).all() and labels[-1] == tokenizer.eos_token_id
            assert labels[0] == -100  # never predicted from the previous poem in the block
            learned_poems.append(tokenizer.decode(labels[poem:-1]).replace(" ", ""))
            learned_prompts.append(labels[1:poem][labels[1:poem] != -100])
            unlearned = ids[1:poem][labels[1:poem] == -100]
            assert prompt_loss == "none" or set(unlearned.tolist()) <= set(markers.tolist())
            start += length
    assert sorted(learned_poems) == sorted(poems)
    prompt_tokens = [len(tokenizer(build_prompt(t))["input_ids"]) - 1 for t in titles]  # all but the first
    assert sum(map(len, learned_prompts)) == {"all": sum(prompt_tokens), "text": sum(prompt_tokens) - 2 * 12,
                                              "none": 0}[prompt_loss]
    assert any(torch.isin(p, markers).any() for p in learned_prompts) == (prompt_loss == "all")


def test_prompt_loss_needs_the_response_marker():
    tokenizer = train_char_tokenizer([build_prompt("題") + "山水風月，雲花春秋。"], min_frequency=1)
    with pytest.raises(PoemDPOError, match="<RES>"):
        packed_dataset(["山水風月，雲花春秋。"], tokenizer, max_length=64, strategy="bfd", seed=0, prompt_loss="text")


def test_bfd_drops_or_truncates_poems_longer_than_a_block():
    texts = [build_prompt(f"題{i}") + "山水風月，雲花春秋。" * (1 + 5 * (i % 2)) for i in range(10)]
    tokenizer = train_char_tokenizer(texts, min_frequency=1)
    lengths = sorted(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + eos
    assert lengths[4] <= 48 < lengths[5]  # five fit a 48-token block, five do not

    dropped = packed_dataset(texts, tokenizer, max_length=48, strategy="bfd", seed=0)
    assert sorted(n for b in dropped["seq_lengths"] for n in b) == lengths[:5]
    assert sum(b.count(tokenizer.eos_token_id) for b in dropped["input_ids"]) == 5  # every kept poem ends

    kept = packed_dataset(texts, tokenizer, max_length=48, strategy="bfd", seed=0, overlong="truncate")
    assert sorted(n for b in kept["seq_lengths"] for n in b) == lengths[:5] + [48] * 5
    assert sum(b.count(tokenizer.eos_token_id) for b in kept["input_ids"]) == 5  # the cut ones lost theirs


def test_well_formed_only_keeps_regular_poems(trained):
    corpus, _, _ = trained
    every = load_training_texts(BaseModelArguments(corpus=str(corpus), poems="all"))
    regular = load_training_texts(BaseModelArguments(corpus=str(corpus), poems="well_formed"))
    poems = [t.split("<RES>")[1] for t in every]
    assert regular == [t for t, p in zip(every, poems, strict=True) if is_well_formed(p)]
    assert 0 < len(regular) < len(every)  # the fixture's 杂言 poems are left out


def test_rhyme_group_init_gives_the_characters_of_one_group_neighbouring_embeddings_and_leaves_the_rest():
    from poemdpo.data import prosody
    from poemdpo.evaluation.probes import embedding_neighbours_in_group

    text = "".join(prosody.group_characters(g) for g in prosody.level_groups_all()) + "，。\n"
    tokenizer = train_char_tokenizer([text], min_frequency=1)
    args = BaseModelArguments(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    models = {}
    for scale in (0.0, 2.0):
        torch.manual_seed(0)
        models[scale] = build_model(BaseModelArguments(**{**vars(args), "rhyme_group_init": scale}), tokenizer)
    plain, seeded = (m.get_input_embeddings().weight for m in models.values())
    comma = tokenizer.convert_tokens_to_ids("，")
    assert torch.equal(plain[comma], seeded[comma])  # not a character of the rhyme book: untouched
    assert torch.equal(plain, models[0.0].lm_head.weight) and torch.equal(seeded, models[2.0].lm_head.weight)
    in_group, chance = embedding_neighbours_in_group(models[0.0], tokenizer)
    assert in_group < chance + 0.05
    assert embedding_neighbours_in_group(models[2.0], tokenizer)[0] > 0.9


def test_bfd_training_loss_falls(tmp_path):
    corpus = _write_corpus(tmp_path)
    trainer = run(corpus, tmp_path / "model", "--max_steps", "12", "--packing_strategy", "bfd", "--save_steps", "50")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "nowhere", tmp_path / "out", "--max_steps", "1")
    assert exit_info.value.code == 2 and "nowhere' does not exist" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    corpus, _, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        run(corpus, tmp_path / "empty", "--max_steps", "1", "--resume_from_checkpoint", "true")
    assert exit_info.value.code == 2 and "no checkpoint-* directory" in capsys.readouterr().err


def test_help_explains_every_model_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_base.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name, spec in BaseModelArguments.__dataclass_fields__.items():
        assert f"--{name}" in help_text
        assert spec.metadata.get("help"), name


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_the_recipes_bf16_falls_back_to_fp32_on_a_cpu_without_bf16_units(tmp_path, monkeypatch, fast_bf16):
    """Emulated bf16 steps were ~9x slower than fp32: train_base.py (and bench_base.py) train in fp32 there."""
    monkeypatch.setattr(base_model, "cpu_has_fast_bf16", lambda: fast_bf16)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[])
    fall_back_to_fp32(args)
    assert args.bf16 is fast_bf16
    assert (args.mixed_precision == "no") is not fast_bf16


@pytest.mark.parametrize("recipe", sorted(p.name for p in Path("configs").glob("base_*.yaml")))
def test_every_base_recipe_parses_and_only_the_default_writes_the_embedded_model(recipe):
    """A recipe key train_base.py does not know stops the parser; a second recipe must not overwrite data/base_model,
    which every later stage reads by default."""
    parser = TrlParser((BaseModelArguments, TrainingArguments))
    args, training_args = parser.parse_args_and_config(["--config", f"configs/{recipe}"])
    model = build_model(args, train_char_tokenizer(["春眠不覺曉，處處聞啼鳥。"], min_frequency=1))
    assert (model.config.hidden_size, model.config.num_attention_heads) == (args.hidden_size, args.num_attention_heads)
    assert (training_args.output_dir == "data/base_model") is (recipe == "base_tiny_cpu.yaml")


def test_one_seed_trains_the_same_weights_and_another_seed_others(tmp_path):
    """--seed fixes the initial weights too (the Trainer seeds torch only after the model is built)."""
    from safetensors.torch import load_file

    corpus = _write_corpus(tmp_path)
    weights = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        run(corpus, tmp_path / name, "--max_steps", "2", "--seed", seed, "--save_strategy", "no")
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["model.embed_tokens.weight"], weights["c"]["model.embed_tokens.weight"])
