"""The preference objectives of train_dpo.py (`method`), each TRL's own trainer on the same pairs:

    dpo    DPOTrainer against a frozen reference (poemdpo.training.dpo, objectives): the default
    simpo  trl.experimental.cpo.CPOTrainer, loss_type simpo: no reference; the mean per-token log-probs of the two
           poems, their gap times β, must clear a margin γ:  −log σ(β·(mean log π(p) − mean log π(n)) − γ)
    orpo   trl.experimental.orpo.ORPOTrainer: no reference; the chosen poem's NLL plus β (the paper's λ) times
           −log σ(log odds(p) − log odds(n)), odds computed from the mean per-token log-probs
    kto    trl.KTOTrainer against a frozen reference: each poem on its own, desirable (chosen) or not (rejected),
           its log-ratio to the reference set against a batch estimate of KL(π‖π_ref) (`unpaired`)

The method decides the config class, so it is read before the full parse, as train_rl.py picks GRPO or RLOO:
`--method simpo --help` lists CPOConfig's fields. A key of another method's config is refused by name, not
dropped, and so is a setting the chosen trainer accepts but would not honour.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl import DPOConfig, KTOConfig, KTOTrainer, ModelConfig
from trl.data_utils import is_conversational, unpair_preference_dataset
from trl.import_utils import TRLExperimentalWarning

from poemdpo.errors import PoemDPOError
from poemdpo.training.dpo import DPOScriptArguments
from poemdpo.training.model_card import card_metadata, card_results, prompt_section, write_model_card
from poemdpo.training.objectives import trainer_class
from poemdpo.training.recipe import method_named
from poemdpo.training.samples import PoemTrainerMixin
from poemdpo.training.speed import LENGTH_COLUMN, _text_length

with warnings.catch_warnings():  # "APIs here are unstable": requirements.txt pins TRL, and the tests here run them
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

METHODS: dict[str, type] = {"dpo": DPOConfig, "simpo": CPOConfig, "orpo": ORPOConfig, "kto": KTOConfig}
RECIPES = {method: f"configs/{method}_tiny_cpu.yaml" for method in METHODS}
# The loss_type each method is: CPOTrainer's sigmoid would be CPO, KTOTrainer's apo_zero_unpaired APO (ORPO has none).
LOSS_TYPES = {"simpo": "simpo", "kto": "kto"}
WITH_REFERENCE = ("dpo", "kto")
# The objective's settings, recorded in poemdpo.json (evaluate.py reads beta and ld_alpha) and on the model card.
OBJECTIVE_KEYS = {
    "dpo": ("beta", "loss_type", "loss_weights", "ld_alpha", "max_length"),
    "simpo": ("beta", "simpo_gamma", "cpo_alpha", "loss_type", "max_length"),
    "orpo": ("beta", "max_length"),
    "kto": ("beta", "loss_type", "desirable_weight", "undesirable_weight", "max_length"),
}


@dataclass
class PreferenceScriptArguments(DPOScriptArguments):
    method: str = field(
        default="dpo",
        metadata={"help": "dpo (DPOTrainer), simpo (CPOTrainer, loss_type simpo), orpo (ORPOTrainer) or kto "
                  "(KTOTrainer, each pair as a desirable and an undesirable poem). Picks the config class too: "
                  "`--method simpo --help` lists SimPO's settings.", "choices": list(METHODS)},
    )


def method_of(argv: Sequence[str], recipe: dict) -> str:
    """The method named on the command line or in the recipe, else dpo. Both naming different methods is refused: the
    recipe's other keys belong to its own method."""
    named = method_named(argv)
    in_recipe = recipe.get("method")
    method = named or in_recipe or "dpo"
    if method not in METHODS:
        hint = " (GRPO and RLOO train on the model's own poems: train_rl.py)" if method in ("grpo", "rloo") else ""
        raise PoemDPOError(f"unknown method {method!r}: choose one of {list(METHODS)}{hint}")
    if named and in_recipe and named != in_recipe:
        raise PoemDPOError(f"the recipe trains method {in_recipe!r} and the command line asks for {named!r}: pass "
                           f"--config {RECIPES[named]} (or a recipe of your own with method: {named})")
    return method


def parser_classes(method: str) -> tuple[type, type, type]:
    """What TrlParser parses for `method`: poem-dpo's script arguments, the method's TRL config, the model's."""
    return PreferenceScriptArguments, METHODS[method], ModelConfig


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def check_method_keys(keys: set[str], method: str) -> None:
    """Refuse a key that is another method's setting. TrlParser would only call it unknown; this names the method it
    belongs to, so a DPO recipe's `ld_alpha` under --method simpo is not a puzzle."""
    own = set().union(*(_field_names(cls) for cls in parser_classes(method)))
    for key in sorted(keys - own):
        others = [m for m, config in METHODS.items() if key in _field_names(config)]
        if others:
            raise PoemDPOError(
                f"{key!r} is a setting of {' and '.join(others)}, not of {method} ({METHODS[method].__name__} has no "
                f"such field): remove it, or train with --method {others[0]}"
            )


