"""``clipmatch.Local``: an export run in this process with onnxruntime. No torch."""
from __future__ import annotations

from pathlib import Path

from clipmatch.backends.onnxruntime import OnnxExecutor
from clipmatch.config import DEFAULT_CONFIG, RuntimeConfig
from clipmatch.matcher import Matcher, ModelFiles

__all__ = ["Local"]


class Local(Matcher):
    """Load an export folder and run it in-process.

    >>> m = clipmatch.Local("exports/tiny")  # doctest: +SKIP
    >>> m.cosine(["cube.png"], ["a red cube"]).shape  # doctest: +SKIP
    (1, 1)
    """

    def __init__(self, path: str | Path, config: RuntimeConfig = DEFAULT_CONFIG, **overrides):
        config = config.replace(**overrides) if overrides else config
        files = ModelFiles.load(path)
        super().__init__(files, OnnxExecutor(files.root, files.manifest, config), config)

    @property
    def providers(self) -> list[str]:
        return list(self.executor.providers)
