"""What the PyTorch side's commands need beyond the SDK: the ``[export]`` extra, checked in one place."""
from __future__ import annotations

from clipmatch.errors import DependencyError

TORCH_SIDE = ("torch", "transformers", "safetensors", "onnx")


def require_torch_side() -> None:
    """Fail with one line naming the extra when the PyTorch side is not installed."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ImportError:  # a finder that refuses it (or a broken install) is absent too
            return True

    missing = [name for name in TORCH_SIDE if absent(name)]
    if missing:
        raise DependencyError(f"this command needs the PyTorch side ({', '.join(missing)} not installed): "
                              f"pip install 'clipmatch[export,cpu]'")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown a command's own output
