"""Fusion weights: the fit finds the score that ranks, the weights travel from model to export to search."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import clipmatch  # noqa: E402
from clipmatch.errors import IncompatibleModelError  # noqa: E402
from clipmatch.fusion import Fusion, FusionWeights, fuse  # noqa: E402
from clipmatch.manifest import HEADS_MANIFEST, ExportManifest, HeadsManifest  # noqa: E402
from clipmatch_export.evaluation.fusion_fit import (  # noqa: E402
    REFERENCE,
    FusionFitConfig,
    Shortlists,
    collect_shortlists,
    fit_model_fusion,
    fit_weights,
)
from clipmatch_export.exporter import ExportOptions, export_model  # noqa: E402
from clipmatch_export.synth.entities import HELD_OUT_ENTITIES  # noqa: E402

SMALL = FusionFitConfig(per_row=8, queries_per_row=5, shortlist=12)


def _noise(rng, q, k, relevant, dcsm):
    return Shortlists(cosine=rng.standard_normal((q, k)) * 5, match_prob=1 / (1 + np.exp(-rng.standard_normal((q, k)) * 3)),
                      dcsm=dcsm, relevant=relevant, rows=["r"] * q)


def test_fit_puts_the_weight_on_the_score_that_ranks():
    # 200 queries of 30 candidates: the relevant one is where the DCSM score peaks,
    # cosine and GI-ITM are noise at a larger scale.
    rng = np.random.default_rng(0)
    q, k = 200, 30
    dcsm = rng.standard_normal((q, k))
    relevant = dcsm == dcsm.max(axis=1, keepdims=True)
    weights, figures = fit_weights(_noise(rng, q, k, relevant, dcsm + 0.3 * rng.standard_normal((q, k))),
                                   (0.0, 0.5, 1.0, 2.0))
    assert weights.dcsm == 1.0 and weights.cosine < 0.5 and weights.match_prob < 0.5, weights
    assert figures["kept"] == "best on grid" and figures["sign_test"]["p"] < 0.01
    assert figures["r1"]["best on grid"] >= max(figures["r1"][name] for name in REFERENCE)
    assert figures["r1"]["dcsm only"] > 0.5 > figures["r1"]["cosine only"]


def test_a_gain_within_noise_keeps_equal_weights():
    # Nothing ranks: the best grid point wins a few queries by chance, and equal weights stay.
    rng = np.random.default_rng(1)
    q, k = 300, 20
    relevant = np.zeros((q, k), bool)
    relevant[np.arange(q), rng.integers(0, k, q)] = True
    weights, figures = fit_weights(_noise(rng, q, k, relevant, rng.standard_normal((q, k))), (0.0, 0.5, 1.0, 2.0))
    assert figures["r1"]["best on grid"] > figures["r1"]["equal"]  # the grid always finds some gain
    assert figures["kept"] == "equal" and figures["sign_test"]["p"] >= 0.01 and weights == FusionWeights()


def test_validation_shortlists_are_ranked_as_the_search_ranks(local):
    whole = FusionFitConfig(per_row=8, queries_per_row=5, shortlist=48)  # the shortlist is the whole gallery
    s = collect_shortlists(local, whole)
    assert set(s) == {"plain", "explained"}
    assert s["plain"].cosine.shape == (4 * 5, 48) and s["explained"].relevant.shape == (2 * 5, 48)
    assert set(s["explained"].rows) == {"entity (named)", "entity (invented name)"}
    # The shortlists are the search's own: a query's K candidates come in the search's fused order
    # (equal weights for the fit), with every score of its hits.
    from clipmatch.fusion import Fusion, fuse

    fused = fuse(Fusion().plain, s["plain"].cosine, s["plain"].match_prob, s["plain"].dcsm)
    assert np.all(np.diff(fused, axis=1) <= 1e-6)
    # Each query's own image is in the gallery and satisfies it, so every whole-gallery shortlist holds a hit.
    assert s["plain"].relevant.any(axis=1).all() and s["explained"].relevant.any(axis=1).all()
    assert np.all((s["explained"].match_prob >= 0) & (s["explained"].match_prob <= 1))
    small = collect_shortlists(local, SMALL)
    assert small["plain"].cosine.shape == (20, 12)
    # A shorter shortlist is the longer one's cosine top 12: the shortlist is by cosine, whatever the order after.
    top = -np.sort(-s["plain"].cosine, axis=1)[:, :12]
    assert np.allclose(-np.sort(-small["plain"].cosine, axis=1), top, atol=1e-6)


def test_validation_draws_no_held_out_entity():
    from clipmatch_export.evaluation.fusion_fit import _validation_rows

    rows = _validation_rows(SMALL)
    entities = {ex.entity for r in ("entity (named)", "entity (invented name)") for ex in rows[r]}
    assert entities and not entities & HELD_OUT_ENTITIES
    assert {ex.split for r in rows.values() for ex in r} == {"val"}


def test_weights_go_from_model_to_export_to_search(model_copy, tmp_path):
    before = HeadsManifest.read(model_copy).identity
    first = ExportManifest.read(export_model(model_copy, tmp_path / "before", ExportOptions(fp16=False)).out_dir)
    fusion = fit_model_fusion(model_copy, SMALL)
    stored = HeadsManifest.read(model_copy)
    assert stored.fusion == fusion and fusion.fitted["split"] == "val" and fusion.fitted["shortlist"] == 12
    for w in (fusion.plain, fusion.explained):
        assert max(w.cosine, w.match_prob, w.dcsm) == 1.0
    # The weights are not part of the model identity: refitting invalidates no export or index.
    export = export_model(model_copy, tmp_path / "export", ExportOptions(fp16=False)).out_dir
    manifest = ExportManifest.read(export)
    assert stored.identity == before and manifest.model_identity == first.model_identity
    assert manifest.fusion == fusion and first.fusion is None

    pytest.importorskip("faiss")
    from PIL import Image

    from clipmatch.explain.explainers import KnowledgeBaseExplainer
    from clipmatch.retrieval.index import GalleryIndex, build_index
    from clipmatch.retrieval.search import Searcher

    paths = []
    for i in range(12):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    m = clipmatch.Local(export)
    build_index(m, paths, tmp_path / "idx", progress=False)
    index = GalleryIndex.open(tmp_path / "idx")
    (tmp_path / "kb.json").write_text(json.dumps({"Orrin pump": "a green star"}))
    # Distinct sets, so that which one a search used shows.
    chosen = Fusion(FusionWeights(1.0, 0.5, 0.25), FusionWeights(0.0, 1.0, 0.5))
    with_kb = Searcher(m, index, KnowledgeBaseExplainer(tmp_path / "kb.json"), fusion=chosen)
    assert with_kb.search("the Orrin pump").weights == chosen.explained
    r = with_kb.search("a red circle", top_k=12)  # top_k = the gallery: every shortlisted image is a hit
    assert r.weights == chosen.plain
    # The ranking is the documented weighted sum of z-scores over the shortlist.
    got = np.array([h.fused for h in r.hits])
    want = fuse(chosen.plain, np.array([h.cosine for h in r.hits]), np.array([h.match_prob for h in r.hits]),
                np.array([h.dcsm for h in r.hits]))
    assert np.allclose(got, want, atol=1e-4)
    assert Searcher(m, index).search("a red circle").weights == fusion.plain  # the model's own by default


def test_bad_fusion_entries_are_refused_by_name(model_copy):
    data = json.loads((model_copy / HEADS_MANIFEST).read_text())
    ok = {"cosine": 1, "match_prob": 1, "dcsm": 1}
    for fusion, message in (
            ({"plain": ok, "explained": {**ok, "match_prob": -1}}, "set 'explained': fusion weight match_prob must be a finite"),
            ({"plain": {**ok, "dcsm": True}, "explained": ok}, "set 'plain': fusion weight dcsm must be a finite"),
            ({"plain": {"cosine": 0, "match_prob": 0, "dcsm": 0}, "explained": ok}, "set 'plain': fusion weights are all 0"),
            ({"plain": {**ok, "clip": 1}, "explained": ok}, r"set 'plain' has unknown scores \['clip'\]"),
            ({"plain": ok}, r"'explained'\] missing"),
            ({"plain": [1, 1, 1], "explained": ok}, "set 'plain' must be an object")):
        (model_copy / HEADS_MANIFEST).write_text(json.dumps({**data, "fusion": fusion}))
        with pytest.raises(IncompatibleModelError, match=message):
            HeadsManifest.read(model_copy)


def test_fit_fusion_cli_dry_run_writes_nothing(model_copy, tmp_path):
    before = (model_copy / HEADS_MANIFEST).read_text()
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "fit-fusion", str(model_copy), "--dry-run",
                          "--json", str(tmp_path / "f.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "plain (600 validation queries)" in out.stdout and "explained (300 validation queries)" in out.stdout
    assert (model_copy / HEADS_MANIFEST).read_text() == before
    assert set(json.loads((tmp_path / "f.json").read_text())) == {"plain", "explained", "fitted"}
