"""Against a real Triton Inference Server (nvidia-pytriton's tritonserver, Python backend) on loopback."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

import clipmatch  # noqa: E402
from clipmatch.errors import BackendError, IncompatibleModelError, InputError, ShapeError  # noqa: E402
from clipmatch.manifest import EXPORT_MANIFEST  # noqa: E402
from clipmatch.serving.repository import RepositoryConfig, write_repository  # noqa: E402
from clipmatch.serving.server import TritonServer, free_port  # noqa: E402

from .burst import inference_stats, text_tower_burst  # noqa: E402

TEXTS = ["a red circle left of a blue square", "a photo of the Kestrel-7 valve", "no", "a cat and no dog"]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30 + i % 7, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def repository(tiny_export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(tiny_export_dir, out, RepositoryConfig(target="python"))
    return out


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository, free_port(), free_port(), free_port(), threads_per_model=1) as s:
        yield s


@pytest.fixture(scope="module", params=["http", "grpc"])
def remote(request, server, tiny_export_dir):
    url = server.http_url if request.param == "http" else server.grpc_url
    with clipmatch.connect(url, tiny_export_dir) as m:
        yield m


def test_served_scores_equal_the_in_process_runtime(remote, local):
    imgs = images(150)  # over the served max batch size (64): split, sent concurrently, reassembled
    a, b = local.encode_images(imgs), remote.encode_images(imgs)
    assert np.abs(a.tokens - b.tokens).max() <= 1e-5 and np.abs(a.embeds - b.embeds).max() <= 1e-5
    ta, tb = local.encode_texts(TEXTS), remote.encode_texts(TEXTS)
    assert np.abs(ta.tokens - tb.tokens).max() <= 1e-5
    for query, explanation in ((TEXTS[0], None), (TEXTS[1], "a blue circle with yellow stripes")):
        ra = local.rescore(query, a[:20], explanation=explanation)
        rb = remote.rescore(query, b[:20], explanation=explanation)
        for score in ("cosine", "match_prob", "entity_score", "dcsm"):
            assert np.abs(getattr(ra, score) - getattr(rb, score)).max() <= 1e-5, score


def test_ensemble_equals_its_member_model(server):
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        size = json.loads(client.get_model_config("image_tower")["parameters"]["clipmatch_sizes"]["string_value"])
        px = np.random.default_rng(3).standard_normal((3, 3, size["image_size"], size["image_size"])).astype(
            np.float32)
        outs = {}
        for model in ("encode_images", "image_tower"):
            i = th.InferInput("pixel_values", list(px.shape), "FP32")
            i.set_data_from_numpy(px)
            r = client.infer(model, [i])
            outs[model] = (r.as_numpy("image_embeds"), r.as_numpy("image_tokens"))
        for x, y in zip(outs["encode_images"], outs["image_tower"]):
            np.testing.assert_array_equal(x, y)
    finally:
        client.close()


def _metric(server, model, name="nv_inference_count"):
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\d+)', text, re.M)
    return int(m.group(1)) if m else 0


def test_dynamic_batching_batches_concurrent_requests_and_metrics_count_them(server):
    metric_before, requests = _metric(server, "text_tower"), 200
    inferences, executions = text_tower_burst(server.grpc_url, requests)
    assert inferences == requests
    assert executions < requests / 2, f"{executions} executions for {requests} requests: barely batched"
    assert _metric(server, "text_tower") - metric_before == requests


def test_bad_input_gets_clear_errors_naming_the_endpoint(remote, server):
    with pytest.raises(InputError, match="no images given"):
        remote.rescore("a cat", [])
    with pytest.raises(ShapeError, match=r"image_tower: pixel_values must have shape"):
        remote.executor.run("image_tower", {"pixel_values": np.zeros((1, 3, 5, 5), np.float32)})
    with pytest.raises(ShapeError, match="must be int64"):
        remote.executor.run("text_tower", {"input_ids": np.zeros((1, 3), np.float32),
                                           "attention_mask": np.ones((1, 3), np.int64)})
    # What a client without clipmatch's checks would send: the server's answer is named, not retried.
    spec_free = remote.executor
    with pytest.raises(BackendError, match=re.escape(spec_free.url) + r".*image_tower.*"):
        spec_free._infer("image_tower", {"pixel_values": np.zeros((1, 3, 5, 5), np.float32)})


def test_a_server_that_is_down_is_named_after_the_retries(tiny_export_dir):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=re.escape(url) + r".*after 3 attempts.*unavailable"):
        clipmatch.connect(url, tiny_export_dir, retries=2, backoff_s=0.05)
    assert time.monotonic() - t0 < 20


def test_a_server_of_another_model_is_refused(server, export_copy):
    manifest = json.loads((export_copy / EXPORT_MANIFEST).read_text())
    manifest["identity"]["model"] = "0" * 64
    (export_copy / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleModelError, match=r"serves a different image_tower .*clipmatch_model_identity"):
        clipmatch.connect(server.grpc_url, export_copy)


def test_a_taken_port_is_refused_by_name(repository):
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(BackendError, match=rf"port {port} \(grpc\) is already in use"):
            TritonServer(repository, free_port(), port, free_port()).start()


def test_a_restart_mid_run_is_survived_with_nothing_lost_or_duplicated(repository, tiny_export_dir, local):
    ports = (free_port(), free_port(), free_port())
    first = TritonServer(repository, *ports, exit_timeout=3).start()
    results, errors = {}, []
    texts = [f"a red circle number {i}" for i in range(40)]
    with clipmatch.connect(first.http_url, tiny_export_dir) as m:  # the default retry window: ~20 s
        def work():
            try:
                for i, t in enumerate(texts):
                    results[i] = m.encode_texts([t]).embeds[0]
                    time.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(0.8)
        first.stop()
        time.sleep(4)  # down for longer than the 3 s the retries once covered, start-up not counted
        second = TritonServer(repository, *ports, exit_timeout=3).start()
        try:
            worker.join(120)
        finally:
            second.stop()
    assert not errors, errors
    assert sorted(results) == list(range(len(texts)))
    expected = local.encode_texts(texts).embeds
    assert np.abs(np.stack([results[i] for i in range(len(texts))]) - expected).max() <= 1e-5


def start_serve(repository):
    """`clipmatch serve` in a subprocess, read up to its ready message: (process, its output, ports)."""
    ports = (free_port(), free_port(), free_port())
    proc = subprocess.Popen([sys.executable, "-m", "clipmatch.cli", "serve", "--repository", str(repository),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                             "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C" in line or not line:
            break
    return proc, "".join(lines), ports


def test_serve_command_starts_prints_endpoints_and_stops_on_sigterm(repository):
    proc, text, (http, grpc, metrics) = start_serve(repository)
    try:
        assert f"http://127.0.0.1:{http}" in text and f"grpc://127.0.0.1:{grpc}" in text, text
        assert "bound to 127.0.0.1" in text and "admin   closed" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        for port in (http, grpc, metrics):  # the kernel's own table of listening sockets
            assert listening(port) == {"127.0.0.1"}, (port, listening(port))
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped (tritonserver exit code 0)" in rest, rest
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2)


def test_a_killed_serve_command_leaves_no_server_behind(repository):
    proc, text, (http, _, _) = start_serve(repository)
    try:
        assert "Ctrl-C" in text, text
        proc.kill()  # SIGKILL: no handler runs, the server must still go
        proc.wait(10)
        deadline = time.monotonic() + 30
        while listening(http) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(http), "tritonserver outlived the killed `clipmatch serve`"
    finally:
        if proc.poll() is None:
            proc.kill()


def listening(port: int) -> set[str]:
    """Addresses with a socket in LISTEN state on ``port``, from /proc/net/tcp and tcp6."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    raw = bytes.fromhex(address)
                    # /proc prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    ip = ipaddress.ip_address(raw)
                    found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC listens on ::ffff:127.0.0.1
    return found


