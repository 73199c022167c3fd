"""The index refuses to guess: one writer at a time, the model recorded first, damage named, nothing silent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("faiss")

from clipmatch.errors import IncompatibleModelError, IndexBusyError, InputError, StorageError  # noqa: E402
from clipmatch.retrieval.index import GalleryIndex, IndexWriter, build_index  # noqa: E402

from ...conftest import write_images  # noqa: E402


def test_two_index_runs_on_one_folder_one_is_refused_and_every_image_is_there_once(tiny_export_dir, tmp_path):
    paths = write_images(tmp_path / "g", 300)
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "clipmatch.cli", "index", str(tmp_path / "g"), "--out", str(out),
           "--export", str(tiny_export_dir), "--chunk", "16"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "images.jsonl").exists() and first.poll() is None:
        time.sleep(0.02)
    # Hold the first run still mid-way (it holds the lock), so the second surely meets it.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and "being written by another process (pid" in second.stderr, second.stderr
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == paths and [r["id"] for r in rows] == list(range(300))
    # Once the first is done, a second run is let in and adds nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "300 images indexed (0 now, 300 before)" in again.stdout, again.stdout


def test_the_model_is_recorded_before_the_first_row(local, tmp_path):
    import dataclasses
    import types

    writer = IndexWriter(tmp_path / "idx", local.manifest)  # a run that stops before any row
    writer.close()
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["model_identity"] == local.manifest.model_identity and meta["faiss"] is None
    other = types.SimpleNamespace(manifest=dataclasses.replace(local.manifest, model_identity="f" * 64))
    with pytest.raises(IncompatibleModelError, match="built with model"):
        build_index(other, write_images(tmp_path / "g", 2), tmp_path / "idx", progress=False)


def test_a_stopped_run_is_not_opened_half_built_and_finishing_it_adds_its_rows(local, tmp_path):
    paths = write_images(tmp_path / "g", 12)
    build_index(local, paths[:4], tmp_path / "idx", progress=False)
    writer = IndexWriter(tmp_path / "idx", local.manifest)  # an added chunk committed, FAISS not yet rebuilt
    from clipmatch.retrieval.index import index_encoding

    writer.append(paths[4:8], index_encoding(local, local.encode_images(paths[4:8])))
    writer.close()
    with pytest.raises(IncompatibleModelError, match="not finished: 8 images are committed but its FAISS index "
                                                     "covers 4"):
        GalleryIndex.open(tmp_path / "idx")
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "index", "--out", str(tmp_path / "idx"), "--export",
                          str(local.files.root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    idx = GalleryIndex.open(tmp_path / "idx")
    assert idx.paths == paths[:8] and idx.faiss_index.ntotal == 8


@pytest.mark.parametrize("damage, message", [
    ("short_tokens", r"tokens.f16 holds 5 rows but the commit log names 6"),
    ("deleted_line", r"images.jsonl:3 is not row 2's entry"),
    ("bad_json", r"images.jsonl:2 is not row 1's entry"),
    ("meta", r"index.json cannot be read"),
    ("faiss", r"faiss.index cannot be read"),
    ("faiss_rows", r"faiss.index holds 3 rows of \d+ dims, not 6"),
])
def test_damaged_files_are_named_never_guessed_at(local, tmp_path, damage, message):
    paths = write_images(tmp_path / "g", 6)
    root = tmp_path / "idx"
    build_index(local, paths, root, progress=False)
    if damage == "short_tokens":
        size = (root / "tokens.f16").stat().st_size
        os.truncate(root / "tokens.f16", size - size // 6)
    elif damage in ("deleted_line", "bad_json"):
        lines = (root / "images.jsonl").read_text().splitlines(keepends=True)
        lines = lines[:2] + lines[3:] if damage == "deleted_line" else [lines[0], "{not json\n"] + lines[2:]
        (root / "images.jsonl").write_text("".join(lines))
    elif damage == "meta":
        (root / "index.json").write_text("{\"model_identity\": ")
    elif damage == "faiss":
        (root / "faiss.index").write_bytes(b"IxFl" + os.urandom(64))
    else:
        build_index(local, paths[:3], tmp_path / "small", progress=False)
        (root / "faiss.index").write_bytes((tmp_path / "small" / "faiss.index").read_bytes())
    with pytest.raises(IncompatibleModelError, match=message):
        GalleryIndex.open(root)
    if damage in ("short_tokens", "deleted_line", "bad_json", "meta"):  # adding to it is refused too: no repair
        with pytest.raises(IncompatibleModelError, match=message):
            build_index(local, write_images(tmp_path / "more", 2, start=50), root, progress=False)


def test_bad_arguments_and_two_spellings_of_one_file(local, tmp_path):
    paths = write_images(tmp_path / "g", 4)
    for chunk in (0, -5, 2.5, True):
        with pytest.raises(InputError, match="chunk must be a positive int"):
            build_index(local, paths, tmp_path / "idx", chunk=chunk, progress=False)
    other = str(tmp_path / "g" / ".." / "g" / os.path.basename(paths[0]))  # the same file, spelt another way
    os.symlink(paths[1], tmp_path / "link.png")
    report = build_index(local, paths + [other, str(tmp_path / "link.png")], tmp_path / "idx", progress=False)
    assert report["total"] == 4
    idx = GalleryIndex.open(tmp_path / "idx")
    assert idx.paths == paths
    for k in (0, -1, True, 1.5):
        with pytest.raises(InputError, match="k must be a positive int"):
            idx.search(idx.embeds[:1], k)
    scores, ids = idx.search(np.asarray(idx.embeds[:1]), 10**9)  # no 12 GB allocation: capped at the rows
    assert ids.shape == (1, 4)


def test_a_full_disk_leaves_the_committed_rows_and_no_temporary_file(local, tmp_path, monkeypatch):
    import clipmatch.retrieval.index_files as files

    paths = write_images(tmp_path / "g", 6)
    build_index(local, paths[:3], tmp_path / "idx", progress=False)
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the tokens of the next chunk are written
        if os.readlink(f"/proc/self/fd/{fd}").endswith("tokens.f16"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(StorageError, match="writing .*tokens.f16 failed: No space left on device"):
        build_index(local, paths, tmp_path / "idx", progress=False)
    monkeypatch.undo()
    # What was committed stays, the next run is let in (the lock went with the failure), and no temp is left.
    assert not list((tmp_path / "idx").glob("*.tmp"))
    again = build_index(local, paths, tmp_path / "idx", progress=False)
    assert (again["already"], again["total"]) == (3, 6)
    assert files.LOCK == ".lock"


def test_files_symlinked_into_an_index_are_never_written_through(local, tmp_path):
    paths = write_images(tmp_path / "g", 4)
    build_index(local, paths[:2], tmp_path / "idx", progress=False)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (tmp_path / "idx" / "tokens.f16").unlink()
    os.symlink(victim, tmp_path / "idx" / "tokens.f16")
    with pytest.raises((StorageError, IncompatibleModelError)):
        build_index(local, paths, tmp_path / "idx", progress=False)
    assert victim.read_bytes() == b"precious"
    os.symlink(victim, tmp_path / "other.lock")
    (tmp_path / "fresh").mkdir()
    os.symlink(victim, tmp_path / "fresh" / ".lock")
    with pytest.raises(StorageError, match="is a symlink"):
        IndexWriter(tmp_path / "fresh", local.manifest)
    assert victim.read_bytes() == b"precious"


def test_a_lock_is_refused_by_name_and_dies_with_its_holder(local, tmp_path):
    writer = IndexWriter(tmp_path / "idx", local.manifest)
    with pytest.raises(IndexBusyError, match=f"pid {os.getpid()}"):
        IndexWriter(tmp_path / "idx", local.manifest)
    writer.close()
    IndexWriter(tmp_path / "idx", local.manifest).close()  # released: let in
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "idx" / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(IndexBusyError):
        IndexWriter(tmp_path / "idx", local.manifest)
    holder.kill()
    holder.wait()
    IndexWriter(tmp_path / "idx", local.manifest).close()  # a killed holder leaves no stale lock


def test_an_index_opens_only_the_image_files_it_indexed(local, tiny_export_dir, tmp_path):
    paths = write_images(tmp_path / "g", 3)
    build_index(local, paths, tmp_path / "idx", progress=False)
    idx = GalleryIndex.open(tmp_path / "idx")
    assert idx.image_path(1) == paths[1]
    private = tmp_path / "private.png"
    private.write_bytes((tmp_path / "g" / "00000.png").read_bytes()[:-1] + b"\x00")  # another file
    log = tmp_path / "idx" / "images.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines[1]["path"] = str(private)  # a crafted images.jsonl: valid JSON, valid ids, another file
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from clipmatch.errors import ImageError

    with pytest.raises(ImageError, match="is not the file index .* indexed as row 1"):
        GalleryIndex.open(tmp_path / "idx").image_path(1)
    with open(paths[2], "ab") as f:  # the file itself changed since
        f.write(b"more")
    with pytest.raises(ImageError, match="is not the file"):
        GalleryIndex.open(tmp_path / "idx").image_path(2)
    # Through the command: a clear error, no traceback, nothing read.
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "search", str(tmp_path / "idx"), "a red circle",
                          "--export", str(tiny_export_dir), "--top-k", "3", "--heatmap", str(tmp_path / "h.png"),
                          "--heatmap-rank", "1"], capture_output=True, text=True, timeout=120)
    hit = [ln for ln in out.stdout.splitlines() if ln.startswith("| 1 ")]
    if out.returncode == 0:  # the top hit was row 0, which is untouched
        assert hit and paths[0] in hit[0]
    else:
        assert out.returncode == 2 and "not opened" in out.stderr and "Traceback" not in out.stderr


def test_verify_finds_a_flipped_byte_by_its_row(local, tiny_export_dir, tmp_path):
    from clipmatch.retrieval.index_files import verify_index

    paths = write_images(tmp_path / "g", 5)
    build_index(local, paths, tmp_path / "idx", chunk=2, progress=False)
    assert verify_index(tmp_path / "idx") == {"rows": 5, "checked": 5, "bad": []}
    row = local.manifest.sizes["num_image_tokens"] * local.manifest.sizes["embed_dim"] * 2
    tokens = tmp_path / "idx" / "tokens.f16"
    data = bytearray(tokens.read_bytes())
    data[3 * row + 17] ^= 0x40  # one bit of row 3's tokens
    tokens.write_bytes(bytes(data))
    assert verify_index(tmp_path / "idx")["bad"] == [3]
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "index", "--verify", str(tmp_path / "idx")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "5 of 5 rows checked against their CRC, 1 damaged: rows [3]" in out.stdout
