"""A searchable gallery on disk: pooled embeddings in FAISS, image tokens in an fp16 memory map.

Layout of an index folder:

- ``index.json``: the model identity, sizes and FAISS kind (written last);
- ``images.jsonl``: one line per indexed image, ``{"id": i, "path": ...}``;
  the commit log: an image is indexed once its line is complete;
- ``embeds.f32`` / ``tokens.f16`` / ``experts.f32``: rows in the same order
  (N x D float32, N x P x D float16, N x K x D float32), appended chunk by
  chunk. ``experts.f32`` holds the entity heads' image part (the K vision
  experts), computed from the stored fp16 tokens, so rescoring from the index
  reads everything it needs and recomputes nothing per image (absent for a
  model without entity heads);
- ``failed.jsonl``: images that could not be read, with the reason;
- ``faiss.index``: rebuilt from ``embeds.f32`` at the end of every run.

Resumable: a run killed midway leaves at most a torn chunk after the last
complete line; the next run cuts the arrays back to the committed rows and
goes on, so every image is indexed exactly once. Adding images works the
same way. An index records its model and refuses another.

Format 2 added ``experts.f32``. A format-1 index of a model with entity heads
is upgraded in place by ``upgrade_index`` (``clipmatch index --upgrade``; a run
that adds images does it first), from its stored tokens alone: the results are
what a fresh index gives.

FAISS (``pip install faiss-cpu``): exact inner product below
``EXACT_LIMIT`` images, else an IVF index trained on the gallery; ``kind``
overrides.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipmatch.contract import ENTITY_IMAGE
from clipmatch.errors import DependencyError, ImageError, IncompatibleModelError, InputError, ModelNotFoundError, ShapeError
from clipmatch.progress import Progress
from clipmatch.results import ImageEncoding

__all__ = ["GalleryIndex", "IndexWriter", "build_index", "index_encoding", "upgrade_index", "needs_upgrade",
           "upgrade_hint", "check_model", "list_images",
           "EXACT_LIMIT", "FORMAT_VERSION"]

DEFAULT_CHUNK = 256  # images per committed chunk: what a killed run can lose and redo

EXACT_LIMIT = 50_000
FORMAT_VERSION = 2
_META, _LOG, _EMB, _TOK, _EXP, _FAILED, _FAISS = ("index.json", "images.jsonl", "embeds.f32", "tokens.f16",
                                                  "experts.f32", "failed.jsonl", "faiss.index")
# A shortlist's rows are read by this many threads, each a share of them: on a cold page
# cache each read waits on the disk. Measured for K = 100 ViT-B/32 rows (51 KB each): 4
# threads with a share each 2.5 ms cold and 2.0 warm; one task per row 5-6 ms either way;
# the memory map 510 ms cold (a page fault at a time) and 0.8 warm.
_READ_THREADS = 4


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
    vision_experts: np.ndarray | None = None  # (N, K, D) float32, memory-mapped; None: format 1 or no heads

    @classmethod
    def open(cls, root: str | Path, model_identity: str | None = None) -> GalleryIndex:
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
        experts = None
        if meta.get("vision_experts"):
            k = meta["num_experts"]
            experts = np.memmap(root / _EXP, np.float32, "r", shape=(n, k, d)) if n else np.zeros((0, k, d),
                                                                                                   np.float32)
        index = _faiss().read_index(str(root / _FAISS))
        return cls(root, meta, paths, embeds, tokens, index, experts)

    def rows(self, ids: np.ndarray) -> ImageEncoding:
        """The encodings of rows ``ids`` (tokens as float32), read in one batched, parallel call.

        A memory map reads K scattered rows one page fault at a time; on a cold page
        cache that is one disk wait after another. Here every row is one ``pread``,
        and ``_READ_THREADS`` of them wait on the disk together.
        """
        ids = np.asarray(ids, np.int64)
        n, (_, p, d) = len(self.paths), self.tokens.shape
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise InputError(f"rows {ids[(ids < 0) | (ids >= n)][:5].tolist()} are outside the index of {n} images")
        embeds = np.asarray(self.embeds[ids], np.float32)
        tokens = _read_rows(self.root / _TOK, ids, (p, d), np.float16).astype(np.float32)
        experts = None
        if self.vision_experts is not None:
            experts = _read_rows(self.root / _EXP, ids, self.vision_experts.shape[1:], np.float32)
        return ImageEncoding(embeds, tokens, experts)

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


@functools.lru_cache(maxsize=1)
def _reader() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="clipmatch-index-read")


def _read_rows(path: Path, ids: np.ndarray, row_shape: tuple[int, ...], dtype) -> np.ndarray:
    """Rows ``ids`` of a flat array file of ``row_shape`` rows, by parallel preads into one buffer."""
    out = np.empty((len(ids), *row_shape), dtype)
    row_bytes = out[0].nbytes if len(ids) else 0
    order = np.argsort(ids, kind="stable")  # each thread reads ascending offsets: the disk's best order
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(share: np.ndarray) -> None:
            for j in share:
                got = os.preadv(fd, [memoryview(out[j]).cast("B")], int(ids[j]) * row_bytes)
                if got != row_bytes:
                    raise ShapeError(f"{path} is shorter than its index says: row {int(ids[j])} is cut off")
        shares = [s for s in np.array_split(order, _READ_THREADS) if len(s)]
        if len(shares) > 1:
            list(_reader().map(read, shares))
        elif shares:
            read(shares[0])
    finally:
        os.close(fd)
    return out


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
        self.k = manifest.sizes.get("num_experts") if ENTITY_IMAGE.name in manifest.components else None
        if (self.out / _META).is_file():
            meta = json.loads((self.out / _META).read_text())
            check_model(meta, manifest.model_identity, self.out)
            if self.k and not meta.get("vision_experts"):
                raise IncompatibleModelError(upgrade_hint(self.out, meta))
        lines = _complete_lines(self.out / _LOG)
        self.log_size = sum(len(line.encode("utf-8")) + 1 for line in lines)
        self.done = {json.loads(line)["path"] for line in lines}
        self.count = len(lines)
        for name, row in self._arrays():
            size = (self.out / name).stat().st_size if (self.out / name).exists() else 0
            if size < self.count * row:  # never extended with zeros: a short file is refused, not guessed at
                raise IncompatibleModelError(f"index {self.out}: {name} holds {size // row if row else 0} rows but "
                                             f"the commit log names {self.count}; the folder is damaged")
        self._cut_back()  # a torn chunk from a killed run
        self.failed_before = {json.loads(line)["path"] for line in _complete_lines(self.out / _FAILED)}

    def _arrays(self) -> list[tuple[str, int]]:
        """(file, bytes per row) of every array this index keeps."""
        arrays = [(_EMB, self.d * 4), (_TOK, self.p * self.d * 2)]
        return arrays + ([(_EXP, self.k * self.d * 4)] if self.k else [])

    def append(self, paths: Sequence[str], encoding: ImageEncoding) -> None:
        """Commit ``paths`` with their encodings (rows in the same order), vision experts included
        when the model has entity heads (``index_encoding`` makes them as the index stores them).

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
        experts = encoding.vision_experts
        if self.k and (experts is None or experts.shape != (n, self.k, self.d)):
            raise ShapeError(f"{n} paths need vision_experts ({n}, {self.k}, {self.d}) for this model's entity heads, "
                             f"got {None if experts is None else experts.shape}: make the encodings with "
                             "gallery_index.index_encoding(matcher, encoding)")
        log = "".join(json.dumps({"id": self.count + i, "path": path}) + "\n"
                      for i, path in enumerate(paths)).encode("utf-8")
        try:
            _append(self.out / _EMB, np.ascontiguousarray(encoding.embeds, np.float32).tobytes())
            _append(self.out / _TOK, np.ascontiguousarray(encoding.tokens, np.float16).tobytes())
            if self.k:
                _append(self.out / _EXP, np.ascontiguousarray(experts, np.float32).tobytes())
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
        for name, row in self._arrays():
            _truncate(self.out / name, self.count * row)

    def fail(self, path: str, reason: str) -> None:
        if path not in self.failed_before:
            _append(self.out / _FAILED, (json.dumps({"path": path, "error": reason}) + "\n").encode())
            self.failed_before.add(path)

    def finish(self, kind: str | None = None) -> dict:
        """Build the FAISS index over every committed row and write ``index.json``; returns it."""
        kind = kind or ("flat" if self.count < EXACT_LIMIT else "ivf")
        _write_faiss(self.out, self.count, self.d, kind)
        m = self.manifest
        meta = {"format": "clipmatch.index", "format_version": FORMAT_VERSION, "model_identity": m.model_identity,
                "tokenizer_identity": m.tokenizer_identity, "embed_dim": self.d, "num_image_tokens": self.p,
                "count": self.count, "faiss": kind, "vision_experts": bool(self.k)}
        if self.k:
            meta["num_experts"] = self.k
        _write_meta(self.out, meta)
        return meta


