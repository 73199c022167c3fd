"""Property-based tests (hypothesis): whatever images, texts, arrays or damaged index files come in, the
answer is a result or a clipmatch error, never another exception. Bounded and seeded for CI."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from PIL import Image  # noqa: E402

from clipmatch.errors import ClipmatchError  # noqa: E402
from clipmatch.inputs.images import load_image  # noqa: E402
from clipmatch.results import ImageEncoding, TextEncoding  # noqa: E402

from .conftest import write_images  # noqa: E402

BOUNDED = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(8, 8)


@BOUNDED
@given(st.one_of(
    st.binary(max_size=512),
    st.builds(lambda cut, tail: PNG[:cut] + tail, st.integers(0, len(PNG)), st.binary(max_size=64)),
    st.builds(lambda i, b: PNG[:i] + bytes([b]) + PNG[i + 1:], st.integers(0, len(PNG) - 1), st.integers(0, 255)),
    hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
               hnp.array_shapes(min_dims=1, max_dims=4, max_side=6)),
))
def test_any_image_input_is_an_image_or_an_image_error(item):
    try:
        image = load_image(item, 0)
    except ClipmatchError:
        return
    assert image.mode == "RGB" and min(image.size) >= 2


@BOUNDED
@given(st.lists(st.text(st.characters(codec=None, exclude_categories=()), max_size=300), min_size=1, max_size=3))
def test_any_text_is_tokenised_or_a_text_error(local, texts):
    try:
        batch = local.tokenize(texts)
    except ClipmatchError:
        return
    assert batch.input_ids.shape[0] == len(texts) and batch.input_ids.shape[1] <= local.manifest.sizes["context_length"]


@BOUNDED
@given(st.data())
def test_any_hand_built_encoding_is_refused_or_scores_finitely(local, data):
    d, p = local.manifest.sizes["embed_dim"], local.manifest.sizes["num_image_tokens"]
    n = data.draw(st.integers(1, 3))
    t = data.draw(st.integers(1, 6))
    floats = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))

    def arr(shape, dtype=np.float32, elements=floats):
        return data.draw(hnp.arrays(dtype, shape, elements=elements))

    try:
        text = TextEncoding(("q",) * n, arr((n, data.draw(st.sampled_from([d, d + 1])))), arr((n, t, d)),
                            arr((n, t), np.int64, st.integers(-1, 2)), arr((n, t), np.int64, st.integers(-1, 3)),
                            np.zeros(n, bool))
        images = ImageEncoding(arr((4, d)), arr((4, data.draw(st.sampled_from([p, p - 1])), d)))
        result = local.rescore(text.row(0), images)
    except ClipmatchError:
        return
    for scores in (result.cosine, result.match_prob, result.dcsm):
        assert scores is None or np.isfinite(scores).all()


@pytest.fixture(scope="module")
def small_index(local, tmp_path_factory):
    pytest.importorskip("faiss")
    from clipmatch.retrieval.index import build_index

    root = tmp_path_factory.mktemp("prop")
    paths = write_images(root, 6, side=16)
    build_index(local, paths, root / "idx", progress=False)
    return root / "idx", paths


FILES = ["index.json", "images.jsonl", "embeds.f32", "tokens.f16", "experts.f32", "faiss.index"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(FILES), how=st.sampled_from(["truncate", "append", "replace", "delete"]),
       where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=64))
def test_any_damaged_index_file_is_a_clipmatch_error_or_a_consistent_index(local, small_index, tmp_path, name, how,
                                                                           where, junk):
    from clipmatch.retrieval.index import GalleryIndex, build_index

    source, paths = small_index
    root = tmp_path / f"idx-{name}-{how}-{int(where * 1e6)}-{junk.hex()[:8]}"
    shutil.copytree(source, root)
    target = root / name
    data = target.read_bytes()
    cut = int(len(data) * where)
    if how == "truncate":
        target.write_bytes(data[:cut])
    elif how == "append":
        target.write_bytes(data + junk)
    elif how == "replace":
        target.write_bytes(data[:cut] + junk + data[cut + len(junk):])
    else:
        target.unlink()
    try:
        index = GalleryIndex.open(root, local.manifest.model_identity)
        scores, ids = index.search(np.asarray(index.embeds[:1], np.float32), 3)
        assert set(ids[0].tolist()) <= set(range(len(index.paths))) | {-1}
        index.rows(ids[0][ids[0] >= 0])
    except ClipmatchError:
        pass
    try:  # adding to it: refused, or every committed image is still there exactly once
        build_index(local, paths, root, progress=False)
        after = GalleryIndex.open(root)
        assert sorted(after.paths) == sorted(set(after.paths)) and len(after.paths) == after.faiss_index.ntotal
    except ClipmatchError:
        pass
