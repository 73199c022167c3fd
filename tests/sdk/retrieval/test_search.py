"""Two-stage search on a real index: query checks, what a result carries, and rescoring beating cosine."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

import clipmatch  # noqa: E402
from clipmatch.errors import InputError, TextError  # noqa: E402
from clipmatch.explain.explainers import KnowledgeBaseExplainer, OpenAIExplainer  # noqa: E402
from clipmatch.retrieval.index import GalleryIndex, build_index  # noqa: E402
from clipmatch.retrieval.search import Searcher  # noqa: E402

from ...conftest import REPO, write_images  # noqa: E402


@pytest.fixture(scope="module")
def tiny_index(local, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    paths = write_images(root, 40)
    build_index(local, paths, root / "idx", progress=False)
    return GalleryIndex.open(root / "idx")


def test_bad_queries_are_refused_by_name(local, tiny_index):
    s = Searcher(local, tiny_index)
    with pytest.raises(TextError, match="query is empty"):
        s.search("   ")
    with pytest.raises(TextError, match="only stop words"):
        s.search("a photo of the")
    with pytest.raises(InputError, match=r"rescore must name heads from \['entity', 'dcsm'\], got \['clip'\]"):
        s.search("a red circle", rescore=("clip",))
    with pytest.raises(InputError, match="got the str 'entity'"):  # a str would be read letter by letter
        s.search("a red circle", rescore="entity")
    with pytest.raises(InputError, match="shortlist must be a positive int, got 0"):
        s.search("a red circle", shortlist=0)
    with pytest.raises(InputError, match="top_k must be a positive int"):
        s.search("a red circle", top_k=-1)


def test_an_empty_index_gives_no_hits_and_says_so(local, tmp_path):
    from clipmatch.retrieval.index import IndexWriter

    IndexWriter(tmp_path / "empty", local.manifest).finish()
    r = Searcher(local, GalleryIndex.open(tmp_path / "empty")).search("a red circle")
    assert r.hits == [] and "holds no images" in r.notes[0]


def test_a_result_carries_every_score_and_what_it_rests_on(local, tiny_index):
    down = OpenAIExplainer("http://127.0.0.1:9/v1", "m", retries=0, timeout_s=0.5)
    r = Searcher(local, tiny_index, explainer=down).search("the Orrin pump", top_k=5, shortlist=20)
    assert len(r.hits) == 5 and [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
    assert all(h.match_prob is not None and h.dcsm is not None for h in r.hits)
    assert r.hits[0].fused >= r.hits[-1].fused
    assert r.notes and "no explanation" in r.notes[0]  # the endpoint is down: searched without, and said so
    assert set(r.timings_ms) == {"explanation", "encode", "shortlist", "token_read", "entity", "dcsm", "fusion",
                                 "rescore"}
    assert r.timings_ms["rescore"] >= r.timings_ms["entity"] + r.timings_ms["dcsm"]
    plain = Searcher(local, tiny_index).search("the Orrin pump", top_k=5, shortlist=20, rescore=())
    assert plain.hits[0].match_prob is None and plain.hits[0].cosine >= plain.hits[-1].cosine


DEFAULT = REPO / "models" / "default"


@pytest.fixture(scope="module")
def default_gallery(tmp_path_factory):
    """The default model's export, and an index of 360 test images (60 per row) with their scenes."""
    if not (DEFAULT / "config.json").is_file():
        pytest.skip("no default model")
    pytest.importorskip("torch")
    from clipmatch_export.evaluation.evaluate import _examples
    from clipmatch_export.exporter import ExportOptions, export_model
    from clipmatch_export.synth.entities import knowledge_base
    from clipmatch_export.synth.world import render

    tmp_path = tmp_path_factory.mktemp("default-gallery")
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
    (tmp_path / "kb.json").write_text(json.dumps(knowledge_base()))
    return m, GalleryIndex.open(tmp_path / "idx"), KnowledgeBaseExplainer(tmp_path / "kb.json"), dict(zip(paths, pool))


