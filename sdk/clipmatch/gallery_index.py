"""A searchable gallery on disk: pooled embeddings in FAISS, image tokens in an fp16 memory map.

Layout of an index folder:

- ``index.json``: the model identity, sizes and FAISS kind (written last);
- ``images.jsonl``: one line per indexed image, ``{"id": i, "path": ...}``;
  the commit log: an image is indexed once its line is complete;
- ``embeds.f32`` / ``tokens.f16``: rows in the same order (N x D float32,
  N x P x D float16), appended chunk by chunk;
- ``failed.jsonl``: images that could not be read, with the reason;
- ``faiss.index``: rebuilt from ``embeds.f32`` at the end of every run.

Resumable: a run killed midway leaves at most a torn chunk after the last
complete line; the next run cuts the arrays back to the committed rows and
goes on, so every image is indexed exactly once. Adding images works the
same way. An index records its model and refuses another.

FAISS (``pip install faiss-cpu``): exact inner product below
``EXACT_LIMIT`` images, else an IVF index trained on the gallery; ``kind``
overrides.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import (DependencyError, ImageError, IncompatibleModelError, InputError, ModelNotFoundError,
                     ShapeError)
from .progress import Progress
from .results import ImageEncoding

__all__ = ["GalleryIndex", "IndexWriter", "build_index", "check_model", "list_images", "EXACT_LIMIT"]

EXACT_LIMIT = 50_000
_META, _LOG, _EMB, _TOK, _FAILED, _FAISS = ("index.json", "images.jsonl", "embeds.f32", "tokens.f16",
                                            "failed.jsonl", "faiss.index")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise DependencyError("the gallery index needs FAISS: pip install faiss-cpu") from exc
    return faiss


@dataclass
class GalleryIndex:
    """An index folder opened for search."""

    root: Path
    meta: dict
    paths: list[str]
    embeds: np.ndarray  # (N, D) float32, memory-mapped
    tokens: np.ndarray  # (N, P, D) float16, memory-mapped
    faiss_index: object

    @classmethod
    def open(cls, root: str | Path, model_identity: str | None = None) -> "GalleryIndex":
        root = Path(root)
        if not (root / _META).is_file():
            raise ModelNotFoundError(f"{root} is not a clipmatch index (no {_META}); build one with `clipmatch index`")
        meta = json.loads((root / _META).read_text())
        if model_identity is not None:
            check_model(meta, model_identity, root)
        paths = [json.loads(line)["path"] for line in _complete_lines(root / _LOG)]
        n, d, p = len(paths), meta["embed_dim"], meta["num_image_tokens"]
        embeds = np.memmap(root / _EMB, np.float32, "r", shape=(n, d)) if n else np.zeros((0, d), np.float32)
        tokens = np.memmap(root / _TOK, np.float16, "r", shape=(n, p, d)) if n else np.zeros((0, p, d), np.float16)
        index = _faiss().read_index(str(root / _FAISS))
        return cls(root, meta, paths, embeds, tokens, index)

    def search(self, query_embeds: np.ndarray, k: int, *, threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and row ids by inner product (cosine: both sides are L2-normalised).

        ``threads``: FAISS's OpenMP threads for this call, set for the calling thread
        only and restored after; None leaves FAISS's own setting. ``Searcher`` passes
        1 (see there).
        """
        queries = np.ascontiguousarray(query_embeds, dtype=np.float32)
        if threads is None:
            return self.faiss_index.search(queries, k)
        faiss = _faiss()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            return self.faiss_index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(before)


