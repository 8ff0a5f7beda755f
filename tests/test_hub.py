"""Pushing to the Hub, proven without one: HfApi's repo and commit calls land in a local FakeHub.

Everything above those calls is the real client (upload_folder's file selection and ignore patterns, the
Trainer's checkpoint pushes running as futures), so what the FakeHub holds is what the Hub would.
"""

from __future__ import annotations

import hashlib
import threading
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import REPO, dpo_argv, make_pairs_dir, make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import train_dpo
from poemdpo.training.model_card import write_model_card
from poemdpo.training.samples import SamplePoemsCallback

ENDPOINT = "https://huggingface.co"


class FakeHub:
    """Repos and commits as the Hub keeps them: a commit stores all its files or, when it fails, none."""

    def __init__(self, root: Path):
        self.root, self.repos, self.commits, self.validated = root, [], [], []
        self.fail_on: str | None = None  # a path pattern whose upload breaks the connection
        self.lock = threading.Lock()  # checkpoint pushes commit from the Trainer's background threads

    def create_repo(self, api, repo_id, *, repo_type=None, exist_ok=False, **kwargs):
        self.repos.append((repo_type or "model", repo_id))
        prefix = "datasets/" if repo_type == "dataset" else ""
        return RepoUrl(f"{ENDPOINT}/{prefix}{repo_id}", endpoint=ENDPOINT)

    def create_commit(self, api, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op  # nothing here deletes files on the Hub
            if self.fail_on and fnmatch(op.path_in_repo, self.fail_on):
                raise ConnectionError(f"Connection reset by peer while uploading {op.path_in_repo}")
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        with self.lock:
            for path, data in files.items():
                target = self.repo_dir(repo_id, repo_type) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.commits.append({"repo_id": repo_id, "repo_type": repo_type or "model", "message": commit_message,
                                 "files": files})
        oid = hashlib.sha1(str(len(self.commits)).encode()).hexdigest()
        return CommitInfo(commit_url=f"{ENDPOINT}/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description="", oid=oid, _endpoint=ENDPOINT)

    def validate_yaml(self, api, content: str, *, repo_type=None, **kwargs):
        """The Hub's /api/validate-yaml, for what it rejects here: a header that is not a YAML mapping."""
        metadata = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
        if not isinstance(metadata, dict):
            raise ValueError(f"Invalid metadata in README.md: {metadata!r}")
        self.validated.append(metadata)

    def repo_dir(self, repo_id: str, repo_type: str | None = None) -> Path:
        return self.root / f"{repo_type or 'model'}s" / repo_id

    def messages(self) -> list[str]:
        return [c["message"] for c in self.commits]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # The single-commit upload path (hf_xet's pipelined one commits through the same create_commit, in batches).
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"type": "user", "name": "tester"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: fake.create_repo(self, repo_id, **k))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **k:
                        fake.create_commit(self, repo_id, operations, **k))
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **k: fake.validate_yaml(self, content, **k))
    return fake


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_pairs_dir(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2") / "base", "qwen2")


def local_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.is_file() and not p.relative_to(directory).as_posix().startswith("checkpoint-")}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_final_push_is_the_output_directory_with_our_card(tmp_path, hub, pairs_dir, qwen_dir, lora):
    out = tmp_path / "out"
    lora_args = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]
    train_dpo.main(dpo_argv(qwen_dir, pairs_dir, out, "--max_steps", "2", "--push_to_hub", "true",
                            "--hub_model_id", "tester/poem-dpo-qwen", *(lora_args if lora else [])))
    assert set(hub.repos) == {("model", "tester/poem-dpo-qwen")}
    # One commit at the end: the Trainer's own push inside save_model (TRL's card, before ours) is not made.
    assert hub.messages() == ["End of training"]
    pushed = hub.commits[0]["files"]
    assert set(pushed) == local_files(out)  # everything the run left, checkpoints aside, and nothing else
    weights = {"adapter_model.safetensors", "adapter_config.json"} if lora else {
        "model.safetensors", "config.json", "generation_config.json"}
    assert weights | {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"} <= set(pushed)
    assert not [p for p in pushed if p.endswith((".bin", ".pt", ".pth")) and p != "training_args.bin"]
    for path, data in pushed.items():
        assert data == (out / path).read_bytes(), path
    card = ModelCard(pushed["README.md"].decode("utf-8"))
    assert card.data.library_name == ("peft" if lora else "transformers")
    assert {"trl", "dpo"} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local base directory means nothing on the Hub
    assert "<|im_start|>assistant" in card.text  # the chat prompt the run trained on
    # What a user downloads loads with plain transformers / PEFT.
    remote = hub.repo_dir("tester/poem-dpo-qwen")
    assert type(AutoTokenizer.from_pretrained(remote)).__name__ == "Qwen2Tokenizer"
    if lora:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_dir), remote)
        assert any("lora_B" in name for name, _ in model.named_parameters())
    else:
        assert type(AutoModelForCausalLM.from_pretrained(remote)).__name__ == "Qwen2ForCausalLM"
        assert GenerationConfig.from_pretrained(remote).eos_token_id == \
            GenerationConfig.from_pretrained(qwen_dir).eos_token_id


