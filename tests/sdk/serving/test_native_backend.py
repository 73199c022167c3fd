"""The onnxruntime repository on Triton's native onnxruntime backend, for real.

Needs the backend built for this server (tritonserver 2.51, backend API 1.19):
``$CLIPMATCH_TRITON_BACKENDS`` names a folder holding
``onnxruntime/libtriton_onnxruntime.so``, as ``/opt/tritonserver/backends`` does
in NVIDIA's container. Without it every test here skips, saying so.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

import clipmatch  # noqa: E402
from clipmatch.serving.repository import Batching, RepositoryConfig, write_repository  # noqa: E402
from clipmatch.serving.repository_check import check_repository  # noqa: E402
from clipmatch.serving.server import BACKENDS_ENV, TritonServer, free_port  # noqa: E402

from .burst import text_tower_burst  # noqa: E402


def _native_backends() -> str | None:
    for folder in os.environ.get(BACKENDS_ENV, "").split(os.pathsep):
        if folder and (Path(folder) / "onnxruntime" / "libtriton_onnxruntime.so").is_file():
            return folder
    return None


pytestmark = pytest.mark.skipif(
    _native_backends() is None,
    reason=f"needs Triton's native onnxruntime backend built for tritonserver 2.51: set ${BACKENDS_ENV} to a "
           "folder holding onnxruntime/libtriton_onnxruntime.so")

TEXTS = ["a red circle left of a blue square", "the Kestrel-7 valve", "no", "a green star and no triangle"]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + i % 5, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=["tiny", "default"])
def model(request, tiny_export_dir, default_export_dir):
    export = tiny_export_dir if request.param == "tiny" else default_export_dir
    return export, clipmatch.Local(export, intra_op_threads=1)


def _serve(export, out, precision="fp32", **config):
    names = write_repository(export, out, RepositoryConfig(target="onnxruntime", precision=precision, **config))
    report = check_repository(out, gpus=0)
    assert report.ok, report.summary()
    return names, TritonServer(out, free_port(), free_port(), free_port(), backend_directory=_native_backends())


@pytest.fixture(scope="module")
def native(model, tmp_path_factory):
    export, local = model
    names, server = _serve(export, tmp_path_factory.mktemp("repo") / "onnxruntime")
    with server:
        yield export, local, names, server


def test_every_model_is_ready_on_the_native_backend(native):
    import tritonclient.http as th

    _, _, names, server = native
    client = th.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert all(client.is_model_ready(n) for n in names), names
        platforms = {n: client.get_model_config(n).get("platform") or client.get_model_config(n).get("backend")
                     for n in names}
        assert platforms["image_tower"] == "onnxruntime_onnx" and platforms["rescore"] == "python"
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_encode_rescore_and_search_equal_in_process(native, protocol, tmp_path):
    pytest.importorskip("faiss")
    from clipmatch.explain.explainers import KnowledgeBaseExplainer
    from clipmatch.retrieval.index import GalleryIndex, build_index
    from clipmatch.retrieval.search import Searcher

    export, local, _, server = native
    url = server.http_url if protocol == "http" else server.grpc_url
    with clipmatch.connect(url, export) as remote:
        imgs = images(70)  # over the max batch size: split, sent concurrently, reassembled
        a, b = local.encode_images(imgs), remote.encode_images(imgs)
        assert np.abs(a.tokens - b.tokens).max() <= 1e-5 and np.abs(a.embeds - b.embeds).max() <= 1e-5
        ta, tb = local.encode_texts(TEXTS), remote.encode_texts(TEXTS)
        assert np.abs(ta.tokens - tb.tokens).max() <= 1e-5 and np.abs(ta.embeds - tb.embeds).max() <= 1e-5
        assert remote.served_rescore
        for query, explanation in ((TEXTS[0], None), (TEXTS[1], "a blue circle with yellow stripes")):
            ra, rb = local.rescore(query, a, explanation=explanation), remote.rescore(query, b, explanation=explanation)
            for score in ("cosine", "match_prob", "entity_score", "dcsm"):
                assert np.abs(getattr(ra, score) - getattr(rb, score)).max() <= 1e-5, score
        paths = []
        for i, img in enumerate(imgs[:40]):
            paths.append(str(tmp_path / f"{i}.png"))
            img.save(paths[-1])
        build_index(local, paths, tmp_path / "idx", progress=False)
        index = GalleryIndex.open(tmp_path / "idx")
        kb = KnowledgeBaseExplainer({"Kestrel-7 valve": "a blue circle with yellow stripes and a white dot"})
        for query in TEXTS[:2]:
            want = Searcher(local, index, kb).search(query, top_k=10, shortlist=25)
            got = Searcher(remote, index, kb).search(query, top_k=10, shortlist=25)
            assert [h.id for h in got.hits] == [h.id for h in want.hits]
            for x, y in zip(got.hits, want.hits):
                assert abs(x.fused - y.fused) <= 1e-4
                for score in ("cosine", "match_prob", "entity_score", "dcsm"):
                    assert abs(getattr(x, score) - getattr(y, score)) <= 1e-5, score


def test_dynamic_batching_batches_on_the_native_backend(tiny_export_dir, tmp_path):
    # The native tiny text tower answers faster than requests arrive, so with the default
    # 100 us delay batches form only under real load; a 5 ms delay makes them certain here.
    _, server = _serve(tiny_export_dir, tmp_path / "repo", default_batching=Batching(max_queue_delay_us=5000))
    requests = 120
    with server:
        inferences, executions = text_tower_burst(server.grpc_url, requests)
    assert inferences == requests
    assert executions < requests / 4, f"{executions} executions for {requests} requests"


def test_fp16_repository_loads_and_stays_within_the_fp16_gate(model, tmp_path):
    from clipmatch_export.parity import FP16

    export, local = model
    names, server = _serve(export, tmp_path / "fp16", precision="fp16")
    imgs = images(12, seed=3)
    with server, clipmatch.connect(server.grpc_url, export) as remote:
        pairs = [(local.encode_images(imgs).tokens, remote.encode_images(imgs).tokens),
                 (local.encode_texts(TEXTS).tokens, remote.encode_texts(TEXTS).tokens)]
        ra, rb = local.rescore(TEXTS[1], imgs, explanation="a blue circle"), remote.rescore(
            TEXTS[1], imgs, explanation="a blue circle")
        pairs += [(getattr(ra, s), getattr(rb, s)) for s in ("match_prob", "entity_score", "dcsm")]
    for want, got in pairs:
        assert np.all(np.abs(got - want) <= FP16.atol + FP16.rtol * np.abs(want))
        assert np.abs(got - want).max() > 1e-5  # it really ran in fp16: above fp32's own noise


def test_one_shared_onnxruntime_pool_serves_the_same_numbers(tiny_export_dir, local, tmp_path):
    names, server = _serve(tiny_export_dir, tmp_path / "repo")
    server.onnxruntime_pool = 2
    with server, clipmatch.connect(server.grpc_url, tiny_export_dir) as remote:
        imgs = images(9, seed=5)
        got, want = remote.rescore(TEXTS[0], imgs), local.rescore(TEXTS[0], imgs)
        for score in ("cosine", "match_prob", "entity_score", "dcsm"):
            assert np.abs(getattr(got, score) - getattr(want, score)).max() <= 1e-5, score
        log = server.log_file.read_text()
    assert "enable-global-threadpool" in log and '"intra_op_thread_count":"2"' in log.replace(" ", "")


def test_the_check_and_the_native_backend_refuse_a_symbolic_width_alike(tiny_export_dir, tmp_path):
    """What exports made before the dims were pinned hold: the check says what the server says."""
    import onnx

    from clipmatch.errors import BackendError

    out = tmp_path / "repo"
    write_repository(tiny_export_dir, out, RepositoryConfig(target="onnxruntime"))
    path = out / "text_tower" / "1" / "model.onnx"
    model = onnx.load(str(path))
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "Iftext_embeds_dim_1"
    onnx.save(model, str(path))
    assert [p.split(":")[:2] for p in check_repository(out, gpus=0).problems] == [["text_tower", " text_embeds"]]
    server = TritonServer(out, free_port(), free_port(), free_port(), backend_directory=_native_backends())
    with pytest.raises(BackendError, match=r"text_tower \(version 1\): .*'text_embeds': the model expects 2 "
                                           r"dimensions \(shape \[-1,-1\]\)"):
        server.start()
