"""The one thing a backend does: run a component on named arrays.

The matcher core builds every request and reads every response; a backend
(in-process onnxruntime, a Triton server) only moves arrays. Feeds are
checked against the tensor contract here, before any backend sees them, so a
wrong shape or dtype is reported with the tensor's name and both shapes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from clipmatch.contract import COMPONENTS
from clipmatch.errors import ShapeError

__all__ = ["Executor", "validate_feeds"]


class Executor(Protocol):
    def run(self, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def validate_feeds(component: str, feeds: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> None:
    spec = COMPONENTS[component]
    batch = None
    for t in spec.inputs:
        if t.name not in feeds:
            raise ShapeError(f"{component}: input {t.name!r} is missing")
        x = feeds[t.name]
        if not isinstance(x, np.ndarray) or x.dtype != np.dtype(t.dtype):
            got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise ShapeError(f"{component}: {t.name} must be {t.dtype}, got {got}")
        expected = t.shape(sizes)
        if x.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
            shown = tuple("?" if e is None else e for e in expected)
            raise ShapeError(f"{component}: {t.name} must have shape {shown}, got {tuple(x.shape)}")
        if t.dims[0] != "batch":  # a query's tensor of an unbatched component: batch 1, checked above
            pass
        elif batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ShapeError(f"{component}: batch sizes differ: {t.name} has {x.shape[0]} rows, "
                             f"{spec.inputs[0].name} has {batch}")
        # The sum is NaN or inf whenever an element is (and, for these unit-scale inputs, only
        # then): one pass without a boolean copy of a shortlist's 10 MB of tokens.
        if x.dtype.kind == "f" and not np.isfinite(x.sum()) and not np.isfinite(x).all():
            rows = sorted(set(np.argwhere(~np.isfinite(x))[:, 0].tolist()))
            raise ShapeError(f"{component}: {t.name} holds NaN or inf in rows {rows[:10]}")
    for name in ("text_length", "explanation_length", "dcsm_length"):
        dims = {t.name: feeds[t.name].shape[i] for t in spec.inputs for i, d in enumerate(t.dims) if d == name}
        if len(set(dims.values())) > 1:
            raise ShapeError(f"{component}: {name} differs between inputs: {dims}")
        if name == "dcsm_length" and dims and max(dims.values()) > sizes["dcsm_text_length"]:
            raise ShapeError(f"{component}: texts are at most dcsm_text_length={sizes['dcsm_text_length']} tokens, "
                             f"got {max(dims.values())}")
