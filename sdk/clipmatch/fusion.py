"""How a search's scores become one ranking.

Within one candidate list each score is z-scored (GI-ITM's match probability
as a logit first), and the fused score is the weighted sum:

    fused = w_cosine * z(cosine) + w_match_prob * z(logit(match_prob)) + w_dcsm * z(dcsm)

A head that was not run adds nothing. Z-scoring makes the weights
scale-free: they say how much each score's *ranking* counts, whatever the
head's range.

There are two weight sets, because the scores mean different things with and
without an explanation: with one, GI-ITM reads what the query's entity looks
like, and the query's own cosine may know nothing of a name it never saw;
without one, GI-ITM sees only the query. ``Fusion.for_query`` picks the set.

The weights of a model are fitted on its validation split
(``clipmatch fit-fusion``) and stored in its manifests; ``Fusion()`` (all
ones) is the fallback for a model without fitted weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clipmatch.errors import ConfigError

__all__ = ["FusionWeights", "Fusion", "Shortlists", "zscore", "logit", "fuse"]

SCORES = ("cosine", "match_prob", "dcsm")
# Names earlier manifests used for a score, read as today's.
_ALIASES = {"itm": "match_prob"}


@dataclass(frozen=True)
class FusionWeights:
    cosine: float = 1.0
    match_prob: float = 1.0
    dcsm: float = 1.0

    def __post_init__(self) -> None:
        for name in SCORES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ConfigError(f"fusion weight {name} must be a finite number >= 0, got {value!r}")
        if not any(getattr(self, name) for name in SCORES):
            raise ConfigError("fusion weights are all 0: every candidate would score the same")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "fusion weights") -> FusionWeights:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{what} must be an object of {SCORES}, got {type(d).__name__}")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        unknown = set(d) - set(SCORES)
        if unknown:
            raise ConfigError(f"{what} has unknown scores {sorted(unknown)}; known: {SCORES}")
        try:
            return cls(**d)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Fusion:
    """The two weight sets, and where they came from (``fitted``: split, seed, sizes, R@1 figures)."""

    plain: FusionWeights = FusionWeights()
    explained: FusionWeights = FusionWeights()
    fitted: dict[str, Any] = field(default_factory=dict, compare=False)

    def for_query(self, has_explanation: bool) -> FusionWeights:
        return self.explained if has_explanation else self.plain

    def to_dict(self) -> dict[str, Any]:
        return {"plain": asdict(self.plain), "explained": asdict(self.explained), "fitted": dict(self.fitted)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fusion:
        missing = [k for k in ("plain", "explained") if k not in d]
        if missing:
            raise ConfigError(f"fusion needs the weight sets 'plain' and 'explained'; {missing} missing")
        return cls(FusionWeights.from_dict(d["plain"], "fusion set 'plain'"),
                   FusionWeights.from_dict(d["explained"], "fusion set 'explained'"), dict(d.get("fitted") or {}))


def zscore(x: np.ndarray) -> np.ndarray:
    """Scores made comparable within one candidate list."""
    return (x - x.mean(axis=-1, keepdims=True)) / (x.std(axis=-1, keepdims=True) + 1e-6)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fuse(weights: FusionWeights, cosine: np.ndarray, match_prob: np.ndarray | None = None,
         dcsm: np.ndarray | None = None) -> np.ndarray:
    """The fused score of each candidate (last axis: the candidate list)."""
    fused = weights.cosine * zscore(np.asarray(cosine, np.float64))
    if match_prob is not None:
        fused = fused + weights.match_prob * zscore(logit(np.asarray(match_prob, np.float64)))
    if dcsm is not None:
        fused = fused + weights.dcsm * zscore(np.asarray(dcsm, np.float64))
    return fused


@dataclass
class Shortlists:
    """Queries' shortlists with every score of every candidate, (Q, K) each, which candidates
    are relevant, and a row name per query: what fusion weights are fitted and judged on."""

    cosine: np.ndarray
    match_prob: np.ndarray
    dcsm: np.ndarray
    relevant: np.ndarray
    rows: list[str]

    def ranked(self, scores: np.ndarray) -> np.ndarray:
        """(Q, K) relevance, each query's candidates best first by ``scores``."""
        order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
        return np.take_along_axis(self.relevant, order, axis=1)

    def r1_mrr(self, weights: FusionWeights) -> tuple[float, float, np.ndarray]:
        """R@1, mean reciprocal rank of the first hit in the shortlist, and each query's R@1."""
        ranked = self.ranked(fuse(weights, self.cosine, self.match_prob, self.dcsm))
        first = ranked.argmax(axis=1)
        rr = np.where(ranked.any(axis=1), 1.0 / (first + 1), 0.0)
        return float(ranked[:, 0].mean()), float(rr.mean()), ranked[:, 0]
