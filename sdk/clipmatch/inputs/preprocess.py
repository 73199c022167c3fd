"""CLIP image preprocessing with numpy and PIL only.

Matches ``transformers.CLIPImageProcessorPil`` bit for bit, by doing the same
steps with the same arithmetic: convert to RGB compositing transparency on
white, resize the shortest edge with PIL, center crop (zero-padding where the
crop is larger than the image), rescale in float64, normalize in float32,
channels first. The served image tower is fed from here, so this module must
never import torch.

Where clipmatch deliberately differs from transformers:

* 16-bit greyscale ("I;16", "I;16B", "I;16L", and "I" from 16-bit PNGs) and
  uint16 arrays are scaled to 8 bits (value / 257, rounded); PIL's own
  ``convert("RGB")`` clips them, turning most of a 16-bit photo white.
* Float arrays and "F" images must lie in [0, 1] and are scaled by 255 and
  rounded (transformers truncates them, and rescales them by 1/255 twice).
* Files and bytes are turned upright by their EXIF orientation, as
  ``transformers.image_utils.load_image`` does; a PIL image you pass is used
  as it is.
* Images with a side below ``ImageConfig.min_side`` (2) are refused.

    >>> import numpy as np
    >>> config = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32)
    >>> preprocess_images([np.zeros((40, 60, 3), np.uint8)], config).shape
    (1, 3, 32, 32)
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipmatch.errors import IncompatibleModelError, InputError, ModelError, ModelNotFoundError
from clipmatch.inputs.images import check_pixels, load_image

__all__ = [
    "model_view",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageConfig",
    "load_image",
    "preprocess_images",
]

# OpenAI CLIP's training statistics; every OpenAI checkpoint ships these.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# PIL's resampling codes: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING.
_PIL_RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)


# --- configuration -----------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """How a model wants its pixels; read from its ``preprocessor_config.json``.

    ``exact_size`` is ``(height, width)`` for checkpoints whose ``size`` is
    ``{"height", "width"}``: images are then squashed to it, ignoring aspect
    ratio, and ``shortest_edge`` is unused.

    ``min_side`` refuses tiny images: a 1x1 image is a tracking pixel or a
    broken thumbnail, not a photo, and upscaling it to 224x224 yields a flat
    colour that still gets a confident embedding.

        >>> ImageConfig(shortest_edge=224, crop_height=224, crop_width=224).output_shape
        (3, 224, 224)
    """

    shortest_edge: int
    crop_height: int
    crop_width: int
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL bicubic, what CLIP was trained with
    min_side: int = 2
    exact_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Coerce JSON-ish values (lists, numpy ints) so that equality and
        # hashing behave; frozen, hence object.__setattr__.
        set_ = object.__setattr__
        for name in ("shortest_edge", "crop_height", "crop_width"):
            set_(self, name, _positive_int(name, getattr(self, name)))
        set_(self, "min_side", _positive_int("min_side", self.min_side))
        if self.exact_size is not None:
            size = tuple(self.exact_size)
            if len(size) != 2:
                raise InputError(f"exact_size must be (height, width), got {self.exact_size!r}")
            set_(self, "exact_size", tuple(_positive_int("exact_size", v) for v in size))
        for name in ("image_mean", "image_std"):
            set_(self, name, _three_floats(name, getattr(self, name)))
        if any(s <= 0 for s in self.image_std):
            raise InputError(f"image_std must be positive, got {self.image_std}")
        if not (isinstance(self.resample, Integral) and int(self.resample) in _PIL_RESAMPLE_CODES):
            raise InputError(
                f"resample must be a PIL filter code in {_PIL_RESAMPLE_CODES}, got {self.resample!r}"
            )
        set_(self, "resample", int(self.resample))
        if not (isinstance(self.rescale_factor, Real) and 0 < self.rescale_factor < math.inf):
            raise InputError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        set_(self, "rescale_factor", float(self.rescale_factor))
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            set_(self, name, bool(getattr(self, name)))
        # A batch is one array, so every image must come out the same size.
        if not self.do_center_crop and not (self.do_resize and self.exact_size):
            raise InputError(
                "do_center_crop=False needs do_resize=True and an exact_size, "
                "otherwise images come out in different sizes"
            )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one preprocessed image."""
        if self.do_center_crop:
            return (3, self.crop_height, self.crop_width)
        return (3, *self.exact_size)

    @classmethod
    def from_preprocessor_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> ImageConfig:
        """Read a Hugging Face ``preprocessor_config.json`` (a file, its folder, or its dict).

        Keys the file leaves out take CLIPImageProcessor's defaults, except
        ``size`` and, when cropping, ``crop_size``, which must be there.

            >>> ImageConfig.from_preprocessor_config({"size": 32, "crop_size": 32}).output_shape
            (3, 32, 32)
        """
        if isinstance(source, Mapping):
            return _config_from_hf(source, "preprocessor config")
        if not isinstance(source, (str, os.PathLike)):
            raise InputError(f"expected a path or a dict, got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"no preprocessor config at '{path}'") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read preprocessor config '{path}': {exc}") from exc
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IncompatibleModelError(f"'{path}' is not valid JSON: {exc}") from exc
        return _config_from_hf(raw, f"'{path}'")

    def to_dict(self) -> dict[str, Any]:
        """The config in Hugging Face's layout; transformers loads it too.

            >>> ImageConfig(shortest_edge=32, crop_height=32, crop_width=32).to_dict()["size"]
            {'shortest_edge': 32}
        """
        if self.exact_size is not None:
            size: dict[str, int] = {"height": self.exact_size[0], "width": self.exact_size[1]}
        else:
            size = {"shortest_edge": self.shortest_edge}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            # transformers keeps unknown keys as attributes, so this is harmless there.
            "clipmatch_min_side": self.min_side,
        }


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, Real):  # transformers allows one value for all channels
        value = (value,) * 3
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be 3 numbers, got {value!r}") from exc
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        raise InputError(f"{name} must be 3 finite numbers, got {value!r}")
    return floats


