"""In-process vs Triton (HTTP, gRPC) latency and throughput, and dynamic batching on vs off, in one run.

Exports the default model (``models/default``), writes two Python-backend
repositories that differ only in dynamic batching, and starts a real Triton
server (nvidia-pytriton) for each in turn on loopback. All paths run the same
graphs with one onnxruntime thread per model, so the differences are the
serving overhead, not the compute.

    python benchmarks/bench_triton.py [--calls 300] [--concurrency 16] [--json OUT]

Prints, per job (encode_images, encode_texts) and batch size (1, 8): p50 and
p99 latency in ms and throughput in items/s for Local, Triton HTTP and Triton
gRPC, and the Triton p50 overhead over in-process; the same call through bare
tritonclient with inputs built once, to split the SDK's share from the
server's. Then throughput at concurrency 16 with dynamic batching on and off,
and their ratio, twice: 16 threads calling the SDK, and 16 requests kept in
flight by tritonclient callbacks (a load generator that leaves the 2 cores to
the server). Targets: overhead <= 1.5 ms p50 at batch 1; batching >= 2x.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import clipmatch
from clipmatch.repository import RepositoryConfig, with_batching, write_repository
from clipmatch.server import TritonServer, free_port
from clipmatch_export.exporter import ExportOptions, export_model

TEXTS = ["a red circle left of a blue square", "a photo of the Kestrel-7 valve", "a green star and no cross",
         "there is a big yellow triangle", "an image of a purple square above an orange circle",
         "a blue cross with orange dots and a black rim", "a small red star", "a photo of a green circle"]


def percentiles(times):
    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_calls(fn, calls, warmup=20):
    for _ in range(warmup):
        fn()
    times = []
    t0 = time.perf_counter()
    for _ in range(calls):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return times, time.perf_counter() - t0


def concurrent_throughput(fn, threads, seconds):
    count = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < stop:
            fn()
            count[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(count) / (time.perf_counter() - t0)


def raw_requests(url: str, export: Path, images, model: str):
    """tritonclient gRPC inputs for one batch-1 request to ``model``, built once: the server's side
    without the SDK's."""
    import tritonclient.grpc as tg

    local = clipmatch.Local(export)
    if model == "image_tower":
        from clipmatch.preprocess import preprocess_images

        feeds = {"pixel_values": preprocess_images(images[:1], local.files.image_config)}
    else:
        tok = local.files.tokenizer(TEXTS[:1])
        width = int(tok.lengths[0])
        feeds = {"input_ids": tok.input_ids[:, :width], "attention_mask": tok.attention_mask[:, :width]}
    inputs = []
    for name, x in feeds.items():
        inp = tg.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(np.ascontiguousarray(x))
        inputs.append(inp)
    return tg.InferenceServerClient(url.removeprefix("grpc://")), inputs


def raw_latency(url, export, images, calls, model="image_tower"):
    client, inputs = raw_requests(url, export, images, model)
    try:
        times, _ = time_calls(lambda: client.infer(model, inputs), calls)
    finally:
        client.close()
    return percentiles(times)


