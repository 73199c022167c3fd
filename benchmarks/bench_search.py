"""Indexing throughput and search latency, split by step, at 10k and 100k images, in one run.

Exports the default model (``models/default``) and runs everything in-process:

1. **Indexing**: renders ``--images`` synthetic test images to PNG files and
   indexes them with ``build_index`` (what ``clipmatch index`` runs: decode,
   preprocess, image tower, fp16 token store, commit log, FAISS); images/s.
2. **Search at each gallery size** (``--sizes``, default 10k and 100k): the
   gallery is synthetic (the issue allows it): the indexed images' real
   embeddings and tokens, repeated with a little noise on the embeddings and
   written through ``IndexWriter``, so scores have the default model's
   distribution. FAISS is chosen as ``clipmatch index`` chooses it (exact
   below 50k, IVF above). Queries are test captions of every row, entity
   queries with the knowledge-base explainer behind a warmed SQLite cache;
   each search runs the full pipeline with K = ``--shortlist`` (100):
   explanation (cache hit), query encoding, FAISS shortlist, rescoring with
   GI-ITM and DCSM, fusion. p50/p99 per step and of the whole call.

At 100k the IVF shortlist is also compared with an exact one: the share of
the exact top-K that IVF returns (its recall), and the exact search's latency.

With ``--triton``, the largest gallery is searched again with the model
served by a real Triton server on loopback (nvidia-pytriton, the ``python``
repository), over gRPC and HTTP: the same ``Searcher`` on ``clipmatch.connect``.

    python benchmarks/bench_search.py [--images 2000] [--sizes 10000,100000] [--queries 200] [--triton] [--json OUT]

Target: p50 under 50 ms at 100k images with K = 100.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import clipmatch
from clipmatch.explain.explainers import CachedExplainer, KnowledgeBaseExplainer
from clipmatch.results import ImageEncoding
from clipmatch.retrieval.index import GalleryIndex, IndexWriter, build_index
from clipmatch.retrieval.search import Searcher
from clipmatch_export.evaluation.evaluate import _examples
from clipmatch_export.exporter import ExportOptions, export_model
from clipmatch_export.synth.entities import knowledge_base
from clipmatch_export.synth.world import render

# "entity" and "dcsm" are in-process; a served rescoring in one request reports "heads".
STEPS = ("explanation", "encode", "shortlist", "token_read", "entity", "dcsm", "heads", "fusion", "rescore")
ROOT = Path(__file__).resolve().parents[1]


def model_dir(name: str, tmp: Path) -> Path:
    """``default`` (models/default), ``vit-b32`` (a ViT-B/32-shaped CLIP, random weights and heads), or a folder."""
    if name == "default":
        return ROOT / "models" / "default"
    if name == "vit-b32":
        from clipmatch_export.tiny import add_random_heads, build_vit_b32

        path = build_vit_b32(tmp / "vit-b32")
        add_random_heads(path)
        return path
    return Path(name)


def percentiles(ms) -> dict[str, float]:
    ms = np.asarray(ms, np.float64)
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


def write_gallery(folder: Path, n: int, seed: int) -> tuple[list[str], list]:
    rows = _examples(n // 6 + 1, seed)
    pool = [ex for examples in rows.values() for ex in examples][:n]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ex in enumerate(pool):
        path = folder / f"{i:06d}.png"
        Image.fromarray(render(ex.scene)).save(path)
        paths.append(str(path))
    return paths, pool


def synthetic_index(matcher, real: GalleryIndex, size: int, out: Path, seed: int, chunk: int = 10_000) -> float:
    """A ``size``-image index of the real rows repeated, embeddings jittered and renormalised; build seconds."""
    rng = np.random.default_rng(seed)
    embeds, tokens = np.asarray(real.embeds), np.asarray(real.tokens)
    experts = None if real.vision_experts is None else np.asarray(real.vision_experts)
    t0 = time.perf_counter()
    writer = IndexWriter(out, matcher.manifest)
    for start in range(0, size, chunk):
        rows = np.arange(start, min(size, start + chunk)) % len(embeds)
        e = embeds[rows] + 0.02 * rng.standard_normal((len(rows), embeds.shape[1])).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        writer.append([f"synthetic/{start + i:07d}" for i in range(len(rows))],
                      ImageEncoding(e, tokens[rows], None if experts is None else experts[rows]))
    writer.finish()
    return time.perf_counter() - t0


def run_searches(searcher: Searcher, queries: list[str], shortlist: int, warmup: int = 10) -> dict:
    for q in queries[:warmup]:
        searcher.search(q, shortlist=shortlist)
    steps: dict[str, list[float]] = {s: [] for s in STEPS}
    total = []
    for q in queries:
        t = time.perf_counter()
        r = searcher.search(q, shortlist=shortlist)
        total.append((time.perf_counter() - t) * 1e3)
        for s in STEPS:
            if s in r.timings_ms:
                steps[s].append(r.timings_ms[s])
    return {"total": percentiles(total), **{s: percentiles(v) for s, v in steps.items() if v},
            "queries": len(queries)}


def _evict(index: GalleryIndex) -> None:
    """Drop the index's array files from the page cache (as after a reboot, or a gallery larger
    than memory); clean pages go without privileges."""
    for name in ("tokens.f16", "experts.f32"):
        path = index.root / name
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def token_reads(index: GalleryIndex, k: int, trials: int, seed: int) -> dict:
    """A shortlist's rows read through the memory map (fancy indexing) and by ``GalleryIndex.rows``
    (parallel preads), from a warm and from a cold page cache; p50 / p99 ms."""
    rng = np.random.default_rng(seed)
    n = len(index.paths)
    out: dict[str, list[float]] = {}
    for _ in range(trials):
        ids = rng.choice(n, size=min(k, n), replace=False)
        for cache in ("cold", "warm"):
            if cache == "cold":
                _evict(index)
            t = time.perf_counter()
            np.asarray(index.tokens[ids], np.float32)
            if index.vision_experts is not None:
                np.asarray(index.vision_experts[ids])
            out.setdefault(f"memmap_{cache}", []).append((time.perf_counter() - t) * 1e3)
        for cache in ("cold", "warm"):
            if cache == "cold":
                _evict(index)
            t = time.perf_counter()
            index.rows(ids)
            out.setdefault(f"rows_{cache}", []).append((time.perf_counter() - t) * 1e3)
    return {name: percentiles(v) for name, v in out.items()}


def bytes_per_image(index: GalleryIndex) -> dict[str, float]:
    n = max(1, len(index.paths))
    files = {name: (index.root / name).stat().st_size for name in ("embeds.f32", "tokens.f16", "experts.f32",
                                                                    "faiss.index") if (index.root / name).exists()}
    return {**{k: round(v / n, 1) for k, v in files.items()}, "total": round(sum(files.values()) / n, 1)}


def shortlist_recall(index: GalleryIndex, matcher, queries: list[str], k: int) -> tuple[float, dict]:
    """Share of the exact top-k that the index's own (IVF) search returns, and the exact search's latency."""
    import faiss

    faiss.omp_set_num_threads(1)  # as GalleryIndex.search runs
    exact = faiss.IndexFlatIP(index.embeds.shape[1])
    exact.add(np.ascontiguousarray(index.embeds))
    vectors = matcher.encode_texts(queries).embeds
    found, times = [], []
    for v in vectors:
        t = time.perf_counter()
        _, want = exact.search(v[None], k)
        times.append((time.perf_counter() - t) * 1e3)
        _, got = index.search(v[None], k)
        found.append(len(set(want[0]) & set(got[0])) / k)
    return float(np.mean(found)), percentiles(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="default, vit-b32, or a model folder")
    p.add_argument("--images", type=int, default=2000, help="real images rendered and indexed")
    p.add_argument("--sizes", default="10000,100000", help="gallery sizes for the search sweep")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--read-trials", type=int, default=30, help="shortlists read cold and warm per gallery size")
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--triton", action="store_true", help="also search the largest gallery through Triton")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="clipmatch-bench-search-") as tmp:
        tmp = Path(tmp)
        export = export_model(model_dir(args.model, tmp), tmp / "export", ExportOptions(fp16=False)).out_dir
        matcher = clipmatch.Local(export)
        paths, pool = write_gallery(tmp / "images", args.images, args.seed)

        t = time.perf_counter()
        report = build_index(matcher, paths, tmp / "real", progress=False)
        seconds = time.perf_counter() - t
        assert report["total"] == len(paths) and not report["failed"], report
        results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                   "model": str(args.model), "shortlist": args.shortlist,
                   "indexing": {"images": len(paths), "seconds": round(seconds, 2),
                                "images_per_s": round(len(paths) / seconds, 1)},
                   "search": {}}
        print(f"indexing: {len(paths)} images in {seconds:.2f} s = {len(paths) / seconds:.0f} images/s "
              f"(decode, preprocess, image tower, token store, FAISS)")

        real = GalleryIndex.open(tmp / "real")
        (tmp / "kb.json").write_text(json.dumps(knowledge_base()))
        explainer = CachedExplainer(KnowledgeBaseExplainer(tmp / "kb.json"), tmp / "explanations.sqlite")
        rng = np.random.default_rng(args.seed)
        queries = [pool[i].caption for i in rng.permutation(len(pool))[:args.queries]]
        for q in queries:  # warm the cache: the timed searches are cache hits
            explainer.explain(q)
        explained = sum(explainer.explain(q).ok for q in queries)

        for size in sizes:
            folder = tmp / f"synthetic_{size}"
            build_s = synthetic_index(matcher, real, size, folder, args.seed + size)
            index = GalleryIndex.open(folder, matcher.manifest.model_identity)
            row = {"faiss": index.meta["faiss"], "build_s": round(build_s, 1),
                   **run_searches(Searcher(matcher, index, explainer), queries, args.shortlist)}
            row["token_reads"] = token_reads(index, args.shortlist, args.read_trials, args.seed)
            row["bytes_per_image"] = bytes_per_image(index)
            if index.meta["faiss"] != "flat":
                recall, exact_ms = shortlist_recall(index, matcher, queries, args.shortlist)
                row.update(shortlist_recall_vs_exact=round(recall, 4), exact_shortlist_ms=exact_ms)
            results["search"][str(size)] = row
            del index

        if args.triton:
            from clipmatch.serving.repository import RepositoryConfig, write_repository
            from clipmatch.serving.server import TritonServer, free_port

            index = GalleryIndex.open(tmp / f"synthetic_{max(sizes)}")
            write_repository(export, tmp / "repository", RepositoryConfig(target="python"))
            results["search_triton"] = {"gallery": max(sizes)}
            with TritonServer(tmp / "repository", free_port(), free_port(), free_port()) as server:
                for proto, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                    with clipmatch.connect(url, export) as remote:
                        results["search_triton"][proto] = run_searches(Searcher(remote, index, explainer), queries,
                                                                       args.shortlist)

    print(f"\nsearch, K = {args.shortlist}, {args.queries} queries ({explained} with an explanation, "
          f"cache hits), ms:")
    shown = [s for s in ("total", *STEPS) if any(s in row for row in results["search"].values())]
    print(f"{'gallery':>8} {'faiss':>5} | " + " | ".join(f"{s:>15}" for s in shown))
    for size, row in results["search"].items():
        cells = " | ".join(f"{row[s]['p50']:6.2f} / {row[s]['p99']:6.2f}" if s in row else f"{'-':>15}"
                           for s in shown)
        print(f"{int(size):>8} {row['faiss']:>5} | {cells}   (p50 / p99)")
        reads = row["token_reads"]
        print(f"{'':>8} shortlist rows read: " + ", ".join(f"{k} {v['p50']:.2f} / {v['p99']:.2f}" for k, v in
                                                           reads.items()) + " ms (p50 / p99)")
        print(f"{'':>8} bytes per image: " + ", ".join(f"{k} {v:g}" for k, v in row["bytes_per_image"].items()))
        if "shortlist_recall_vs_exact" in row:
            print(f"{'':>8} IVF shortlist recall vs exact: {row['shortlist_recall_vs_exact']:.3f}; exact "
                  f"shortlist p50 {row['exact_shortlist_ms']['p50']:.2f} ms")
    for proto in ("grpc", "http"):
        if proto in results.get("search_triton", {}):
            row = results["search_triton"][proto]
            cells = " | ".join(f"{row[s]['p50']:6.2f} / {row[s]['p99']:6.2f}" if s in row else f"{'-':>15}"
                               for s in shown)
            print(f"{max(sizes):>8} {proto:>5} | {cells}   (Triton on loopback)")
    biggest = results["search"][str(max(sizes))]
    verdict = "met" if biggest["total"]["p50"] < 50 else "missed"
    print(f"\ntarget: p50 < 50 ms at {max(sizes)} images with K = {args.shortlist}: "
          f"{biggest['total']['p50']:.1f} ms, {verdict}")
    results["queries"] = {"count": len(queries), "with_explanation": explained}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
