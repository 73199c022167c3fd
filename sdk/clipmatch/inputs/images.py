"""Images from what callers hand in: paths, bytes, arrays, PIL images, each made RGB.

Files and bytes are turned upright by their EXIF orientation, as
``transformers.image_utils.load_image`` does; a PIL image you pass is used as it
is. 16-bit greyscale and uint16 arrays are scaled to 8 bits (value / 257,
rounded); float arrays must lie in [0, 1]. A failure names the item's position
(``ImageError.index``) and what is wrong with it. ``preprocess.py`` turns the
result into the image tower's pixels.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from numbers import Integral
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipmatch.errors import ImageError

__all__ = ["load_image", "check_pixels", "MAX_FILE_BYTES", "MAX_PIXELS"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# What PIL raises on bad data besides DecompressionBombError; its decoders
# and plugins are not consistent about which.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# Limits, so that no file a caller names can exhaust the process: a file over
# MAX_FILE_BYTES is refused before it is read, an image over MAX_PIXELS before it
# is decoded, and one whose resize would make more than MAX_PIXELS before the
# resize (a 2 x 1,000,000 image resized to a shortest edge of 224 would be 25
# Gpx). 64 Mpx takes an 8192 x 8192 image and a 50 MP camera's photos.
MAX_FILE_BYTES = 256 * 2**20
MAX_PIXELS = 64 * 2**20


def load_image(item: Any, index: int, *, min_side: int = 2) -> Image.Image:
    """Decode one image from a path, bytes, PIL image or array; return it in mode RGB.

    Every problem raises ``ImageError(..., index=index)``.

        >>> import numpy as np
        >>> load_image(np.zeros((4, 6, 3), np.uint8), 0).size
        (6, 4)
    """
    if isinstance(item, (str, os.PathLike)):
        image = _decode(_read_file(item, index), f"file '{os.fspath(item)}'", index)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = item.tobytes() if isinstance(item, memoryview) else bytes(item)
        image = _decode(data, "image data", index)
    elif isinstance(item, Image.Image):
        # An image from Image.open is decoded lazily: force it, so a truncated
        # file fails here rather than somewhere inside PIL's resize.
        check_pixels(item.width, item.height, "PIL image", index)
        try:
            item.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"refusing a possible decompression bomb: {exc}", index=index) from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(f"PIL image is corrupt or truncated: {exc}", index=index) from exc
        except Exception as exc:  # PIL's plugins raise what they like (an odd DDS: NotImplementedError)
            raise ImageError(f"PIL image could not be decoded ({type(exc).__name__}: {exc})", index=index) from exc
        image = item
    elif isinstance(item, np.ndarray):
        image = _array_to_image(item, index)
    else:
        kind = f"{type(item).__module__}.{type(item).__qualname__}".removeprefix("builtins.")
        raise ImageError(
            f"unsupported image type {kind}; expected a path, bytes, PIL.Image.Image or numpy.ndarray",
            index=index,
        )

    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"image has zero size ({width}x{height})", index=index)
    if min(width, height) < min_side:
        raise ImageError(
            f"image is {width}x{height} (width x height), a side below min_side={min_side}", index=index
        )
    return _to_rgb(image, index)


def check_pixels(width: int, height: int, source: str, index: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{source} would be {width}x{height} pixels, over the limit of {MAX_PIXELS:,} "
                         "(clipmatch.inputs.images.MAX_PIXELS)", index=index)


def _read_file(path: str | os.PathLike, index: int) -> bytes:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never end
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(path)
            raise ImageError(f"'{os.fspath(path)}' is not a regular file (a pipe, device or socket)", index=index)
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(f"'{os.fspath(path)}' is {info.st_size:,} bytes, over the limit of {MAX_FILE_BYTES:,} "
                             "(clipmatch.inputs.images.MAX_FILE_BYTES)", index=index)
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since the stat
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"'{os.fspath(path)}' is over the limit of {MAX_FILE_BYTES:,} bytes", index=index)
        return data
    except FileNotFoundError as exc:
        hint = ""
        if str(path).startswith(("http://", "https://")):
            hint = "; URLs are not fetched, download the bytes and pass those"
        raise ImageError(f"no such file: '{os.fspath(path)}'{hint}", index=index) from exc
    except IsADirectoryError as exc:
        raise ImageError(f"'{os.fspath(path)}' is a directory, not an image file", index=index) from exc
    except OSError as exc:
        raise ImageError(f"cannot read '{os.fspath(path)}': {exc.strerror or exc}", index=index) from exc


def _decode(data: bytes, source: str, index: int) -> Image.Image:
    if not data:
        raise ImageError(f"{source} is empty (0 bytes)", index=index)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            check_pixels(opened.width, opened.height, source, index)  # from the header, before decoding
            # load() decodes every pixel: Image.open only reads the header, and
            # a file cut short would otherwise pass unnoticed.
            opened.load()
            if opened.format == "PCX":
                _check_pcx(data, source, index)
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{source}: refusing a possible decompression bomb: {exc}", index=index) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"{source} is not an image PIL can read ({len(data)} bytes starting {data[:8]!r})",
            index=index,
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{source} is corrupt or truncated ({len(data)} bytes): {exc}", index=index) from exc
    except ImageError:
        raise
    except Exception as exc:  # PIL's plugins raise what they like (an odd DDS: NotImplementedError)
        raise ImageError(f"{source} could not be decoded ({type(exc).__name__}: {exc})", index=index) from exc
    return image


def _check_pcx(data: bytes, source: str, index: int) -> None:
    """A version-5, 8-bit, one-plane PCX ends with its 256-colour palette (0x0C, then 768 bytes).
    Cut short, PIL decodes it without a word as grey, from the wrong bytes: refuse it instead."""
    if len(data) > 65 and data[1] == 5 and data[3] == 8 and data[65] == 1:
        if len(data) < 128 + 769 or data[-769] != 12:
            raise ImageError(f"{source} is a truncated PCX ({len(data)} bytes): the 256-colour palette it must "
                             "end with is missing", index=index)


def _array_to_image(array: np.ndarray, index: int) -> Image.Image:
    shape = tuple(array.shape)
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise ImageError(f"expected HxW or HxWxC with C in 1, 3, 4, got shape {shape}", index=index)
    if shape[0] == 0 or shape[1] == 0:
        raise ImageError(f"image has zero size, array shape {shape}", index=index)
    if array.ndim == 3 and shape[2] == 1:
        array = array[..., 0]

    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = _sixteen_to_eight(array)
    elif array.dtype.type in _FLOAT_DTYPES:
        pixels = _unit_floats_to_eight(array, index, "array")
    else:
        raise ImageError(
            f"unsupported array dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1]",
            index=index,
        )
    # fromarray picks L / RGB / RGBA from the shape.
    return Image.fromarray(np.ascontiguousarray(pixels))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    # round(v / 257) in integers: 65535 -> 255, 32768 -> 128; no ties exist.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _unit_floats_to_eight(values: np.ndarray, index: int, what: str) -> np.ndarray:
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int(values.size - finite.sum()) - n_nan
        raise ImageError(f"{what} has {n_nan} NaN and {n_inf} inf values", index=index)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(f"float {what} must lie in [0, 1], got min {low} and max {high}", index=index)
    return np.round(values * 255.0).astype(np.uint8)


def _to_rgb(image: Image.Image, index: int) -> Image.Image:
    """Mode RGB, transparency composited on white as transformers' convert_to_rgb does."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        image = _wide_grey_to_eight(image, index)
    elif image.mode == "F":
        image = Image.fromarray(_unit_floats_to_eight(np.asarray(image), index, "mode 'F' image"))

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # convert() copies even when already RGB, so the caller's image is never returned.
    return image.convert("RGB")


def _wide_grey_to_eight(image: Image.Image, index: int) -> Image.Image:
    """16-bit greyscale to mode L (or LA when it has a transparent value)."""
    values = np.asarray(image).astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        # Mode "I" is 32-bit; only 16-bit content has a known white.
        raise ImageError(
            f"mode {image.mode!r} image has values in [{low}, {high}], outside the 16-bit range [0, 65535]",
            index=index,
        )
    grey = _sixteen_to_eight(values)
    transparent = image.info.get("transparency")
    if isinstance(transparent, Integral):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))  # (H, W, 2) -> LA
    return Image.fromarray(grey)
