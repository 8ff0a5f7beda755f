"""train_rl.py: the graded rule reward on hand-made poems; GRPO and RLOO end to end on a tiny char-level Llama, with
the rule and with a reward-model directory; a KL penalty to a frozen reference; bad input stopped in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_prosody import CHUN_WANG, DENG_GUAN_QUE_LOU, MIXED, swap
from test_reward import make_pairs_dir, tiny_base_dir
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

import train_rl
from poemdpo.data.rules import RULES, credit, preferred
from poemdpo.models import generation
from poemdpo.training import rl
from poemdpo.training.reward import score
from poemdpo.training.rl import (
    RewardModelReward,
    completion_length,
    make_rule_reward,
    rule_reward,
    short_prompts,
)

# Hand-made poems of characters the tiny tokenizer knows.
FIVE = "山水風月雲，花春秋日夜。\n人天江河長，城空寒白青。"
SEVEN = "山水風月雲花春，秋日夜人天江河。\n長城空寒白青紅，金玉清明高遠歸。"
THREE_OF_FOUR = "山水風月雲，花春秋日夜。\n人天江河長，城空寒白青紅。"  # the last line has six
ONE_OF_FOUR = "山水風月雲，花春秋日夜人。\n人天江河長天，城空寒白青紅。"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return make_pairs_dir(tmp_path_factory.mktemp("rl") / "pairs")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, pairs_dir) -> str:
    return tiny_base_dir(tmp_path_factory.mktemp("rl") / "base", pairs_dir)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, base_dir) -> str:
    """A reward-model directory as train_reward.py leaves one: a one-output head on the base backbone."""
    path = tmp_path_factory.mktemp("rl") / "reward"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- the rule as a graded reward ------------------------------------------------------------------------------


def test_rule_reward_grades_hand_made_poems():
    poems = [FIVE, SEVEN, THREE_OF_FOUR, ONE_OF_FOUR, ""]
    assert rule_reward(poems) == [1.0, 0.0, 0.375, 0.125, 0.0]
    assert rule_reward(poems, rule="seven_char") == [0.0, 1.0, 0.0, 0.0, 0.0]
    # jueju: a regular four-line poem of 5 or 7; an eight-line 五言 poem is regular but the wrong shape.
    assert rule_reward([FIVE, SEVEN, FIVE + "\n" + FIVE], rule="jueju") == [1.0, 1.0, 0.5]
    # Chat turns as TRL hands them for conversational prompts: the poem is the last turn's content.
    assert rule_reward([[{"role": "assistant", "content": FIVE}]]) == [1.0]
    # Partial credit never reaches the full reward, and near misses rank above wrecks: a group is not all ties.
    assert max(rule_reward([THREE_OF_FOUR, ONE_OF_FOUR, SEVEN])) <= 0.5
    assert len(set(rule_reward([THREE_OF_FOUR, ONE_OF_FOUR, SEVEN]))) == 3


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_grades_its_own_poems_full_and_a_wreck_zero(rule):
    """Each rule carries its partial credit (`rules.credit`): a rule added later cannot fall back to 0/1 ties."""
    poems = [FIVE, SEVEN, FIVE + "\n" + FIVE, DENG_GUAN_QUE_LOU, CHUN_WANG]
    mine = [p for p in poems if preferred(p, rule)]
    assert mine, f"no hand-made poem meets {rule}"
    assert [credit(p, rule) for p in mine] == [1.0] * len(mine)
    assert credit("，，，", rule) == 0.0 and rule_reward(["，，，"], rule=rule) == [0.0]
    assert all(0.0 <= credit(p, rule) <= 1.0 for p in poems + [THREE_OF_FOUR, ONE_OF_FOUR, MIXED])


def test_prosody_rules_give_credit_for_rhyme_half_kept():
    off_group = swap(DENG_GUAN_QUE_LOU, "流", "山")  # 山 is 平 in 十五刪: one of two even lines in 十一尤
    eight = CHUN_WANG  # rhymes in 十二侵 on its four even lines
    three_of_four = swap(eight, "簪", "天")  # 天 is 平 in 一先: three of four even lines in one group
    rewards = rule_reward([DENG_GUAN_QUE_LOU, off_group, eight, three_of_four, MIXED], rule="rhyme")
    assert rewards[0] == rewards[2] == 1.0
    # Half for the shape, half for the share of even lines in one group (1/2, 3/4), all times the miss's 0.5.
    assert rewards[1] == pytest.approx(0.5 * (0.5 + 0.5 * 1 / 2))
    assert rewards[3] == pytest.approx(0.5 * (0.5 + 0.5 * 3 / 4))
    assert rewards[4] < rewards[1] < rewards[3] < 0.5
    # gelv: the 格律 checks' share; a poem that rhymes but breaks one tone check still misses.
    broken = swap(DENG_GUAN_QUE_LOU, "黃河", "綠河")  # 孤平: six of seven checks
    assert rule_reward([DENG_GUAN_QUE_LOU, broken], rule="gelv") == [1.0, pytest.approx(0.5 * (0.5 + 0.5 * 6 / 7))]


def test_rule_reward_reads_token_ids_finished_and_unknown(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reward = make_rule_reward("five_char", tokenizer, [tokenizer.eos_token_id])
    ids = tokenizer(FIVE, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    eos = tokenizer.eos_token_id
    # Finished (ends in eos): full reward. Cut off by the length limit: only the partial credit.
    assert reward([FIVE], completion_ids=[ids + [eos]]) == [1.0]
    assert reward([FIVE], completion_ids=[ids]) == [0.5]
    # A rare character is an unknown token; TRL's decoded text drops it (a line of four), the ids keep its place.
    with_unknown = [tokenizer.unk_token_id if i == 2 else t for i, t in enumerate(ids)] + [eos]
    dropped = tokenizer.decode(with_unknown, skip_special_tokens=True)
    assert rule_reward([dropped]) == [0.375]
    assert reward([dropped], completion_ids=[with_unknown]) == [1.0]
    # A prompt marker written inside the poem is no character to drop: the poem no longer has the form.
    marker = tokenizer.convert_tokens_to_ids("<RES>")
    assert reward([FIVE], completion_ids=[ids[:2] + [marker] + ids[2:] + [eos]]) == [pytest.approx(0.375)]


# --- end to end -----------------------------------------------------------------------------------------------


def run(out: Path, base_dir: str, pairs_dir: Path, method: str, *extra: str):
    return train_rl.main([
        "--method", method, "--model_name_or_path", base_dir, "--dataset_name", str(pairs_dir),
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "48", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1",
        "--sample_titles", "3", "--sample_every_steps", "2", "--sample_max_new_tokens", "24",
        "--save_strategy", "no", "--report_to", "none", *extra,
    ])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rl_with_the_rule_keeps_a_kl_penalty_and_saves_a_loadable_policy(tmp_path, base_dir, pairs_dir, method,
                                                                          monkeypatch):
    draws = []  # rows of every next-token draw by the inverse-CDF sampler
    spy = generation.inverse_cdf_sample
    monkeypatch.setattr(generation, "inverse_cdf_sample", lambda probs: draws.append(len(probs)) or spy(probs))
    batches = []  # batches decoded by sample_dropping_finished
    dropping = generation.sample_dropping_finished
    monkeypatch.setattr(generation, "sample_dropping_finished",
                        lambda model, ids, *a, **k: batches.append(len(ids)) or dropping(model, ids, *a, **k))
    out = tmp_path / method
    trainer = run(out, base_dir, pairs_dir, method)
    # The training poems (8 per step) were drawn by the default sampler and decoded by our loop, not only the
    # sample table's 3.
    assert 8 in draws and batches.count(8) == 3
    assert type(trainer).__name__ == {"grpo": "PoemGRPOTrainer", "rloo": "PoemRLOOTrainer"}[method]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    # The recipe's KL penalty: beta > 0, logged with every step beside TRL's KL estimate.
    assert trainer.beta > 0 and all(e["beta"] == trainer.beta and "kl" in e for e in logs)
    assert all("rewards/rule_reward/mean" in e and e["generation/completions_per_second"] > 0 for e in logs)
    assert trainer.completions_generated == 3 * 8
    # The reference is a separate copy of the starting weights that the optimizer never sees.
    start = load_file(f"{base_dir}/model.safetensors")
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[name], tensor) for name, tensor in start.items() if name in reference)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in trainer.ref_model.parameters()}
    # The sample callback ran on this trainer: rates logged, table written.
    assert any("samples/five_char_rate" in e for e in trainer.state.log_history)
    assert "| title | aligned | reference |" in (out / "samples.md").read_text(encoding="utf-8")
    # Saved: a causal LM with the trained weights, its tokenizer, the card and the run record.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in loaded.state_dict().items())
    assert AutoTokenizer.from_pretrained(out).eos_token_id is not None
    info = json.loads((out / "poemdpo.json").read_text(encoding="utf-8"))
    assert info["stage"] == method and info["beta"] > 0 and info["reward"] == "rule:five_char"
    assert info["sampler"] == "inverse_cdf" and info["drop_finished"] is True
    assert info["max_completion_length"] == 48 and info["completions"] == 24
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"base_model: {base_dir}" in card and f"tags: [trl, {method}" in card and "rule_reward" in card


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rl_scores_only_the_poems_through_the_lm_head_with_trls_log_probs(tmp_path, base_dir, pairs_dir, method):
    """The compact head (poemdpo.training.speed) replaces TRL's CPU head, which projects prompts and padding too:
    per-token log-probs and entropies at TRL's temperature are TRL's, for left-padded prompts and right-padded poems."""
    trainer = run(tmp_path / method, base_dir, pairs_dir, method, "--max_steps", "1", "--temperature", "0.7")
    assert trainer.compact_lm_head
    trl_head = AutoModelForCausalLM.from_pretrained(tmp_path / method)  # the trained weights
    add_fused_lm_head(trl_head, temperature=0.7, outputs=("log_probs", "entropy"))
    tokenizer, pad = trainer.processing_class, trainer.processing_class.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("<INS>山<RES>", "<INS>水月山<RES>")]
    poems = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in (FIVE, "山水。")]
    width, keep = max(map(len, prompts)), max(map(len, poems))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p + c + [pad] * (keep - len(c))
                              for p, c in zip(prompts, poems, strict=True)])
    attention_mask = (input_ids != pad).long()
    ours = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, keep,
                                                      compute_entropy=True)
    theirs = trainer._get_per_token_logps_and_entropies(trl_head, input_ids, attention_mask, keep,
                                                        compute_entropy=True)
    mask = attention_mask[:, -keep:].bool()
    assert mask.sum() == sum(map(len, poems))
    for got, expected in zip(ours[:2], theirs[:2], strict=True):
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_ptx_adds_the_next_token_loss_of_corpus_poems_to_every_rl_step(tmp_path, base_dir, pairs_dir, monkeypatch):
    """PPO-ptx: the RL loss plus ptx_coef x the mean NLL of a batch of the train split's chosen poems."""
    calls = []
    rl_loss = torch.tensor(0.25)
    trainer = run(tmp_path / "ptx", base_dir, pairs_dir, "grpo", "--ptx_coef", "0.5", "--ptx_batch_size", "4",
                  "--sample_titles", "0")
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(e["ptx_nll"] > 0 for e in logs)
    info = json.loads((tmp_path / "ptx" / "poemdpo.json").read_text(encoding="utf-8"))
    assert info["ptx_coef"] == 0.5 and "PPO-ptx" in (tmp_path / "ptx" / "README.md").read_text(encoding="utf-8")
    # The term itself, on the next batch: TRL's loss (stubbed) + 0.5 x the model's own loss on those poems.
    monkeypatch.setattr(rl.GRPOTrainer, "compute_loss", lambda self, *a, **k: calls.append(1) or rl_loss)
    position = trainer._ptx_position
    batch = trainer.next_ptx_batch()
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] == -100).any()  # the prompts are not learned
    trainer._ptx_position = position
    model = trainer.model.train()
    with torch.no_grad():
        got = trainer.compute_loss(model, {})
        expected = rl_loss + 0.5 * model(**batch).loss
    assert calls and torch.allclose(got, expected)
    # Off by default: the loss is TRL's alone.
    trainer._ptx = None
    with torch.no_grad():
        assert trainer.compute_loss(model, {}) is rl_loss