def upgrade_hint(root: str | Path, meta: dict) -> str:
    return (f"index {root} is format {meta.get('format_version', 1)}, without the entity heads' image part; add it "
            f"in place with `clipmatch index --upgrade {root} --export EXPORT_DIR` (from the stored tokens alone; "
            "no image is read again)")


def index_encoding(matcher, encoding: ImageEncoding) -> ImageEncoding:
    """``encoding`` as an index stores it: vision experts computed from the tokens rounded to
    fp16, the precision the index keeps them in, so rescoring from the index and an upgrade
    from its tokens give the same numbers."""
    if "entity" not in matcher.heads:
        return encoding
    stored = ImageEncoding(encoding.embeds, np.asarray(encoding.tokens, np.float16).astype(np.float32))
    return matcher.with_vision_experts(stored)


def needs_upgrade(root: str | Path, manifest) -> bool:
    """Whether ``root`` is a finished index of format 1 that this model's entity heads need upgraded."""
    meta_path = Path(root) / _META
    if ENTITY_IMAGE.name not in manifest.components or not meta_path.is_file():
        return False
    return not json.loads(meta_path.read_text()).get("vision_experts")


def upgrade_index(matcher, root: str | Path, *, chunk: int = 4096, progress: bool = True) -> int:
    """Add the vision experts to a format-1 index, in place, from its stored tokens; returns the
    rows upgraded (0: nothing to do). Written beside and renamed into place, so a killed
    upgrade leaves the index as it was."""
    root = Path(root)
    if not needs_upgrade(root, matcher.manifest):
        return 0
    meta = json.loads((root / _META).read_text())
    check_model(meta, matcher.manifest.model_identity, root)
    n = len(_complete_lines(root / _LOG))
    p, d = meta["num_image_tokens"], meta["embed_dim"]
    tokens = np.memmap(root / _TOK, np.float16, "r", shape=(n, p, d)) if n else np.zeros((0, p, d), np.float16)
    tmp = root / (_EXP + ".tmp")
    tmp.unlink(missing_ok=True)
    bar = Progress(n, enabled=progress and n > 0, desc="upgrade", unit="images")
    for start in range(0, n, chunk):
        rows = np.asarray(tokens[start:start + chunk], np.float32)
        enc = matcher.with_vision_experts(ImageEncoding(rows[:, 0], rows))
        _append(tmp, np.ascontiguousarray(enc.vision_experts, np.float32).tobytes())
        bar.update(len(rows))
    bar.close()
    tmp.touch()
    tmp.replace(root / _EXP)
    meta.update(format_version=FORMAT_VERSION, vision_experts=True, num_experts=matcher.manifest.sizes["num_experts"])
    _write_meta(root, meta)
    return n