def test_card_metadata_names_hub_base_model_and_dataset(tmp_path):
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none",
                     activation_checkpointing=False)
    for use_peft in (False, True):
        write_model_card(tmp_path, base_model="Qwen/Qwen2.5-0.5B-Instruct", dataset="tester/poem-pairs",
                         rule="five_char", args=args, use_peft=use_peft, train_pairs=8, metrics={}, sample_rates={},
                         sample_table="")
        data = ModelCard.load(tmp_path / "README.md").data
        assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and data.datasets == ["tester/poem-pairs"]
        assert data.library_name == ("peft" if use_peft else "transformers") and data.language == ["lzh"]
        assert "<INS>請用以下題目寫一首詩<INP>{title}<RES>" in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_push_failing_half_way_keeps_the_output_and_says_so_in_one_sentence(tmp_path, hub, pairs_dir, qwen_dir,
                                                                          capsys):
    hub.fail_on = "model.safetensors"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        train_dpo.main(dpo_argv(qwen_dir, pairs_dir, out, "--max_steps", "1", "--push_to_hub", "true",
                                "--hub_model_id", "tester/poem-dpo-qwen"))
    message = str(stopped.value.code)
    assert message.startswith("train_dpo.py: error: could not push") and message.count("\n") == 0
    assert "ConnectionError: Connection reset by peer" in message and "the trained model is intact there" in message
    assert f"hf upload tester/poem-dpo-qwen {out} ." in message
    assert hub.commits == []  # the Hub keeps no half commit
    # The local output is whole: our card, the weights, a model transformers loads.
    assert "poem-dpo" in (out / "README.md").read_text(encoding="utf-8")
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2ForCausalLM"


def samples_of(trainer) -> SamplePoemsCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, SamplePoemsCallback))


def hub_recipe(tmp_path: Path, **hub_settings) -> Path:
    """The default recipe plus the Hub keys a user adds to it."""
    recipe = yaml.safe_load((REPO / "configs" / "dpo_tiny_cpu.yaml").read_text(encoding="utf-8"))
    recipe.update({"push_to_hub": True, "hub_model_id": "tester/poem-dpo-ckpt", **hub_settings})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def test_hub_strategy_every_save_pushes_the_model_at_each_save(tmp_path, hub, pairs_dir, qwen_dir):
    recipe = hub_recipe(tmp_path, hub_strategy="every_save", hub_always_push=True)
    train_dpo.main(dpo_argv(qwen_dir, pairs_dir, tmp_path / "out", "--max_steps", "4", "--save_strategy", "steps",
                            "--save_steps", "2", config=recipe))
    assert hub.messages() == ["Training in progress, step 2", "Training in progress, step 4", "End of training"]
    for commit in hub.commits[:2]:
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(commit["files"])
        assert not [p for p in commit["files"] if p.startswith(("checkpoint-", "last-checkpoint/"))]


