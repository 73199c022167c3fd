"""Library versions recorded in manifests, so a model says what produced it."""
from __future__ import annotations

from importlib import metadata


def versions() -> dict[str, str]:
    out = {}
    for name in ("clipmatch", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
