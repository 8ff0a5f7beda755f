"""Hugging Face Hub: fail fast before training when the Hub cannot be reached, push after it."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from poemdpo.training.dpo import ConfigError


def check_hub_access(repo_id: str | None) -> None:
    """A cheap authenticated call now, so an offline run stops before training instead of after it."""
    if not repo_id:
        raise ConfigError("push_to_hub needs hub_model_id (e.g. your-name/poem-dpo-tiny)")
    try:
        HfApi().whoami()
    except Exception as e:  # no token, no network, bad token: each its own class
        raise ConfigError(
            f"push_to_hub is set but the Hub cannot be used ({type(e).__name__}: {e}); "
            "check the network and `hf auth login`, or drop --push_to_hub"
        ) from None


def push_final_model(trainer) -> None:
    """Push the saved model, then our model card over the one the Trainer writes."""
    output_dir = Path(trainer.args.output_dir)
    try:
        trainer.push_to_hub()
        HfApi().upload_file(path_or_fileobj=str(output_dir / "README.md"), path_in_repo="README.md",
                            repo_id=trainer.hub_model_id)
    except Exception as e:
        raise SystemExit(
            f"could not push to the Hub as {trainer.args.hub_model_id!r} ({type(e).__name__}: {e}); "
            f"the trained model is intact in {output_dir}"
        ) from None