def r1_cosine_and_rescored(default_gallery, row):
    """R@1 of cosine alone and of the search as shipped (both heads, the model's fusion, K = 100)."""
    from clipmatch_export.evaluation.evaluate import row_of
    from clipmatch_export.synth.forms import satisfies

    m, index, kb, pool = default_gallery
    queries = [ex for ex in pool.values() if row_of(ex) == row]

    def r1(searcher, **kw):
        return float(np.mean([satisfies(pool[searcher.search(ex.caption, top_k=1, **kw).hits[0].path].scene, ex.form)
                              for ex in queries]))

    figures = (r1(Searcher(m, index), rescore=()), r1(Searcher(m, index, explainer=kb)))
    print(f"{row}: R@1 cosine {figures[0]:.3f} -> rescored {figures[1]:.3f}")
    return figures


# When written: spatial 0.550 -> 0.683, held-out entities 0.000 -> 0.817 (60 queries each).
@pytest.mark.parametrize("row", ["spatial", "entity (held-out)"])
def test_rescoring_beats_cosine_on_the_default_models_test_gallery(default_gallery, row):
    m = default_gallery[0]
    assert m.manifest.fusion is not None and m.manifest.fusion.fitted["split"] == "val"
    cosine, rescored = r1_cosine_and_rescored(default_gallery, row)
    assert rescored > cosine + 0.1, (row, cosine, rescored)


# Not there yet (README, "Search"): the DCSM head does not beat cosine on binding or
# negation in this default model (its own strict xfail in test_default_model.py), so
# neither does the fused search (binding 0.400 -> 0.350, negation 0.667 -> 0.667 when
# written). Strict, so the suite says so the day it starts to hold.
@pytest.mark.xfail(strict=True, reason="DCSM does not beat cosine on binding and negation yet (README)")
@pytest.mark.parametrize("row", ["binding", "negation"])
def test_rescoring_beats_cosine_on_binding_and_negation(default_gallery, row):
    cosine, rescored = r1_cosine_and_rescored(default_gallery, row)
    assert rescored > cosine, (row, cosine, rescored)


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
    assert data["fusion_weights"] == {"cosine": 1.0, "match_prob": 1.0, "dcsm": 1.0}  # the tiny model has no fitted ones
    assert Image.open(tmp_path / "why.png").size[1] == 180 and "heatmap of hit 1" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "clipmatch.cli", "search", str(tiny_index.root), "the",
                          "--export", str(tiny_export_dir)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "only stop words" in bad.stderr


def test_heatmap_puts_a_word_where_its_tokens_match(local, tiny_index, tmp_path):
    from clipmatch.retrieval.heatmap import render_heatmap, word_maps

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


def test_search_scores_are_the_unsplit_pytorch_heads_on_the_indexs_tokens(default_gallery):
    """The split graphs and the index's stored vision experts give, for every hit, what the whole
    PyTorch heads compute from the index's fp16 tokens: the scores the search had before the split."""
    import torch

    from clipmatch_export.models.heads import load_heads

    m, index, kb, pool = default_gallery
    heads, _ = load_heads(DEFAULT)
    searcher = Searcher(m, index, explainer=kb)
    queries = [ex.caption for ex in list(pool.values())[::12]]  # 30, every row
    for query in queries:
        result = searcher.search(query, top_k=100, shortlist=100)
        explanation = result.explanation.text if result.explanation is not None and result.explanation.ok else None
        q = m.encode_texts([query])
        e = q if explanation is None else m.encode_texts([explanation])
        ids = [h.id for h in result.hits]
        tokens = torch.from_numpy(np.asarray(index.tokens[ids], np.float32))
        k = len(ids)
        n, length = int(q.mask[0].sum()), m.manifest.sizes["dcsm_text_length"]
        fit = np.zeros((1, length), np.int64)
        fit[0, :min(n, length)] = 1
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
        with torch.no_grad():
            match_prob, entity_score = heads.entity(
                tokens, t(q.tokens).expand(k, -1, -1), t(q.mask).expand(k, -1), t(e.tokens).expand(k, -1, -1),
                t(e.mask).expand(k, -1))
            text = np.zeros((1, length, q.tokens.shape[2]), np.float32)
            text[0, :min(n, length)] = q.tokens[0, :min(n, length)]
            func = np.zeros((1, length), np.int64)
            func[0, :min(n, length)] = q.functional_ids[0, :min(n, length)]
            dcsm = heads.dcsm(tokens, t(text).expand(k, -1, -1), t(fit).expand(k, -1), t(func).expand(k, -1))
        got = {name: np.array([getattr(h, name) for h in result.hits]) for name in ("match_prob", "entity_score",
                                                                                    "dcsm")}
        assert np.abs(got["match_prob"] - match_prob.numpy()).max() <= 1e-5, query
        assert np.abs(got["entity_score"] - entity_score.numpy()).max() <= 1e-5, query
        # An unbounded logit of 10 to 20 here: float32 rounding at that size is 1e-6 a step.
        assert np.all(np.abs(got["dcsm"] - dcsm.numpy()) <= 1e-5 + 1e-6 * np.abs(dcsm.numpy())), query


