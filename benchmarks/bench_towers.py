"""Tower latency: PyTorch eager vs the SDK's in-process onnxruntime path, side by side.

Builds a ViT-B/32-shaped CLIP from ``CLIPConfig()`` defaults with random
weights (latency does not depend on the weights), exports its towers, and
times, interleaved in one run and on the same threads:

- PyTorch eager: the tower module under ``torch.no_grad()`` on ready tensors;
- SDK graph: onnxruntime on the same ready tensors (the graph alone);
- SDK call: ``Local.encode_images`` / ``encode_texts`` from 224x224 uint8
  images / strings, so preprocessing and tokenisation are included.

Paths are timed in alternating blocks, not call by call: the thread pools of
one library keep spinning briefly after a call and slow the other's next one.

    python benchmarks/bench_towers.py [--threads 2] [--repeats 20] [--json OUT]

Prints medians and p90s in ms and the ratio eager / SDK (higher = SDK faster).
Target: the SDK call at least 1.5x faster than eager for the image tower at batch 1.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

import clipmatch
from clipmatch_export import tiny
from clipmatch_export.exporter import ExportOptions, export_model
from clipmatch_export.models.towers import ImageTower, TextTower

CAPTIONS = [
    "a red cube to the left of a small blue ball",
    "two green cones and no yellow cylinder",
    "the kestrel valve next to a striped box",
    "a big purple sphere above a tiny orange cube on a grey table",
    "a photo of a dog",
    "three white squares without a black circle",
    "a blue cylinder below a red cone",
    "an orange ball right of a green cube and a small pink star",
]


def build_vit_b32(root: Path, seed: int = 0) -> Path:
    return tiny.build_vit_b32(root / "vit-b32", seed=seed)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="clipmatch-bench-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_vit_b32(Path(tmp))
        result = export_model(model_dir, Path(tmp) / "export", ExportOptions(towers_only=True))
        print(f"ViT-B/32-shaped CLIP built and exported in {time.perf_counter() - t0:.0f} s")
        for name in ("image_tower", "text_tower"):
            print(f"  {name} ONNX vs PyTorch max|diff|: fp32 {result.report.worst(name, 'fp32'):.1e}, "
                  f"fp16 {result.report.worst(name, 'fp16'):.1e}")

        clip = CLIPModel.from_pretrained(str(model_dir)).eval()
        image_tower, text_tower = ImageTower(clip).eval(), TextTower(clip).eval()
        sdk = clipmatch.Local(result.out_dir, intra_op_threads=args.threads)
        rng = np.random.default_rng(0)
        rows = []
        for batch in (1, 8):
            images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
            texts = CAPTIONS[:batch]
            pixels = np.stack([np.zeros((3, 224, 224), np.float32)] * batch)
            pixels[:] = rng.standard_normal(pixels.shape)
            tokens = sdk.files.tokenizer(texts)
            ids, mask = tokens.input_ids, tokens.attention_mask
            cases = {
                "image": {
                    "pytorch eager": lambda: image_tower(torch.from_numpy(pixels)),
                    "sdk graph": lambda: sdk.executor.run("image_tower", {"pixel_values": pixels}),
                    "sdk call": lambda: sdk.encode_images(images),
                },
                "text": {
                    "pytorch eager": lambda: text_tower(torch.from_numpy(ids), torch.from_numpy(mask)),
                    "sdk graph": lambda: sdk.executor.run("text_tower", {"input_ids": ids, "attention_mask": mask}),
                    "sdk call": lambda: sdk.encode_texts(texts),
                },
            }
            with torch.no_grad():
                for tower, fns in cases.items():
                    for _ in range(args.warmup):
                        for fn in fns.values():
                            fn()
                    times = {name: [] for name in fns}
                    # Blocks, not single calls, alternated twice (ABC ABC) so drift hits every
                    # path alike; each block opens with an untimed call, because the threads of
                    # the path that ran before (torch's OpenMP, onnxruntime's pool) spin on for
                    # a while and would slow the first call of the next path.
                    for _ in range(2):
                        for name, fn in fns.items():
                            fn()
                            times[name].extend(timed(fn) for _ in range((args.repeats + 1) // 2))
                    med = {n: statistics.median(t) for n, t in times.items()}
                    p90 = {n: float(np.percentile(t, 90)) for n, t in times.items()}
                    rows.append({"tower": tower, "batch": batch, "median_ms": med, "p90_ms": p90,
                                 "eager_over_sdk_call": med["pytorch eager"] / med["sdk call"],
                                 "eager_over_sdk_graph": med["pytorch eager"] / med["sdk graph"]})

    print(f"\n{platform.processor() or platform.machine()}, {args.threads} threads, median (p90) of "
          f"{args.repeats}, ms; text batch = captions of {int(mask.sum(1).max())} tokens at most")
    print("| tower | batch | PyTorch eager | SDK graph | SDK call | eager / SDK call | eager / SDK graph |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m, p = r["median_ms"], r["p90_ms"]
        cell = lambda n: f"{m[n]:.1f} ({p[n]:.1f})"
        print(f"| {r['tower']} | {r['batch']} | {cell('pytorch eager')} | {cell('sdk graph')} | "
              f"{cell('sdk call')} | {r['eager_over_sdk_call']:.2f}x | {r['eager_over_sdk_graph']:.2f}x |")
    target = next(r for r in rows if r["tower"] == "image" and r["batch"] == 1)["eager_over_sdk_call"]
    print(f"\ntarget: SDK call >= 1.5x faster than eager, image tower, batch 1: {target:.2f}x -> "
          f"{'met' if target >= 1.5 else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
