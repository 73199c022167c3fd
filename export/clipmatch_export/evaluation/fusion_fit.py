"""``clipmatch fit-fusion``: the search fusion weights, fitted on the synthetic validation split.

The search ranks its shortlist by a weighted sum of z-scored scores
(``clipmatch.fusion``). This fits the weights the way the search uses them:
a gallery of validation images, each query's shortlist taken exactly as
``Searcher`` takes it (cosine of the query, plus its explanation's when it
has one; K = 100), every head run on it through the exported graphs, and
the weights chosen on a grid to maximise R@1 (ties: mean reciprocal rank),
where a hit is any image that satisfies the query's logical form. The best
grid point is kept only where it beats equal weights by more than chance (a
paired sign test, p < 0.01); else the set stays equal.

Two weight sets, one per kind of query:

- ``plain``: queries without an explanation (basic, binding, spatial,
  negation);
- ``explained``: entity queries with their knowledge-base explanation, half
  under their own names and half under invented names. The validation split
  holds no held-out entity (those are the test split's), and an invented
  name is what a never-seen name looks like to the towers: no signal, so the
  weights must not lean on the query's cosine alone.

The test split is never read: ``clipmatch eval`` then measures the fitted
weights on data they were not chosen on.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipmatch.fusion import Fusion, FusionWeights, Shortlists
from clipmatch.manifest import HeadsManifest
from clipmatch.matcher import Matcher
from clipmatch_export.evaluation.evaluate import search_gallery, shortlist_scores
from clipmatch_export.synth.dataset import make_examples
from clipmatch_export.synth.entities import knowledge_base, rename_entities
from clipmatch_export.synth.forms import satisfies
from clipmatch_export.synth.world import render
from clipmatch_export.train.data import kb_explanation

__all__ = ["FusionFitConfig", "collect_shortlists", "fit_labelled_fusion", "fit_weights", "fit_fusion", "fit_model_fusion",
           "format_fit", "GROUPS"]

PLAIN_ROWS = ("basic", "binding", "spatial", "negation")
ENTITY_ROWS = ("entity (named)", "entity (invented name)")
GROUPS = {"plain": PLAIN_ROWS, "explained": ENTITY_ROWS}
# Reference points reported beside the fit: each score alone, and all equal.
REFERENCE = {"cosine only": (1, 0, 0), "match_prob only": (0, 1, 0), "dcsm only": (0, 0, 1), "equal": (1, 1, 1)}


@dataclass(frozen=True)
class FusionFitConfig:
    seed: int = 20261124  # validation examples; eval's test seed differs
    per_row: int = 200  # validation examples per row; all go into the gallery
    queries_per_row: int = 150
    shortlist: int = 100  # the search default
    grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _validation_rows(config: FusionFitConfig) -> dict[str, list]:
    rows = {p: make_examples("val", config.per_row, config.seed, phenomena=(p,)) for p in PLAIN_ROWS}
    entity = make_examples("val", 2 * config.per_row, config.seed + 1, phenomena=("entity",))
    rows[ENTITY_ROWS[0]], rows[ENTITY_ROWS[1]] = entity[0::2], entity[1::2]
    return rows


def collect_shortlists(matcher: Matcher, config: FusionFitConfig) -> dict[str, Shortlists]:
    """The search run on the validation queries, by group: each shortlist with every score."""
    rows = _validation_rows(config)
    gallery_ex = [ex for examples in rows.values() for ex in examples]
    # Equal weights for the search itself: the shortlist does not depend on them, and the
    # fit sees every candidate's scores.
    searcher = search_gallery(matcher, [render(ex.scene) for ex in gallery_ex], fusion=Fusion())
    kb = knowledge_base()
    rng = np.random.default_rng(config.seed)
    k = min(config.shortlist, len(gallery_ex))
    out: dict[str, Shortlists] = {}
    for group, names in GROUPS.items():
        cols: dict[str, list] = {"cosine": [], "match_prob": [], "dcsm": [], "relevant": [], "rows": []}
        for row in names:
            for ex in rows[row][:config.queries_per_row]:
                explanation = kb_explanation(ex.caption, kb) if group == "explained" else None
                caption = rename_entities(ex.caption, {}, rng) if row == ENTITY_ROWS[1] else ex.caption
                found = shortlist_scores(searcher, caption, explanation, k)
                for name in ("cosine", "match_prob", "dcsm"):
                    cols[name].append(found[name])
                cols["relevant"].append([satisfies(gallery_ex[i].scene, ex.form) for i in found["ids"]])
                cols["rows"].append(row)
        out[group] = Shortlists(*(np.asarray(cols[c], np.float64) for c in ("cosine", "match_prob", "dcsm")),
                                np.asarray(cols["relevant"], bool), cols["rows"])
    return out


def _normalised(w: tuple[float, ...]) -> FusionWeights:
    top = max(w)
    return FusionWeights(*(round(x / top, 4) for x in w))


def sign_test(wins: int, losses: int) -> float:
    """One-sided p of at least ``wins`` of ``wins + losses`` discordant queries going one way by chance."""
    n = wins + losses
    return float(sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n) if n else 1.0


def fit_weights(shortlists: Shortlists, grid: tuple[float, ...], alpha: float = 0.01) -> tuple[FusionWeights, dict]:
    """The weights to ship for one group, and the figures that chose them.

    The grid point with the best R@1 (then MRR) replaces equal weights only
    where it beats them by more than chance: a one-sided paired sign test over
    the queries that one gets right and the other wrong, p < ``alpha``.
    Picking the best of 215 points finds a few queries' gain on noise alone,
    and equal weights are the better guess then.
    """
    best_key, best = None, None
    for w in itertools.product(grid, repeat=3):
        if not any(w):
            continue
        r1, mrr, _ = shortlists.r1_mrr(FusionWeights(*w))
        if best_key is None or (r1, mrr) > best_key:
            best_key, best = (r1, mrr), w
    equal = REFERENCE["equal"]
    hits = {"equal": shortlists.r1_mrr(FusionWeights(*equal))[2],
            "best on grid": shortlists.r1_mrr(FusionWeights(*best))[2]}  # each query's R@1
    wins = int((hits["best on grid"] & ~hits["equal"]).sum())
    losses = int((~hits["best on grid"] & hits["equal"]).sum())
    p = sign_test(wins, losses)
    chosen = _normalised(best if p < alpha else equal)
    figures = {name: shortlists.r1_mrr(FusionWeights(*w))[0] for name, w in REFERENCE.items()}
    figures["best on grid"] = best_key[0]
    rows = np.array(shortlists.rows)
    by_row = {row: {name: float(h[rows == row].mean()) for name, h in hits.items()}
              for row in dict.fromkeys(shortlists.rows)}
    return chosen, {
        "r1": {k: round(v, 4) for k, v in figures.items()},
        "r1_by_row": {r: {k: round(v, 4) for k, v in d.items()} for r, d in by_row.items()},
        "best_on_grid": asdict(_normalised(best)),
        "sign_test": {"wins": wins, "losses": losses, "p": p, "alpha": alpha},
        "kept": "equal" if chosen == FusionWeights() else "best on grid",
        "queries": len(shortlists.rows)}


def fit_fusion(matcher: Matcher, config: FusionFitConfig = FusionFitConfig()) -> Fusion:
    shortlists = collect_shortlists(matcher, config)
    weights, figures = {}, {}
    for group, s in shortlists.items():
        weights[group], figures[group] = fit_weights(s, config.grid)
    fitted = {"split": "val", "seed": config.seed, "shortlist": config.shortlist, "grid": list(config.grid),
              "objective": "R@1 (ties: MRR)",
              "rule": "the best grid point where a paired sign test against equal weights gives p < 0.01, "
                      "else equal",
              **{g: figures[g] for g in GROUPS}}
    return Fusion(weights["plain"], weights["explained"], fitted)


def fit_model_fusion(model_dir: str | Path, config: FusionFitConfig = FusionFitConfig(), *,
                     write: bool = True) -> Fusion:
    """Fit on ``model_dir``'s exported graphs and, with ``write``, store the weights in its heads manifest."""
    from clipmatch.backends.local import Local
    from clipmatch_export.exporter import exported

    manifest = HeadsManifest.read(model_dir) if write else None  # fail before the work, not after
    with exported(model_dir) as export_dir:
        fusion = fit_fusion(Local(export_dir), config)
    if manifest is not None:
        dataclasses.replace(manifest, fusion=fusion).write(model_dir)
    return fusion


