"""The gallery index on real files: kill-and-resume, unreadable images, adding, another model refused."""
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

from clipmatch.errors import IncompatibleModelError, InputError, ShapeError  # noqa: E402
from clipmatch.results import ImageEncoding  # noqa: E402
from clipmatch.retrieval.index import GalleryIndex, IndexWriter, build_index, index_encoding  # noqa: E402

from ...conftest import write_images  # noqa: E402


def test_index_search_and_tokens_match_the_runtime(local, tmp_path):
    paths = write_images(tmp_path / "g", 30)
    report = build_index(local, paths, tmp_path / "idx", chunk=8, progress=False)
    assert report["total"] == 30 and not report["failed"]
    idx = GalleryIndex.open(tmp_path / "idx", local.manifest.model_identity)
    enc = local.encode_images(paths)
    assert idx.paths == paths
    assert np.abs(np.asarray(idx.tokens, np.float32) - enc.tokens).max() < 2e-3  # fp16 store
    scores, ids = idx.search(enc.embeds[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_unreadable_images_are_reported_not_fatal_and_adding_works(local, tmp_path):
    paths = write_images(tmp_path / "g", 10)
    (tmp_path / "g" / "broken.png").write_bytes(b"not a png at all")
    bad = [str(tmp_path / "g" / "broken.png"), str(tmp_path / "g" / "missing.png")]
    report = build_index(local, paths[:5] + bad, tmp_path / "idx", chunk=4, progress=False)
    assert report["total"] == 5 and sorted(f["path"] for f in report["failed"]) == sorted(bad)
    failed = [json.loads(line) for line in (tmp_path / "idx" / "failed.jsonl").read_text().splitlines()]
    assert {f["path"] for f in failed} == set(bad) and all(f["error"] for f in failed)
    again = build_index(local, paths, tmp_path / "idx", chunk=4, progress=False)  # add the other 5
    assert (again["already"], again["indexed"], again["total"]) == (5, 5, 10)
    assert GalleryIndex.open(tmp_path / "idx").paths == paths[:5] + paths[5:]


def test_an_index_from_another_model_is_refused(local, tmp_path):
    import dataclasses
    import types

    build_index(local, write_images(tmp_path / "g", 3), tmp_path / "idx", progress=False)
    # Another model: only its identity matters before anything is encoded.
    other = types.SimpleNamespace(manifest=dataclasses.replace(local.manifest, model_identity="f" * 64))
    with pytest.raises(IncompatibleModelError, match="built with model"):
        build_index(other, write_images(tmp_path / "g", 2, start=3), tmp_path / "idx", progress=False)
    with pytest.raises(IncompatibleModelError, match="index the gallery again"):
        GalleryIndex.open(tmp_path / "idx", "f" * 64)
    assert len(GalleryIndex.open(tmp_path / "idx", local.manifest.model_identity).paths) == 3


def test_kill_and_resume_indexes_every_image_exactly_once(tiny_export_dir, tmp_path):
    paths = write_images(tmp_path / "g", 600)
    cmd = [sys.executable, "-m", "clipmatch.cli", "index", str(tmp_path / "g"), "--out", str(tmp_path / "idx"),
           "--export", str(tiny_export_dir), "--chunk", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "idx" / "images.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_bytes().splitlines()) < 64):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    partial = len(log.read_bytes().splitlines())
    assert 0 < partial < 600, "the run was not caught midway"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["path"] for r in rows] == paths  # every image once, in order
    assert [r["id"] for r in rows] == list(range(600))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["count"] == 600
    size = meta["num_image_tokens"] * meta["embed_dim"] * 2
    assert (tmp_path / "idx" / "tokens.f16").stat().st_size == 600 * size
    # stderr is a pipe here: progress comes as whole lines, and the last one says it finished.
    last = [line for line in done.stderr.splitlines() if line.startswith("index [")][-1]
    assert f"{600 - partial}/{600 - partial} 100%" in last and "images/s" in last and "eta 0:00" in last


def test_progress_redraws_on_a_terminal_and_writes_lines_to_a_log():
    import io

    from clipmatch.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, log = Terminal(), io.StringIO()
    for stream in (term, log):
        bar = Progress(10, desc="index", unit="images", stream=stream, interval_s=0, log_interval_s=3600)
        for _ in range(4):
            bar.update(1)
        bar.close()
    # On a terminal every update redraws the same line; in a log the first update and where it stopped.
    assert term.getvalue().count("\r") == 4 and term.getvalue().endswith("\n")
    assert "[########------------]  4/10  40%" in term.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[0].startswith("index [##") and " 1/10" in lines[0]
    assert " 4/10  40%" in lines[1] and "images/s" in lines[1]


def test_index_writer_refuses_bad_rows_before_writing_and_cuts_back_a_failed_write(local, tmp_path):
    plain = local.encode_images(write_images(tmp_path / "g", 4))
    enc = index_encoding(local, plain)
    w = IndexWriter(tmp_path / "idx", local.manifest)
    with pytest.raises(ShapeError, match=r"1 paths need vision_experts \(1, 2, 24\) .*index_encoding"):
        w.append(["a.png"], plain[0:1])
    w.append(["a.png"], enc[0:1])
    sizes = {f: (tmp_path / "idx" / f).stat().st_size
             for f in ("embeds.f32", "tokens.f16", "experts.f32", "images.jsonl")}
    with pytest.raises(InputError, match=r"path 1 must be a str, got PosixPath"):
        w.append(["b.png", tmp_path / "c.png"], enc[1:3])
    with pytest.raises(InputError, match="a.png is already in the index"):
        w.append(["a.png"], enc[1:2])
    with pytest.raises(InputError, match="b.png is given twice"):
        w.append(["b.png", "b.png"], enc[1:3])
    with pytest.raises(ShapeError, match=r"2 paths need embeds \(2, "):
        w.append(["b.png", "c.png"], enc[1:2])
    # A write that fails halfway (the tokens cannot be converted after the embeddings went
    # out) is cut back: the arrays never hold a row the commit log does not name.
    broken = ImageEncoding(enc.embeds[1:2], np.full(enc.tokens[1:2].shape, "x", dtype=object), enc.vision_experts[1:2])
    with pytest.raises(ValueError):
        w.append(["b.png"], broken)
    assert {f: (tmp_path / "idx" / f).stat().st_size for f in sizes} == sizes
    w.append(["b.png", "c.png"], enc[1:3])
    w.finish()
    index = GalleryIndex.open(tmp_path / "idx", local.manifest.model_identity)
    assert index.paths == ["a.png", "b.png", "c.png"]
    assert np.allclose(index.embeds, enc.embeds[:3]) and np.allclose(index.tokens, enc.tokens[:3], atol=2e-3)
