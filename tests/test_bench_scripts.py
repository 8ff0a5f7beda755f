"""Every benchmark script still starts: its imports resolve against today's package layout. Benchmarks are run by
hand, rarely, so a moved module breaks them silently (bench_base.py imported `poemdpo.forms` long after it moved)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(script: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"bench_script_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script, monkeypatch):
    module = _load(script, monkeypatch)  # top-level code only: every script runs its work under __main__
    assert callable(getattr(module, "main", None)), f"bench/{script} has no main()"


def test_recipe_sweep_rows_a_method_without_dpo_rewards(monkeypatch):
    """SimPO and ORPO runs have no DPO implicit rewards (evaluate.py reports None): a dash, not a crash."""
    sweep = _load("recipe_sweep.py", monkeypatch)
    assert sweep.reward_accuracy({"rewards": None}) == "—"
    assert sweep.reward_accuracy({"rewards": {"reward_accuracy": 0.875}}) == sweep._pct(0.875)


def test_bench_dpo_times_the_trainer_train_dpo_builds(tmp_path, monkeypatch):
    """bench_dpo's `ours` variant drives train_dpo.main and times its steps: it broke silently once, when
    train_dpo stopped naming its trainer class (an AttributeError at the bench's first run)."""
    from tiny_models import make_pairs_dir, make_tiny_model

    bench = _load("bench_dpo.py", monkeypatch)
    pairs = make_pairs_dir(tmp_path)
    model = make_tiny_model(tmp_path / "model", "llama")
    result = bench.run_ours(model, str(pairs), n_pairs=4, batch_size=2, max_length=64, warmup=1)
    assert result["timed_steps"] >= 1 and result["tokens_per_s"] > 0


def test_rule_within_counts_a_rule_among_the_finished_poems_that_meet_another(tmp_path, monkeypatch):
    import json

    bench = _load("rule_within.py", monkeypatch)
    five_rhyme = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
    five_plain = "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"
    seven_rhyme = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
    rows = [(five_rhyme, True), (five_rhyme, False), (five_plain, True), (seven_rhyme, True)]
    (tmp_path / "poems.jsonl").write_text("".join(
        json.dumps({"aligned": {"text": t, "finished": f}}, ensure_ascii=False) + "\n" for t, f in rows), "utf-8")
    result = bench.rule_within([str(tmp_path)], "rhyme", "five_char")
    assert (result["within"]["count"], result["within"]["n"]) == (2, 4)  # the unfinished 五言 poem does not count
    assert (result["rule_among"]["count"], result["rule_among"]["n"]) == (1, 2)