def test_online_dpo_pairs_two_poems_per_title_and_the_rule_reads_each_poem_to_its_eos(tmp_path, base_dir, pairs_dir,
                                                                                    monkeypatch):
    seen = []  # the token ids the rule was handed, poem by poem
    spy = rl.rule_reward
    monkeypatch.setattr(rl, "rule_reward", lambda completions, **kw: seen.extend(kw["completion_ids"]) or spy(
        completions, **kw))
    out = tmp_path / "online_dpo"
    trainer = train_rl.main([
        "--method", "online_dpo", "--model_name_or_path", base_dir, "--dataset_name", str(pairs_dir),
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_new_tokens", "48",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--sample_titles", "3",
        "--sample_every_steps", "2", "--sample_max_new_tokens", "24", "--save_strategy", "no", "--report_to", "none",
    ])
    assert type(trainer).__name__ == "PoemOnlineDPOTrainer"
    # Two poems for each of 4 titles a step, every one scored by the rule from its own ids: a finished poem ends at
    # its (first) eos, with none of the batch's padding after it; an unfinished one runs the full 48 tokens.
    assert trainer.completions_generated == len(seen) == 3 * 4 * 2
    eos = trainer.eos_token_ids
    for ids in seen:
        assert not any(t in eos for t in ids[:-1])
        assert ids[-1] in eos or len(ids) == 48
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all("objective/scores" in e and e["beta"] == trainer.beta > 0 for e in logs)
    start = load_file(f"{base_dir}/model.safetensors")
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[name], tensor) for name, tensor in start.items() if name in reference)
    info = json.loads((out / "poemdpo.json").read_text(encoding="utf-8"))
    assert info["stage"] == "online_dpo" and info["num_generations"] == 2 and info["max_completion_length"] == 48
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "OnlineDPOTrainer" in card and '"max_new_tokens": 48' in card and "objective/scores" in card
    AutoModelForCausalLM.from_pretrained(out)


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<INS>{{ m['content'] }}<RES>"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)