def check_method_settings(method: str, args) -> None:
    """Settings the method's config accepts but its trainer would not honour here."""
    wanted = LOSS_TYPES.get(method)
    if wanted and args.loss_type != wanted:
        raise PoemDPOError(f"method {method} is {type(args).__name__} with loss_type {wanted!r}; loss_type "
                           f"{args.loss_type!r} is another objective: remove the loss_type setting")
    if method in ("simpo", "orpo"):
        if args.max_completion_length is not None:
            raise PoemDPOError(
                f"max_completion_length is read by {type(args).__name__.removesuffix('Config')}Trainer for "
                "encoder-decoder models only; for a causal LM set max_length (prompt + poem) alone"
            )
        if args.generate_during_eval:
            raise PoemDPOError("generate_during_eval logs poems to W&B or Comet only; poem-dpo writes sample poems "
                               "while training for every method (see sample_titles)")
    if method == "kto" and args.per_device_train_batch_size < 2:
        raise PoemDPOError("per_device_train_batch_size must be at least 2 for kto: its KL term is estimated from the "
                           "other poems of the same batch")


def needs_reference(method: str, model_args: ModelConfig, args) -> bool:
    """Whether train_dpo.py loads a frozen copy of the starting model: for dpo and kto, which compare with one, unless
    LoRA (the base with the adapter off is the reference) or precomputed reference log-probs make it unneeded.
    KTOTrainer would load one itself; poem-dpo's one loader loads it as it loads the policy."""
    return method in WITH_REFERENCE and not (model_args.use_peft or args.precompute_ref_log_probs)


# --- trainers -------------------------------------------------------------------------------------------------------


class _PoemTrainer(PoemTrainerMixin):
    """PoemTrainerMixin for TRL's other preference trainers. A reference-free trainer gets `ref_model = None`, so the
    sample poems' reference column is the policy before its first step, the model the method started from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self, "ref_model"):
            self.ref_model = None


class _TokenizedAsDPO:
    """CPOTrainer and ORPOTrainer tokenize a pair their own way, with two differences from DPOTrainer (and KTOTrainer),
    both undone here so that every method trains on the ids DPO trains on (tested):

    - they put the tokenizer's bos before every prompt, whether or not the tokenizer puts one there itself. poem-dpo's
      char tokenizer never does (a prompt starts with <INS>), and sampling does not either: left in, the model would
      learn to write after a token it never sees when it writes. Kept only where the tokenizer puts it.
    - they append eos after a chat turn, which the template already ended (Qwen2.5: <|im_end|>\n<|im_end|>).
    """

    def __init__(self, *args, train_dataset: Dataset | None = None, **kwargs):
        self.chat_rows = train_dataset is not None and is_conversational(train_dataset[0])
        super().__init__(*args, train_dataset=train_dataset, **kwargs)

    def tokenize_row(self, feature: dict, model=None) -> dict:
        row = super().tokenize_row(feature, model)
        tokenizer = self.processing_class
        bos = tokenizer.bos_token_id
        tokenizer_puts_bos = tokenizer(feature["prompt"])["input_ids"][:1] == [bos]  # as DPOTrainer calls it
        if bos is not None and row["prompt_input_ids"][:1] == [bos] and not tokenizer_puts_bos:
            row = {key: value[1:] for key, value in row.items()}  # prompt_*, chosen_*, rejected_*: all start with it
        for column in ("chosen", "rejected") if self.chat_rows else ():
            rendered = tokenizer(feature["prompt"] + feature[column], add_special_tokens=False)["input_ids"]
            if row[f"{column}_input_ids"] == [*rendered, tokenizer.eos_token_id]:
                row = {key: value[:-1] if key.startswith(column) else value for key, value in row.items()}
        return row


class PoemCPOTrainer(_PoemTrainer, _TokenizedAsDPO, CPOTrainer):
    pass


class PoemORPOTrainer(_PoemTrainer, _TokenizedAsDPO, ORPOTrainer):
    pass


class PoemKTOTrainer(_PoemTrainer, KTOTrainer):
    pass


TRAINERS = {"simpo": PoemCPOTrainer, "orpo": PoemORPOTrainer, "kto": PoemKTOTrainer}


def unpaired(pairs: Dataset, order: str, batch_size: int, seed: int) -> Dataset:
    """Each pair as two rows (prompt, completion, label: the chosen poem desirable, the rejected one not), in the order
    KTO is to read them.

    KTOTrainer reads its rows in sequence (its KL term pairs each poem with the next prompt of the same batch, so TRL
    refuses any other sampler) and, left to unpair the pairs itself, puts the chosen poems of each block of 1,000
    pairs before their rejected ones: a batch would hold one label only. The order is made here, once, by seed, as
    the sampler named by train_sampling_strategy would have made it: `group_by_length` as the Trainer's
    LengthGroupedSampler groups (batches of poems of similar length, mixing chosen and rejected poems, which
    length-matched pairs keep close in length), `random` a shuffle, `sequential` TRL's own order.
    """
    rows = unpair_preference_dataset(pairs)
    if LENGTH_COLUMN in rows.column_names:  # the pair's length: each row gets its own
        rows = rows.remove_columns(LENGTH_COLUMN)
    rows = rows.map(lambda row: {LENGTH_COLUMN: _text_length(row["prompt"]) + _text_length(row["completion"])},
                    desc="poem lengths")
    if order == "sequential":
        return rows
    generator = torch.Generator().manual_seed(seed)
    if order == "group_by_length":
        indices = get_length_grouped_indices(rows[LENGTH_COLUMN], batch_size, generator=generator)
    else:
        indices = torch.randperm(len(rows), generator=generator).tolist()
    return rows.select(indices)


def build_trainer(method: str, *, model, ref_model, args, train: Dataset, test: Dataset | None,
                  tokenizer: PreTrainedTokenizerBase, peft_config) -> Trainer:
    """The method's trainer on the prepared pairs (`test` None: no evaluation while training)."""
    data = {"train_dataset": train, "eval_dataset": test, "processing_class": tokenizer, "peft_config": peft_config}
    if method == "dpo":  # ChapterDPOTrainer for the chapter's objectives, else PoemDPOTrainer
        return trainer_class(args.loss_type)(model=model, ref_model=ref_model, args=args, **data)
    if method == "kto":
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        data["train_dataset"] = unpaired(train, args.train_sampling_strategy, batch, args.seed)
        data["eval_dataset"] = unpaired(test, "random", batch, args.seed) if test is not None else None
        args.train_sampling_strategy = "sequential"  # the rows are in the sampler's order already (`unpaired`)
        return PoemKTOTrainer(model=model, ref_model=ref_model, args=args, **data)
    return TRAINERS[method](model=model, args=args, **data)


