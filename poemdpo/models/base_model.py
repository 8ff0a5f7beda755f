"""The default base model: a small Llama trained from scratch, character by character, on the corpus.

Every training example is `build_prompt(title) + poem + eos` for a poem whose title is not held out, so
the DPO test titles stay unseen. The tokenizer is built from those same texts (`poemdpo.models.tokenizer`).

Training is transformers' `Trainer` on blocks packed by TRL's `pack_dataset`, so a step costs what a
plain PyTorch loop costs (bench/bench_base.py measures both on the same batches). Not TRL's `SFTTrainer`:
in TRL 1.16 it always routes the loss through its chunked "fused LM head" (per-token log-probs, entropy
and top-1 accuracy for its metrics, the vocabulary projection recomputed in the backward pass). Without
Triton, on this CPU, that ran at 0.64x a plain loop in fp32 and 0.50x with bf16 autocast, and no
SFTConfig switch turns it off. The switches that do exist (precision, batch size, threads, activation
checkpointing) are set in configs/base_tiny_cpu.yaml. What remains between the Trainer and the plain loop
(a few percent, profiled): with bf16, accelerate wraps the model's forward so that its outputs come back in
fp32 (`convert_outputs_to_fp32`), one extra copy of the 8 x 256 x vocabulary logits per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from trl import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from poemdpo.data import prosody
from poemdpo.data.corpus import DEFAULT_CORPUS, Poem, read_corpus
from poemdpo.data.forms import is_well_formed
from poemdpo.data.prompts import RESPONSE_MARKER, SPECIAL_TOKENS, build_prompt
from poemdpo.data.splits import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_SIZE,
    DEFAULT_VALIDATION_SIZE,
    SplitSpec,
    split_poems,
)
from poemdpo.errors import PoemDPOError
from poemdpo.models.tokenizer import DEFAULT_MIN_FREQUENCY, train_char_tokenizer
from poemdpo.run_info import parse_resume, write_run_info
from poemdpo.training.speed import use_chunked_lm_loss

logger = logging.getLogger(__name__)


@dataclass
class BaseModelArguments:
    """What to train on, how it is cut into blocks, and the model's shape. The rest is `TrainingArguments`."""

    corpus: str = field(
        default=str(DEFAULT_CORPUS),
        metadata={"help": "Corpus: a directory of chinese-poetry poet.tang.*.json files, or one such file."},
    )
    validation_size: float = field(
        default=DEFAULT_VALIDATION_SIZE,
        metadata={"help": "Share of titles held out for validation (never trained on); recorded in poemdpo.json, "
                  "and the DPO stage refuses pairs built with another split."},
    )
    test_size: float = field(
        default=DEFAULT_TEST_SIZE, metadata={"help": "Share of titles held out for test (never trained on)."}
    )
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the title hash of the splits."})
    max_poems: int | None = field(
        default=None, metadata={"help": "Train on the first N training-split poems only (quick trials)."}
    )
    poems: str = field(
        default="well_formed",
        metadata={
            "help": "Which training-split poems to learn from. all: every one. well_formed: only poems with equal "
            "line lengths, an even number of lines and final punctuation (90%% of the corpus; the rest are 詞 "
            "lyrics, mixed-length 古體 and leftover editors' notes), so the model writes regular verse more often.",
            "choices": ["all", "well_formed"],
        },
    )
    min_frequency: int = field(
        default=DEFAULT_MIN_FREQUENCY,
        metadata={"help": "A character enters the vocabulary if it occurs this often in the training texts."},
    )
    max_length: int = field(
        default=256, metadata={"help": "Context length of the model, and the length of every packed block."}
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "How trl.pack_dataset fills blocks. wrapped: concatenate all examples and cut every max_length "
            "tokens (no padding, attention runs across poem boundaries). bfd: whole poems per block, best fit, "
            "each poem at positions 0.. and attending only to itself, as at generation time; a block is padded "
            "where no poem fits, and poems longer than max_length are truncated.",
            "choices": ["wrapped", "bfd"],
        },
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "bfd only: what to do with a poem whose prompt + poem + eos is longer than max_length. drop: "
            "leave it out. truncate: keep its first max_length tokens, which end without eos and teach the model "
            "that a poem may run on past where it should stop.",
            "choices": ["drop", "truncate"],
        },
    )
    prompt_loss: str = field(
        default="all",
        metadata={
            "help": "What of each prompt the model learns to write (it reads all of it). all: every token. text: the "
            "instruction and the title, not the <INS>/<INP>/<RES> markers, which a poem should never contain. "
            "none: only the poem and its eos, as TRL's SFT on prompt-completion data (completion_only_loss).",
            "choices": ["all", "text", "none"],
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the model."})
    intermediate_size: int = field(default=352, metadata={"help": "Width of each MLP's hidden layer."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per block."})
    tie_word_embeddings: bool = field(
        default=True, metadata={"help": "Share input embedding and output projection (saves vocab x hidden)."}
    )
    rhyme_group_init: float = field(
        default=0.0,
        metadata={"help": "Give every character the 平水韵 knows a head start on rhyme: add one random direction per "
                  "rhyme group to its initial embedding (the mean of its groups' directions for a character with "
                  "several), this many times as long as the embedding's own random part. 0 (the default): plain "
                  "initialisation. A char-level model trained from scratch learns next to nothing about which "
                  "characters share a rhyme group (issue #13, docs/prosody.md)."},
    )
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Compute the training loss and its gradient 512 positions at a time, without the "
                  "[tokens, vocab] logits (poemdpo.training.speed.use_chunked_lm_loss): the same loss and gradients as "
                  "transformers' to float rounding, 1.1-1.2x the steps per second on a 2-core CPU. false: "
                  "transformers' own loss."},
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for training; unset leaves torch's default."}
    )
    max_new_tokens: int = field(
        default=256,
        metadata={"help": "Saved generation default: most tokens to write after a prompt (sampling also stops at the "
                  "context, max_length). At 200, 8 of 300 poems of one aligned model were cut off mid-line."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Saved generation default: sampling temperature."})


def splits_of(args: BaseModelArguments) -> SplitSpec:
    return SplitSpec(args.validation_size, args.test_size, args.split_seed)


def poem_text(poem: Poem) -> str:
    """A training example without eos: the prompt, then the poem."""
    return build_prompt(poem.title) + poem.text


def load_training_texts(args: BaseModelArguments) -> list[str]:
    """Prompt + poem (no eos) for every training-split poem; PoemDPOError on bad input."""
    poems, _ = read_corpus(args.corpus)
    train = split_poems(poems, splits_of(args))["train"]
    if args.poems == "well_formed":
        train = [p for p in train if is_well_formed(p.text)]
    if args.max_poems is not None:
        train = train[: args.max_poems]
    if not train:
        raise PoemDPOError(f"no training poems in {args.corpus!r} with splits {splits_of(args).to_dict()}")
    return [poem_text(p) for p in train]


def build_model(args: BaseModelArguments, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by `args`, with the tokenizer's special ids and generation defaults.

    Llama rather than, say, Qwen2: AutoTokenizer on a qwen2 `config.json` swaps in Qwen's byte-level
    tokenizer and loses the Chinese characters (see poemdpo/models/tokenizer.py).
    """
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"hidden_size {args.hidden_size} is not divisible by {args.num_attention_heads} heads")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        max_position_embeddings=args.max_length,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if args.rhyme_group_init:
        add_rhyme_group_directions(model.get_input_embeddings().weight, tokenizer, args.rhyme_group_init)
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,  # pure sampling: transformers would otherwise cut to the top 50
        max_new_tokens=args.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@torch.no_grad()
def add_rhyme_group_directions(embedding: torch.Tensor, tokenizer: PreTrainedTokenizerFast, scale: float) -> None:
    """Add to each row of `embedding` whose token is a character of the 平水韵 the mean of its rhyme groups'
    random directions, `scale` times the rows' own size.

    Characters of one group then share a component of their embedding, and with tied weights of their output
    row too, so "a character of line 2's group" is one direction the model can copy forward from line 2 to
    line 4. Drawn from torch's global generator, as the rest of the initialisation is.
    """
    groups = prosody.groups()
    directions = torch.randn(len(groups), embedding.shape[1]) * embedding.std() * scale
    index = {group: i for i, group in enumerate(groups)}
    for token, row in tokenizer.get_vocab().items():
        token_groups = prosody.rhyme_groups(token) if len(token) == 1 else frozenset()
        if token_groups:
            embedding[row] += directions[[index[g] for g in sorted(token_groups)]].mean(0).to(embedding.dtype)


def packed_dataset(
    texts: list[str],
    tokenizer: PreTrainedTokenizerFast,
    max_length: int,
    strategy: str,
    seed: int,
    overlong: str = "drop",
    prompt_loss: str = "all",
) -> Dataset:
    """`text + eos` for each text, tokenized, shuffled, and packed into blocks of `max_length` tokens.

    With bfd, `overlong="drop"` leaves out the examples longer than a block instead of truncating them.
    `prompt_loss` other than "all" adds a `labels` column, -100 where the model is not to learn (see
    BaseModelArguments.prompt_loss); the collators take it instead of `input_ids`.
    """
    # eos ends every example, so the model learns where a poem stops.
    dataset = Dataset.from_dict({"text": [t + tokenizer.eos_token for t in texts]}).shuffle(seed=seed)
    dataset = dataset.map(
        # verbose=False: poems longer than a block are expected here; they are dropped or cut below.
        lambda batch: {"input_ids": tokenizer(batch["text"], verbose=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        desc="tokenizing",
    )
    if prompt_loss != "all":
        markers = set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        response = tokenizer.convert_tokens_to_ids(RESPONSE_MARKER)
        dataset = dataset.map(_prompt_labels, desc="labels",
                              fn_kwargs={"markers": markers, "response": response, "whole": prompt_loss == "none"})
    if strategy == "bfd" and overlong == "drop":
        before = len(dataset)
        dataset = dataset.filter(
            lambda batch: [len(ids) <= max_length for ids in batch["input_ids"]], batched=True, desc="dropping overlong"
        )
        logger.info("dropped %d of %d poems longer than %d tokens", before - len(dataset), before, max_length)
    # One map batch, so wrapped packing leaves a single short block at the end instead of one per batch.
    return pack_dataset(dataset, max_length, strategy=strategy, map_kwargs={"batch_size": len(dataset)})


def _prompt_labels(example: dict, markers: set[int], response: int, whole: bool) -> dict:
    """`input_ids` as labels, -100 on the prompt's markers, or on the whole prompt up to its response marker."""
    ids = example["input_ids"]
    if response not in ids:
        raise PoemDPOError(f"prompt_loss: a training text has no {RESPONSE_MARKER} marker: {ids[:20]}...")
    if whole:
        start = ids.index(response) + 1
        return {"labels": [-100] * start + ids[start:]}
    return {"labels": [-100 if i in markers else i for i in ids]}


class PackedPoemsCollator(DataCollatorForLanguageModeling):
    """Batches of bfd blocks in which every poem only sees itself.

    Position ids restart at each poem and no attention mask is passed: transformers then finds the poems from the
    position ids (masking_utils.find_packed_sequence_indices) and masks attention block-diagonally, on any attention
    implementation. It skips that detection when the model builds a KV cache, hence `use_cache=False`.

    `width` pads every batch to that many tokens (a block is at most max_length, some batches are a token short):
    one shape for torch.compile, which otherwise recompiles for the short batch with slower dynamic shapes.
    """

    def __init__(self, pad_token_id: int, width: int | None = None) -> None:
        super().__init__(pad_token_id=pad_token_id, return_position_ids=True, pad_to_multiple_of=width)

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        del batch["attention_mask"]  # padding is excluded by its -100 labels
        # The first token of a poem is not predicted from the end of the previous one.
        batch["labels"][batch["position_ids"] == 0] = -100
        batch["use_cache"] = False
        return batch


def make_trainer(
    args: BaseModelArguments,
    training_args: TrainingArguments,
    texts: list[str],
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Trainer:
    """A Trainer for a fresh model on `texts`; builds the tokenizer from them unless one is given."""
    if tokenizer is None:
        tokenizer = train_char_tokenizer(texts, args.min_frequency, model_max_length=args.max_length)
    dataset = packed_dataset(
        texts, tokenizer, args.max_length, args.packing_strategy, training_args.seed, args.overlong,
        args.prompt_loss,
    )
    # The Trainer seeds torch only once it is built, after the model: seed the initial weights here, or every run of
    # one --seed starts from other weights.
    set_seed(training_args.seed)
    model = build_model(args, tokenizer)
    if args.chunked_loss:
        use_chunked_lm_loss(model)
    if args.packing_strategy == "bfd":
        collator = PackedPoemsCollator(tokenizer.pad_token_id, args.max_length if training_args.torch_compile else None)
    else:
        # Pads the short last block and sets labels = input_ids, -100 on padding.
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )


def resolve_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint` (`parse_resume`) with true resolved to the latest checkpoint in output_dir."""
    resume = parse_resume(resume)
    if resume is not True:
        return resume
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise PoemDPOError(f"--resume_from_checkpoint true: no checkpoint-* directory in {output_dir!r}")
    return last


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it torch emulates bf16, and a
    bf16-autocast step took ~9x longer than fp32 on a 2-core AVX2 machine (26 s vs 3 s, under load)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust the recipe
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fall_back_to_fp32(training_args: TrainingArguments) -> None:
    """bf16 autocast off (with a warning) when the recipe asks for it on a CPU that only emulates bf16."""
    if training_args.bf16 and training_args.use_cpu and not cpu_has_fast_bf16():
        logger.warning("bf16: this CPU has no bf16 matmul (AVX512-BF16/AMX); training in fp32 instead")
        training_args.bf16 = False
        training_args.mixed_precision = "no"  # what accelerate reads; set from bf16 when the arguments were parsed


def train_base(args: BaseModelArguments, training_args: TrainingArguments) -> Trainer:
    """Train, then save model, tokenizer and generation config to `training_args.output_dir`."""
    fall_back_to_fp32(training_args)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    texts = load_training_texts(args)
    # The vocabulary would be rebuilt identically, but resume with exactly the one the weights were trained on.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint) if checkpoint else None
    trainer = make_trainer(args, training_args, texts, tokenizer)
    logger.info(
        "%d training poems, %d blocks of %d tokens, vocabulary %d, %.2fM parameters",
        len(texts),
        len(trainer.train_dataset),
        args.max_length,
        len(trainer.processing_class),
        trainer.model.num_parameters() / 1e6,
    )
    logger.info("mixed precision: %s", trainer.accelerator.mixed_precision)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)  # weights, config, generation config and tokenizer
    if trainer.is_world_process_zero():
        write_run_info(training_args.output_dir, {
            "stage": "base_model", "corpus": args.corpus, "poems": args.poems, "splits": splits_of(args).to_dict(),
            "training_poems": len(texts), "max_length": args.max_length, "prompt_loss": args.prompt_loss,
        })
    return trainer
