"""SimPO, ORPO and KTO as methods of train_dpo.py (poemdpo/training/methods.py): each trains end to end on a tiny Llama
with the char tokenizer, its loss is TRL's as TRL logs it, its run is recorded and evaluated; the ids SimPO and ORPO
train on are DPO's; KTO reads the pairs unpaired in mixed batches; wrong settings stop with the key named; the
recipes are the DPO recipe with the objective swapped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, load_dataset
from test_train_dpo import tiny_model_dir
from tiny_models import REPO, dpo_argv, make_pairs_dir, make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer, TrlParser

import train_dpo
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.evaluate import EvalArguments, headline, resolve_training_settings, run
from poemdpo.models.tokenizer import train_char_tokenizer
from poemdpo.run_info import read_run_info
from poemdpo.training.dpo import to_conversational
from poemdpo.training.methods import (
    METHODS,
    OBJECTIVE_KEYS,
    RECIPES,
    TRAINERS,
    CPOTrainer,
    ORPOTrainer,
    check_method_keys,
    check_method_settings,
    parser_classes,
    unpaired,
)

NEW_METHODS = ("simpo", "orpo", "kto")
# Batch 1 for SimPO: its logged margin is then the one pair's, and the loss can be recomputed from it exactly.
BATCH = {"simpo": "1", "orpo": "4", "kto": "4"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs_dir(tmp_path_factory.mktemp("methods"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, pairs) -> str:
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "model", "llama", pairs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs, base):
    """train_dpo.main for a method, two steps from its own recipe; each method trained once per module."""
    done = {}

    def train(method: str):
        if method not in done:
            out = tmp_path_factory.mktemp(method) / "out"
            argv = dpo_argv(base, pairs, out, "--method", method, "--max_steps", "2",
                            "--per_device_train_batch_size", BATCH[method], config=REPO / RECIPES[method])
            done[method] = (train_dpo.main(argv), out)
        return done[method]

    return train


def logged(trainer, key: str) -> list[dict]:
    return [e for e in trainer.state.log_history if key in e and "loss" in e]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_trains_saves_and_records_its_run(runs, base, method):
    trainer, out = runs(method)
    assert type(trainer) is TRAINERS[method] and trainer.state.global_step == 2
    # The saved model loads with plain transformers and moved away from the base model.
    loaded, start = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), start.state_dict().values(),
                                                      strict=True))
    info = read_run_info(out)
    assert info["stage"] == method and info["train_pairs"] == 16 and info["base_model"] == base
    recipe = yaml.safe_load((REPO / RECIPES[method]).read_text(encoding="utf-8"))
    assert {key: info[key] for key in OBJECTIVE_KEYS[method]} == {key: recipe[key] for key in OBJECTIVE_KEYS[method]}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"train_dpo.py --method {method}" in card and f"- {method}" in card and "eval_rewards/margins" in card
    # Sample poems were written, their rates joined the training log.
    assert (out / "samples.md").is_file() and logged(trainer, "samples/five_char_rate")


def test_simpo_loss_is_trl_simpo_loss(runs):
    trainer, _ = runs("simpo")
    beta, gamma = trainer.args.beta, trainer.args.simpo_gamma
    alpha = trainer.args.cpo_alpha
    assert (beta, gamma, alpha, trainer.args.loss_type) == (2.0, 1.0, 1.0, "simpo")
    entries = logged(trainer, "rewards/margins")
    assert len(entries) == 2
    for entry in entries:  # one pair a step: the loss of its logged margin, plus the NLL of its chosen poem
        assert entry["nll_loss"] > 0.0
        # rewards are β × mean per-token log-prob, no reference
        assert entry["rewards/margins"] == pytest.approx(beta * (entry["logps/chosen"] - entry["logps/rejected"]),
                                                         rel=1e-4, abs=1e-5)
        expected = math.log1p(math.exp(-(entry["rewards/margins"] - gamma)))  # −log σ(β·Δ − γ)
        assert entry["loss"] == pytest.approx(expected + alpha * entry["nll_loss"], rel=1e-4)


def test_orpo_loss_is_trl_orpo_loss(runs):
    trainer, _ = runs("orpo")
    entries = logged(trainer, "log_odds_ratio")
    assert len(entries) == 2
    for entry in entries:  # the chosen poem's NLL − β · mean log σ(log-odds ratio)
        assert entry["loss"] == pytest.approx(entry["nll_loss"] - trainer.args.beta * entry["log_odds_ratio"],
                                              rel=1e-4)


def test_kto_loss_is_trl_kto_loss_against_the_frozen_start(runs, base):
    trainer, _ = runs("kto")
    first = logged(trainer, "kl")[0]
    # Before its first step the policy is its reference: every log-ratio and the KL estimate are 0, so each poem's
    # loss is 1 − σ(0), desirable or not.
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    assert all(first[k] == pytest.approx(0.0, abs=1e-6) for k in ("rewards/chosen", "rewards/rejected") if k in first)
    # The reference is a frozen copy of the base model (poem-dpo's loader), untouched by training.
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    start = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for name, tensor in trainer.ref_model.state_dict().items():
        assert torch.equal(tensor, start[name]), name
    assert trainer.args.train_sampling_strategy == "sequential"  # the order is unpaired()'s


def test_a_reference_free_run_is_evaluated_without_dpo_rewards(runs, pairs, tmp_path):
    _, out = runs("simpo")
    report = run(EvalArguments(model=str(out), dataset=str(pairs), split="test", num_titles=2, poems_per_title=1,
                               max_new_tokens=12, batch_size=8, max_eval_pairs=4, max_held_out_poems=4, max_kl_poems=2,
                               output_dir=str(tmp_path / "eval")))
    assert report["rewards"] is None and report["training_settings"]["beta"] is None
    assert report["models"]["aligned"]["kl_to_reference"]["n"] == 2  # the rest of the protocol as for DPO
    assert "rewards   none: a simpo run, trained without a reference model" in headline(report)
    assert "No DPO implicit rewards (none: a simpo run" in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("info, beta, expected", [
    ({"stage": "simpo", "beta": 2.0}, None, None),
    ({"stage": "orpo", "beta": 0.1}, None, None),
    ({"stage": "orpo", "beta": 0.1}, 0.5, 0.5),  # --beta asks for them anyway
    ({"stage": "kto", "beta": 0.1}, None, 0.1),  # a log-ratio to the reference, as DPO's
    ({"stage": "grpo", "beta": 0.04}, None, 0.04),
    ({"stage": "dpo", "beta": 0.5, "ld_alpha": 0.5}, None, 0.5),
])
def test_dpo_rewards_only_for_runs_held_to_a_reference(info, beta, expected):
    assert resolve_training_settings(EvalArguments(beta=beta), info)["beta"] == expected


# --- the ids trained on, and KTO's rows ----------------------------------------------------------------------------

ROWS = [
    {"prompt": build_prompt("月"), "chosen": "白日依山盡，黃河入海流。", "rejected": "君不見，黃河之水天上來。"},
    {"prompt": build_prompt("秋夜"), "chosen": "床前明月光，疑是地上霜。",
     "rejected": "月落烏啼霜滿天，江楓漁火對愁眠。"},
]


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(  # the tokenizer's ids are all that matters here
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    """The char tokenizer (it has a bos, and never puts it anywhere), and chat models whose templates end a turn."""
    root = tmp_path_factory.mktemp("tokenizers")
    found = {"char": train_char_tokenizer([r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")],
                                          min_frequency=1)}
    for family in ("llama", "qwen2", "gemma2"):
        found[family] = AutoTokenizer.from_pretrained(make_tiny_model(root / family, family))
    return found


@pytest.mark.parametrize("family", ["char", "llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("method, plain", [("simpo", CPOTrainer), ("orpo", ORPOTrainer)])
def test_simpo_and_orpo_train_on_the_ids_dpo_trains_on(tmp_path, tokenizers, family, method, plain):
    tokenizer = tokenizers[family]
    rows = Dataset.from_list(ROWS) if family == "char" else to_conversational(Dataset.from_list(ROWS))
    common = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none", "max_length": 256,
              "activation_checkpointing": False}
    dpo = DPOTrainer(tiny_model(tokenizer), tiny_model(tokenizer), DPOConfig(**common), train_dataset=rows,
                     processing_class=tokenizer).train_dataset
    extra = {"loss_type": "simpo", "cpo_alpha": 0.0} if method == "simpo" else {}
    args = METHODS[method](**common, **extra)
    ours = TRAINERS[method](tiny_model(tokenizer), args=args, train_dataset=rows,
                            processing_class=tokenizer).train_dataset
    for column in ("chosen", "rejected"):
        expected = [p + c for p, c in zip(dpo["prompt_ids"], dpo[f"{column}_ids"], strict=True)]
        assert ours[f"{column}_input_ids"] == expected
        # the loss reads the completion only, as DPO's completion mask does
        assert [sum(label != -100 for label in labels) for labels in ours[f"{column}_labels"]] == \
            [len(ids) for ids in dpo[f"{column}_ids"]]
    # TRL's own trainer puts a bos first that neither DPO nor sampling ever writes after (char), or an eos after
    # the template's end of turn (qwen2, gemma2); the Llama-3 template's ids it gets right.
    theirs = plain(tiny_model(tokenizer), args=args, train_dataset=rows, processing_class=tokenizer).train_dataset
    assert (theirs["chosen_input_ids"] != ours["chosen_input_ids"]) == (family != "llama")


def test_kto_reads_the_pairs_unpaired_in_mixed_batches(pairs):
    train = load_dataset(str(pairs))["train"].select(range(32))
    train = train.map(lambda row: {"length": len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"]))})
    batch = 4

    def batches(rows):
        return [rows.select(range(i, i + batch)) for i in range(0, len(rows), batch)]

    def mixed(rows) -> int:
        return sum(len(set(b["label"])) == 2 for b in batches(rows))

    def spread(rows) -> float:  # the padding a batch carries: its longest poem minus its shortest, on average
        return sum(max(b["length"]) - min(b["length"]) for b in batches(rows)) / (len(rows) // batch)

    orders = {order: unpaired(train, order, batch, seed=0) for order in ("sequential", "random", "group_by_length")}
    for rows in orders.values():  # every pair as its chosen poem, desirable, and its rejected poem, not
        assert len(rows) == 64 and sum(rows["label"]) == 32
        assert sorted(zip(rows["prompt"], rows["completion"], rows["label"], strict=True)) == sorted(
            [(p, c, True) for p, c in zip(train["prompt"], train["chosen"], strict=True)]
            + [(p, r, False) for p, r in zip(train["prompt"], train["rejected"], strict=True)])
        assert rows["length"] == [len(p) + len(c) for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
    # TRL's own order: all chosen poems first, every batch one label (why the rows are ordered here).
    assert mixed(orders["sequential"]) == 0
    assert mixed(orders["random"]) >= 10 and mixed(orders["group_by_length"]) >= 10  # of 16 batches
    assert spread(orders["group_by_length"]) < spread(orders["random"]) / 2
    assert orders["random"]["completion"] == unpaired(train, "random", batch, seed=0)["completion"]  # seeded


# --- refusals, help, recipes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/dpo_tiny_cpu.yaml", "--method", "simpo"],
     "'ld_alpha' is a setting of dpo, not of simpo (CPOConfig has no such field)"),
    (["--method", "dpo", "--desirable_weight", "2.0"], "'desirable_weight' is a setting of kto, not of dpo"),
    (["--method", "orpo", "--precompute_ref_log_probs", "true"],
     "'precompute_ref_log_probs' is a setting of dpo and kto, not of orpo"),
    (["--method", "simpo", "--loss_type", "sigmoid"],
     "method simpo is CPOConfig with loss_type 'simpo'; loss_type 'sigmoid' is another objective"),
    (["--method", "kto", "--loss_type", "apo_zero_unpaired"], "method kto is KTOConfig with loss_type 'kto'"),
    (["--method", "orpo", "--max_completion_length", "64"],
     "max_completion_length is read by ORPOTrainer for encoder-decoder models only"),
    (["--method", "simpo", "--max_prompt_length", "64"], "'max_prompt_length' is not a CPO setting in TRL 1.x"),
    (["--method", "kto", "--per_device_train_batch_size", "1"], "per_device_train_batch_size must be at least 2"),
    (["--config", "configs/kto_tiny_cpu.yaml", "--method", "orpo"],
     "the recipe trains method 'kto' and the command line asks for 'orpo'"),
    (["--method", "grpo"], "unknown method 'grpo'"),
])
def test_settings_that_do_not_apply_stop_with_the_key_named(tmp_path, pairs, base, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_dpo.main([*argv, "--model_name_or_path", base, "--dataset_name", str(pairs), "--output_dir", str(out),
                        "--report_to", "none"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method, fields, foreign", [
    ("simpo", ("--simpo_gamma", "--cpo_alpha"), "--ld_alpha"),
    ("orpo", ("--beta",), "--simpo_gamma"),
    ("kto", ("--desirable_weight", "--undesirable_weight"), "--loss_weights"),
    ("dpo", ("--ld_alpha", "--loss_weights"), "--simpo_gamma"),
])
def test_help_lists_the_method_config_fields(capsys, method, fields, foreign):
    with pytest.raises(SystemExit) as exit_info:
        train_dpo.main(["--method", method, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert all(f"{field} " in printed for field in fields) and f"{foreign} " not in printed


def read_recipe(path) -> dict:
    return yaml.safe_load((REPO / path).read_text(encoding="utf-8"))


OBJECTIVE = {"method", "loss_type", "loss_weights", "beta", "ld_alpha", "precompute_ref_log_probs", "simpo_gamma",
             "cpo_alpha", "desirable_weight", "undesirable_weight", "output_dir"}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_recipes_are_the_dpo_recipe_with_the_objective_swapped(method):
    """A methods-table row compares objectives: any other difference from the DPO recipe would be measured too."""
    dpo, recipe = read_recipe(RECIPES["dpo"]), read_recipe(RECIPES[method])
    differ = {k for k in dpo.keys() | recipe.keys() if k not in OBJECTIVE and dpo.get(k) != recipe.get(k)}
    assert not differ, f"{RECIPES[method]} differs from the DPO recipe beyond the objective: {sorted(differ)}"
    assert recipe["method"] == method and recipe["output_dir"] == f"data/{method}_tiny_cpu"
    # Every key is the method's own and parses into its config, which the method's checks accept.
    check_method_keys(set(recipe), method)
    script_args, args, _ = TrlParser(parser_classes(method)).parse_args_and_config(
        ["--config", str(REPO / RECIPES[method])])
    assert script_args.method == method and type(args) is METHODS[method]
    check_method_settings(method, args)
    assert (args.bf16, args.activation_checkpointing, args.learning_rate) == (False, False, 3.0e-4)


def test_recipe_objective_values():
    """The objectives' hyper-parameters the recipes state (SimPO's paper setting for base models with CPO's NLL term,
    chosen on validation; ORPO's and KTO's defaults), not TRL's CPOConfig defaults (beta 0.1, simpo_gamma 0.5)."""
    simpo, orpo, kto = (read_recipe(RECIPES[m]) for m in NEW_METHODS)
    assert (simpo["beta"], simpo["simpo_gamma"] / simpo["beta"], simpo["cpo_alpha"]) == (2.0, 0.5, 1.0)
    assert orpo["beta"] == 0.1 and "loss_type" not in orpo
    assert (kto["beta"], kto["desirable_weight"], kto["undesirable_weight"]) == (0.1, 1.0, 1.0)