def _write_meta(root: Path, meta: dict) -> None:
    tmp = root / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(root / _META)


def build_index(matcher, images: Sequence[str | Path], out: str | Path, *, chunk: int = DEFAULT_CHUNK,
                kind: str | None = None, progress: bool = True) -> dict:
    """Index (or add) ``images`` with ``matcher``'s image tower; returns a report (``upgraded``:
    rows of a format-1 index upgraded first)."""
    upgraded = upgrade_index(matcher, out, progress=progress) if Path(out).is_dir() else 0
    writer = IndexWriter(out, matcher.manifest)
    todo = [x for x in dict.fromkeys(str(i) for i in images) if x not in writer.done]
    report = {"already": len(writer.done), "indexed": 0, "failed": [], "total": 0, "upgraded": upgraded}
    bar = Progress(len(todo), enabled=progress and bool(todo), desc="index", unit="images")
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        counted = 0
        try:
            # Encoded a batch of the runtime's at a time, so the progress line moves every few
            # seconds, not once a chunk (a 256-image chunk is 17 s at ViT-B/32 on two cores).
            step, parts = matcher.config.image_batch_size, []
            for i in range(0, len(batch), step):
                parts.append(matcher.encode_images(batch[i:i + step]))
                bar.update(len(parts[-1]))
                counted += len(parts[-1])
            enc, ok = _joined(parts), batch
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
            enc = _joined(encs) if encs else None
        if ok:
            writer.append(ok, index_encoding(matcher, enc))
            report["indexed"] += len(ok)
        bar.update(len(batch) - counted)
    bar.close()
    report["total"] = writer.count
    writer.finish(kind)
    return report


def _joined(encodings: Sequence[ImageEncoding]) -> ImageEncoding:
    return ImageEncoding(np.concatenate([e.embeds for e in encodings]), np.concatenate([e.tokens for e in encodings]))


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
