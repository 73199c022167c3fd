"""``clipmatch demo``: the whole path on a model built on the spot.

Builds a tiny random CLIP checkpoint with untrained heads, exports and
parity-checks it, loads it with the in-process runtime, ranks a few drawn
images for a few queries with every head, and prints latency. The weights
are random, so the rankings show that every stage runs, not what it is worth.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = [
    ("red circle", (220, 30, 30), "circle"),
    ("blue square", (30, 60, 220), "square"),
    ("green triangle", (30, 170, 60), "triangle"),
    ("yellow circle", (230, 210, 40), "circle"),
    ("red square", (220, 30, 30), "square"),
    ("blue triangle", (30, 60, 220), "triangle"),
]
QUERIES = [
    ("a red circle", None),
    ("a blue square left of a green triangle", None),
    ("the Kestrel-7 valve", "a blue cylinder with yellow stripes and a small white mark"),
]


def draw(colour: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=colour)
    return img


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate arenas
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(workdir: Path | None = None, repeats: int = 20) -> int:
    from .cli import _export_package
    from .local import Local

    _export_package()
    from clipmatch_export.exporter import export_model
    from clipmatch_export.tiny import add_random_heads, build_tiny_clip

    with tempfile.TemporaryDirectory(prefix="clipmatch-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        t0 = time.perf_counter()
        model_dir = build_tiny_clip(root / "model", seed=0)
        add_random_heads(model_dir, seed=0)
        result = export_model(model_dir, root / "export")
        print(f"built, exported and parity-checked a tiny random CLIP in {time.perf_counter() - t0:.1f} s "
              f"({root / 'export'})")
        for name in result.manifest.components:
            print(f"  {name:13s} ONNX vs PyTorch max|diff| fp32 {result.report.worst(name, 'fp32'):.1e}, "
                  f"fp16 {result.report.worst(name, 'fp16'):.1e}")

        matcher = Local(root / "export")
        images = [np.asarray(draw(colour, shape)) for _, colour, shape in SHAPES]
        gallery = matcher.encode_images(images)
        for query, explanation in QUERIES:
            r = matcher.rescore(query, gallery, explanation=explanation)
            print(f"\nquery: {query!r}" + (f"  (explanation: {explanation!r})" if explanation else ""))
            rows = [{"rank": rank, "image": SHAPES[i][0], "cosine": float(r.cosine[i]),
                     "match_prob": float(r.match_prob[i]), "entity_score": float(r.entity_score[i]),
                     "dcsm": float(r.dcsm[i])}
                    for rank, i in enumerate(r.order("cosine"), 1)]
            print(format_table(rows))

        batch8 = images + images[:2]
        print(f"\nlatency, median of {repeats} ({', '.join(matcher.providers)}):")
        for label, fn in [
            ("encode_images batch 1", lambda: matcher.encode_images(images[:1])),
            ("encode_images batch 8", lambda: matcher.encode_images(batch8)),
            ("encode_texts batch 1", lambda: matcher.encode_texts([QUERIES[1][0]])),
            ("rescore K=6, both heads", lambda: matcher.rescore(QUERIES[2][0], gallery, explanation=QUERIES[2][1])),
        ]:
            print(f"  {label:26s} {_median_ms(fn, repeats):7.2f} ms")
        print("\nthe weights are random: rankings show the path runs end to end, not model quality")
    return 0
