"""Serving in one run: in-process vs Triton's native onnxruntime backend vs the python target.

For each model of ``--models`` (``default``: models/default; ``vit-b32``: a
ViT-B/32-shaped CLIP, ``CLIPConfig()`` defaults with random weights and
untrained heads, since latency does not depend on the weights):

1. exports it (fp32) and writes two repositories from the same description:
   ``onnxruntime`` (Triton's native backend) and ``python`` (onnxruntime inside
   the Python backend), each served in turn by a real tritonserver on loopback;
2. **latency**: encode_images and encode_texts at batch 1 and 8 through the
   SDK: ``Local`` and each served path over HTTP and gRPC, p50/p99 and the p50
   overhead over in-process. Every path runs one onnxruntime thread per model,
   so the differences are serving, not compute;
3. **search** over a ``--gallery``-image index (default 100k) with K = 100:
   the same ``Searcher`` in-process and through each served path. The gallery
   is synthetic: ``--real-images`` rendered test images indexed in-process,
   their rows repeated with noise (as ``bench_search.py`` does). In-process
   runs as a user runs it (onnxruntime's own threads) and at one thread; the
   repositories run their defaults (the host's cores shared out among the
   models: one thread each here), and the native backend once more with one
   thread pool of every core shared by all models (``native_pool``);
4. for the first model, dynamic batching on vs off (python target) with 16
   requests in flight, as before.

The native backend is found by ``--backend-directory`` or
``$CLIPMATCH_TRITON_BACKENDS`` (a folder holding
``onnxruntime/libtriton_onnxruntime.so`` built for tritonserver 2.51); without
it the native rows are left out and the run says so.

    python benchmarks/bench_triton.py [--models default,vit-b32] [--gallery 100000] [--json OUT]

Targets: native overhead over in-process <= 0.5 ms p50 at batch 1 (default
model); search through the native target <= 1.5x in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import clipmatch
from clipmatch.explain.explainers import CachedExplainer, KnowledgeBaseExplainer
from clipmatch.retrieval.index import GalleryIndex, build_index
from clipmatch.retrieval.search import Searcher
from clipmatch.serving.repository import RepositoryConfig, with_batching, write_repository
from clipmatch.serving.repository_check import check_repository
from clipmatch.serving.server import BACKENDS_ENV, TritonServer, free_port
from clipmatch_export.exporter import ExportOptions, export_model
from clipmatch_export.synth.entities import knowledge_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import model_dir, percentiles, run_searches, synthetic_index, write_gallery  # noqa: E402

TEXTS = ["a red circle left of a blue square", "a photo of the Kestrel-7 valve", "a green star and no cross",
         "there is a big yellow triangle", "an image of a purple square above an orange circle",
         "a blue cross with orange dots and a black rim", "a small red star", "a photo of a green circle"]


def time_calls(fn, calls: int, budget_s: float, warmup: int = 5) -> tuple[list[float], float]:
    """Up to ``calls`` timed calls, fewer (at least 10) when ``budget_s`` runs out; ms each, and items/s basis."""
    for _ in range(warmup):
        fn()
    times, t0 = [], time.perf_counter()
    while len(times) < calls and (len(times) < 10 or time.perf_counter() - t0 < budget_s):
        s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - s) * 1e3)
    return times, time.perf_counter() - t0


def latency_rows(paths: dict, images, calls: int, budget_s: float) -> dict:
    jobs = {"encode_images": lambda m, n: m.encode_images(images[:n]),
            "encode_texts": lambda m, n: m.encode_texts(TEXTS[:n])}
    rows = {}
    for job, fn in jobs.items():
        for batch in (1, 8):
            row = {}
            for name, m in paths.items():
                times, total = time_calls(lambda: fn(m, batch), calls, budget_s)
                row[name] = {**percentiles(times), "calls": len(times), "items_per_s": len(times) * batch / total}
            for name in paths:
                if name != "local":
                    row[name]["overhead_p50_ms"] = row[name]["p50"] - row["local"]["p50"]
            rows[f"{job} b{batch}"] = row
    return rows


def in_flight_throughput(url: str, model: str, feeds: dict, in_flight: int, seconds: float) -> float:
    """Batch-1 requests kept ``in_flight`` at once by tritonclient callbacks (a load generator, not threads)."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url.removeprefix("grpc://"))
    inputs = []
    for name, x in feeds.items():
        inp = tg.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(np.ascontiguousarray(x))
        inputs.append(inp)
    done, slots, stop = [0], threading.Semaphore(in_flight), time.perf_counter() + seconds

    def callback(result, error):
        done[0] += error is None
        slots.release()

    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        slots.acquire()
        client.async_infer(model, inputs, callback)
    for _ in range(in_flight):
        slots.acquire()
    rate = done[0] / (time.perf_counter() - t0)
    client.close()
    return rate


