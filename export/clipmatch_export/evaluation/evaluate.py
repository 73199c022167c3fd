"""``clipmatch eval``: what each head is worth, per phenomenon, on the synthetic test split.

Runs the served path (an export loaded with the SDK runtime), not PyTorch.
Two protocols:

1. image -> K captions: one test image, its true caption and that caption's
   hard negatives; correct when the true caption scores highest.
2. text -> image: a gallery of test images; each query's cosine top-K is
   rescored; R@1 and R@5 count a hit when the retrieved image *satisfies* the
   query (checked on the scene's logical form), not only when it is the
   query's own image, since many images fit "a red circle". An entity query
   comes with its KB explanation, and the top-K the heads rescore is ranked by
   the query's cosine plus the explanation's (the CLIP cosine column ranks by
   the query alone): the EntityCLIP pipeline, explanation included.

Columns: chance, CLIP cosine, DCSM, MMAE/GI-ITM (match probability, reading
the KB explanation of each candidate caption for entity rows) and combined:
the search's fusion (``clipmatch.fusion``), a weighted sum of the three
scores z-scored within the candidate list, with the model's weights fitted
on the validation split (``clipmatch fit-fusion``; equal weights for a model
without them), the explained set for entity rows.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipmatch.fusion import Fusion, fuse
from clipmatch.matcher import Matcher
from clipmatch.retrieval.gallery import MemoryGallery
from clipmatch.retrieval.search import Searcher
from clipmatch_export.synth.dataset import make_examples
from clipmatch_export.synth.entities import HELD_OUT_ENTITIES, knowledge_base
from clipmatch_export.synth.forms import satisfies
from clipmatch_export.synth.world import render
from clipmatch_export.train.data import kb_explanation

ROWS = ("basic", "binding", "spatial", "negation", "entity (seen)", "entity (held-out)")
COLUMNS = ("chance", "cosine", "dcsm", "match_prob", "fused")


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 20261123  # differs from every training seed
    per_row: int = 200  # protocol 1 examples per row
    gallery_size: int = 1200  # protocol 2 gallery
    queries_per_row: int = 150
    shortlist: int = 100  # cosine top-K that the heads rescore: the search default


def row_of(example) -> str:
    if example.phenomenon != "entity":
        return example.phenomenon
    return "entity (held-out)" if example.entity in HELD_OUT_ENTITIES else "entity (seen)"


def _examples(n_per_row: int, seed: int) -> dict[str, list]:
    """Test examples bucketed by row; entity examples drawn until both entity rows are full."""
    rows: dict[str, list] = {r: [] for r in ROWS}
    for phenomenon in ("basic", "binding", "spatial", "negation"):
        rows[phenomenon] = make_examples("test", n_per_row, seed, phenomena=(phenomenon,))
    attempt = 0
    while min(len(rows["entity (seen)"]), len(rows["entity (held-out)"])) < n_per_row and attempt < 20:
        for ex in make_examples("test", 2 * n_per_row, seed + 7919 * (attempt + 1), phenomena=("entity",)):
            bucket = rows[row_of(ex)]
            if len(bucket) < n_per_row:
                bucket.append(ex)
        attempt += 1
    return rows


def _explanation(caption: str, example) -> str | None:
    """The KB explanation for an entity caption, found by the entity name it mentions."""
    return kb_explanation(caption, _KB) if example.phenomenon == "entity" else None


_KB = knowledge_base()


def _scores(matcher: Matcher, captions: Sequence[str], explanations: Sequence[str | None], images) -> dict[str, np.ndarray]:
    """Every column's score for each (caption, image) candidate pair, as (len(captions), len(images))."""
    cos = np.zeros((len(captions), len(images)))
    dcsm = np.zeros_like(cos)
    itm = np.zeros_like(cos)
    for i, (caption, expl) in enumerate(zip(captions, explanations)):
        r = matcher.rescore(caption, images, explanation=expl)
        cos[i], dcsm[i], itm[i] = r.cosine, r.dcsm, r.match_prob
    return {"cosine": cos, "dcsm": dcsm, "match_prob": itm}


def search_gallery(matcher: Matcher, images: Sequence, fusion: Fusion | None = None) -> Searcher:
    """A ``Searcher`` over ``images`` encoded in memory: every protocol that ranks a gallery
    ranks it as ``clipmatch search`` does (shortlist by the query's cosine plus its
    explanation's, the heads, the fusion)."""
    encoding = matcher.with_vision_experts(matcher.encode_images(list(images)))  # as the index stores them
    gallery = MemoryGallery(encoding, matcher.manifest.model_identity)
    return Searcher(matcher, gallery, fusion=fusion, explanation_cache=0)


