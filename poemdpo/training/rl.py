"""RL on the model's own poems: TRL's `GRPOTrainer`, `RLOOTrainer` or online DPO, rewarded by the rule or a reward
model.

The chapter's RLHF road ends in PPO. TRL 1.x removed `PPOTrainer`; what it keeps are two algorithms that drop
PPO's value model and take the baseline from the samples themselves: for each title the policy writes K poems,
GRPO scales each reward against its group's mean and spread, RLOO subtracts the mean of the other K−1. Both
are held near a frozen copy of the starting model, here with β > 0 (TRL's GRPO default is β = 0, which loads
no reference at all): GRPO adds β·KL per token to its loss, RLOO takes β·KL summed over the poem off the reward.
Online DPO (`trl.experimental.online_dpo`) is the middle road: two poems per title, the reward picks which is
chosen, and DPO's loss against the frozen reference does the rest — a pair every step, from the current policy.

The reward is either the rule itself, a verifiable reward (`rule_reward`), or a reward model trained by
`train_reward.py` (`RewardModelReward`), the chapter's learned judge.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from poemdpo.data.prompts import build_prompt, conversational, title_of
from poemdpo.data.rules import RULES, credit, preferred
from poemdpo.data.splits import SplitSpec, check_same_splits
from poemdpo.errors import PoemDPOError
from poemdpo.models import loading
from poemdpo.models.generation import (
    DEFAULT_SAMPLER,
    DROP_FINISHED,
    SAMPLERS,
    decode_poem,
    default_max_new_tokens,
    generate_dropping_finished,
    token_sampler,
)
from poemdpo.run_info import read_run_info, recorded_splits
from poemdpo.training.dpo import DEFAULT_DATASET
from poemdpo.training.model_card import card_results, prompt_section
from poemdpo.training.recipe import method_named
from poemdpo.training.reward import load_reward_model, score
from poemdpo.training.speed import use_compact_lm_head

METHODS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer),
           "online_dpo": (OnlineDPOConfig, OnlineDPOTrainer)}
RECIPES = {"grpo": "configs/grpo_tiny_cpu.yaml", "rloo": "configs/rloo_tiny_cpu.yaml",
           "online_dpo": "configs/online_dpo_tiny_cpu.yaml"}

@dataclass
class RLScriptArguments:
    method: str = field(
        default="grpo",
        metadata={"help": "grpo (TRL's GRPOTrainer), rloo (RLOOTrainer) or online_dpo (trl.experimental's "
                  "OnlineDPOTrainer: two poems per title, the reward picks the chosen one); TRL 1.x has no "
                  "PPOTrainer. Picks the config class too: `--method rloo --help` lists RLOO's settings.",
                  "choices": sorted(METHODS)},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "A reward model directory written by train_reward.py; unset: the rule itself is the "
                  "reward (rule_reward)."},
    )
    rule: str | None = field(
        default=None,
        metadata={"help": "The rule rewarded (without --reward_model) and counted in the sample poems (default: the "
                  "dataset's stats.json, else five_char).", "choices": sorted(RULES)},
    )
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Preference pairs written by build_dataset.py: the titles of its train split are the "
                  "prompts (the pairs themselves are not used)."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split whose titles are the prompts."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Held-out split the sample poems' titles come from (evaluate.py reports on test)."},
    )
    max_train_titles: int | None = field(
        default=None, metadata={"help": "Use N of the train titles (shuffled by seed); all if unset."}
    )
    max_prompt_tokens: int = field(
        default=64,
        metadata={"help": "Leave out train titles whose prompt is longer (18 of 23,242 in the corpus): all poems of a "
                  "step share one length limit, the context minus the longest prompt."},
    )
    sample_titles: int = field(
        default=32,
        metadata={"help": "Titles to write poems for while training (0: none): the chapter's 春夜喜雨 first, then "
                  "held-out titles."},
    )
    sample_table_rows: int = field(
        default=6, metadata={"help": "How many of those poems to print side by side with the reference's."}
    )
    sample_every_steps: int = field(default=50, metadata={"help": "Write sample poems every N steps, and at the end."})
    sample_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Length limit of a sample poem, in tokens (default: as evaluate.py, the model's "
                  "generation_config.max_new_tokens within its context)."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "instruction: the seed's <INS>..<RES> prompts; chat: conversational prompts through the "
                  "tokenizer's chat template; auto: chat when the tokenizer has a template.",
                  "choices": ["auto", "instruction", "chat"]},
    )
    reward_batch_size: int = field(default=64, metadata={"help": "Poems per forward pass of the reward model."})
    sampler: str = field(
        default=DEFAULT_SAMPLER,
        metadata={"help": "How generate draws each token of the training poems: inverse_cdf (fast on a CPU) or "
                  "multinomial (torch.multinomial, transformers' own). The same distribution.",
                  "choices": list(SAMPLERS)},
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={"help": "InstructGPT's PPO-ptx, for GRPO and RLOO: add ptx_coef x the next-token loss on a batch "
                  "of the train split's chosen poems (--ptx_dataset) to every step's loss, so that RL does not "
                  "buy its reward with the language. 0: off."},
    )
    ptx_dataset: str | None = field(
        default=None, metadata={"help": "Pairs whose train split's chosen poems the ptx term reads (default: "
                                "--dataset_name)."},
    )
    ptx_batch_size: int = field(default=32, metadata={"help": "Poems per step in the ptx term."})
    drop_finished: bool = field(
        default=DROP_FINISHED,
        metadata={"help": "TRL's generate call decodes with generation.sample_dropping_finished (finished poems leave "
                  "the batch, the KV cache grows with the poems) where the generation settings are plain sampling; "
                  "false: transformers' generate. The same distribution."},
    )
    compact_lm_head: bool = field(
        default=True,
        metadata={"help": "GRPO and RLOO, off CUDA/XPU: score the poems' tokens through the LM head in one matmul of "
                  "the poem positions only (poemdpo.training.speed), where TRL's CPU head projects every position, "
                  "prompts and padding too, and again in the backward. The same log-probs. false: TRL's head."},
    )


def method_of(argv: Sequence[str], recipe: dict) -> str:
    """The method named on the command line, else in the recipe, else grpo: it decides the config class, so it is
    read before the full parse."""
    named = method_named(argv)
    method = named if named is not None else recipe.get("method", "grpo")
    if method not in METHODS:
        hint = " (TRL 1.x removed PPOTrainer; GRPO and RLOO are its successors)" if method == "ppo" else ""
        raise PoemDPOError(f"unknown method {method!r}: choose one of {sorted(METHODS)}{hint}")
    return method


def check_settings(args: GRPOConfig | RLOOConfig | OnlineDPOConfig, script_args: RLScriptArguments) -> None:
    betas = args.beta if isinstance(args.beta, list) else [args.beta]  # online DPO takes one β per epoch
    if any(beta < 0 for beta in betas):
        raise PoemDPOError(f"beta must be >= 0 (the weight of the KL penalty to the reference), got {args.beta}")
    if args.use_vllm:
        raise PoemDPOError("use_vllm: true needs a GPU and vLLM; poem-dpo's RL recipes sample with transformers")
    for name in ("sample_titles", "sample_table_rows"):
        if getattr(script_args, name) < 0:
            raise PoemDPOError(f"{name} must be >= 0")
    for name in ("sample_every_steps", "reward_batch_size", "max_prompt_tokens"):
        if getattr(script_args, name) < 1:
            raise PoemDPOError(f"{name} must be at least 1")
    if script_args.ptx_coef < 0:
        raise PoemDPOError(f"ptx_coef must be >= 0, got {script_args.ptx_coef}")
    if script_args.ptx_coef and isinstance(args, OnlineDPOConfig):
        raise PoemDPOError("ptx_coef is for GRPO and RLOO; online DPO's loss has no room for it here")
    if script_args.ptx_batch_size < 1:
        raise PoemDPOError("ptx_batch_size must be at least 1")
    if script_args.max_train_titles is not None and script_args.max_train_titles < 1:
        raise PoemDPOError("max_train_titles must be at least 1 (or unset for all)")


def train_titles(pairs: Dataset, n: int | None, seed: int) -> list[str]:
    """Distinct titles of the split (from `title`, else from the prompts), in a seeded shuffle, `n` of them."""
    if "title" in pairs.column_names:
        found = pairs["title"]
    else:
        found = [t for t in (title_of(p) for p in pairs["prompt"]) if t]
    titles = sorted(set(found))
    if not titles:
        raise PoemDPOError("the train split holds no titles (no `title` column and no prompt in the seed's format)")
    order = Dataset.from_dict({"title": titles}).shuffle(seed=seed)["title"]
    return order[:n] if n else order


def prompt_dataset(titles: Sequence[str], chat: bool) -> Dataset:
    return Dataset.from_dict({
        "prompt": [conversational(t) if chat else build_prompt(t) for t in titles],
        "title": list(titles),
    })


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], chat: bool) -> list[int]:
    """Tokens of each title's prompt, tokenized as TRL tokenizes prompts (chat turns through the template)."""
    if chat:
        return [len(tokenizer.apply_chat_template(conversational(t), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for t in titles]
    return [len(ids) for ids in tokenizer([build_prompt(t) for t in titles])["input_ids"]]


def short_prompts(tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], max_tokens: int,
                  chat: bool = False) -> tuple[list[str], int]:
    """The titles whose prompt takes at most `max_tokens`, and the longest such prompt: every poem of a step gets
    the same length limit, so one very long title (the corpus has prompts of 137 tokens) would shorten them all."""
    lengths = prompt_lengths(tokenizer, titles, chat)
    kept = [(title, n) for title, n in zip(titles, lengths, strict=True) if n <= max_tokens]
    if not kept:
        raise PoemDPOError(f"no train title has a prompt of at most max_prompt_tokens={max_tokens} tokens")
    return [title for title, _ in kept], max(n for _, n in kept)


def length_setting(args) -> str:
    """The config field that limits a poem's tokens: GRPO and RLOO say max_completion_length, online DPO
    max_new_tokens."""
    return "max_new_tokens" if isinstance(args, OnlineDPOConfig) else "max_completion_length"


def completion_length(model, longest_prompt: int, wanted: int | None, setting: str = "max_completion_length") -> int:
    """The longest poem RL may write: as evaluate.py, the model's `generation_config.max_new_tokens` (else 128),
    within its context after the longest prompt. A `wanted` length that does not fit stops the run, naming the
    trainer's own `setting` (`length_setting`)."""
    length = default_max_new_tokens(model, wanted)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return length
    room = context - longest_prompt
    if room < 1:
        raise PoemDPOError(f"a train prompt takes {longest_prompt} tokens, the whole context ({context}) of the model")
    if wanted is not None and wanted > room:
        raise PoemDPOError(
            f"{setting} {wanted} does not fit: the longest train prompt takes {longest_prompt} of the "
            f"model's {context} positions, leaving {room}; set at most {room} (or lower max_prompt_tokens), or leave "
            "it unset"
        )
    return min(length, room)


# --- rewards ------------------------------------------------------------------------------------------------


def _text(completion) -> str:
    """A completion as TRL hands it: a string, or chat turns whose last one is the poem."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def rule_reward(completions: Sequence, *, rule: str = "five_char", completion_ids: Sequence[Sequence[int]] | None
                = None, tokenizer: PreTrainedTokenizerBase | None = None, eos_token_ids: Sequence[int] = (),
                **kwargs) -> list[float]:
    """The rule as a graded, verifiable reward: 1 for a finished poem the rule prefers, else 0.5 × the rule's
    partial credit (`rules.credit`: for five_char, the share of lines of five characters).

    Graded, because GRPO and RLOO learn only from differences inside a group of K poems for one title: with a
    0/1 reward a group whose poems all miss (most groups, early on, for a rule the base model rarely meets) is
    all ties and teaches nothing, while the partial credit still ranks a poem one line off above a wreck. The
    credit stays below the full reward (at most 0.5 < 1), so meeting the rule always beats nearly meeting it and
    the optimum is the rule itself. A poem the model did not finish (no eos within the length limit) never gets
    the full reward — a run-on is not a poem — only its partial credit, its cut last line counting as a miss.

    With `completion_ids` and `tokenizer` (as `train_rl.py` passes them) a poem is read from its token ids:
    finished means it ends in one of `eos_token_ids`, and an unknown token reads as □ (TRL's decoded text drops
    it, which would make a five-character line with one rare character look like four). Without them, each
    completion is taken as a finished poem's text.
    """
    rewards = []
    for i, completion in enumerate(completions):
        text, finished = _text(completion), True
        if completion_ids is not None and tokenizer is not None:
            ids = list(completion_ids[i])
            finished = bool(ids) and ids[-1] in eos_token_ids
            text = decode_poem(tokenizer, ids[:-1] if finished else ids)
        if finished and preferred(text, rule):
            rewards.append(1.0)
            continue
        rewards.append(0.5 * credit(text, rule))
    return rewards


def make_rule_reward(rule: str, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int]):
    """`rule_reward` bound to a rule and the policy's tokenizer, in the form TRL calls (it logs it by name)."""
    if rule not in RULES:
        raise PoemDPOError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    return functools.partial(rule_reward, rule=rule, tokenizer=tokenizer, eos_token_ids=list(eos_token_ids))


class RewardModelReward:
    """A reward model from `train_reward.py`, scoring each prompt + poem + eos exactly as it was trained.

    TRL can take the directory itself as a reward function, but it scores prompt + decoded completion without
    the eos after which the reward model learned to read its score; here every poem is scored through
    `reward.score`, the path its training and its reported accuracy used. A poem cut off by the length limit
    is scored as if it ended there (its broken last line is the judge's to punish).
    """

    __name__ = "reward_model"  # the name TRL logs its rewards under

    def __init__(self, path: str, *, tokenizer: PreTrainedTokenizerBase | None = None,
                 eos_token_ids: Sequence[int] = (), dtype=None, batch_size: int = 64):
        self.path, self.batch_size = path, batch_size
        self.policy_tokenizer, self.eos_token_ids = tokenizer, set(eos_token_ids)
        self.tokenizer = loading.load_tokenizer(path, what="reward model")
        self.model = load_reward_model(path, self.tokenizer, dtype=dtype, what="reward model").eval()
        self.model.requires_grad_(False)

    def to(self, device) -> RewardModelReward:
        self.model.to(device)
        return self

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is not None and self.policy_tokenizer is not None and isinstance(completions[0], str):
            # Read from the ids: an unknown token becomes □ (which the reward model's tokenizer maps to its own
            # unknown id) instead of vanishing from the line.
            completions = [
                decode_poem(self.policy_tokenizer, ids[:-1] if ids and ids[-1] in self.eos_token_ids else ids)
                for ids in map(list, completion_ids)
            ]
        return score(self.model, self.tokenizer, prompts, completions, self.batch_size)


def check_reward_model(path: str, splits: SplitSpec | None, chat: bool) -> None:
    """A directory written by train_reward.py, holding out the titles this run holds out, prompted the same way."""
    if loading.looks_local(path) and not Path(path).is_dir():
        raise PoemDPOError(
            f"reward model directory {path!r} does not exist; train one with: python train_reward.py --output_dir "
            f"{path}"
        )
    config_path = Path(path) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.get(
            "num_labels", len(config.get("id2label") or {0: 0})
        ) != 1:
            raise PoemDPOError(
                f"{path!r} is not a reward model (its config.json names {architectures or 'no architecture'}, not a "
                "one-output ForSequenceClassification head); train one with: python train_reward.py"
            )
    check_same_splits(splits, recorded_splits(path), f"reward model {path!r} (its poemdpo.json)")
    recorded = read_run_info(path).get("prompt_format")
    if recorded and recorded != ("chat" if chat else "instruction"):
        raise PoemDPOError(
            f"reward model {path!r} was trained on {recorded} prompts, but this run writes "
            f"{'chat' if chat else 'instruction'} prompts; set prompt_format to match"
        )


# --- trainers -----------------------------------------------------------------------------------------------


class _PoemRL:
    """What poem-dpo adds to TRL's RL trainers: metrics handed in by callbacks join the next training log (the
    sample poems' rates, as `PoemDPOTrainer` does), every training log carries β, the time spent writing
    poems is counted, so the run reports its generation throughput, and off CUDA the poems are scored through the
    compact LM head."""

    scores_through_fused_lm_head = True  # TRL's GRPO and RLOO: their `add_fused_lm_head` is swapped for ours

    def __init__(self, *args, sampler: str = DEFAULT_SAMPLER, drop_finished: bool = DROP_FINISHED,
                 ptx_poems: Dataset | None = None, ptx_coef: float = 0.0, ptx_batch_size: int = 32,
                 compact_lm_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.compact_lm_head = (compact_lm_head and self.scores_through_fused_lm_head
                                and use_compact_lm_head(self, ("log_probs", "entropy"), self.temperature))
        self.ptx_coef, self.ptx_batch_size = ptx_coef, ptx_batch_size
        self._ptx = ptx_poems.shuffle(seed=self.args.seed) if ptx_poems is not None and ptx_coef else None
        self._ptx_position = 0
        self.pending_metrics: dict[str, float] = {}
        self.generation_seconds, self.completions_generated = 0.0, 0
        self._window = (0.0, 0)
        self.sampler = sampler  # how generate draws each token: generation.SAMPLERS
        self.drop_finished = drop_finished  # generate's call decoded by generation.sample_dropping_finished

    def _timed(self, poems: int, generate, *args):
        """Run TRL's own generation with our token sampler (and decoding loop), counting the poems and the seconds."""
        start = time.perf_counter()
        # the model TRL's unwrap_model_for_generation calls generate on
        decoding = (generate_dropping_finished(self.accelerator.unwrap_model(self.model)) if self.drop_finished
                    else contextlib.nullcontext())
        try:
            with token_sampler(self.sampler), decoding:
                return generate(*args)
        finally:
            self.generation_seconds += time.perf_counter() - start
            self.completions_generated += poems

    def next_ptx_batch(self) -> dict[str, torch.Tensor]:
        """The next ptx_batch_size poems of the shuffled ptx poems (round and round), padded, on the model's device."""
        rows = [self._ptx[(self._ptx_position + i) % len(self._ptx)] for i in range(self.ptx_batch_size)]
        self._ptx_position += self.ptx_batch_size
        batch = DataCollatorForLanguageModeling(pad_token_id=self.processing_class.pad_token_id)(rows)
        return {k: batch[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "labels")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's RL loss, plus ptx_coef x the mean next-token loss of a batch of corpus poems (PPO-ptx), scaled
        for gradient accumulation as TRL scales its own (the RL trainers' loss is already per accumulation step)."""
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        if self._ptx is None or not model.training:
            return loss
        nll = model(**self.next_ptx_batch(), use_cache=False).loss
        self._metrics["train"]["ptx_nll"].append(nll.item())
        return loss + self.ptx_coef * nll / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.pending_metrics)
            self.pending_metrics = {}
            if "loss" in logs:
                seconds = self.generation_seconds - self._window[0]
                completions = self.completions_generated - self._window[1]
                logs["beta"] = self.beta
                if seconds > 0:
                    logs["generation/completions_per_second"] = completions / seconds
                self._window = (self.generation_seconds, self.completions_generated)
        super().log(logs, start_time)


class PoemGRPOTrainer(_PoemRL, GRPOTrainer):
    def _generate(self, prompts: list):
        return self._timed(len(prompts), super()._generate, prompts)  # TRL repeats each prompt num_generations times


class PoemRLOOTrainer(_PoemRL, RLOOTrainer):
    def _generate(self, prompts: list):
        return self._timed(len(prompts), super()._generate, prompts)


class PoemOnlineDPOTrainer(_PoemRL, OnlineDPOTrainer):
    """TRL's online DPO, its two poems per title drawn by our sampler and read by the reward as the poems themselves:
    TRL hands reward functions each poem's ids padded to the longest of the batch, so a finished poem would not end
    in its eos; they are cut after the first eos here (TRL's own `truncate_right` pads only after it).
    A tie (both poems fully rewarded, most pairs once the policy writes the form) still becomes a pair in TRL, the
    first poem taken as chosen: such pairs carry no preference, only noise around the reference."""

    scores_through_fused_lm_head = False  # scores with the model's own forward: nothing to swap

    def _generate(self, model, prompts, images=None):
        return self._timed(2 * len(prompts), super()._generate, model, prompts, images)

    def _calculate_rewards_from_functions(self, prompts, completions, completion_ids_list, **reward_kwargs):
        eos = set(self.eos_token_ids)
        trimmed = [ids[:next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))] for ids in completion_ids_list]
        return super()._calculate_rewards_from_functions(prompts, completions, trimmed, **reward_kwargs)


TRAINERS = {"grpo": PoemGRPOTrainer, "rloo": PoemRLOOTrainer, "online_dpo": PoemOnlineDPOTrainer}


# --- card ---------------------------------------------------------------------------------------------------

CARD_SETTINGS = (
    "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs", "max_completion_length", "max_new_tokens",
    "temperature",
    "top_k", "top_p", "num_iterations", "epsilon", "loss_type", "scale_rewards", "normalize_advantages",
    "mask_truncated_completions", "bf16", "seed",
)
CARD_METRICS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "frac_reward_zero_std", "generation/completions_per_second",
                # online DPO's names: the reward's mean and the chosen-minus-rejected gap, KL, DPO's own rewards
                "objective/scores", "objective/scores_margin", "objective/kl", "rewards/margins",
                "rewards/accuracies")