def batching_on_off(export: Path, tmp: Path, local, images, in_flight: int, seconds: float) -> dict:
    on = RepositoryConfig(target="python", threads_per_model=1)
    write_repository(export, tmp / "batching_on", on)
    write_repository(export, tmp / "batching_off", with_batching(on, dynamic=False))
    from clipmatch.inputs.preprocess import preprocess_images

    tok = local.files.tokenizer(TEXTS[:1])
    width = int(tok.lengths[0])
    feeds = {"image_tower": {"pixel_values": preprocess_images(images[:1], local.files.image_config)},
             "text_tower": {"input_ids": tok.input_ids[:, :width], "attention_mask": tok.attention_mask[:, :width]}}
    out = {}
    for mode in ("on", "off"):
        with TritonServer(tmp / f"batching_{mode}", free_port(), free_port(), free_port(), exit_timeout=3) as s:
            out[mode] = {m: in_flight_throughput(s.grpc_url, m, f, in_flight, seconds) for m, f in feeds.items()}
    return {m: {"on_per_s": out["on"][m], "off_per_s": out["off"][m], "ratio": out["on"][m] / out["off"][m]}
            for m in feeds}


def search_setup(local, tmp: Path, real_images: int, gallery: int, seed: int, queries: int):
    paths, pool = write_gallery(tmp / "images", real_images, seed)
    build_index(local, paths, tmp / "real", progress=False)
    real = GalleryIndex.open(tmp / "real")
    synthetic_index(local, real, gallery, tmp / "gallery", seed + gallery)
    (tmp / "kb.json").write_text(json.dumps(knowledge_base()))
    explainer = CachedExplainer(KnowledgeBaseExplainer(tmp / "kb.json"), tmp / "explanations.sqlite")
    rng = np.random.default_rng(seed)
    texts = [pool[i].caption for i in rng.permutation(len(pool))[:queries]]
    for q in texts:  # warm the cache: the timed searches are cache hits
        explainer.explain(q)
    return GalleryIndex.open(tmp / "gallery", local.manifest.model_identity), explainer, texts