def fit_labelled_fusion(model_dir: str | Path, data: str | Path, *, gallery: str | Path | None = None,
                        knowledge_base: str | Path | None = None, shortlist: int = 100,
                        grid: tuple[float, ...] = FusionFitConfig.grid, write: bool = True) -> Fusion:
    """The same fit and sign test on a user's labelled queries (``clipmatch.retrieval.labelled``) over their
    own gallery, searched as the search runs. A group without queries keeps the model's weights."""
    import tempfile

    from clipmatch.backends.local import Local
    from clipmatch.explain.explainers import KnowledgeBaseExplainer
    from clipmatch.retrieval.labelled import collect, open_gallery, read_labelled
    from clipmatch.retrieval.search import Searcher
    from clipmatch_export.exporter import exported

    manifest = HeadsManifest.read(model_dir)  # fail before the work, not after
    kb = KnowledgeBaseExplainer(knowledge_base) if knowledge_base is not None else None
    queries = read_labelled(data, knowledge_base=kb)
    with exported(model_dir) as export_dir, tempfile.TemporaryDirectory(prefix="clipmatch-fit-") as tmp:
        matcher = Local(export_dir)
        index = open_gallery(matcher, gallery, queries, tmp)
        # Equal weights for the search itself: the shortlist does not depend on them, and the
        # fit sees every candidate's scores.
        shortlists, _ = collect(Searcher(matcher, index, fusion=Fusion()), queries, shortlist)
    current = manifest.fusion or Fusion()
    weights, figures = {}, {}
    for group in GROUPS:
        if group in shortlists:
            weights[group], figures[group] = fit_weights(shortlists[group], grid)
        else:
            weights[group] = current.for_query(group == "explained")
            figures[group] = {"queries": 0, "kept": "the model's (no labelled queries of this group)"}
    fitted = {"split": "labelled data", "data": str(Path(data).resolve()), "gallery": len(index.paths),
              "shortlist": min(shortlist, len(index.paths)), "grid": list(grid), "objective": "R@1 (ties: MRR)",
              "rule": "the best grid point where a paired sign test against equal weights gives p < 0.01, "
                      "else equal", **figures}
    fusion = Fusion(weights["plain"], weights["explained"], fitted)
    if write:
        dataclasses.replace(manifest, fusion=fusion).write(model_dir)
    return fusion


