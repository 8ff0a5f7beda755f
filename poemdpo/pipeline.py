"""The main job, end to end on the embedded default: dataset -> base model (if missing) -> training -> evaluation.

The training stage is one of the repository's roads (--method): DPO then a short GRPO on the DPO model's own poems
(the default, dpo_grpo), DPO alone, iterated DPO (a second round on the DPO model's own poems), the chapter's two
objectives
or SimPO / ORPO / KTO on train_dpo.py, a reward model, GRPO or RLOO on the model's own poems, or GRPO rewarded by a
reward model. The headline is evaluate.py's own: the rule's strict rate on random test titles (K poems each), with
its 95% interval, beside the reference's. A reward model writes no poems: its headline is its accuracy on the held-out
pairs, as train_reward.py measured it. Every stage uses the same train / validation / test split of titles.

    python -m poemdpo.pipeline                       # DPO, then GRPO; 五言 preferred (rule five_char)
    python -m poemdpo.pipeline --method dpo          # DPO alone
    python -m poemdpo.pipeline --rule seven_char     # 七言 preferred
    python -m poemdpo.pipeline --method simpo        # SimPO (also orpo, kto): the DPO recipe, the objective swapped
    python -m poemdpo.pipeline --method grpo         # GRPO, the rule as reward (also rloo, online_dpo)
    python -m poemdpo.pipeline --method iterated_dpo # DPO, then DPO again on pairs of its own poems
    python -m poemdpo.pipeline --method grpo_reward_model   # a reward model (if missing), then GRPO against it
    python -m poemdpo.pipeline --method dpo --max_train_pairs 500   # the rest goes to the (last) training script
    python -m poemdpo.pipeline --rule five_char_rhyme   # the rhyme road: a base with rhyme-group embeddings, a
                                                     # fine-tune with the rhyme slots weighted up, then GRPO

Each stage is the repository's own script, run as a child process exactly as a user would run it, so
that a stage's memory is freed before the next and its output is what the script prints on its own. Where the
platform has one, the children are forks of multiprocessing's fork server, which imported torch, transformers,
datasets and TRL's trainers once (--fork_stages): a new interpreter spends ~10 s of each stage on them here.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import reduction
from pathlib import Path

from transformers import HfArgumentParser

from poemdpo.data.corpus import DEFAULT_CORPUS
from poemdpo.data.pairs import DEFAULT_NEAR_MISS_SHARE, DEFAULT_PAIRING, STRATEGIES
from poemdpo.data.rules import RULES
from poemdpo.data.splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_SIZE, DEFAULT_VALIDATION_SIZE, split_flags
from poemdpo.run_info import read_run_info
from poemdpo.training.recipe import read_recipe

PROJECT = Path(__file__).resolve().parent.parent  # the scripts and recipes
ROOT = PROJECT  # where the stages run and relative paths resolve (the tests point it elsewhere)

# method -> (training script, its recipe, arguments the script needs to run this method)
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dpo": ("train_dpo.py", "configs/dpo_tiny_cpu.yaml", ()),
    # DPO's loss as TRL ships it, without the recipe's SFT term: what the SFT term buys
    "dpo_sigmoid": ("train_dpo.py", "configs/dpo_tiny_cpu.yaml", ("--loss_type", "sigmoid", "--loss_weights", "1.0")),
    "chapter_unlikelihood": ("train_dpo.py", "configs/dpo_chapter_unlikelihood_cpu.yaml", ()),
    "chapter_linear": ("train_dpo.py", "configs/dpo_chapter_linear_cpu.yaml", ()),
    "simpo": ("train_dpo.py", "configs/simpo_tiny_cpu.yaml", ("--method", "simpo")),
    "orpo": ("train_dpo.py", "configs/orpo_tiny_cpu.yaml", ("--method", "orpo")),
    "kto": ("train_dpo.py", "configs/kto_tiny_cpu.yaml", ("--method", "kto")),
    "reward_model": ("train_reward.py", "configs/reward_tiny_cpu.yaml", ()),
    "grpo": ("train_rl.py", "configs/grpo_tiny_cpu.yaml", ("--method", "grpo")),
    "rloo": ("train_rl.py", "configs/rloo_tiny_cpu.yaml", ("--method", "rloo")),
    "online_dpo": ("train_rl.py", "configs/online_dpo_tiny_cpu.yaml", ("--method", "online_dpo")),
    "grpo_reward_model": ("train_rl.py", "configs/grpo_tiny_cpu.yaml", ("--method", "grpo")),
    "dpo_grpo": ("train_rl.py", "configs/grpo_after_dpo_cpu.yaml", ("--method", "grpo")),
    "iterated_dpo": ("train_dpo.py", "configs/dpo_tiny_cpu.yaml", ()),
    "slot_sft": ("train_sft.py", "configs/sft_rhyme_slots_cpu.yaml", ()),
    "slot_sft_grpo": ("train_rl.py", "configs/grpo_after_sft_cpu.yaml", ("--method", "grpo")),
}
# Methods that go on from another method's model: dpo_grpo is DPO (its own stage, into data/dpo_<rule>), then GRPO
# with the rule on the DPO model's poems. Corpus pairs teach the form; only the policy's own poems show its slips.
STARTS_FROM = {"dpo_grpo": "dpo", "iterated_dpo": "dpo", "slot_sft_grpo": "slot_sft"}
# Methods whose last stage learns from pairs of the first stage's own poems, labelled by the rule
# (build_dataset.py --on_policy_model): iterated DPO's second round, the offline cousin of dpo_grpo.
ON_POLICY_PAIRS = {"iterated_dpo"}
# Per-rule settings of a method's recipe, chosen on validation (docs/recipes.md, "七言: 100 GRPO steps"): a 七言 poem
# has 40% more characters to slip on, and 50 GRPO steps after DPO leave slips that 100 remove (97.1% -> 98.3%, p 4e-4);
# 五言 keeps 50 (98.4% vs 97.9% at 100, p 0.18). They come after the recipe and before the user's own overrides.
RULE_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {("dpo_grpo", "seven_char"): ("--max_steps", "100")}
# The recipe the headline reports (docs/recipes.md): on validation, 50 GRPO steps after DPO took strict 五言 from
# 96.3% to 98.9% (two base models, paired p = 6e-10).
DEFAULT_METHOD = "dpo_grpo"
# The rhyme road (docs/prosody.md, "A model that rhymes"): DPO and GRPO from the plain base leave rhyme near 0-6%.
RHYME_RULES = ("rhyme", "five_char_rhyme", "gelv")
DEFAULT_METHODS = {rule: "slot_sft_grpo" for rule in RHYME_RULES}
# Methods that need a base model whose embeddings start with a direction per rhyme group; without it the rhyme
# slot fine-tune moves the rhyme probe +11.3 points instead of +28.9, and GRPO after it rhymes 58.6% against 73.2%.
RHYME_BASE_METHODS = ("slot_sft", "slot_sft_grpo")
# It also learns the prompt's markers (prompt_loss all, where the default base has text): on validation the road
# rhymed 75.3% / 83.5% of strict 五言 from two text bases, 85.4% / 83.7% from two all bases (docs/prosody.md).
RHYME_BASE, RHYME_BASE_FLAGS = "data/base_model_rhyme", ("--rhyme_group_init", "1.0", "--prompt_loss", "all")
# The slot fine-tune reads the rhyme rule's poems (五言 and 七言) whatever the rule: the 五言 ones alone have half the
# rhyme slots, and GRPO after them reached 33.5% against 80.1% on validation. Trained once, if missing.
SFT_RULE = "rhyme"
SLOT_SFT_DIR = f"data/slot_sft_{SFT_RULE}"


@dataclass
class PipelineArguments:
    method: str | None = field(
        default=None,
        metadata={"help": "The training road. Default: slot_sft_grpo for the rules rhyme, five_char_rhyme and gelv, "
                  "else dpo_grpo. slot_sft_grpo: a base model with rhyme-group embeddings (data/base_model_rhyme, "
                  "trained if missing), a fine-tune on the rhyme rule's poems with the rhyme slots weighted x100 "
                  "(train_sft.py, into data/slot_sft_rhyme if missing), then 100 GRPO steps with the rule; slot_sft: "
                  "that fine-tune alone. dpo_grpo: DPO into data/dpo_<rule> (recipe: --dpo_config, "
                  "default DPO's), then 50 GRPO steps (100 for seven_char: RULE_OVERRIDES) with the rule on that "
                  "model's own poems (--config; the extra arguments go to this last stage); dpo: DPO alone (sigmoid "
                  "+ SFT); dpo_sigmoid: DPO's recipe "
                  "without its SFT term (TRL's sigmoid loss alone); chapter_unlikelihood / "
                  "chapter_linear: the chapter's objectives (a) and (b), DPO's recipe with the loss swapped; simpo / "
                  "orpo / kto: TRL's CPOTrainer (SimPO), ORPOTrainer, KTOTrainer, DPO's recipe with the objective "
                  "swapped; "
                  "reward_model: a reward model on the pairs (no policy: its held-out accuracy is the result); "
                  "grpo / rloo: RL on the model's own poems, the rule as reward; online_dpo: TRL's online DPO, two "
                  "poems per title, the rule picks the chosen one; grpo_reward_model: GRPO rewarded "
                  "by a reward model (trained first if --reward_model is missing); iterated_dpo: DPO, then a second "
                  "DPO round (same recipe) on pairs of the DPO model's own poems for train titles, labelled by the "
                  "rule (into <pairs_dir>_on_policy).", "choices": list(METHODS)},
    )
    rule: str = field(default="five_char",
                      metadata={"help": "Which poems to prefer.", "choices": sorted(RULES)})
    pairing: str = field(default=DEFAULT_PAIRING, metadata={"help": "Pairing strategy of build_dataset.py.",
                                                      "choices": list(STRATEGIES)})
    near_miss_share: float = field(
        default=DEFAULT_NEAR_MISS_SHARE, metadata={"help": "Share of near-miss train pairs (build_dataset.py)."}
    )
    corpus: str = field(default=str(DEFAULT_CORPUS), metadata={"help": "Corpus directory or file (chinese-poetry)."})
    pairs_dir: str | None = field(default=None, metadata={"help": "Where the pairs go (default: data/pairs_<rule>)."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model directory; trained with train_base.py if missing. Default: data/base_model, "
                  "or data/base_model_rhyme (trained with --rhyme_group_init 1.0 --prompt_loss all) for slot_sft and "
                  "slot_sft_grpo."},
    )
    base_config: str = field(default="configs/base_tiny_cpu.yaml", metadata={"help": "Recipe for train_base.py."})
    config: str | None = field(
        default=None, metadata={"help": "Recipe for the training script (default: the method's own, in configs/)."}
    )
    dpo_config: str | None = field(
        default=None, metadata={"help": "The old name of --config, for the methods trained by train_dpo.py."}
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "grpo_reward_model only: the reward model directory, trained with train_reward.py and "
                  "its recipe if missing (default: data/reward_model_<rule>)."},
    )
    output_dir: str | None = field(default=None,
                                   metadata={"help": "Training output (default: data/<method>_<rule>)."})
    validation_size: float = field(default=DEFAULT_VALIDATION_SIZE,
                                   metadata={"help": "Share of titles held out for validation (every stage)."})
    test_size: float = field(default=DEFAULT_TEST_SIZE,
                             metadata={"help": "Share of titles held out for test (every stage)."})
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the title hash (every stage)."})
    num_titles: int = field(default=300, metadata={"help": "Random test titles sampled for in evaluation."})
    poems_per_title: int = field(default=4, metadata={"help": "Poems per title in evaluation (K)."})
    seeds: int = field(default=1, metadata={"help": "Sampling seeds in evaluation; counts are pooled."})
    fork_stages: bool = field(
        default="forkserver" in multiprocessing.get_all_start_methods(),
        metadata={"help": "Run each stage's script in a process forked from multiprocessing's fork server, which "
                  "imports torch, transformers, datasets and TRL's trainers once (each stage still has its own "
                  "memory, freed when it ends). false: a new Python interpreter per stage, each importing them "
                  "again (~10 s a stage on a 2-core CPU). Default: true where the platform has a fork server."},
    )


def training_inputs(model: str, dataset: str, rule: str) -> list[str]:
    """The flags every training script takes: the model it starts from, the pairs it reads, the rule they follow.
    A stage that goes on from another stage's model or poems builds its own, rather than patching a list."""
    return ["--model_name_or_path", model, "--dataset_name", dataset, "--rule", rule]