def bench_model(name: str, args, tmp: Path, backends: str | None, first: bool) -> dict:
    tmp = tmp / name.replace("/", "_")
    tmp.mkdir(parents=True)
    t = time.perf_counter()
    export = export_model(model_dir(name, tmp), tmp / "export", ExportOptions(fp16=False)).out_dir
    result = {"export_s": round(time.perf_counter() - t, 1), "latency": {}, "search": {}}
    local1 = clipmatch.Local(export, intra_op_threads=1)
    size = local1.manifest.sizes["image_size"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    big = local1.manifest.sizes["embed_dim"] >= 256
    queries = args.search_queries_large if big else args.search_queries
    index, explainer, texts = search_setup(clipmatch.Local(export), tmp, args.real_images, args.gallery, args.seed,
                                           queries)
    result["search_queries"] = len(texts)
    result["search"]["local"] = run_searches(Searcher(clipmatch.Local(export), index, explainer), texts,
                                             args.shortlist, warmup=3)
    result["search"]["local_1thread"] = run_searches(Searcher(local1, index, explainer), texts, args.shortlist,
                                                     warmup=3)
    # (label, repository, server options); latency is measured on the runs without server options
    runs = [("python", RepositoryConfig(target="python"), {})]
    if backends:
        native = RepositoryConfig(target="onnxruntime")
        runs = [("native", native, {}), ("native_pool", native, {"onnxruntime_pool": os.cpu_count()})] + runs
    for target, config, server_options in runs:
        # Latency at one thread per model on every path; search at the repository's defaults.
        for threads in ((None,) if server_options else (1, None)):
            repo = tmp / f"repo_{target}_{threads or 'default'}"
            write_repository(export, repo, replace(config, threads_per_model=threads))
            checked = check_repository(repo)
            assert checked.ok, checked.summary()
            with TritonServer(repo, free_port(), free_port(), free_port(), backend_directory=backends,
                              exit_timeout=3, **server_options) as server:
                remotes = {f"{target}_{p}": clipmatch.connect(u, export)
                           for p, u in (("http", server.http_url), ("grpc", server.grpc_url))}
                try:
                    if threads == 1:
                        rows = latency_rows({"local": local1, **remotes}, images, args.calls, args.budget_s)
                        for job, row in rows.items():
                            result["latency"].setdefault(job, {"local": row["local"]}).update(
                                {k: v for k, v in row.items() if k != "local"})
                    else:
                        for key, m in remotes.items():
                            result["search"][key] = run_searches(Searcher(m, index, explainer), texts,
                                                                 args.shortlist, warmup=3)
                finally:
                    for m in remotes.values():
                        m.close()
    if first and args.batching:
        result["batching"] = batching_on_off(export, tmp, local1, images, args.concurrency, args.seconds)
    del index
    return result


def report(name: str, r: dict, gallery: int, shortlist: int) -> None:
    print(f"\n== {name} model (export {r['export_s']} s) ==")
    print("latency, one onnxruntime thread per model on every path, p50 / p99 ms (overhead p50 over in-process):")
    for job, row in r["latency"].items():
        cells = []
        for path, v in row.items():
            extra = f" ({v['overhead_p50_ms']:+.2f})" if "overhead_p50_ms" in v else ""
            cells.append(f"{path} {v['p50']:.2f}/{v['p99']:.2f}{extra}")
        print(f"  {job:17s} " + " | ".join(cells))
    print(f"search at {gallery} images, K = {shortlist}, {r['search_queries']} queries, p50 / p99 ms "
          f"(total; rescore):")
    base = r["search"]["local"]["total"]["p50"]
    for path, v in r["search"].items():
        print(f"  {path:18s} {v['total']['p50']:8.2f} / {v['total']['p99']:8.2f}; rescore "
              f"{v['rescore']['p50']:8.2f} / {v['rescore']['p99']:8.2f}   {v['total']['p50'] / base:5.2f}x in-process")
    for m, v in r.get("batching", {}).items():
        print(f"  dynamic batching (python target, 16 in flight) {m}: on {v['on_per_s']:.0f}/s, "
              f"off {v['off_per_s']:.0f}/s, {v['ratio']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default,vit-b32", help="default, vit-b32, or model folders")
    p.add_argument("--backend-directory", default=os.environ.get(BACKENDS_ENV) or None,
                   help=f"native backends (default ${BACKENDS_ENV})")
    p.add_argument("--calls", type=int, default=300, help="most timed calls per latency figure")
    p.add_argument("--budget-s", type=float, default=6.0, help="time per latency figure (at least 10 calls)")
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--real-images", type=int, default=500, help="rendered images behind the synthetic gallery")
    p.add_argument("--search-queries", type=int, default=100, help="per search path (small models)")
    p.add_argument("--search-queries-large", type=int, default=30, help="per search path (embed_dim >= 256)")
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--no-batching", dest="batching", action="store_false", help="skip batching on vs off")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="per batching throughput figure")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "gallery": args.gallery,
               "shortlist": args.shortlist, "native_backend": args.backend_directory, "models": {}}
    if not args.backend_directory:
        print(f"no native backend (--backend-directory / ${BACKENDS_ENV}): native rows left out")
    with tempfile.TemporaryDirectory(prefix="clipmatch-bench-triton-") as tmp:
        for i, name in enumerate(m for m in args.models.split(",") if m):
            results["models"][name] = bench_model(name, args, Path(tmp), args.backend_directory, first=i == 0)
            report(name, results["models"][name], args.gallery, args.shortlist)
            if args.json:  # after every model: a long run keeps what it measured
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    default = results["models"].get("default")
    if default and "native_grpc" in default["latency"]["encode_images b1"]:
        worst = max(default["latency"][j][f"native_{p}"]["overhead_p50_ms"]
                    for j in ("encode_images b1", "encode_texts b1") for p in ("http", "grpc"))
        print(f"\ntarget: native overhead <= 0.5 ms p50 at batch 1 (default model): worst {worst:+.2f} ms, "
              f"{'met' if worst <= 0.5 else 'missed'}")
    for name, r in results["models"].items():
        if "native_grpc" in r["search"]:
            ratio = min(r["search"][f"native_{p}"]["total"]["p50"] for p in ("http", "grpc")) / \
                r["search"]["local"]["total"]["p50"]
            print(f"target: search through native <= 1.5x in-process ({name}): {ratio:.2f}x, "
                  f"{'met' if ratio <= 1.5 else 'missed'}")


if __name__ == "__main__":
    main()
