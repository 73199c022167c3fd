"""Two-stage search over a gallery index: explanation -> query encoding -> cosine shortlist -> rescoring -> fusion.

Works with any ``Matcher`` (``Local`` or a Triton ``Remote``). The shortlist
is ranked by the query's cosine plus, when the query has an explanation, the
explanation's: a name never seen in training finds nothing by itself. The
heads rescore the shortlist from the index's cached image tokens (no image is
read again). Each hit carries every score separately and the fused one.

Fusion (``clipmatch.fusion``): within the shortlist each score is z-scored
(the match probability as a logit) and the fused score is their weighted
sum, with one weight set for queries that have an explanation and one for
those that do not. The weights are the model's own, fitted on its validation
split (``clipmatch fit-fusion``) and read from its manifest; a model without
them weighs the three scores equally.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clipmatch.contract import HEAD_NAMES
from clipmatch.errors import BackendError, IncompatibleModelError, InputError, TextError
from clipmatch.explain.explainers import Explainer, Explanation
from clipmatch.fusion import Fusion, FusionWeights, fuse
from clipmatch.results import TextEncoding
from clipmatch.retrieval.index import GalleryIndex, check_model, upgrade_hint

__all__ = ["SearchHit", "SearchResult", "Searcher", "STOP_WORDS", "check_query"]

STOP_WORDS = frozenset(
    "a an the of in on at to for with and or but is are was were be this that these those there here it its "
    "photo image picture of some any".split())


@dataclass(frozen=True)
class SearchHit:
    rank: int
    id: int
    path: str
    cosine: float
    fused: float
    match_prob: float | None = None
    entity_score: float | None = None
    dcsm: float | None = None


@dataclass
class SearchResult:
    query: str
    hits: list[SearchHit]
    explanation: Explanation | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the result rests on, e.g. a failed explanation
    weights: FusionWeights | None = None  # the fusion weights the ranking used


def check_query(query: str) -> str:
    if not isinstance(query, str):
        raise TextError(f"query must be a str, got {type(query).__name__}")
    words = query.strip().lower().split()
    if not words:
        raise TextError("query is empty")
    if all(w.strip(".,!?;:'\"") in STOP_WORDS for w in words):
        raise TextError(f"query {query!r} has only stop words; say what to look for")
    return query.strip()


class Searcher:
    def __init__(self, matcher, index: GalleryIndex, explainer: Explainer | None = None,
                 fusion: Fusion | None = None, *, explanation_cache: int = 1024):
        """``fusion``: the weights to rank with; by default the model's fitted ones.
        ``explanation_cache``: encoded explanations kept in memory, most recent first. Queries
        about one entity share its explanation, and encoding it costs a text tower call (21 ms
        at ViT-B/32 size on two cores)."""
        check_model(index.meta, matcher.manifest.model_identity, index.root)
        if "entity" in matcher.heads and index.vision_experts is None and index.paths:
            raise IncompatibleModelError(upgrade_hint(index.root, index.meta))
        self.matcher, self.index, self.explainer = matcher, index, explainer
        self._explanations: OrderedDict[str, TextEncoding] = OrderedDict()
        self._cache_size = explanation_cache
        self.fusion = fusion or matcher.manifest.fusion or Fusion()

    def _explanation_encoding(self, text: str) -> TextEncoding:
        """An explanation's encoding, encoded alone (so it never depends on what it was batched with)."""
        if text in self._explanations:
            self._explanations.move_to_end(text)
            return self._explanations[text]
        encoding = self.matcher.encode_texts([text]).row(0)
        if self._cache_size > 0:
            self._explanations[text] = encoding
            if len(self._explanations) > self._cache_size:
                self._explanations.popitem(last=False)
        return encoding

    def search(self, query: str, *, top_k: int = 10, shortlist: int = 100,
               rescore: Sequence[str] = HEAD_NAMES, explanation: str | None = None) -> SearchResult:
        """``explanation``: what the query names looks like, given by the caller (labelled data, a
        cache of its own); the explainer is then not asked."""
        query = check_query(query)
        if explanation is not None and (not isinstance(explanation, str) or not explanation.strip()):
            raise TextError(f"explanation must be a non-empty str, got {explanation!r}")
        if isinstance(rescore, str):
            raise InputError(f"rescore must be a sequence of head names from {list(HEAD_NAMES)}, got the str "
                             f"{rescore!r}")
        unknown = set(rescore) - set(HEAD_NAMES)
        if unknown:
            raise InputError(f"rescore must name heads from {list(HEAD_NAMES)}, got {sorted(unknown)}")
        for name, value in (("top_k", top_k), ("shortlist", shortlist)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        times: dict[str, float] = {}
        notes: list[str] = []
        t = time.perf_counter()
        if explanation is not None:
            explanation = Explanation(query, explanation.strip(), "given by the caller")
        elif self.explainer is not None:
            explanation = self.explainer.explain(query)
        times["explanation"] = (time.perf_counter() - t) * 1e3
        if explanation is not None and explanation.note:
            notes.append(explanation.note)
        if explanation is not None and not explanation.ok:
            notes.append(f"no explanation: {explanation.error}; searched without one")
        text = explanation.text if explanation is not None and explanation.ok else None

        t = time.perf_counter()
        enc = self.matcher.encode_texts([query]).row(0)
        explained = None if text is None else self._explanation_encoding(text)
        vector = enc.embeds if explained is None else enc.embeds + explained.embeds  # query + explanation cosine
        if bool(enc.truncated[0]):
            notes.append("the query was longer than the text context and was cut")
        times["encode"] = (time.perf_counter() - t) * 1e3

        weights = self.fusion.for_query(text is not None)
        n = len(self.index.paths)
        if n == 0:
            notes.append(f"the index {self.index.root} holds no images")
            return SearchResult(query, [], explanation, times, notes, weights)
        t = time.perf_counter()
        # One FAISS thread: a search holds one query, and FAISS's idle OpenMP threads
        # spin on the cores onnxruntime rescores on next. Measured with
        # benchmarks/bench_search.py at 10k images: the exact shortlist took 10-12 ms
        # p50 with FAISS's default threads, 0.5 ms with one, and rescoring 37 ms, not 30.
        _, ids = self.index.search(vector, min(shortlist, n), threads=1)
        ids = ids[0][ids[0] >= 0]
        times["shortlist"] = (time.perf_counter() - t) * 1e3

        t0 = time.perf_counter()
        cands = self.index.rows(ids)
        times["token_read"] = (time.perf_counter() - t0) * 1e3
        heads = [h for h in HEAD_NAMES if h in rescore and h in self.matcher.heads]
        cosine = cands.embeds @ enc.embeds[0]
        r = None
        if heads:
            r = self.matcher.rescore(enc, cands, explanation=explained,
                                     heads=heads)
            times.update(r.timings_ms)
            for name in ("match_prob", "dcsm"):
                v = getattr(r, name)
                if v is not None and not np.isfinite(v).all():
                    bad = [int(ids[j]) for j in np.flatnonzero(~np.isfinite(v))[:5]]
                    raise BackendError(f"the {name} score is not finite for index rows {bad} "
                                       f"({self.index.paths[bad[0]]}, ...): the model or its cached tokens are broken")
        t = time.perf_counter()
        fused = fuse(weights, cosine, None if r is None else r.match_prob, None if r is None else r.dcsm)
        times["fusion"] = (time.perf_counter() - t) * 1e3
        times["rescore"] = (time.perf_counter() - t0) * 1e3  # token read, heads and fusion

        order = np.argsort(-fused, kind="stable")[:top_k]
        hits = [SearchHit(rank=i + 1, id=int(ids[j]), path=self.index.paths[int(ids[j])], cosine=float(cosine[j]),
                          fused=float(fused[j]),
                          match_prob=None if r is None or r.match_prob is None else float(r.match_prob[j]),
                          entity_score=None if r is None or r.entity_score is None else float(r.entity_score[j]),
                          dcsm=None if r is None or r.dcsm is None else float(r.dcsm[j]))
                for i, j in enumerate(order)]
        return SearchResult(query, hits, explanation, times, notes, weights)
