"""Checks a Hugging Face CLIP checkpoint folder before anything loads it.

A checkpoint is what a user with ``openai/clip-vit-base-patch32`` on disk has:
``config.json``, safetensors weights, a tokenizer (``tokenizer.json`` or
``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``. Every
missing file is reported at once, and pickled weights are refused rather
than loaded: unpickling a file runs whatever code it holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipmatch.errors import IncompatibleModelError, ModelNotFoundError
from clipmatch.manifest import read_json_object

__all__ = ["CheckpointFiles", "inspect_checkpoint", "TOKENIZER_FILES"]

# Copied with an export so the SDK tokenises exactly as the checkpoint does.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: dict[str, Any]
    weights: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]
    preprocessor_config: Path

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or {}

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.config.get("vision_config") or {}


def inspect_checkpoint(path: str | Path) -> CheckpointFiles:
    """Validate a CLIP checkpoint folder and list its files.

    >>> inspect_checkpoint("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    clipmatch.errors.ModelNotFoundError: model folder not found: /nonexistent
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelNotFoundError(f"model folder not found: {root}")

    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{root} is not a Hugging Face checkpoint: config.json is missing")
    config = read_json_object(config_path, "checkpoint config")
    model_type = config.get("model_type")
    if model_type != "clip":
        raise IncompatibleModelError(
            f"{root} holds a {model_type!r} checkpoint (config.json model_type); "
            "clipmatch serves CLIP checkpoints (model_type 'clip')"
        )

    missing: list[str] = []
    weights = _weights(root, missing)

    tokenizer_files = tuple(root / n for n in TOKENIZER_FILES if (root / n).is_file())
    names = {p.name for p in tokenizer_files}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        missing.append("tokenizer.json (or vocab.json and merges.txt)")

    preprocessor = root / "preprocessor_config.json"
    if not preprocessor.is_file():
        missing.append("preprocessor_config.json")

    if missing:
        raise ModelNotFoundError(f"CLIP checkpoint {root} is incomplete; missing: {', '.join(missing)}")
    return CheckpointFiles(root, config, weights, tokenizer_files, preprocessor)


def _weights(root: Path, missing: list[str]) -> tuple[Path, ...]:
    single = root / "model.safetensors"
    if single.is_file():
        return (single,)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IncompatibleModelError(f"{index} is malformed: {exc!r}") from exc
        absent = [s for s in shards if not (root / s).is_file()]
        missing.extend(absent)
        return tuple(root / s for s in shards)
    pickled = [n for n in _PICKLED if (root / n).is_file()]
    if pickled:
        raise IncompatibleModelError(
            f"{root} holds weights only as {', '.join(pickled)}; clipmatch loads safetensors only "
            "and never unpickles a checkpoint. Convert it once where you trust the file: "
            "CLIPModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
        )
    missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    return ()
