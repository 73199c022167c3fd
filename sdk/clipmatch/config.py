"""Runtime settings, in one object that flows from the caller to every layer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipmatch.errors import ConfigError

__all__ = ["RuntimeConfig", "DEFAULT_CONFIG"]

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class RuntimeConfig:
    """How an export is run.

    >>> RuntimeConfig().replace(image_batch_size=8).image_batch_size
    8
    """

    # onnxruntime execution providers, best first. None: the CPU provider only
    # (predictable everywhere); "auto": TensorRT, CUDA, CPU, whichever exist.
    providers: tuple[str, ...] | str | None = None
    # "fp16" runs the fp16 graphs: for GPU providers, where they are ~2x faster.
    precision: str = "fp32"
    # Threads per onnxruntime session; None lets onnxruntime use every physical core.
    intra_op_threads: int | None = None
    # Whether a session's idle threads spin for more work after a call. A search runs
    # several sessions one after another (text tower, entity parts, DCSM), and threads
    # left spinning by one take the cores the next needs.
    allow_spinning: bool = False
    # Largest batch sent to one graph call. Images dominate memory (P*D floats
    # of tokens each), so they go in smaller batches than texts.
    image_batch_size: int = 32
    text_batch_size: int = 64
    # Candidates per head call: a whole K = 100 shortlist in one (the query part is shared).
    pair_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("image_batch_size", "text_batch_size", "pair_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.allow_spinning, bool):
            raise ConfigError(f"allow_spinning must be a bool, got {self.allow_spinning!r}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ConfigError(f"intra_op_threads must be positive, got {self.intra_op_threads}")
        if isinstance(self.providers, list):
            object.__setattr__(self, "providers", tuple(self.providers))

    def replace(self, **changes) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


DEFAULT_CONFIG = RuntimeConfig()
