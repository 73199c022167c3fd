"""Inputs an attacker or a careless caller hands in: each is a clear error naming the item, fast, never a hang."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clipmatch.errors import ImageError, TextError
from clipmatch.inputs.images import MAX_FILE_BYTES, MAX_PIXELS, load_image
from clipmatch.inputs.preprocess import ImageConfig, preprocess_images
from clipmatch.inputs.texts import MAX_TEXT_CHARS, prepare_texts

CLIP = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_thin_image_whose_resize_would_explode_is_refused_before_the_resize():
    data = png(Image.new("L", (2, 1_000_000)))  # a few KB: the bomb is in the resize, not the decode
    assert len(data) < 100_000
    t = time.perf_counter()
    with pytest.raises(ImageError, match=r"item 3: image 2x1000000 resized would be 32x16000000 pixels, over the limit"):
        preprocess_images([data], CLIP, start_index=3)
    assert time.perf_counter() - t < 10


def test_a_small_file_of_too_many_pixels_is_refused_from_its_header():
    side = int(MAX_PIXELS ** 0.5) + 8
    data = png(Image.new("1", (side, side)))  # a 1-bit image: a small file, a large decode
    with pytest.raises(ImageError, match=f"would be {side}x{side} pixels, over the limit of {MAX_PIXELS:,}"):
        load_image(data, 0)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(Image.open(io.BytesIO(data)), 0)  # a lazily opened PIL image too


def test_pipes_devices_and_huge_files_are_refused_without_reading_them(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: done.append(pytest.raises(ImageError, load_image, str(fifo), 1)),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert done and "is not a regular file" in str(done[0].value), "a FIFO named .png must not block"
    for device in ("/dev/zero", "/dev/urandom"):
        with pytest.raises(ImageError, match="is not a regular file"):
            load_image(device, 2)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ImageError, match=f"over the limit of {MAX_FILE_BYTES:,}"):
        load_image(str(huge), 0)


def test_a_decoder_raising_outside_the_usual_types_is_an_image_error():
    header = bytearray(124)
    for offset, value in ((0, 124), (4, 0x1007), (8, 4), (12, 4), (72, 32), (76, 0x4)):
        struct.pack_into("<I", header, offset, value)
    header[80:84] = b"XXXX"  # a DDS of a pixel format PIL does not implement: NotImplementedError
    with pytest.raises(ImageError, match=r"item 5: image data could not be decoded \(NotImplementedError"):
        load_image(b"DDS " + bytes(header) + bytes(64), 5)


def test_texts_that_are_not_unicode_or_far_too_long():
    with pytest.raises(TextError, match=r"item 1: text holds '\\udcff' at position 2, which is not valid Unicode"):
        prepare_texts(["fine", "a \udcff b"])
    long = "a red circle " * 100_000  # 1.3 MB
    t = time.perf_counter()
    texts, cut = prepare_texts([long, " " * 100_000 + "a red circle"])
    assert time.perf_counter() - t < 2
    assert len(texts[0]) == MAX_TEXT_CHARS and cut == [True, False] and texts[1] == "a red circle"


def test_the_tokenizer_reports_a_precut_text_as_truncated_and_reads_the_same_tokens(local):
    long = "a red circle left of a blue square " * 2_000
    a, b = local.encode_texts([long]), local.encode_texts([long[:5_000]])
    assert a.truncated.tolist() == [True] and np.abs(a.embeds - b.embeds).max() == 0
    padded = local.encode_texts([" " * 200_000 + "a red circle"])  # only white space dropped: not truncated
    assert padded.truncated.tolist() == [False]
    assert np.abs(padded.embeds - local.encode_texts(["a red circle"]).embeds).max() == 0


def test_a_command_line_argument_that_is_not_utf8_is_a_clear_error(tiny_export_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "rank", str(tiny_export_dir), "x.png", "-q",
                          b"a \xff circle"], capture_output=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert b"not valid Unicode" in out.stderr and b"Traceback" not in out.stderr


def test_a_truncated_palette_pcx_is_refused_not_decoded_as_grey():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    buf = io.BytesIO()
    image.save(buf, format="PCX")
    data = buf.getvalue()
    whole = load_image(data, 0)
    assert whole.size == (16, 16)
    for cut in (1, 100, 768):
        with pytest.raises(ImageError, match="item 4: image data is a truncated PCX"):
            load_image(data[:-cut], 4)
