"""Loads a Hugging Face CLIP checkpoint from a local folder, safetensors only."""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPModel

from clipmatch.errors import IncompatibleModelError
from clipmatch_export.checkpoint import CheckpointFiles, inspect_checkpoint


def load_clip(path: str | Path) -> tuple[CLIPModel, CheckpointFiles]:
    """Load the checkpoint in eval mode, after checking every file it needs is there.

    transformers fills a tensor missing from the weights with random values
    and only logs it; here that is an error, since every score would be wrong
    and the parity gate (ONNX against the same PyTorch model) cannot see it.
    """
    files = inspect_checkpoint(path)
    try:
        model, info = CLIPModel.from_pretrained(
            str(files.root), local_files_only=True, use_safetensors=True, attn_implementation="sdpa",
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise IncompatibleModelError(f"cannot load CLIP weights from {files.root}: {exc}") from exc
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        # position_ids is a buffer some checkpoints carry and others derive; it holds no weights.
        names = sorted(str(n) for n in info.get(kind) or () if "position_ids" not in str(n))
        if names:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(names[:8])}")
    if problems:
        raise IncompatibleModelError(f"the weights in {files.root} do not fit its config.json ({'; '.join(problems)})")
    return model.eval(), files