FORK_STAGES = False  # main() sets it from --fork_stages
# What the stages' scripts import first (torch, transformers, datasets, TRL's trainers), imported once by the fork
# server that every stage is forked from.
PRELOAD = ["poemdpo.evaluation.evaluate", "poemdpo.models.base_model", "poemdpo.training.methods",
           "poemdpo.training.rl", "poemdpo.training.sft"]


def headline(report: dict) -> str:
    """evaluate.py's own headline. Imported when it is printed, not at start: the evaluation module brings torch and
    TRL (~0.5 GB, seconds), which the pipeline's own process otherwise never needs; the stages' fork server has them."""
    from poemdpo.evaluation.evaluate import headline as evaluation_headline

    return evaluation_headline(report)


def run_stage(name: str, command: list[str]) -> float:
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    returncode = run_forked(command) if FORK_STAGES else subprocess.run([sys.executable, *command], cwd=ROOT).returncode
    if returncode != 0:
        sys.exit(f"pipeline: the {name} stage failed (exit code {returncode}); its output is above")
    return time.perf_counter() - start


def run_forked(command: list[str]) -> int:
    """`python script args...` in ROOT, forked from multiprocessing's fork server, which imported PRELOAD once
    when the first stage started; the exit code. The server itself never runs torch, so a fork of it may (a fork of a
    process whose OpenMP threads have run hangs in its first parallel op). As the interpreter would, the child writes
    to this process's stdout and stderr as they are now, and prints the traceback of an uncaught exception (exit
    code 1) or the message of `sys.exit("...")` (1)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    sys.stdout.flush()
    sys.stderr.flush()
    stage = context.Process(target=run_script, args=(str(ROOT), list(command), StdioForChild()), name=command[0])
    stage.start()
    try:
        stage.join()
    except BaseException:  # as subprocess.run does: a stage outlives no interrupted pipeline
        stage.kill()
        stage.join()
        raise
    return stage.exitcode


class StdioForChild:
    """File descriptors 1 and 2 of this process, sent with a stage to its fork (`multiprocessing.reduction.DupFd`,
    while the stage is being started): it arrives as a pair whose `detach()` gives the child its own copies."""

    def __reduce__(self):
        return tuple, ((reduction.DupFd(1), reduction.DupFd(2)),)


def run_script(root: str, command: list[str], stdio: tuple) -> None:
    """The child's side of `run_forked`: stdout and stderr onto the pipeline's, the script as __main__ from `root`,
    then the exit handlers it registered (multiprocessing leaves those to the interpreter, which a fork never
    reaches)."""
    for fd, handle in zip((1, 2), stdio, strict=True):
        copy = handle.detach()
        os.dup2(copy, fd)
        os.close(copy)
    os.chdir(root)
    sys.argv = list(command)
    sys.path[0] = root
    try:
        runpy.run_path(command[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def recipe_of(args: PipelineArguments) -> str:
    """--config, else --dpo_config (its old name, train_dpo.py's methods only), else the method's own recipe.
    (For a method that starts from DPO's model, --dpo_config is that first stage's recipe: first_recipe_of.)"""
    script, recipe, _ = METHODS[args.method]
    if args.method in STARTS_FROM:
        return args.config or recipe
    if args.dpo_config is not None:
        if script != "train_dpo.py":
            sys.exit(f"pipeline: --dpo_config is a recipe for train_dpo.py; --method {args.method} trains with "
                     f"{script}: pass its recipe as --config")
        if args.config is not None and args.config != args.dpo_config:
            sys.exit("pipeline: --dpo_config is the old name of --config; give one of them")
    return args.config or args.dpo_config or recipe


def left_by_a_run(model_dir: str) -> bool:
    """Whether `model_dir` (under ROOT) holds a model an earlier run saved: its config.json is there."""
    return (ROOT / model_dir / "config.json").is_file()


def first_recipe_of(args: PipelineArguments) -> str:
    """The recipe of the stage a STARTS_FROM method goes on from: --dpo_config, else that method's own."""
    return args.dpo_config or METHODS[STARTS_FROM[args.method]][1]


def sft_pairs(args: PipelineArguments, dataset: list[str], seconds: dict[str, float]) -> str:
    """The rhyme rule's pairs, whose chosen poems the slot fine-tune reads: the run's own pairs under that rule,
    else data/pairs_rhyme, built beside them."""
    if args.rule == SFT_RULE:
        return args.pairs_dir or f"data/pairs_{SFT_RULE}"
    path = f"data/pairs_{SFT_RULE}"
    rule_flag = dataset.index("--rule") + 1
    seconds["fine-tune poems"] = run_stage("fine-tune poems", [*dataset[:rule_flag], SFT_RULE,
                                                               *dataset[rule_flag + 1:], "--output_dir", path])
    return path


def check_rhyme_base(base_model: str) -> None:
    """The rhyme road's own base, left by an earlier run, is reused only if it learned what RHYME_BASE_FLAGS ask of
    the prompt (a base from before prompt_loss existed learned all of it)."""
    wanted = RHYME_BASE_FLAGS[RHYME_BASE_FLAGS.index("--prompt_loss") + 1]
    if base_model != RHYME_BASE or not left_by_a_run(base_model):
        return
    trained = read_run_info(ROOT / base_model).get("prompt_loss", "all")
    if trained != wanted:
        sys.exit(f"pipeline: {base_model} was trained with prompt_loss {trained}, not the rhyme road's {wanted}; "
                 f"delete it (and {SLOT_SFT_DIR}) to train it again")


def check_slot_sft(base_model: str) -> None:
    """A fine-tune left by an earlier run is reused only if it was made from this run's base model, with the
    recipe's settings, and that base is still there (otherwise a stale fine-tune would be reused without a word)."""
    if not left_by_a_run(SLOT_SFT_DIR):
        return
    info = read_run_info(ROOT / SLOT_SFT_DIR)
    if info.get("base_model") != base_model:
        sys.exit(f"pipeline: {SLOT_SFT_DIR} was fine-tuned from {info.get('base_model')!r}, not from the base model "
                 f"{base_model!r}; delete it to fine-tune again, or pass --base_model {info.get('base_model')}")
    from poemdpo.training.sft import RECORDED_SETTINGS  # only here: the module imports torch and TRL

    recipe = read_recipe(["--config", str(PROJECT / METHODS["slot_sft"][1])])
    for key in RECORDED_SETTINGS:
        if key in recipe and info.get(key) != recipe[key]:
            sys.exit(f"pipeline: {SLOT_SFT_DIR} was fine-tuned with {key} {info.get(key)}, not the recipe's "
                     f"{recipe[key]} ({METHODS['slot_sft'][1]}); delete it to fine-tune again")
    if not left_by_a_run(base_model):  # the base is about to be trained anew
        sys.exit(f"pipeline: {SLOT_SFT_DIR} was fine-tuned from an earlier {base_model}, which is gone; delete it "
                 f"to fine-tune again from the base this run trains")


def slot_sft_stage(args: PipelineArguments, model: str, dataset: list[str], seconds: dict[str, float]) -> str:
    """The rhyme slot fine-tune slot_sft_grpo goes on from, into data/slot_sft_rhyme; trained if missing, as the
    base model is (its poems and recipe do not depend on the run's rule), and refused if another base made it."""
    out = SLOT_SFT_DIR
    if not left_by_a_run(out):
        script, recipe, _ = METHODS["slot_sft"]
        inputs = training_inputs(model, sft_pairs(args, dataset, seconds), SFT_RULE)
        seconds["slot_sft"] = run_stage("slot_sft", [script, "--config", recipe, *inputs, "--output_dir", out])
    return out


def print_times(seconds: dict[str, float]) -> None:
    print("time      " + "  ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"  total {sum(seconds.values()) / 60:.1f} min")


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(PipelineArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    args, overrides = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    args.method = args.method or DEFAULT_METHODS.get(args.rule, DEFAULT_METHOD)
    global FORK_STAGES
    FORK_STAGES = args.fork_stages
    rhyme_base = args.method in RHYME_BASE_METHODS
    base_flags = RHYME_BASE_FLAGS if rhyme_base else ()
    args.base_model = args.base_model or (RHYME_BASE if rhyme_base else "data/base_model")
    if rhyme_base:
        check_rhyme_base(args.base_model)
    if STARTS_FROM.get(args.method) == "slot_sft":
        if args.dpo_config is not None:
            sys.exit("pipeline: --dpo_config is the DPO stage's recipe; --method slot_sft_grpo has none (its fine-tune "
                     "reads configs/sft_rhyme_slots_cpu.yaml)")
        check_slot_sft(args.base_model)
    if args.reward_model is not None and args.method != "grpo_reward_model":
        sys.exit(f"pipeline: --reward_model is the judge of --method grpo_reward_model, not of {args.method}")
    script, _, method_args = METHODS[args.method]
    recipe = recipe_of(args)
    pairs = args.pairs_dir or f"data/pairs_{args.rule}"
    output_dir = args.output_dir or f"data/{args.method}_{args.rule}"
    seconds = {}

    # 1. The preference pairs, split by title.
    splits = split_flags(args.validation_size, args.test_size, args.split_seed)
    dataset = ["build_dataset.py", "--corpus", args.corpus, "--rule", args.rule, "--pairing", args.pairing,
               "--near_miss_share", str(args.near_miss_share), *splits]
    seconds["dataset"] = run_stage("dataset", [*dataset, "--output_dir", pairs])

    # 2. The base model, if missing.
    if not left_by_a_run(args.base_model):
        seconds["base model"] = run_stage("base model", ["train_base.py", "--config", args.base_config,
                                                         "--corpus", args.corpus, "--output_dir", args.base_model,
                                                         *base_flags, *splits])

    # 3. Training: every script takes the same model, data, rule and output flags (the RL recipes name a rule).
    model, train_pairs = args.base_model, pairs
    if args.method in STARTS_FROM:  # the first stage, as its own method runs it; the second goes on from its model
        first = STARTS_FROM[args.method]
        first_script, _, first_args = METHODS[first]
        if first == "slot_sft":
            first_dir = slot_sft_stage(args, model, dataset, seconds)
        else:
            first_dir = f"data/{first}_{args.rule}"
            seconds[first] = run_stage(first, [first_script, *first_args, "--config", first_recipe_of(args),
                                               *training_inputs(model, pairs, args.rule), "--output_dir", first_dir])
        model = first_dir
    if args.method in ON_POLICY_PAIRS:  # the second round's pairs: the first stage's poems, labelled by the rule
        train_pairs = f"{pairs}_on_policy"
        seconds["on-policy pairs"] = run_stage("on-policy pairs", [*dataset, "--on_policy_model", model,
                                                                   "--output_dir", train_pairs])
    common = training_inputs(model, train_pairs, args.rule)
    if args.method == "slot_sft":  # the fine-tune is the whole road: its poems are the rhyme rule's
        common = training_inputs(model, sft_pairs(args, dataset, seconds), SFT_RULE)
    if args.method == "grpo_reward_model":
        reward_dir = args.reward_model or f"data/reward_model_{args.rule}"
        if not left_by_a_run(reward_dir):
            reward_script, reward_recipe, _ = METHODS["reward_model"]
            seconds["reward_model"] = run_stage("reward_model", [reward_script, "--config", reward_recipe, *common,
                                                                 "--output_dir", reward_dir])
        method_args = (*method_args, "--reward_model", reward_dir)
    seconds[args.method] = run_stage(args.method, [script, *method_args, "--config", recipe, *common,
                                                   "--output_dir", output_dir,
                                                   *RULE_OVERRIDES.get((args.method, args.rule), ()), *overrides])

    # 4. A reward model writes no poems: its result is the held-out accuracy train_reward.py recorded.
    if args.method == "reward_model":
        accuracy = read_run_info(ROOT / output_dir).get("reward_accuracy")
        if not accuracy:
            sys.exit(f"pipeline: {output_dir}/poemdpo.json records no reward accuracy; train_reward.py writes it")
        print("\n=== poem-dpo: done")
        print(f"{args.rule} reward model {output_dir}, accuracy on held-out pairs (a tie counts as wrong):")
        for split, a in accuracy.items():
            print(f"{split:10s} accuracy {a['accuracy']:.1%}  mean margin {a['margin']:.3f}  ({a['pairs']} pairs)")
        print_times(seconds)
        print(f"card      {output_dir}/README.md")
        return {"reward_accuracy": accuracy, "seconds": seconds}

    # 5. Evaluation of the trained policy against the base model, on random test titles.
    seconds["evaluation"] = run_stage("evaluation", ["evaluate.py", "--model", output_dir, "--reference",
                                                     args.base_model, "--dataset", pairs, "--split", "test",
                                                     "--num_titles", str(args.num_titles), "--poems_per_title",
                                                     str(args.poems_per_title), "--seeds", str(args.seeds)])
    report = json.loads((ROOT / output_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    print("\n=== poem-dpo: done")
    print(headline(report))
    print_times(seconds)
    print(f"report    {output_dir}/eval/report.md")
    return {"report": report, "seconds": seconds}


if __name__ == "__main__":
    main()
