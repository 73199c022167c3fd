"""A gallery held in memory: encodings the caller already has, searched exactly.

``Searcher`` takes any gallery with the interface below; ``GalleryIndex`` is the
one on disk. This one serves the evaluation and the fusion fit (a synthetic
split encoded on the spot) and callers who keep a small gallery in memory, so
that they all rank as the search ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipmatch.errors import InputError, ShapeError
from clipmatch.results import ImageEncoding

__all__ = ["MemoryGallery"]


class MemoryGallery:
    """``encoding``'s images under ``names`` (default "0", "1", ...), for ``model_identity``.

    The search is exact (inner product, as the index's flat FAISS search), and
    rows come back as they were given: float32 tokens, not the index's fp16.
    """

    def __init__(self, encoding: ImageEncoding, model_identity: str, names: Sequence[str] | None = None):
        if not isinstance(encoding, ImageEncoding):
            raise InputError(f"a memory gallery holds an ImageEncoding, got {type(encoding).__name__}")
        names = [str(i) for i in range(len(encoding))] if names is None else [str(n) for n in names]
        if len(names) != len(encoding):
            raise ShapeError(f"a memory gallery of {len(encoding)} images got {len(names)} names")
        self.encoding = encoding
        self.paths = names
        self.meta = {"model_identity": model_identity}
        self.root = Path("<memory>")
        self.vision_experts = encoding.vision_experts

    def search(self, query_embeds: np.ndarray, k: int, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and row ids by inner product, best first; ties keep row order."""
        scores = np.asarray(query_embeds, np.float32) @ np.asarray(self.encoding.embeds, np.float32).T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, axis=1), ids

    def rows(self, ids: np.ndarray) -> ImageEncoding:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.paths)):
            raise InputError(f"rows {ids[(ids < 0) | (ids >= len(self.paths))][:5].tolist()} are outside the "
                             f"gallery of {len(self.paths)} images")
        return self.encoding[ids]
