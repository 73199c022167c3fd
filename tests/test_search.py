"""Two-stage search on a real index: query checks, what a result carries, and rescoring beating cosine."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

import clipmatch  # noqa: E402
from clipmatch.errors import TextError  # noqa: E402
from clipmatch.explainers import KnowledgeBaseExplainer, OpenAIExplainer  # noqa: E402
from clipmatch.gallery_index import GalleryIndex, build_index  # noqa: E402
from clipmatch.search import Searcher  # noqa: E402

from .conftest import REPO  # noqa: E402


@pytest.fixture(scope="module")
def tiny_index(local, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    build_index(local, paths, root / "idx", progress=False)
    return GalleryIndex.open(root / "idx")


def test_bad_queries_are_refused_by_name(local, tiny_index):
    s = Searcher(local, tiny_index)
    with pytest.raises(TextError, match="query is empty"):
        s.search("   ")
    with pytest.raises(TextError, match="only stop words"):
        s.search("a photo of the")
    with pytest.raises(TextError, match="itm and/or dcsm"):
        s.search("a red circle", rescore=("clip",))


def test_a_result_carries_every_score_and_what_it_rests_on(local, tiny_index):
    down = OpenAIExplainer("http://127.0.0.1:9/v1", "m", retries=0, timeout_s=0.5)
    r = Searcher(local, tiny_index, explainer=down).search("the Orrin pump", top_k=5, shortlist=20)
    assert len(r.hits) == 5 and [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
    assert all(h.match_prob is not None and h.dcsm is not None for h in r.hits)
    assert r.hits[0].fused >= r.hits[-1].fused
    assert r.notes and "no explanation" in r.notes[0]  # the endpoint is down: searched without, and said so
    assert set(r.timings_ms) == {"explanation", "encode", "shortlist", "rescore"}
    plain = Searcher(local, tiny_index).search("the Orrin pump", top_k=5, shortlist=20, rescore=())
    assert plain.hits[0].match_prob is None and plain.hits[0].cosine >= plain.hits[-1].cosine


DEFAULT = REPO / "models" / "default"


@pytest.mark.skipif(not (DEFAULT / "config.json").is_file(), reason="no default model")
def test_rescoring_beats_cosine_on_the_default_models_test_gallery(tmp_path):
    pytest.importorskip("torch")
    from clipmatch_export.evaluate import _examples, row_of
    from clipmatch_export.exporter import ExportOptions, export_model
    from clipmatch_export.synth.entities import knowledge_base
    from clipmatch_export.synth.forms import satisfies
    from clipmatch_export.synth.world import render

    export = export_model(DEFAULT, tmp_path / "export", ExportOptions(fp16=False)).out_dir
    m = clipmatch.Local(export)
    rows = _examples(60, seed=777)
    pool = [ex for examples in rows.values() for ex in examples]
    paths = []
    for i, ex in enumerate(pool):
        p = tmp_path / "g" / f"{i:04d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(render(ex.scene)).save(p)
        paths.append(str(p))
    build_index(m, paths, tmp_path / "idx", progress=False)
    index = GalleryIndex.open(tmp_path / "idx")
    (tmp_path / "kb.json").write_text(json.dumps(knowledge_base()))
    kb = KnowledgeBaseExplainer(tmp_path / "kb.json")
    scene = {p: ex.scene for p, ex in zip(paths, pool)}

    def r1(searcher, queries, **kw):
        return float(np.mean([satisfies(scene[searcher.search(ex.caption, top_k=1, **kw).hits[0].path], ex.form)
                              for ex in queries]))

    # The search as shipped: both heads, the model's fitted fusion weights, K = 100.
    assert m.manifest.fusion is not None and m.manifest.fusion.fitted["split"] == "val"
    figures = {}
    for row in ("spatial", "binding", "negation", "entity (held-out)"):
        queries = [ex for ex in pool if row_of(ex) == row]
        cosine = r1(Searcher(m, index), queries, rescore=())
        rescored = r1(Searcher(m, index, explainer=kb), queries)
        figures[row] = (cosine, rescored)
    print("R@1 cosine -> rescored:", figures)
    # Spatial relations and held-out entities gain clearly (0.55 -> 0.68, 0.00 -> 0.82 when
    # written); binding and negation by one query in 60 each, so for them: no worse.
    for row in ("spatial", "entity (held-out)"):
        assert figures[row][1] > figures[row][0] + 0.1, (row, figures)
    for row in ("binding", "negation"):
        assert figures[row][1] >= figures[row][0], (row, figures)


def test_search_cli_prints_every_score_as_json(tiny_export_dir, tiny_index, tmp_path):
    import subprocess
    import sys

    kb = tmp_path / "kb.json"
    kb.write_text(json.dumps({"Orrin pump": "a green star with purple checks"}))
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "search", str(tiny_index.root), "the orrin PUMP",
                          "--export", str(tiny_export_dir), "--explain", str(kb), "--cache", str(tmp_path / "c.db"),
                          "--top-k", "3", "--shortlist", "10", "--json", "--heatmap", str(tmp_path / "why.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["explanation"]["text"] == "a green star with purple checks" and len(data["hits"]) == 3
    assert {"cosine", "match_prob", "entity_score", "dcsm", "fused", "path"} <= set(data["hits"][0])
    assert data["fusion_weights"] == {"cosine": 1.0, "itm": 1.0, "dcsm": 1.0}  # the tiny model has no fitted ones
    assert Image.open(tmp_path / "why.png").size[1] == 180 and "heatmap of hit 1" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "clipmatch.cli", "search", str(tiny_index.root), "the",
                          "--export", str(tiny_export_dir)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "only stop words" in bad.stderr


def test_heatmap_puts_a_word_where_its_tokens_match(local, tiny_index, tmp_path):
    from clipmatch.heatmap import render_heatmap, word_maps

    # A synthetic map: token 1 is patch 2's own token, so its map must peak at patch 2.
    p = local.manifest.sizes["num_image_tokens"]
    d = local.manifest.sizes["embed_dim"]
    grid = int(round((p - 1) ** 0.5))
    rng = np.random.default_rng(0)
    img = rng.standard_normal((p, d)).astype(np.float32) * 0.01
    txt = np.zeros((4, d), np.float32)
    txt[1] = img[1 + 2]  # token 1 equals patch 2's token: its map peaks there
    img[1 + 2] *= 100
    maps, keep = word_maps(img, txt, np.array([1, 1, 1, 0]), np.zeros(4, np.int64), np.array([0, 5, 6, 0]), {0})
    assert keep == [1, 2] and np.unravel_index(maps[0].argmax(), maps[0].shape) == divmod(2, grid)
    out = render_heatmap(local, tiny_index.paths[0], tiny_index.tokens[0], "a red circle", tmp_path / "h.png")
    png = Image.open(out)
    words = len(local.files.tokenizer(["a red circle"]).input_ids[0][local.files.tokenizer(["a red circle"])
                                                                       .attention_mask[0] > 0]) - 2
    assert png.size == (160 * (1 + words), 180)