def shortlist_scores(searcher: Searcher, query: str, explanation: str | None, k: int) -> dict[str, np.ndarray]:
    """The search's K candidates for one query (gallery rows, in the search's order) with every score."""
    hits = searcher.search(query, top_k=k, shortlist=k, explanation=explanation).hits
    out = {"ids": np.array([h.id for h in hits], np.int64)}
    for name in ("cosine", "match_prob", "dcsm", "fused"):
        out[name] = np.array([np.nan if getattr(h, name) is None else getattr(h, name) for h in hits], np.float64)
    return out


def image_to_captions(matcher: Matcher, rows: dict[str, list]) -> dict[str, dict[str, float]]:
    fusion = matcher.manifest.fusion or Fusion()
    table: dict[str, dict[str, float]] = {}
    for row, examples in rows.items():
        hits = {c: 0 for c in COLUMNS[1:]}
        chance = 0.0
        for ex in examples:
            image = matcher.encode_images([render(ex.scene)])
            captions = [ex.caption, *ex.negative_captions]
            s = _scores(matcher, captions, [_explanation(c, ex) for c in captions], image)
            cols = {k: v[:, 0] for k, v in s.items()}
            cols["fused"] = fuse(fusion.for_query(ex.phenomenon == "entity"), cols["cosine"], cols["match_prob"],
                                    cols["dcsm"])
            for name, v in cols.items():
                hits[name] += int(np.argmax(v) == 0 and (v[0] > v[1:]).all())  # ties count as misses
            chance += 1 / len(captions)
        n = max(1, len(examples))
        table[row] = {"chance": chance / n, **{k: v / n for k, v in hits.items()}, "n": len(examples)}
    return table


def text_to_image(matcher: Matcher, rows: dict[str, list], config: EvalConfig) -> dict[str, dict[str, dict[str, float]]]:
    # The gallery: test images of every row, so queries meet distractors of all kinds.
    pool = [ex for examples in rows.values() for ex in examples]
    rng = np.random.default_rng(config.seed)
    gallery_ex = [pool[i] for i in rng.permutation(len(pool))[:config.gallery_size]]
    searcher = search_gallery(matcher, [render(ex.scene) for ex in gallery_ex])
    gallery = searcher.index.encoding
    scenes = [ex.scene for ex in gallery_ex]
    out: dict[str, dict[str, dict[str, float]]] = {}
    k = min(config.shortlist, len(gallery_ex))
    for row in ROWS:
        queries = [ex for ex in gallery_ex if row_of(ex) == row][:config.queries_per_row]
        recall = {c: {"r1": 0.0, "r5": 0.0} for c in COLUMNS}
        for ex in queries:
            relevant = np.array([satisfies(s, ex.form) for s in scenes])
            r = int(relevant.sum())
            n = len(scenes)
            recall["chance"]["r1"] += r / n
            recall["chance"]["r5"] += 1 - math.comb(n - r, 5) / math.comb(n, 5)
            # The cosine column ranks the whole gallery by the query alone; the others are
            # the search's shortlist reordered by each score (the rest of the gallery after).
            plain = np.argsort(-matcher.cosine(gallery, [ex.caption])[:, 0], kind="stable")
            found = shortlist_scores(searcher, ex.caption, _explanation(ex.caption, ex), k)
            rest = np.setdiff1d(np.arange(n), found["ids"])  # never read past the top 5 when K >= 5
            rankings = {"cosine": plain}
            for name in ("dcsm", "match_prob", "fused"):
                rankings[name] = np.concatenate([found["ids"][np.argsort(-found[name], kind="stable")], rest])
            for name, ranked in rankings.items():
                recall[name]["r1"] += float(relevant[ranked[0]])
                recall[name]["r5"] += float(relevant[ranked[:5]].any())
        q = max(1, len(queries))
        out[row] = {c: {m: v / q for m, v in rv.items()} for c, rv in recall.items()}
        out[row]["n"] = {"queries": len(queries), "gallery": len(scenes)}
    return out


def evaluate(matcher: Matcher, config: EvalConfig = EvalConfig()) -> dict:
    rows = _examples(config.per_row, config.seed)
    return {"config": asdict(config), "image_to_captions": image_to_captions(matcher, rows),
            "text_to_image": text_to_image(matcher, rows, config)}


def format_markdown(result: dict) -> str:
    head = "| row | chance | cosine | dcsm | match_prob | fused |\n|---|---|---|---|---|---|"
    lines = ["**Image -> K captions** (accuracy: the true caption scores highest; n examples per row)", "", head]
    for row, v in result["image_to_captions"].items():
        lines.append(f"| {row} (n={v['n']}) | " + " | ".join(f"{v[c]:.3f}" for c in COLUMNS) + " |")
    t2i = result["text_to_image"]
    gallery = next(iter(t2i.values()))["n"]["gallery"]
    lines += ["", f"**Text -> image** (R@1 / R@5 over a {gallery}-image test gallery; heads rescore the cosine "
              f"top-{result['config']['shortlist']})", "", head]
    for row, v in t2i.items():
        lines.append(f"| {row} (q={v['n']['queries']}) | " +
                     " | ".join(f"{v[c]['r1']:.3f} / {v[c]['r5']:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