def raw_throughput(url, export, images, in_flight, seconds, model):
    """Batch-1 requests kept ``in_flight`` at once by callbacks (a load generator, not threads)."""
    client, inputs = raw_requests(url, export, images, model)
    done, stop = [0], time.perf_counter() + seconds
    slots = threading.Semaphore(in_flight)

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "default")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="per concurrency measurement")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="clipmatch-bench-") as tmp:
        tmp = Path(tmp)
        export = export_model(args.model, tmp / "export", ExportOptions(fp16=False)).out_dir
        size = clipmatch.Local(export).manifest.sizes["image_size"]
        images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(8)]
        jobs = {"encode_images": lambda m, n: m.encode_images(images[:n]),
                "encode_texts": lambda m, n: m.encode_texts(TEXTS[:n])}
        on = RepositoryConfig(target="python")
        write_repository(export, tmp / "batching_on", on)
        write_repository(export, tmp / "batching_off", with_batching(on, dynamic=False))

        results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "latency": {},
                   "concurrency": {}}
        local = clipmatch.Local(export, intra_op_threads=1)
        with TritonServer(tmp / "batching_on", free_port(), free_port(), free_port(), threads_per_model=1) as s:
            remotes = {"local": local, "http": clipmatch.connect(s.http_url, export),
                       "grpc": clipmatch.connect(s.grpc_url, export)}
            for job, fn in jobs.items():
                for batch in (1, 8):
                    row = {}
                    for name, m in remotes.items():
                        times, total = time_calls(lambda: fn(m, batch), args.calls)
                        p50, p99 = percentiles(times)
                        row[name] = {"p50_ms": p50, "p99_ms": p99, "items_per_s": args.calls * batch / total}
                    for name in ("http", "grpc"):
                        row[f"{name}_overhead_p50_ms"] = row[name]["p50_ms"] - row["local"]["p50_ms"]
                    results["latency"][f"{job} b{batch}"] = row
            raw = {"p50_ms": None}
            raw["p50_ms"], raw["p99_ms"] = raw_latency(s.grpc_url, export, images, args.calls)
            results["raw_grpc_image_tower_b1"] = raw
            on_tp = concurrent_throughput(lambda: remotes["grpc"].encode_images(images[:1]), args.concurrency,
                                          args.seconds)
            on_raw = {m: raw_throughput(s.grpc_url, export, images, args.concurrency, args.seconds, m)
                      for m in ("image_tower", "text_tower")}
            for m in ("http", "grpc"):
                remotes[m].close()
        with TritonServer(tmp / "batching_off", free_port(), free_port(), free_port(), threads_per_model=1) as s:
            with clipmatch.connect(s.grpc_url, export) as g:
                off_tp = concurrent_throughput(lambda: g.encode_images(images[:1]), args.concurrency, args.seconds)
            off_raw = {m: raw_throughput(s.grpc_url, export, images, args.concurrency, args.seconds, m)
                       for m in ("image_tower", "text_tower")}
        results["concurrency"] = {"threads": args.concurrency, "job": "encode_images b1 over gRPC",
                                  "batching_on_items_per_s": on_tp, "batching_off_items_per_s": off_tp,
                                  "ratio": on_tp / off_tp,
                                  "raw_in_flight": {m: {"batching_on_items_per_s": on_raw[m],
                                                        "batching_off_items_per_s": off_raw[m],
                                                        "ratio": on_raw[m] / off_raw[m]} for m in on_raw}}

    print(f"default model, 1 onnxruntime thread per model, {args.calls} calls per figure ({results['machine']})")
    print(f"{'job':18s} {'path':6s} {'p50 ms':>8s} {'p99 ms':>8s} {'items/s':>9s}")
    for key, row in results["latency"].items():
        for name in ("local", "http", "grpc"):
            r = row[name]
            print(f"{key:18s} {name:6s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['items_per_s']:9.0f}")
        print(f"{'':18s} Triton p50 overhead: HTTP {row['http_overhead_p50_ms']:+.2f} ms, "
              f"gRPC {row['grpc_overhead_p50_ms']:+.2f} ms")
    r = results["raw_grpc_image_tower_b1"]
    print(f"tritonclient gRPC alone (inputs built once), image_tower b1: p50 {r['p50_ms']:.2f} ms, "
          f"p99 {r['p99_ms']:.2f} ms")
    c = results["concurrency"]
    print(f"concurrency {c['threads']}, SDK threads, {c['job']}: batching on {c['batching_on_items_per_s']:.0f}/s, "
          f"off {c['batching_off_items_per_s']:.0f}/s, ratio {c['ratio']:.2f}x")
    for m, r in c["raw_in_flight"].items():
        print(f"{c['threads']} requests in flight, tritonclient gRPC callbacks, {m} b1: batching on "
              f"{r['batching_on_items_per_s']:.0f}/s, off {r['batching_off_items_per_s']:.0f}/s, "
              f"ratio {r['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
