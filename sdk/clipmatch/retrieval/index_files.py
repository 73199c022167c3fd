"""The files of an index folder: names, the writer's lock, and reads that check before they trust.

Everything here refuses to guess. A file shorter than the commit log says, a
log line out of sequence, metadata that does not parse: each is a clear
``IncompatibleModelError`` naming the file and what is wrong, never a number
made up (a short array extended with zeros, a path shifted by one row).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from clipmatch.errors import DependencyError, IncompatibleModelError, IndexBusyError, InputError, ShapeError, StorageError

META, LOG, EMB, TOK, EXP, FAILED, FAISS, LOCK = ("index.json", "images.jsonl", "embeds.f32", "tokens.f16",
                                                 "experts.f32", "failed.jsonl", "faiss.index", ".lock")
# A shortlist's rows are read by this many threads, each a share of them: on a cold page
# cache each read waits on the disk. Measured for K = 100 ViT-B/32 rows (51 KB each): 4
# threads with a share each 2.3 ms cold and 1.9 warm; one task per row 6-7 ms either way;
# the memory map 581 ms cold (a page fault at a time) and 0.8 warm.
READ_THREADS = 4


class IndexLock:
    """One writer per index folder: an exclusive ``flock`` on ``.lock``, held until ``release``.

    The kernel drops it when the holder dies (SIGKILL included), so a killed run never
    leaves a stale lock. A second writer is refused at once, naming the holder's pid.
    """

    def __init__(self, root: Path):
        self.root = root
        self.fd: int | None = _open_own(root / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise IndexBusyError(f"index {root} is being written by another process (pid {holder}); wait for it "
                                 "to finish, or write another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def damaged(root: Path, what: str) -> IncompatibleModelError:
    return IncompatibleModelError(f"index {root}: {what}; the folder is damaged. Index the gallery again into a new "
                                  "folder (or restore this one from a copy)")


def read_meta(root: Path) -> dict:
    try:
        meta = json.loads((root / META).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(root, f"{META} cannot be read ({exc})") from None
    need = {"model_identity": str, "embed_dim": int, "num_image_tokens": int}
    bad = [k for k, t in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if bad:
        raise damaged(root, f"{META} lacks {bad}")
    return meta


def complete_lines(path: Path) -> list[str]:
    """The log's complete lines; a torn last line (a killed write) is not one."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return [line for line in data[:end].decode("utf-8", "replace").splitlines() if line.strip()]


def committed_bytes(path: Path) -> int:
    """Where the log's complete lines end: what a writer cuts a torn tail back to."""
    if not path.exists():
        return 0
    return path.read_bytes().rfind(b"\n") + 1


def arrays(d: int, p: int, k: int | None) -> list[tuple[str, int]]:
    """(file, bytes per row) of every array an index of these sizes keeps, in write order."""
    return [(EMB, d * 4), (TOK, p * d * 2)] + ([(EXP, k * d * 4)] if k else [])


def fingerprint(path: str) -> str | None:
    """A file's size and the hash of its first 64 KiB: what the index remembers of an image file, so
    that a reader (the heatmap) opens only the file that was indexed, not whatever a crafted or
    stale ``images.jsonl`` names. None for a path that is not a regular file here (encodings
    made elsewhere)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    return f"{info.st_size}:{hashlib.blake2b(head, digest_size=16).hexdigest()}"


def read_log(root: Path) -> list[dict]:
    """The committed entries (``path``, and ``fingerprint`` and ``crc`` where written), in row
    order, each line checked: its id is its row."""
    entries = []
    for row, line in enumerate(complete_lines(root / LOG)):
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and entry.get("id") == row and isinstance(entry.get("path"), str)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise damaged(root, f"{LOG}:{row + 1} is not row {row}'s entry ({line[:80]!r})")
        entries.append(entry)
    return entries


def check_rows(root: Path, name: str, rows: int, row_bytes: int) -> None:
    """An array file must hold at least the committed rows (a torn tail past them is cut by the writer)."""
    size = (root / name).stat().st_size if (root / name).exists() else 0
    if size < rows * row_bytes:
        raise damaged(root, f"{name} holds {size // row_bytes if row_bytes else 0} rows but the commit log "
                            f"names {rows}")


def _open_own(path: Path, flags: int) -> int:
    """A file of the index itself: never through a symlink, which could point anywhere."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"{path} is a symlink; an index writes only its own files, never through a link") from None
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}") from exc


