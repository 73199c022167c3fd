"""Labelled queries over a user's own gallery: evaluate the search on them, and fit its fusion weights.

A labelled file is JSONL, one query per line:

    {"query": "a red kettle left of a mug", "relevant": ["photos/0012.jpg", "photos/0480.jpg"]}
    {"query": "the Kestrel-7 valve", "relevant": ["photos/0007.jpg"], "explanation": "a blue cylinder ..."}
    {"query": "a photo of the Orrin pump", "relevant": ["photos/0101.jpg"], "entity": "Orrin pump"}

- ``relevant``: the gallery images that satisfy the query (paths relative to the
  file's folder, or absolute); at least one;
- ``explanation`` (optional): what the query names looks like, as the search's
  explainer would give it;
- ``entity`` (optional): a knowledge-base entry whose description is the
  explanation (needs a knowledge base).

Queries with an explanation are the ``explained`` group and the others the
``plain`` group: the two fusion weight sets. A bad line stops the read with
``file:line: problem``.

Every query runs through ``Searcher`` as a search runs: the cosine shortlist
of K, both heads, the fused ranking. The columns rank that shortlist by one
score each; ``cosine`` ranks the whole gallery by the query's cosine alone.
R@1, R@5 and MRR count a query found when a relevant image is at the top, in
the top 5, and at reciprocal rank (0 when no relevant image is in the K).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipmatch.errors import DatasetError, InputError
from clipmatch.fusion import Shortlists, fuse
from clipmatch.retrieval.search import Searcher

__all__ = ["LabelledQuery", "read_labelled", "open_gallery", "collect", "evaluate_labelled", "format_table",
           "COLUMNS"]

COLUMNS = ("cosine", "dcsm", "match_prob", "fused")
_KEYS = {"query", "relevant", "explanation", "entity"}


@dataclass(frozen=True)
class LabelledQuery:
    query: str
    relevant: tuple[str, ...]  # resolved absolute paths
    explanation: str | None
    line: int

    @property
    def group(self) -> str:
        return "plain" if self.explanation is None else "explained"


def read_labelled(path: str | Path, *, knowledge_base=None) -> list[LabelledQuery]:
    """The queries of a labelled JSONL file; ``knowledge_base`` (a ``KnowledgeBaseExplainer``)
    resolves ``entity`` fields."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read the labelled queries: {exc}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path)) from exc
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue

        def bad(problem: str) -> DatasetError:
            return DatasetError(problem, index=number, path=str(path))

        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(f"not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise bad(f"a line must be a JSON object, got {type(record).__name__}")
        unknown = set(record) - _KEYS
        if unknown:
            raise bad(f"unknown keys {sorted(unknown)}; a query has {sorted(_KEYS)}")
        query = record.get("query")
        if not isinstance(query, str) or not query.strip():
            raise bad("'query' must be a non-empty string")
        relevant = record.get("relevant")
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) and r for r in relevant):
            raise bad("'relevant' must be a non-empty list of image paths")
        explanation = record.get("explanation")
        if explanation is not None and (not isinstance(explanation, str) or not explanation.strip()):
            raise bad("'explanation' must be a non-empty string when given")
        entity = record.get("entity")
        if entity is not None:
            if explanation is not None:
                raise bad("give 'explanation' or 'entity', not both")
            if not isinstance(entity, str) or not entity.strip():
                raise bad("'entity' must be a non-empty string when given")
            if knowledge_base is None:
                raise bad(f"'entity' {entity!r} needs a knowledge base (--kb)")
            found = knowledge_base.explain(entity)
            if not found.ok:
                raise bad(f"entity {entity!r} is not in the knowledge base ({found.error})")
            explanation = found.text
        resolved = tuple(str((path.parent / r).resolve()) for r in relevant)
        out.append(LabelledQuery(query.strip(), resolved, explanation, number))
    if not out:
        raise DatasetError("holds no queries", path=str(path))
    return out


