"""A server restarted with another model between two calls of one Remote is refused before any row returns."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

import clipmatch  # noqa: E402
from clipmatch.errors import IncompatibleModelError  # noqa: E402
from clipmatch.serving.repository import RepositoryConfig, write_repository  # noqa: E402
from clipmatch.serving.server import TritonServer, free_port  # noqa: E402


@pytest.fixture(scope="module")
def repositories(tiny_export_dir, other_export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    for name, export in (("first", tiny_export_dir), ("other", other_export_dir)):
        write_repository(export, root / name, RepositoryConfig(target="python"))
    return root / "first", root / "other"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_restart_with_another_model_is_refused_on_the_next_call(repositories, tiny_export_dir, local, protocol):
    first_repo, other_repo = repositories
    ports = (free_port(), free_port(), free_port())
    server = TritonServer(first_repo, *ports, exit_timeout=3).start()
    try:
        url = server.http_url if protocol == "http" else server.grpc_url
        with clipmatch.connect(url, tiny_export_dir, retries=20, backoff_s=0.2, max_backoff_s=1.0) as m:
            got = m.encode_texts(["a red circle"]).embeds
            assert np.abs(got - local.encode_texts(["a red circle"]).embeds).max() <= 1e-5
            server.stop()
            server = TritonServer(other_repo, *ports, exit_timeout=3).start()  # same address, another model
            for call in (lambda: m.encode_texts(["a blue square"]), lambda: m.rescore("a cat", got_images()),
                         lambda: m.encode_images(got_images())):
                with pytest.raises(IncompatibleModelError, match=r"serves a different .*clipmatch_model_identity"):
                    call()  # every later call too: it stays refused
    finally:
        server.stop()


def got_images(n=3):
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]


def test_an_index_written_through_a_restarted_server_keeps_only_the_first_models_rows(
        repositories, tiny_export_dir, local, tmp_path):
    pytest.importorskip("faiss")
    from clipmatch.retrieval.index import GalleryIndex, build_index

    first_repo, other_repo = repositories
    rng = np.random.default_rng(8)
    paths = []
    for i in range(240):
        paths.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(rng.integers(0, 255, (34, 34, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "index"
    ports = (free_port(), free_port(), free_port())
    server = TritonServer(first_repo, *ports, exit_timeout=3).start()
    errors: list[BaseException] = []
    try:
        with clipmatch.connect(server.grpc_url, tiny_export_dir, retries=20, backoff_s=0.2,
                               max_backoff_s=1.0) as m:
            def job():
                try:
                    build_index(m, paths, out, chunk=4, progress=False)
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    errors.append(exc)

            worker = threading.Thread(target=job)
            worker.start()
            deadline = time.monotonic() + 60
            while not (out / "images.jsonl").exists() or len((out / "images.jsonl").read_text().splitlines()) < 8:
                assert time.monotonic() < deadline and worker.is_alive(), errors
                time.sleep(0.02)
            server.stop()  # mid-job
            server = TritonServer(other_repo, *ports, exit_timeout=3).start()
            worker.join(120)
            assert not worker.is_alive()
    finally:
        server.stop()
    assert len(errors) == 1 and isinstance(errors[0], IncompatibleModelError), errors
    committed = [json.loads(line)["path"] for line in (out / "images.jsonl").read_text().splitlines()]
    assert 8 <= len(committed) < len(paths)
    # Finishing the job in-process with the first model: every image once, every row the first model's.
    build_index(local, paths, out, chunk=64, progress=False)
    index = GalleryIndex.open(out, local.manifest.model_identity)
    assert index.paths == committed + [p for p in paths if p not in set(committed)]
    order = [paths.index(p) for p in index.paths]
    want = local.encode_images([paths[i] for i in order])
    assert np.abs(np.asarray(index.embeds) - want.embeds).max() <= 1e-5