def check_model(meta: dict, model_identity: str, root: Path) -> None:
    """Refuse to read or extend an index with a model other than the one that built it."""
    if meta["model_identity"] != model_identity:
        raise IncompatibleModelError(f"index {root} was built with model {meta['model_identity'][:12]}, not this "
                                     f"one ({model_identity[:12]}); index the gallery again with this model, or "
                                     f"use the model that built it")


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return [line for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class IndexWriter:
    """Appends encoded images to an index folder, one committed chunk at a time.

    Opening an existing folder checks its model and cuts back whatever a killed
    run left past the last committed line. ``build_index`` drives it with the
    image tower; a caller with its own encodings (a batch job on a Triton
    server, a benchmark's synthetic gallery) can append them directly.
    """

    def __init__(self, out: str | Path, manifest):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.d, self.p = manifest.sizes["embed_dim"], manifest.sizes["num_image_tokens"]
        if (self.out / _META).is_file():
            check_model(json.loads((self.out / _META).read_text()), manifest.model_identity, self.out)
        lines = _complete_lines(self.out / _LOG)
        self.log_size = sum(len(line.encode("utf-8")) + 1 for line in lines)
        self.done = {json.loads(line)["path"] for line in lines}
        self.count = len(lines)
        self._cut_back()  # a torn chunk from a killed run
        self.failed_before = {json.loads(line)["path"] for line in _complete_lines(self.out / _FAILED)}

    def append(self, paths: Sequence[str], encoding: ImageEncoding) -> None:
        """Commit ``paths`` with their encodings (rows in the same order).

        Everything is checked before anything is written, and a failed write is
        cut back, so the arrays never hold a row the commit log does not name.
        """
        n = len(paths)
        for i, path in enumerate(paths):
            if not isinstance(path, str):
                raise InputError(f"path {i} must be a str, got {type(path).__name__} ({path!r})")
        seen: set[str] = set()
        for path in paths:
            if path in self.done or path in seen:
                raise InputError(f"{path} is already in the index {self.out}" if path in self.done
                                 else f"{path} is given twice")
            seen.add(path)
        if encoding.embeds.shape != (n, self.d) or encoding.tokens.shape != (n, self.p, self.d):
            raise ShapeError(f"{n} paths need embeds ({n}, {self.d}) and tokens ({n}, {self.p}, {self.d}), got "
                             f"{encoding.embeds.shape} and {encoding.tokens.shape}")
        log = "".join(json.dumps({"id": self.count + i, "path": path}) + "\n"
                      for i, path in enumerate(paths)).encode("utf-8")
        try:
            _append(self.out / _EMB, np.ascontiguousarray(encoding.embeds, np.float32).tobytes())
            _append(self.out / _TOK, np.ascontiguousarray(encoding.tokens, np.float16).tobytes())
            # The commit: these images count as indexed once their lines are complete.
            _append(self.out / _LOG, log)
        except BaseException:
            self._cut_back()
            raise
        self.count += n
        self.log_size += len(log)
        self.done.update(paths)

    def _cut_back(self) -> None:
        """The log and the arrays cut to exactly the committed rows."""
        _truncate(self.out / _LOG, self.log_size)
        _truncate(self.out / _EMB, self.count * self.d * 4)
        _truncate(self.out / _TOK, self.count * self.p * self.d * 2)

    def fail(self, path: str, reason: str) -> None:
        if path not in self.failed_before:
            _append(self.out / _FAILED, (json.dumps({"path": path, "error": reason}) + "\n").encode())
            self.failed_before.add(path)

    def finish(self, kind: str | None = None) -> dict:
        """Build the FAISS index over every committed row and write ``index.json``; returns it."""
        kind = kind or ("flat" if self.count < EXACT_LIMIT else "ivf")
        _write_faiss(self.out, self.count, self.d, kind)
        m = self.manifest
        meta = {"format": "clipmatch.index", "format_version": 1, "model_identity": m.model_identity,
                "tokenizer_identity": m.tokenizer_identity, "embed_dim": self.d, "num_image_tokens": self.p,
                "count": self.count, "faiss": kind}
        tmp = self.out / (_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(self.out / _META)
        return meta


def build_index(matcher, images: Sequence[str | Path], out: str | Path, *, chunk: int = 256,
                kind: str | None = None, progress: bool = True) -> dict:
    """Index (or add) ``images`` with ``matcher``'s image tower; returns a report."""
    writer = IndexWriter(out, matcher.manifest)
    todo = [x for x in dict.fromkeys(str(i) for i in images) if x not in writer.done]
    report = {"already": len(writer.done), "indexed": 0, "failed": [], "total": 0}
    bar = Progress(len(todo), enabled=progress and bool(todo), desc="index", unit="images")
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        try:
            enc, ok = matcher.encode_images(batch), batch
        except ImageError:
            # Some image of the chunk is unreadable: encode one by one, list the bad ones, go on.
            ok, encs = [], []
            for path in batch:
                try:
                    encs.append(matcher.encode_images([path]))
                    ok.append(path)
                except ImageError as exc:
                    reason = str(exc).split(": ", 1)[-1]
                    report["failed"].append({"path": path, "error": reason})
                    writer.fail(path, reason)
            enc = ImageEncoding(np.concatenate([e.embeds for e in encs]),
                                np.concatenate([e.tokens for e in encs])) if encs else None
        if ok:
            writer.append(ok, enc)
            report["indexed"] += len(ok)
        bar.update(len(batch))
    bar.close()
    report["total"] = writer.count
    writer.finish(kind)
    return report


def _write_faiss(out: Path, n: int, d: int, kind: str) -> None:
    faiss = _faiss()
    embeds = np.fromfile(out / _EMB, np.float32).reshape(n, d) if n else np.zeros((0, d), np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))  # FAISS wants >= 39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeds)
        index.nprobe = max(1, nlist // 8)
    else:
        raise InputError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    if n:
        index.add(embeds)
    tmp = out / (_FAISS + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(out / _FAISS)


def list_images(items: Iterable[str | Path]) -> list[str]:
    """Files given, and image files under folders given, sorted within each folder."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*")
                          if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"))
        else:
            out.append(str(path))
    return out