def format_fit(fusion: Fusion) -> str:
    lines = []
    for group in GROUPS:
        w, f = fusion.for_query(group == "explained"), fusion.fitted[group]
        if not f.get("queries"):
            lines.append(f"{group}: no queries; weights cosine {w.cosine:g}, match_prob {w.match_prob:g}, dcsm {w.dcsm:g} "
                         f"kept: {f.get('kept')}")
            continue
        split = "labelled" if fusion.fitted.get("split") == "labelled data" else "validation"
        lines.append(f"{group} ({f['queries']} {split} queries): weights cosine {w.cosine:g}, "
                     f"match_prob {w.match_prob:g}, dcsm {w.dcsm:g}")
        lines.append("  R@1: " + ", ".join(f"{k} {v:.3f}" for k, v in f["r1"].items()))
        t = f["sign_test"]
        b = f["best_on_grid"]
        lines.append(f"  best on grid {b['cosine']:g} / {b['match_prob']:g} / {b['dcsm']:g} against equal: "
                     f"{t['wins']} queries won, {t['losses']} lost, sign test p = {t['p']:.2g}; kept: {f['kept']}")
        for row, v in f["r1_by_row"].items():
            lines.append(f"  {row}: equal {v['equal']:.3f}, best on grid {v['best on grid']:.3f}")
    return "\n".join(lines)