def test_a_chat_model_gets_conversational_prompts(tmp_path, pairs_dir):
    base = tiny_base_dir(tmp_path / "chat_base", pairs_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    trainer = run(tmp_path / "chat", base, pairs_dir, "grpo", "--max_steps", "2")
    prompt = trainer.train_dataset[0]["prompt"]
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    assert all("rewards/rule_reward/mean" in e for e in trainer.state.log_history if "loss" in e)
    assert json.loads((tmp_path / "chat" / "poemdpo.json").read_text())["prompt_format"] == "chat"


def test_grpo_with_a_reward_model_directory(tmp_path, base_dir, pairs_dir, reward_dir):
    trainer = run(tmp_path / "grpo_rm", base_dir, pairs_dir, "grpo", "--reward_model", reward_dir)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("rewards/reward_model/mean" in e and "kl" in e for e in logs)
    assert "rule_reward" not in json.dumps(trainer.state.log_history)
    assert json.loads((tmp_path / "grpo_rm" / "poemdpo.json").read_text())["reward"] == reward_dir
    AutoModelForCausalLM.from_pretrained(tmp_path / "grpo_rm")


def test_reward_model_reward_scores_poems_as_the_reward_model_was_trained(base_dir, reward_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reward = RewardModelReward(reward_dir, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    prompts = ["<INS>請用以下題目寫一首詩<INP>春<RES>"] * 2
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in (FIVE, SEVEN)]
    got = reward(prompts, [FIVE, SEVEN], completion_ids=[ids[0] + [tokenizer.eos_token_id], ids[1]])
    assert got == pytest.approx(score(reward.model, reward.tokenizer, prompts, [FIVE, SEVEN]), abs=1e-6)
    assert got == pytest.approx([score(reward.model, reward.tokenizer, [p], [c])[0]
                                 for p, c in zip(prompts, [FIVE, SEVEN], strict=True)], abs=1e-5)


def test_completion_length_comes_from_the_model_and_long_titles_stay_out(base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    short = len(tokenizer("<INS>請用以下題目寫一首詩<INP>春夜喜雨<RES>")["input_ids"])
    titles, longest = short_prompts(tokenizer, ["春", "春夜喜雨", "春" * 80], max_tokens=64)
    assert titles == ["春", "春夜喜雨"] and longest == short
    # No generation default here: 128 (as evaluate.py); with one of 256, what the context leaves after the prompt.
    assert completion_length(model, longest, None) == 128
    model.generation_config.max_new_tokens = 256
    assert completion_length(model, longest, None) == 256 - short
    assert completion_length(model, longest, 100) == 100


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward_model", "data/no_such_reward_model"],
         "reward model directory 'data/no_such_reward_model' does not exist; train one with: python train_reward.py"),
        (["--method", "ppo"],
         "unknown method 'ppo': choose one of ['grpo', 'online_dpo', 'rloo'] (TRL 1.x removed PPOTrainer"),
        (["--max_completion_length", "400"], "max_completion_length 400 does not fit"),
        (["--beta", "-0.1"], "beta must be >= 0"),
        (["--dataset_name", "data/no_such_pairs"], "dataset 'data/no_such_pairs' does not exist"),
        (["--ptx_coef", "-1"], "ptx_coef must be >= 0"),
        (["--ptx_coef", "0.5", "--ptx_dataset", "data/no_such_pairs"], "dataset 'data/no_such_pairs' does not exist"),
    ],
)
def test_bad_input_is_one_clear_sentence(tmp_path, base_dir, pairs_dir, capsys, extra, message):
    with pytest.raises(SystemExit):
        run(tmp_path / "out", base_dir, pairs_dir, "grpo", *extra)
    assert message in capsys.readouterr().err


def test_a_poem_length_that_does_not_fit_names_the_methods_own_setting(tmp_path, base_dir, pairs_dir, capsys):
    with pytest.raises(SystemExit):
        train_rl.main(["--method", "online_dpo", "--model_name_or_path", base_dir, "--dataset_name", str(pairs_dir),
                       "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "400", "--report_to", "none"])
    assert "max_new_tokens 400 does not fit" in capsys.readouterr().err


def test_a_causal_lm_is_not_taken_for_a_reward_model(tmp_path, base_dir, pairs_dir, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "out", base_dir, pairs_dir, "grpo", "--reward_model", base_dir)
    assert "is not a reward model" in capsys.readouterr().err
