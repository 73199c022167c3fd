"""Loads a Hugging Face CLIP checkpoint from a local folder, safetensors only."""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPModel

from clipmatch.checkpoint import CheckpointFiles, inspect_checkpoint
from clipmatch.errors import IncompatibleModelError


def load_clip(path: str | Path) -> tuple[CLIPModel, CheckpointFiles]:
    """Load the checkpoint in eval mode, after checking every file it needs is there."""
    files = inspect_checkpoint(path)
    try:
        model = CLIPModel.from_pretrained(
            str(files.root), local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise IncompatibleModelError(f"cannot load CLIP weights from {files.root}: {exc}") from exc
    return model.eval(), files
