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
