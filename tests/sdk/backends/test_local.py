"""The in-process runtime on a real export: parity with PyTorch, every input kind, every bad input."""
from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

import clipmatch
from clipmatch import (
    BackendError,
    ImageEncoding,
    ImageError,
    IncompatibleModelError,
    InputError,
    ModelNotFoundError,
    ShapeError,
    TextError,
)
from clipmatch.manifest import EXPORT_MANIFEST

from ...conftest import PYTHON, sdk_only_env


def scene(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(150, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(2):
        x, y = (int(v) for v in rng.integers(0, 30, 2))
        d.ellipse((x, y, x + 14, y + 12), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


IMAGES = [scene(i, size) for i, size in enumerate([(48, 40), (37, 53), (64, 64), (100, 30), (33, 33)])]
QUERY = "a red cube left of a blue ball and no green cone above it"
EXPLANATION = "the kestrel valve is a blue cylinder with yellow stripes"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- parity with PyTorch ---------------------------------------------------------

@pytest.fixture(scope="module")
def torch_reference(tiny_model_dir):
    """Scores computed entirely in PyTorch + transformers, from the checkpoint folder."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from clipmatch.inputs.tokenizer import ClipTokenizer
    from clipmatch_export.models.heads import load_heads
    from clipmatch_export.models.towers import ImageTower, TextTower

    clip = CLIPModel.from_pretrained(str(tiny_model_dir)).eval()
    heads, manifest = load_heads(tiny_model_dir)
    processor = CLIPImageProcessorPil.from_pretrained(str(tiny_model_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model_dir))
    L = manifest.config.dcsm_text_length

    def text(t):
        enc = tokenizer([t], return_tensors="pt", truncation=True, max_length=77)
        return enc["input_ids"], enc["attention_mask"]

    with torch.no_grad():
        pixels = torch.from_numpy(processor(IMAGES, return_tensors="np")["pixel_values"])
        img_embeds, img_tokens = ImageTower(clip)(pixels)
        ids, mask = text(QUERY)
        q_embeds, q_tokens = TextTower(clip)(ids, mask)
        e_ids, e_mask = text(EXPLANATION)
        _, e_tokens = TextTower(clip)(e_ids, e_mask)
        k = len(IMAGES)
        rep = lambda x: x.expand(k, *x.shape[1:])
        match_prob, entity_score = heads.entity(img_tokens, rep(q_tokens), rep(mask), rep(e_tokens), rep(e_mask))
        # Functional ids come from the SDK tokenizer (its placement is tested in test_tokenizer).
        func = torch.from_numpy(ClipTokenizer.from_dir(tiny_model_dir)([QUERY], functional_words=manifest.config
                                                                       .functional_words).functional_ids)
        assert func.shape == ids.shape and int(func.sum()) > 0
        fit = lambda x: torch.nn.functional.pad(x[:, :L], (0, 0) * (x.dim() - 2) + (0, max(0, L - x.shape[1])))
        dcsm = heads.dcsm(img_tokens, rep(fit(q_tokens)), rep(fit(mask)), rep(fit(func)))
    return {"cosine": (img_embeds @ q_embeds[0]).numpy(), "match_prob": match_prob.numpy(),
            "entity_score": entity_score.numpy(), "dcsm": dcsm.numpy(), "image_embeds": img_embeds.numpy(),
            "image_tokens": img_tokens.numpy()}


def test_sdk_scores_match_pytorch(local, torch_reference):
    images = local.encode_images(IMAGES)
    np.testing.assert_allclose(images.embeds, torch_reference["image_embeds"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(images.tokens, torch_reference["image_tokens"], atol=1e-4, rtol=0)
    r = local.rescore(QUERY, IMAGES, explanation=EXPLANATION)
    assert r.explained and not r.truncated and r.dcsm_truncated  # the query is longer than L=16 tokens
    for name in ("cosine", "match_prob", "entity_score", "dcsm"):
        diff = np.abs(getattr(r, name) - torch_reference[name]).max()
        print(f"{name}: max |sdk - torch| = {diff:.2e}")  # shown with pytest -s
        assert diff <= 1e-4, f"{name}: max |sdk - torch| = {diff}"


def test_fp16_graphs_run_and_stay_close(tiny_export_dir, local):
    half = clipmatch.Local(tiny_export_dir, precision="fp16")
    a = local.rescore(QUERY, IMAGES, explanation=EXPLANATION)
    b = half.rescore(QUERY, IMAGES, explanation=EXPLANATION)
    for name in ("cosine", "match_prob", "entity_score", "dcsm"):
        assert np.abs(getattr(a, name) - getattr(b, name)).max() < 5e-3, name


# -- inputs ------------------------------------------------------------------------

def test_every_image_input_kind_gives_the_same_encoding(local, tmp_path):
    img = IMAGES[1]
    path = tmp_path / "a.png"
    img.save(path)
    kinds = [str(path), path, png_bytes(img), img, np.asarray(img)]
    enc = local.encode_images(kinds)
    np.testing.assert_allclose(enc.embeds, np.repeat(enc.embeds[:1], len(kinds), 0), atol=1e-6)


def test_batches_are_split_and_reassembled_in_order(tiny_export_dir, local):
    small = clipmatch.Local(tiny_export_dir, image_batch_size=2, text_batch_size=2, pair_batch_size=2)
    np.testing.assert_allclose(small.encode_images(IMAGES).tokens, local.encode_images(IMAGES).tokens, atol=1e-6)
    texts = ["a cat", QUERY, "red", "a blue ball below a cube", "no"]
    a, b = small.encode_texts(texts), local.encode_texts(texts)
    np.testing.assert_allclose(a.embeds, b.embeds, atol=1e-6)
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-6)
    for name in ("match_prob", "dcsm"):
        np.testing.assert_allclose(getattr(small.rescore(QUERY, IMAGES), name),
                                   getattr(local.rescore(QUERY, IMAGES), name), atol=1e-6)


def test_cached_encodings_score_like_raw_inputs(local):
    gallery = local.encode_images(IMAGES)
    a = local.rescore(QUERY, gallery, explanation=EXPLANATION)
    b = local.rescore(QUERY, IMAGES, explanation=EXPLANATION)
    np.testing.assert_allclose(a.dcsm, b.dcsm, atol=1e-6)
    np.testing.assert_allclose(local.cosine(gallery, [QUERY])[:, 0], a.cosine, atol=1e-6)
    assert a.order("dcsm").tolist() == np.argsort(-a.dcsm, kind="stable").tolist()


def test_converted_image_modes_encode(local):
    rgb = IMAGES[2]
    grey, rgba, cmyk = rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("CMYK")
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    enc = local.encode_images([grey, rgba, cmyk, sixteen, np.asarray(grey), np.asarray(grey).astype(np.uint16) * 257])
    assert np.isfinite(enc.tokens).all()
    np.testing.assert_allclose(enc.embeds[0], enc.embeds[3], atol=1e-5)  # 16-bit scaled, not clipped
    np.testing.assert_allclose(enc.embeds[0], enc.embeds[4], atol=1e-6)
    np.testing.assert_allclose(enc.embeds[1], local.encode_images([rgb]).embeds[0], atol=1e-6)  # opaque alpha


def test_long_text_is_truncated_and_says_so(local):
    long = " ".join(["a red cube left of a blue ball"] * 30)
    enc = local.encode_texts(["short", long])
    assert enc.truncated.tolist() == [False, True]
    assert enc.mask[1].sum() == 77
    assert local.rescore(long, IMAGES[:2]).truncated


def test_query_without_explanation_is_flagged(local):
    r = local.rescore("a red cube", IMAGES[:3])
    assert not r.explained and not r.explanation_truncated and r.match_prob.shape == (3,)
    long = " ".join(["a blue cylinder with yellow stripes"] * 30)
    r = local.rescore("the kestrel valve", IMAGES[:3], explanation=long, heads="entity")
    assert r.explained and r.explanation_truncated and not r.truncated and r.dcsm is None
    with pytest.raises(InputError, match="'dcsm'"):
        r.order("dcsm")


# -- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("bad, problem", [
    (b"definitely not an image", "not an image|corrupt"),
    (png_bytes(IMAGES[0])[:60], "truncated|corrupt"),
    (np.zeros((0, 5, 3), np.uint8), "zero|empty|0x"),
    (Image.new("RGB", (1, 1)), "1x1"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
])
def test_bad_image_names_its_index_across_batches(tiny_export_dir, bad, problem):
    import re

    m = clipmatch.Local(tiny_export_dir, image_batch_size=2)
    with pytest.raises(ImageError) as err:
        m.encode_images([IMAGES[0], IMAGES[1], IMAGES[2], bad])
    assert err.value.index == 3
    assert "item 3" in str(err.value) and re.search(problem, str(err.value), re.I), str(err.value)


def test_bad_texts(local):
    with pytest.raises(InputError, match="no texts"):
        local.encode_texts([])
    with pytest.raises(TextError) as err:
        local.encode_texts(["fine", ""])
    assert err.value.index == 1
    with pytest.raises(InputError, match="list"):
        local.encode_texts("a bare string")
    with pytest.raises(InputError, match="no images"):
        local.encode_images([])
    with pytest.raises(InputError, match="query must be a str"):
        local.rescore(None, IMAGES[:1])


def test_mismatched_shapes_are_refused(local):
    enc = local.encode_images(IMAGES[:3])
    with pytest.raises(ShapeError, match="do not fit"):
        ImageEncoding(enc.embeds, enc.tokens[:2])
    wrong_tokens = ImageEncoding(enc.embeds, np.repeat(enc.tokens, 2, axis=1))  # P doubled
    with pytest.raises(ShapeError, match="image_tokens must have shape"):
        local.rescore(QUERY, wrong_tokens)
    nan = ImageEncoding(enc.embeds, enc.tokens.copy())
    nan.tokens[1, 0, 0] = np.nan
    with pytest.raises(ShapeError, match=r"NaN or inf in rows \[1\]"):
        local.rescore(QUERY, nan, heads=["dcsm"])
    with pytest.raises(InputError, match="unknown heads"):
        local.rescore(QUERY, enc, heads=["itm"])
    # Cached embeddings are checked before the cosine step, too.
    with pytest.raises(ShapeError, match="different models"):
        local.rescore(QUERY, ImageEncoding(enc.embeds[:, :-1], enc.tokens[:, :, :-1]))
    broken = ImageEncoding(enc.embeds.copy(), enc.tokens)
    broken.embeds[2, 0] = np.inf
    with pytest.raises(ShapeError, match=r"NaN or inf in rows \[2\]"):
        local.rescore(QUERY, broken)


def test_unavailable_provider_is_named(tiny_export_dir):
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        clipmatch.Local(tiny_export_dir, providers=("CUDAExecutionProvider",))


# -- broken export folders ---------------------------------------------------------------

def test_missing_or_incomplete_export(tmp_path, export_copy):
    with pytest.raises(ModelNotFoundError, match="not found"):
        clipmatch.Local(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match=EXPORT_MANIFEST):
        clipmatch.Local(tmp_path)
    (export_copy / "dcsm.onnx").unlink()
    with pytest.raises(ModelNotFoundError, match="dcsm.onnx"):
        clipmatch.Local(export_copy)


def test_graph_from_another_export_is_refused(export_copy):
    pytest.importorskip("onnx")
    from clipmatch_export.onnx_export import set_metadata

    set_metadata(export_copy / "text_tower.onnx", {"clipmatch.model_identity": "0" * 64})
    with pytest.raises(IncompatibleModelError, match="does not belong to this export"):
        clipmatch.Local(export_copy)


def test_swapped_tokenizer_is_refused(export_copy):
    data = json.loads((export_copy / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (export_copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelError, match="tokenizer"):
        clipmatch.Local(export_copy)


def test_towers_only_export_serves_cosine_not_heads(model_copy, tmp_path):
    pytest.importorskip("torch")
    from clipmatch_export.exporter import ExportOptions, export_model

    out = export_model(model_copy, tmp_path / "towers", ExportOptions(towers_only=True, fp16=False)).out_dir
    m = clipmatch.Local(out)
    assert m.heads == ()
    r = m.rescore(QUERY, IMAGES[:2])
    assert r.match_prob is None and r.dcsm is None and r.cosine.shape == (2,)
    with pytest.raises(ModelNotFoundError, match="dcsm"):
        m.rescore(QUERY, IMAGES[:2], heads=["dcsm"])


# -- no torch -------------------------------------------------------------------------------

def test_sdk_runs_where_torch_cannot_be_imported(tiny_export_dir):
    code = f"""
import sys
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable: the blocker did not work")
import numpy as np, clipmatch
m = clipmatch.Local({str(tiny_export_dir)!r})
r = m.rescore("a red cube left of a ball", [np.full((40, 40, 3), 200, np.uint8)] * 3, explanation="red")
assert r.dcsm.shape == (3,) and np.isfinite(r.match_prob).all()
assert not [k for k in sys.modules if k.split('.')[0] in ("torch", "transformers")], "torch got imported"
print("ok")
"""
    out = subprocess.run([PYTHON, "-c", code], env=sdk_only_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