def test_the_shared_memory_api_is_closed_by_default(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    http = th.InferenceServerClient(server.http_url.removeprefix("http://"))
    grpc = tg.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        for client in (http, grpc):
            with pytest.raises(Exception, match=r"(?i)restricted|permission|clipmatch-admin-key") as caught:
                client.register_system_shared_memory("probe", "/clipmatch-probe", 16)
            assert "clipmatch-admin-key" in str(caught.value)
            with pytest.raises(Exception, match="clipmatch-admin-key"):
                client.get_system_shared_memory_status()
            with pytest.raises(Exception, match="clipmatch-admin-key"):
                client.load_model("image_tower")
        assert http.is_model_ready("image_tower") and grpc.get_model_config("image_tower")  # the rest stays open
    finally:
        http.close()
        grpc.close()


def test_a_repository_the_server_cannot_run_is_refused_with_the_cause(tiny_export_dir, tmp_path):
    from clipmatch.serving.repository import RepositoryConfig, write_repository

    write_repository(tiny_export_dir, tmp_path / "native", RepositoryConfig(target="onnxruntime"))
    with pytest.raises(BackendError, match=r"needs the onnxruntime backend for dcsm, entity_image, entity_pair, "
                                           r"entity_query, image_tower, text_tower.*--backend-directory DIR"
                                           r".*onnxruntime/libtriton_onnxruntime.so"):
        TritonServer(tmp_path / "native", free_port(), free_port(), free_port(), backend_directory=[]).start()
    with pytest.raises(BackendError, match="is an export folder, not a model repository"):
        TritonServer(tiny_export_dir, free_port(), free_port(), free_port()).start()
    write_repository(tiny_export_dir, tmp_path / "py", RepositoryConfig(target="python"))
    (tmp_path / "py" / "dcsm" / "1" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match=r"models failed to load:\n  dcsm \(version 1\): "
                                           r".*(?i:protobuf parsing failed|invalid protobuf)"
                       ) as caught:
        TritonServer(tmp_path / "py", free_port(), free_port(), free_port()).start()
    assert "+------" not in str(caught.value)  # the cause, not the status table


def test_concurrent_callers_share_one_remote(remote, local):
    texts = [f"a blue square number {i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: remote.encode_texts([t]).embeds[0], texts))
    assert np.abs(np.stack(got) - local.encode_texts(texts).embeds).max() <= 1e-5


def test_asyncio_clients_share_the_core_and_agree(server, tiny_export_dir, local):
    import asyncio

    imgs = images(12, seed=5)
    queries = ["a red circle", "a blue square left of a green star", "no cat", "the Orrin pump"]

    async def run(url):
        async with await clipmatch.aio.connect(url, tiny_export_dir) as m:
            gallery = await m.encode_images(imgs)
            return await asyncio.gather(*(m.rescore(q, gallery, explanation="a round thing") for q in queries))

    for url in (server.http_url, server.grpc_url):
        for q, got in zip(queries, asyncio.run(run(url))):
            want = local.rescore(q, imgs, explanation="a round thing")
            assert np.abs(got.dcsm - want.dcsm).max() <= 1e-5 and np.abs(got.match_prob - want.match_prob).max() <= 1e-5


class _KeyCheckingGateway:
    """A reverse proxy on loopback that forwards to Triton's HTTP port only with the right API key."""

    def __init__(self, upstream_port: int, key: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("x-api-key") != key:
                    msg = b'{"error":"missing or wrong x-api-key"}'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "x-api-key")}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_headers_reach_a_gateway_that_checks_a_key(server, tiny_export_dir, local):
    gateway = _KeyCheckingGateway(server.ports.http, key="s3cret")
    try:
        with pytest.raises(BackendError, match=re.escape(gateway.url) + r".*401|" + re.escape(gateway.url)
                           + r".*x-api-key"):
            clipmatch.connect(gateway.url, tiny_export_dir, retries=0)
        with clipmatch.connect(gateway.url, tiny_export_dir, headers={"x-api-key": "s3cret"}) as m:
            got = m.encode_texts(TEXTS).embeds
        assert np.abs(got - local.encode_texts(TEXTS).embeds).max() <= 1e-5
    finally:
        gateway.close()


def test_served_rescore_answers_in_one_request_and_equals_in_process(remote, server, local):
    import tritonclient.grpc as tg

    assert remote.served_rescore
    client = tg.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        before = inference_stats(client, "rescore")[0]
        gallery = remote.encode_images(images(70, seed=9))  # K over the heads' max batch: chunked inside
        for query, explanation in (("a blue square left of a red circle and no star", None),
                                   ("the Kestrel-7 valve", "a blue circle with yellow stripes and a white dot")):
            got = remote.rescore(query, gallery, explanation=explanation)
            want = local.rescore(query, gallery, explanation=explanation)
            for score in ("cosine", "match_prob", "entity_score", "dcsm"):
                assert np.abs(getattr(got, score) - getattr(want, score)).max() <= 1e-5, score
            assert (got.explained, got.truncated, got.dcsm_truncated) == \
                (want.explained, want.truncated, want.dcsm_truncated)
        assert inference_stats(client, "rescore")[0] - before == 2
    finally:
        client.close()


def test_served_rescore_refuses_zero_candidates_by_name(remote):
    tok = remote._tokens("a cat")
    p = remote.manifest.sizes
    with pytest.raises(BackendError, match=r"rescoring 0 candidates failed: .*K = 0"):
        remote.executor.rescore({"input_ids": tok.input_ids, "attention_mask": tok.attention_mask,
                                 "functional_ids": tok.functional_ids, "explanation_ids": tok.input_ids,
                                 "explanation_mask": tok.attention_mask,
                                 "image_tokens": np.zeros((0, p["num_image_tokens"], p["embed_dim"]), np.float32),
                                 "vision_experts": np.zeros((0, p["num_experts"], p["embed_dim"]), np.float32)})


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs the openssl command for a certificate")
def test_grpc_over_tls_with_the_servers_certificate(repository, tiny_export_dir, local, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}",
           f"--grpc-root-cert={cert}"]
    with TritonServer(repository, free_port(), free_port(), free_port(), extra_args=tls) as s:
        url = f"grpcs://localhost:{s.ports.grpc}"
        with clipmatch.connect(url, tiny_export_dir, ssl_ca_file=str(cert)) as m:
            got = m.encode_texts(TEXTS).embeds
        assert np.abs(got - local.encode_texts(TEXTS).embeds).max() <= 1e-5
        # Plain gRPC against the TLS port is refused, and named.
        with pytest.raises(BackendError, match=re.escape(f"grpc://localhost:{s.ports.grpc}")):
            clipmatch.connect(f"grpc://localhost:{s.ports.grpc}", tiny_export_dir, retries=1, backoff_s=0.05,
                              timeout_s=5)


def test_search_gives_the_same_results_in_process_and_through_triton(remote, local, tmp_path):
    pytest.importorskip("faiss")
    from clipmatch.explain.explainers import KnowledgeBaseExplainer
    from clipmatch.retrieval.index import GalleryIndex, build_index
    from clipmatch.retrieval.search import Searcher

    paths = []
    for i, img in enumerate(images(40, seed=11)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    build_index(local, paths, tmp_path / "idx", progress=False)
    index = GalleryIndex.open(tmp_path / "idx")
    kb = KnowledgeBaseExplainer({"Orrin pump": "a green star with purple checks"})
    for query in ("the Orrin pump", "a red circle left of a blue square"):
        a = Searcher(local, index, kb).search(query, top_k=10, shortlist=25)
        b = Searcher(remote, index, kb).search(query, top_k=10, shortlist=25)
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        for x, y in zip(a.hits, b.hits):
            assert abs(x.fused - y.fused) <= 1e-4 and abs(x.dcsm - y.dcsm) <= 1e-5
            assert abs(x.match_prob - y.match_prob) <= 1e-5 and abs(x.cosine - y.cosine) <= 1e-5