def last_train_metrics(log_history: list[dict]) -> dict:
    """The newest training log entry that carries rewards."""
    for entry in reversed(log_history):
        if "reward" in entry or "objective/scores" in entry:
            return {k: v for k, v in entry.items() if k in CARD_METRICS or k.startswith("rewards/")}
    return {}


def write_rl_card(output_dir: str | Path, *, method: str, base_model: str, dataset: str, rule: str,
                  reward: str, args, titles: int, metrics: dict, sample_rates: dict, sample_table: str,
                  tokenizer=None, chat: bool = False) -> Path:
    settings = {key: getattr(args, key) for key in CARD_SETTINGS if hasattr(args, key)}
    card = f"""---
base_model: {base_model}
library_name: transformers
tags: [trl, {method}, poem-dpo, poetry]
language: [lzh]
---
# {Path(output_dir).name}

A causal LM trained by {method.upper()} (TRL `{METHODS[method][1].__name__}`, poem-dpo's `train_rl.py`) on its
own poems for {titles} training titles of `{dataset}`, starting from `{base_model}` and held near a frozen copy of
it (β = {args.beta}). Reward: {reward}. The rule counted in the samples: **`{rule}`**.

## Prompt

{prompt_section(tokenizer, chat)}

{card_results(settings, metrics, "Final training metrics", sample_rates, sample_table)}"""
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
