"""``clipmatch demo``: the whole path, on the embedded default model.

Exports and parity-checks the default model (``models/default``), loads the
export with the in-process runtime, builds a gallery from the synthetic test
split, and for one query per phenomenon shows the top results by cosine and
after each head's rescoring, marking which results really satisfy the query.
Then it prints latency, and serves the export from a real Triton server on
loopback (where nvidia-pytriton is installed) to compare scores and latency. ``--tiny`` runs the same path on a tiny random model
built on the spot (rankings then show only that every stage runs).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipmatch.results import format_table

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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate arenas
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default"
DEMO_QUERIES = [  # one query of each kind, from the synthetic test split
    "binding", "spatial", "negation", "entity (held-out)",
]


def run_default_demo(model_dir: Path, workdir: Path | None, repeats: int, gallery_size: int = 300) -> int:
    from clipmatch.backends.local import Local
    from clipmatch_export.extras import require_torch_side

    require_torch_side()
    from clipmatch_export.evaluation.evaluate import _examples, _explanation, row_of, search_gallery, shortlist_scores
    from clipmatch_export.exporter import export_model
    from clipmatch_export.synth.forms import satisfies
    from clipmatch_export.synth.world import render

    with tempfile.TemporaryDirectory(prefix="clipmatch-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        t0 = time.perf_counter()
        result = export_model(model_dir, root / "export")
        print(f"exported and parity-checked {model_dir} in {time.perf_counter() - t0:.1f} s")
        _print_parity(result)
        matcher = Local(root / "export")
        rows = _examples(gallery_size // 6 + 1, seed=4242)
        pool = [ex for examples in rows.values() for ex in examples][:gallery_size]
        t0 = time.perf_counter()
        searcher = search_gallery(matcher, [render(ex.scene) for ex in pool])
        gallery = searcher.index.encoding
        print(f"encoded a gallery of {len(pool)} synthetic test images in {time.perf_counter() - t0:.2f} s")
        for row in DEMO_QUERIES:
            ex = next(e for e in pool if row_of(e) == row)
            explanation = _explanation(ex.caption, ex)
            plain = np.argsort(-matcher.cosine(gallery, [ex.caption])[:, 0], kind="stable")
            found = shortlist_scores(searcher, ex.caption, explanation, 20)  # the search's shortlist
            print(f"\n[{row}] query: {ex.caption!r}" + (f"\n  explanation: {explanation!r}" if explanation else ""))
            table = []
            for label in ("cosine", "dcsm", "match_prob", "fused"):
                top = plain[:3] if label == "cosine" else found["ids"][np.argsort(-found[label], kind="stable")[:3]]
                marks = ["yes" if satisfies(pool[i].scene, ex.form) else "no" for i in top]
                table.append({"ranked by": label, "top-3 satisfy the query": " ".join(marks),
                              "top-1 caption": pool[top[0]].caption})
            print(format_table(table))
        _latency(matcher, [render(ex.scene) for ex in pool[:8]], gallery[:20], pool[0].caption,
                 repeats)
        _served(root, matcher, gallery[:20], pool[0].caption, repeats)
    return 0


def _served(root: Path, local, shortlist, query: str, repeats: int) -> None:
    """The same export behind a real Triton server on loopback: same scores, and what serving costs."""
    try:
        from clipmatch.backends.triton import connect
        from clipmatch.serving.repository import RepositoryConfig, write_repository
        from clipmatch.serving.server import TritonServer, free_port, tritonserver_home

        tritonserver_home()
        import tritonclient.grpc  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the demo says what is missing and goes on
        print(f"\nTriton: skipped ({exc})")
        return
    export = local.files.root
    write_repository(export, root / "triton_models", RepositoryConfig(target="python"))
    t0 = time.perf_counter()
    with TritonServer(root / "triton_models", free_port(), free_port(), free_port()) as server:
        print(f"\nTriton {server.grpc_url} ready in {time.perf_counter() - t0:.1f} s (python backend, onnxruntime)")
        with connect(server.grpc_url, export) as remote:
            a, b = local.rescore(query, shortlist), remote.rescore(query, shortlist)
            diff = max(float(np.abs(getattr(a, k) - getattr(b, k)).max())
                       for k in ("cosine", "match_prob", "entity_score", "dcsm"))
            print(f"  served rescore vs in-process, max|diff| over all scores: {diff:.1e}")
            for label, fn in [("encode_texts batch 1", lambda: remote.encode_texts([query])),
                              (f"rescore K={len(shortlist)}, one request", lambda: remote.rescore(query, shortlist))]:
                print(f"  {label:26s} {_median_ms(fn, repeats):7.2f} ms")


def _print_parity(result) -> None:
    for name in result.manifest.components:
        print(f"  {name:13s} ONNX vs PyTorch max|diff| fp32 {result.report.worst(name, 'fp32'):.1e}, "
              f"fp16 {result.report.worst(name, 'fp16'):.1e}")


def _latency(matcher, images, shortlist, query: str, repeats: int) -> None:
    print(f"\nlatency, median of {repeats} ({', '.join(matcher.providers)}):")
    for label, fn in [
        ("encode_images batch 1", lambda: matcher.encode_images(images[:1])),
        ("encode_images batch 8", lambda: matcher.encode_images(images[:8])),
        ("encode_texts batch 1", lambda: matcher.encode_texts([query])),
        (f"rescore K={len(shortlist)}, both heads", lambda: matcher.rescore(query, shortlist)),
    ]:
        print(f"  {label:26s} {_median_ms(fn, repeats):7.2f} ms")


def run_demo(workdir: Path | None = None, repeats: int = 20, tiny: bool = False) -> int:
    if not tiny and (DEFAULT_MODEL / "config.json").is_file():
        return run_default_demo(DEFAULT_MODEL, workdir, repeats)
    return run_tiny_demo(workdir, repeats)


def run_tiny_demo(workdir: Path | None = None, repeats: int = 20) -> int:
    from clipmatch.backends.local import Local
    from clipmatch_export.extras import require_torch_side

    require_torch_side()
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
        _print_parity(result)

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

        _latency(matcher, images + images[:2], gallery, QUERIES[2][0], repeats)
        print("\nthe weights are random: rankings show the path runs end to end, not model quality")
    return 0