def test_an_index_of_the_older_format_is_refused_by_name_and_upgraded_in_place(local, tmp_path):
    """Format 1 had no stored vision experts: search says which command adds them; the upgrade
    (from the stored tokens alone) gives the index a fresh run would have written."""
    from clipmatch.cli import main
    from clipmatch.errors import IncompatibleModelError

    paths = []
    for i in range(30):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    build_index(local, paths[:20], tmp_path / "idx", progress=False)
    fresh = np.fromfile(tmp_path / "idx" / "experts.f32", np.float32)
    want = Searcher(local, GalleryIndex.open(tmp_path / "idx")).search("a red circle", top_k=10, shortlist=20)
    # What an index written before the split holds.
    (tmp_path / "idx" / "experts.f32").unlink()
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta.update(format_version=1)
    del meta["vision_experts"], meta["num_experts"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match=r"format 1, without the entity heads' image part; .*"
                                                     r"clipmatch index --upgrade .*idx --export EXPORT_DIR"):
        Searcher(local, GalleryIndex.open(tmp_path / "idx"))
    assert main(["index", "--upgrade", str(tmp_path / "idx"), "--export", str(local.files.root)]) == 0
    np.testing.assert_array_equal(np.fromfile(tmp_path / "idx" / "experts.f32", np.float32), fresh)
    got = Searcher(local, GalleryIndex.open(tmp_path / "idx")).search("a red circle", top_k=10, shortlist=20)
    assert [(h.id, h.fused) for h in got.hits] == [(h.id, h.fused) for h in want.hits]
    assert main(["index", "--upgrade", str(tmp_path / "idx"), "--export", str(local.files.root)]) == 0  # no-op
    # Adding images to a format-1 index upgrades it first.
    (tmp_path / "idx" / "experts.f32").unlink()
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    report = build_index(local, paths, tmp_path / "idx", progress=False)
    assert report["upgraded"] == 20 and report["total"] == 30
    index = GalleryIndex.open(tmp_path / "idx")
    np.testing.assert_array_equal(np.asarray(index.vision_experts[:20]).ravel(), fresh)


def test_shortlist_rows_are_read_as_stored(local, tiny_index):
    ids = np.array([5, 0, 17, 3, 3])  # any order, repeats too
    rows = tiny_index.rows(ids)
    np.testing.assert_array_equal(rows.tokens, np.asarray(tiny_index.tokens[ids], np.float32))
    np.testing.assert_array_equal(rows.embeds, np.asarray(tiny_index.embeds[ids]))
    np.testing.assert_array_equal(rows.vision_experts, np.asarray(tiny_index.vision_experts[ids]))
    with pytest.raises(InputError, match=r"rows \[999\] are outside the index"):
        tiny_index.rows(np.array([1, 999]))


def test_the_heatmap_shows_the_crop_the_model_saw(local, tiny_index, tmp_path):
    from clipmatch.retrieval.heatmap import render_heatmap

    # A 3:1 image: red sides, a blue centre square. The tower sees the centre crop, so must the picture.
    wide = np.zeros((60, 180, 3), np.uint8)
    wide[:, :, 0] = 220
    wide[:, 60:120] = (20, 40, 220)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = render_heatmap(local, str(tmp_path / "wide.png"), tiny_index.tokens[0], "a red circle", tmp_path / "h.png")
    base = np.asarray(Image.open(out).convert("RGB"))[:160, :160].astype(float)
    assert base[..., 2].mean() > 150 and base[..., 0].mean() < 80, base.reshape(-1, 3).mean(0)