def _config_from_hf(raw: Any, where: str) -> ImageConfig:
    if not isinstance(raw, Mapping):
        raise IncompatibleModelError(f"{where} must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("image_processor_type") or raw.get("feature_extractor_type")
    if kind is not None and "CLIP" not in str(kind):
        raise IncompatibleModelError(f"{where} is for {kind!r}, not a CLIP image processor")
    if "size" not in raw:
        raise IncompatibleModelError(
            f"{where} has no 'size', so it is not a CLIP image processor config; keys: {sorted(raw)}"
        )
    if raw.get("do_pad"):
        raise IncompatibleModelError(f"{where} asks for do_pad, which a CLIP image processor does not do")

    size = raw["size"]
    exact_size = None
    if isinstance(size, Integral):
        shortest_edge = size
    elif isinstance(size, Mapping) and _only(size, "shortest_edge"):
        shortest_edge = size["shortest_edge"]
    elif isinstance(size, Mapping) and _only(size, "height", "width"):
        exact_size = (size["height"], size["width"])
        shortest_edge = min(exact_size)
    else:
        raise IncompatibleModelError(
            f"{where} has size {size!r}; expected an int, "
            "{'shortest_edge': n} or {'height': h, 'width': w}"
        )

    do_center_crop = raw.get("do_center_crop", True)
    crop = raw.get("crop_size")
    if isinstance(crop, Integral):
        crop_height = crop_width = crop
    elif isinstance(crop, Mapping) and _only(crop, "height", "width"):
        crop_height, crop_width = crop["height"], crop["width"]
    elif crop is None and not do_center_crop:
        crop_height, crop_width = exact_size or (shortest_edge, shortest_edge)
    else:
        raise IncompatibleModelError(
            f"{where} has crop_size {crop!r}; expected an int or {{'height': h, 'width': w}}"
        )

    try:
        return ImageConfig(
            shortest_edge=shortest_edge,
            crop_height=crop_height,
            crop_width=crop_width,
            do_resize=raw.get("do_resize", True),
            do_center_crop=do_center_crop,
            do_rescale=raw.get("do_rescale", True),
            rescale_factor=raw.get("rescale_factor", 1 / 255),
            do_normalize=raw.get("do_normalize", True),
            image_mean=raw.get("image_mean", OPENAI_CLIP_MEAN),
            image_std=raw.get("image_std", OPENAI_CLIP_STD),
            resample=raw.get("resample", 3),
            min_side=raw.get("clipmatch_min_side", 2),
            exact_size=exact_size,
        )
    except InputError as exc:
        raise IncompatibleModelError(f"{where}: {exc}") from exc


def _only(d: Mapping, *keys: str) -> bool:
    """True if d sets exactly these keys (transformers writes unset ones as null)."""
    return {k for k, v in d.items() if v is not None} == set(keys)


# --- pixels ------------------------------------------------------------------


def _resize_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    """(height, width) after resizing.

    As transformers' get_resize_output_image_size(default_to_square=False):
    the long side is truncated, not rounded.
    """
    if config.exact_size is not None:
        return config.exact_size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Crop (H, W, C) to the centre; where the image is smaller, pad with zeros.

    Per axis this is what transformers' center_crop does: crop from
    (size - crop) // 2, or place the image at ceil((crop - size) / 2).
    """
    height, width = pixels.shape[:2]
    if height >= crop_height and width >= crop_width:
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        return pixels[top : top + crop_height, left : left + crop_width]
    out = np.zeros((crop_height, crop_width, pixels.shape[2]), dtype=pixels.dtype)
    src_rows, dst_rows = _crop_span(height, crop_height)
    src_cols, dst_cols = _crop_span(width, crop_width)
    out[dst_rows, dst_cols] = pixels[src_rows, src_cols]
    return out


def _crop_span(size: int, crop: int) -> tuple[slice, slice]:
    """(source, destination) slices along one axis."""
    if size >= crop:
        start = (size - crop) // 2
        return slice(start, start + crop), slice(0, crop)
    start = math.ceil((crop - size) / 2)
    return slice(0, size), slice(start, start + size)


def model_view(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """(H, W, 3) uint8: the part of an RGB image the image tower sees, resized and cropped as it
    is (before rescaling), so a picture drawn over it lines up with the tower's patches."""
    if config.do_resize:
        height, width = _resize_size(image.height, image.width, config)
        image = image.resize((width, height), resample=config.resample)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    if config.do_center_crop:
        pixels = _center_crop(pixels, config.crop_height, config.crop_width)
    return pixels


def _pixel_values(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """One RGB image to (3, H, W) float32."""
    pixels = model_view(image, config)
    # Same arithmetic as transformers (rescale in float64, then float32
    # normalize), so results agree to the bit rather than to 1e-7.
    if config.do_rescale:
        values = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        values = (values - mean) / std
    return values.transpose(2, 0, 1)  # (3, H, W)


def preprocess_images(items: Sequence[Any], config: ImageConfig, *, start_index: int = 0) -> np.ndarray:
    """Load and preprocess a list of images into one float32 (N, 3, H, W) array.

    Errors name the first bad item by its position (``ImageError.index``);
    ``start_index`` is added to it when ``items`` is one chunk of a longer list.

        >>> import numpy as np
        >>> config = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32)
        >>> preprocess_images([np.zeros((40, 60, 3), np.uint8)], config).dtype
        dtype('float32')
    """
    single = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray)
    if isinstance(items, single):
        raise InputError(
            f"pass a list of images, got a single {type(items).__name__}; wrap it as [image]"
        )
    if not isinstance(items, Sequence):
        raise InputError(f"pass a list of images, got {type(items).__name__}")
    if len(items) == 0:
        raise InputError("no images given")

    out = np.empty((len(items), *config.output_shape), dtype=np.float32)
    for i, item in enumerate(items):
        image = load_image(item, start_index + i, min_side=config.min_side)
        if config.do_resize:
            height, width = _resize_size(image.height, image.width, config)
            check_pixels(width, height, f"image {image.width}x{image.height} resized", start_index + i)
        out[i] = _pixel_values(image, config)
    return out