def append(path: Path, data: bytes) -> None:
    fd = _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        with open(fd, "ab", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        fd = _open_own(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, and a
    failed write (a full disk) leaves neither a torn file nor its temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_meta(root: Path, meta: dict) -> None:
    def write(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)  # a planted link in its place is removed, not followed
        fd = _open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")

    replace_atomically(root / META, write)


@functools.lru_cache(maxsize=1)
def _reader() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="clipmatch-index-read")


def read_rows(path: Path, ids: np.ndarray, row_shape: tuple[int, ...], dtype) -> np.ndarray:
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
        shares = [s for s in np.array_split(order, READ_THREADS) if len(s)]
        if len(shares) > 1:
            list(_reader().map(read, shares))
        elif shares:
            read(shares[0])
    finally:
        os.close(fd)
    return out


def faiss_module():
    try:
        import faiss
    except ImportError as exc:
        raise DependencyError("the gallery index needs FAISS: pip install faiss-cpu") from exc
    return faiss


def check_model(meta: dict, model_identity: str, root: Path) -> None:
    """Refuse to read or extend an index with a model other than the one that built it."""
    if meta["model_identity"] != model_identity:
        raise IncompatibleModelError(f"index {root} was built with model {meta['model_identity'][:12]}, not this "
                                     f"one ({model_identity[:12]}); index the gallery again with this model, or "
                                     f"use the model that built it")


def upgrade_hint(root: str | Path, meta: dict) -> str:
    return (f"index {root} is format {meta.get('format_version', 1)}, without the entity heads' image part; add it "
            f"in place with `clipmatch index --upgrade {root} --export EXPORT_DIR` (from the stored tokens alone; "
            "no image is read again)")


def write_faiss(out: Path, n: int, d: int, kind: str) -> None:
    faiss = faiss_module()
    embeds = np.fromfile(out / EMB, np.float32).reshape(n, d) if n else np.zeros((0, d), np.float32)
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
    replace_atomically(out / FAISS, lambda tmp: faiss.write_index(index, str(tmp)))


def row_crcs(blocks: list[bytes], n: int) -> list[str]:
    """One CRC-32 per row over its bytes in every array (``blocks``: each array's n rows, in order).
    Kept in the row's log line, the commit itself, so a row and its checksum land together."""
    sizes = [len(b) // n if n else 0 for b in blocks]
    out = []
    for i in range(n):
        crc = 0
        for b, size in zip(blocks, sizes):
            crc = zlib.crc32(memoryview(b)[i * size:(i + 1) * size], crc)
        out.append(f"{crc:08x}")
    return out


def verify_index(root: Path, *, chunk: int = 1024) -> dict:
    """Every row's arrays against the CRC its log line carries: ``{"rows", "checked", "bad"}``.
    A search never pays for this (it would read each row twice); run it when a disk is in doubt
    (``clipmatch index --verify INDEX``)."""
    meta = read_meta(root)
    crcs = [entry.get("crc") for entry in read_log(root)]
    n = len(crcs)
    files = arrays(meta["embed_dim"], meta["num_image_tokens"],
                   meta.get("num_experts") if meta.get("vision_experts") else None)
    for name, row in files:
        check_rows(root, name, n, row)
    bad, checked = [], 0
    handles = [open(root / name, "rb") for name, _ in files]  # read in order: one pass over each file
    try:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            blocks = [fh.read((stop - start) * row) for fh, (_, row) in zip(handles, files)]
            for i, crc in enumerate(row_crcs(blocks, stop - start), start):
                if crcs[i] is not None:
                    checked += 1
                    if crcs[i] != crc:
                        bad.append(i)
    finally:
        for fh in handles:
            fh.close()
    return {"rows": n, "checked": checked, "bad": bad}
