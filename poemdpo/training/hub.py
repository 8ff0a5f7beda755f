"""Hugging Face Hub: fail fast before training when the Hub cannot be reached, push once after it.

What is pushed at the end is the output directory as `train_dpo.py` left it (weights as safetensors, config,
generation config, tokenizer with its chat template, our model card, samples), checkpoints excluded: the
Trainer's `hub_strategy` already pushed those while training (`checkpoint`: the latest one in `last-checkpoint/`,
enough to resume elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from poemdpo.errors import PoemDPOError

# As the Trainer's own push (`_*` are its temporary files), plus the checkpoints' folders.
IGNORE_PATTERNS = ["_*", "checkpoint-*"]


def check_hub_access(repo_id: str | None) -> None:
    """A cheap authenticated call now, so an offline run stops before training instead of after it."""
    if not repo_id:
        raise PoemDPOError("push_to_hub needs hub_model_id (e.g. your-name/poem-dpo-tiny)")
    try:
        HfApi().whoami()
    except Exception as e:  # no token, no network, bad token: each its own class
        raise PoemDPOError(
            f"push_to_hub is set but the Hub cannot be used ({type(e).__name__}: {e}); "
            "check the network and `hf auth login`, or drop --push_to_hub"
        ) from None


def push_final_model(trainer) -> str:
    """Push the saved output directory with our model card in one commit; returns the commit URL.

    A failure anywhere leaves the local directory as it was and raises one sentence saying how to push it again.
    """
    args = trainer.args
    output_dir = Path(args.output_dir)
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    # A checkpoint push still uploading (hub_strategy) would race this commit; the Trainer waits the same way.
    trainer._finish_current_push()
    failed = [job.exception() for job in getattr(getattr(trainer, "push_in_progress", None), "jobs", [])
              if job.done() and not job.cancelled() and job.exception() is not None]
    if failed:
        print(f"warning: {len(failed)} checkpoint push(es) to {repo_id} failed while training "
              f"(first: {type(failed[0]).__name__}: {failed[0]})")
    try:
        api = HfApi(token=args.hub_token)
        api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="End of training",
                                   ignore_patterns=IGNORE_PATTERNS, revision=args.hub_revision)
    except Exception as e:  # network, auth, quota, a server error mid-upload: many classes
        raise PoemDPOError(
            f"could not push {output_dir} to the Hub as {repo_id!r} ({type(e).__name__}: {e}); the trained model "
            f"is intact there, push it again with: hf upload {repo_id} {output_dir} . --exclude 'checkpoint-*'"
        ) from None
    print(f"pushed {output_dir} to https://huggingface.co/{repo_id}")
    return commit.commit_url