def collect(searcher: Searcher, queries: Sequence[LabelledQuery], shortlist: int = 100
            ) -> tuple[dict[str, Shortlists], dict[str, np.ndarray]]:
    """Every query searched as the search runs: per group, the shortlists with every score, and each
    query's cosine-only rank of its first relevant image (0 when not in the top K)."""
    index = searcher.index
    paths = [str(Path(p).resolve()) for p in index.paths]
    known = set(paths)
    for q in queries:
        missing = [r for r in q.relevant if r not in known]
        if missing:
            raise InputError(f"line {q.line}: relevant images {missing[:3]} are not in the gallery {index.root}")
    k = min(shortlist, len(paths))
    cols: dict[str, dict[str, list]] = {}
    for q in queries:
        result = searcher.search(q.query, top_k=k, shortlist=k, explanation=q.explanation)
        hits = result.hits
        if len(hits) < k or any(h.match_prob is None or h.dcsm is None for h in hits):
            raise InputError(f"line {q.line}: the search returned {len(hits)} of {k} candidates with every "
                             "score; evaluating needs a model with both heads")
        c = cols.setdefault(q.group, {"cosine": [], "match_prob": [], "dcsm": [], "relevant": [], "rows": [],
                                      "cosine_rank": []})
        relevant = set(q.relevant)
        for name in ("cosine", "match_prob", "dcsm"):
            c[name].append([getattr(h, name) for h in hits])
        c["relevant"].append([paths[h.id] in relevant for h in hits])
        c["rows"].append(q.group)
        embeds = searcher.matcher.encode_texts([q.query]).embeds
        _, ids = index.search(embeds, k, threads=1)
        found = [j for j, i in enumerate(ids[0]) if i >= 0 and paths[i] in relevant]
        c["cosine_rank"].append(found[0] + 1 if found else 0)
    shortlists = {g: Shortlists(*(np.asarray(c[n], np.float64) for n in ("cosine", "match_prob", "dcsm")),
                                np.asarray(c["relevant"], bool), c["rows"]) for g, c in cols.items()}
    return shortlists, {g: np.asarray(c["cosine_rank"]) for g, c in cols.items()}


def _metrics(ranked: np.ndarray) -> dict[str, float]:
    first = ranked.argmax(axis=1)
    found = ranked.any(axis=1)
    return {"r1": float(ranked[:, 0].mean()), "r5": float(ranked[:, :5].any(axis=1).mean()),
            "mrr": float(np.where(found, 1.0 / (first + 1), 0.0).mean())}


def evaluate_labelled(searcher: Searcher, queries: Sequence[LabelledQuery], shortlist: int = 100) -> dict:
    """R@1, R@5 and MRR per group and column (``COLUMNS``), with the fusion weights the search used."""
    shortlists, cosine_ranks = collect(searcher, queries, shortlist)
    table = {}
    for group, s in shortlists.items():
        weights = searcher.fusion.for_query(group == "explained")
        rank = cosine_ranks[group]
        row = {"cosine": {"r1": float((rank == 1).mean()), "r5": float(((rank >= 1) & (rank <= 5)).mean()),
                          "mrr": float(np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0).mean())},
               "dcsm": _metrics(s.ranked(s.dcsm)), "match_prob": _metrics(s.ranked(s.match_prob)),
               "fused": _metrics(s.ranked(fuse(weights, s.cosine, s.match_prob, s.dcsm)))}
        table[group] = {**row, "queries": len(s.rows),
                        "weights": {"cosine": weights.cosine, "match_prob": weights.match_prob, "dcsm": weights.dcsm}}
    return {"shortlist": min(shortlist, len(searcher.index.paths)), "gallery": len(searcher.index.paths),
            "groups": table}


def format_table(result: dict) -> str:
    lines = [f"Text -> image over {result['gallery']} images, heads rescore the top {result['shortlist']} "
             "(R@1 / R@5 / MRR)", "", "| queries | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for group, row in result["groups"].items():
        cells = " | ".join(f"{row[c]['r1']:.3f} / {row[c]['r5']:.3f} / {row[c]['mrr']:.3f}" for c in COLUMNS)
        lines.append(f"| {group} (q={row['queries']}) | {cells} |")
    return "\n".join(lines)


def open_gallery(matcher, gallery: str | Path | None, queries: Sequence[LabelledQuery], workdir: str | Path):
    """The gallery to search: an index folder as it is; else an index built in ``workdir`` from a
    folder's images (``gallery``) and every image the queries name."""
    from clipmatch.retrieval.index import GalleryIndex, build_index, list_images

    if gallery is not None and (Path(gallery) / "index.json").is_file():
        return GalleryIndex.open(gallery, matcher.manifest.model_identity)
    images = list_images([gallery]) if gallery is not None else []
    images = list(dict.fromkeys([str(Path(p).resolve()) for p in images] + [r for q in queries for r in q.relevant]))
    report = build_index(matcher, images, Path(workdir) / "index", progress=False)
    if report["failed"]:
        bad = report["failed"][0]
        raise InputError(f"{len(report['failed'])} gallery images are unreadable, e.g. {bad['path']}: {bad['error']}")
    return GalleryIndex.open(Path(workdir) / "index")