def test_resume_from_the_checkpoint_pushed_by_hub_strategy_checkpoint(tmp_path, hub, pairs_dir, qwen_dir):
    """What `hub_strategy: checkpoint` put in last-checkpoint/ at step 2 is enough to finish the run on another
    machine: resumed there, the run ends with the very weights of the run that never stopped."""
    recipe = hub_recipe(tmp_path, hub_strategy="checkpoint", hub_always_push=True)
    steps = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    first = tmp_path / "first"
    uninterrupted = train_dpo.main(dpo_argv(qwen_dir, pairs_dir, first, *steps, config=recipe))
    assert hub.messages() == ["Training in progress, step 2", "Training in progress, step 2, checkpoint",
                              "Training in progress, step 4", "Training in progress, step 4, checkpoint",
                              "End of training"]
    at_step_2 = hub.commits[1]["files"]
    needed = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
              "tokenizer.json"}
    assert {f"last-checkpoint/{name}" for name in needed} <= set(at_step_2)

    # Elsewhere: `hf download tester/poem-dpo-ckpt --include "last-checkpoint/*" --local-dir elsewhere` at step 2.
    elsewhere = tmp_path / "elsewhere"
    for path, data in at_step_2.items():
        (elsewhere / path).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / path).write_bytes(data)
    resumed = train_dpo.main(dpo_argv(qwen_dir, pairs_dir, elsewhere / "out", *steps, "--push_to_hub", "false",
                                      "--resume_from_checkpoint", str(elsewhere / "last-checkpoint"), config=recipe))
    assert resumed.state.global_step == 4
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4]
    # The reference's poems come from the reference itself (the frozen copy), not the step-2 weights resumed.
    assert samples_of(resumed).reference_poems == samples_of(uninterrupted).reference_poems
    final, again = load_file(first / "model.safetensors"), load_file(elsewhere / "out" / "model.safetensors")
    assert final.keys() == again.keys()
    for name in final:
        assert torch.equal(final[name], again[name]), name


def build_with_push(root: Path, *extra: str) -> Path:
    import json

    import build_dataset
    from conftest import make_corpus_poems

    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(200), ensure_ascii=False),
                                                      encoding="utf-8")
    build_dataset.main(["--corpus", str(root / "corpus"), "--output_dir", str(root / "pairs"), "--test_size", "0.2",
                        "--push_to_hub", "tester/poem-pairs", *extra])
    return root / "pairs"


def test_dataset_push_is_the_hub_layout_directory(tmp_path, hub):
    from datasets import load_dataset

    local = build_with_push(tmp_path)
    assert hub.repos == [("dataset", "tester/poem-pairs")]
    assert len(hub.commits) == 1 and hub.commits[0]["repo_type"] == "dataset"
    pushed = hub.commits[0]["files"]
    assert set(pushed) == local_files(local)
    assert {"README.md", "stats.json"} <= set(pushed)
    splits = {p.split("/")[1].split("-")[0] for p in pushed if p.startswith("data/") and p.endswith(".parquet")}
    assert splits == {"train", "validation", "test"}
    card = yaml.safe_load(pushed["README.md"].decode("utf-8").split("---\n")[1])
    assert {config["config_name"] for config in card["configs"]} >= {"default"}
    # What `load_dataset("tester/poem-pairs")` reads after the push: the same rows as the local directory. (A
    # cache of its own: datasets 5.2 keys a local directory's cache by its name and card, not its files, and
    # serves the rows of any earlier directory of the same name.)
    fresh = {"cache_dir": str(tmp_path / "cache")}
    remote = load_dataset(str(hub.repo_dir("tester/poem-pairs", "dataset")), **fresh)
    here = load_dataset(str(local), **fresh)
    assert set(remote) == set(here) == splits
    for split in splits:
        assert remote[split].to_list() == here[split].to_list()


def test_dataset_push_failing_half_way_keeps_the_local_copy(tmp_path, hub):
    from datasets import load_dataset

    hub.fail_on = "data/train-*"
    with pytest.raises(SystemExit) as stopped:
        build_with_push(tmp_path)
    message = str(stopped.value.code)
    assert message.startswith("build_dataset.py: error: could not push the dataset to the Hub as 'tester/poem-pairs'")
    assert "ConnectionError" in message and "is intact" in message and message.count("\n") == 0
    assert hub.commits == []
    assert len(load_dataset(str(tmp_path / "pairs"), cache_dir=str(tmp_path / "cache"))["train"]) > 0