def objective_settings(method: str, args) -> dict:
    """The objective's settings as poemdpo.json records them."""
    return {key: getattr(args, key) for key in OBJECTIVE_KEYS[method]}


# --- card -----------------------------------------------------------------------------------------------------------

OBJECTIVES = {
    "simpo": "SimPO (TRL `CPOTrainer` with loss_type simpo), with no reference model: the logged rewards are β × a "
             "poem's mean per-token log-prob",
    "orpo": "ORPO (TRL `ORPOTrainer`), with no reference model: the logged rewards are β × a poem's mean per-token "
            "log-prob",
    "kto": "KTO (TRL `KTOTrainer`, each pair's poems as one desirable and one undesirable example) against a frozen "
           "copy of the starting model: the logged rewards are β × a poem's log-ratio to it",
}
CARD_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "activation_checkpointing", "bf16",
                 "seed")


def write_card(method: str, output_dir: str | Path, *, base_model: str, dataset: str, rule: str, args,
               use_peft: bool, train_pairs: int, metrics: dict, sample_rates: dict, sample_table: str,
               tokenizer: PreTrainedTokenizerBase | None = None, chat: bool = False) -> Path:
    """The model card: DPO's own (model_card.write_model_card), else the same sections naming the method."""
    common = {"base_model": base_model, "dataset": dataset, "use_peft": use_peft}
    if method == "dpo":
        return write_model_card(output_dir, rule=rule, args=args, train_pairs=train_pairs, metrics=metrics,
                                sample_rates=sample_rates, sample_table=sample_table, tokenizer=tokenizer, chat=chat,
                                **common)
    metadata = card_metadata(**common)
    metadata["tags"] = [method if tag == "dpo" else tag for tag in metadata["tags"]]
    settings = {key: getattr(args, key) for key in (*OBJECTIVE_KEYS[method], *CARD_SETTINGS)}
    shown = {k: v for k, v in metrics.items() if "rewards/" in k or "logps/" in k or k.endswith(("loss", "kl"))}
    header = yaml.safe_dump(metadata, allow_unicode=True, sort_keys=False)
    card = f"""---
{header}---
# {Path(output_dir).name}

A causal LM aligned by {OBJECTIVES[method]} (poem-dpo's `train_dpo.py --method {method}`) to prefer poems
under the rule **`{rule}`**, starting from `{base_model}`{" with a LoRA adapter" if use_peft else ""}, on
{train_pairs} pairs of `{dataset}`.

## Prompt

{prompt_section(tokenizer, chat)}

{card_results(settings, shown, "Final metrics", sample_rates, sample_table)}"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
