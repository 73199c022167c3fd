"""clipmatch.inputs.preprocess against transformers' CLIPImageProcessorPil, on real files."""
from __future__ import annotations

import doctest
import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

import clipmatch.inputs.preprocess as preprocess
from clipmatch.errors import ImageError, IncompatibleModelError, InputError, ModelNotFoundError
from clipmatch.inputs.preprocess import ImageConfig, load_image, preprocess_images


def clip_processor(**kwargs):
    """transformers' CLIPImageProcessorPil: the reference, from the [export] extra.

    Imported here rather than at the top so that the rest of the file runs
    (and stays fast) where transformers is not installed.
    """
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.CLIPImageProcessorPil(**kwargs)


REPO = Path(__file__).resolve().parents[3]

TINY = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32)
VIT_B32 = ImageConfig(shortest_edge=224, crop_height=224, crop_width=224)
# Crop taller than the resized image and narrower: pads rows, crops columns.
PADDED = ImageConfig(
    shortest_edge=20, crop_height=32, crop_width=24, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
)
SIZES = [(37, 53), (300, 17), (17, 300), (224, 224), (500, 333), (31, 31)]  # (width, height)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 that looks like a photo: gradients, shapes, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [
            120 + 100 * np.sin(x / max(width, 1) * 3.1 + seed),
            60 + 150 * y / max(height - 1, 1),
            200 - 120 * (x + y) / max(width + height - 2, 1),
        ],
        axis=-1,
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(1, width // 2 + 2), y0 + rng.integers(1, height // 2 + 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def processor_for(config: ImageConfig):
    size = (
        {"height": config.exact_size[0], "width": config.exact_size[1]}
        if config.exact_size
        else {"shortest_edge": config.shortest_edge}
    )
    return clip_processor(
        size=size,
        crop_size={"height": config.crop_height, "width": config.crop_width},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_center_crop=config.do_center_crop,
    )


def reference(images: list[Image.Image], config: ImageConfig) -> np.ndarray:
    out = processor_for(config)(images=images, return_tensors="np")["pixel_values"]
    return np.asarray(out)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# --- parity with transformers ------------------------------------------------


@pytest.mark.parametrize("config", [TINY, VIT_B32, PADDED], ids=["tiny", "vit_b32", "padded"])
def test_parity_with_transformers_on_photos(config):
    images = [Image.fromarray(photo(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    ours = preprocess_images(images, config)
    theirs = reference(images, config)
    assert ours.shape == theirs.shape == (len(SIZES), *config.output_shape)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.abs(ours - theirs).max() <= 1e-5


def test_parity_with_exact_size_from_height_width_config():
    config = ImageConfig.from_preprocessor_config(
        {"size": {"height": 40, "width": 28}, "crop_size": {"height": 32, "width": 24}}
    )
    assert config.exact_size == (40, 28)
    images = [Image.fromarray(photo(w, h, seed=i)) for i, (w, h) in enumerate(SIZES[:3])]
    assert np.abs(preprocess_images(images, config) - reference(images, config)).max() <= 1e-5


def test_parity_without_resize_pads_small_images():
    config = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32, do_resize=False)
    images = [Image.fromarray(photo(w, h, seed=i)) for i, (w, h) in enumerate([(20, 45), (50, 9)])]
    proc = clip_processor(do_resize=False, crop_size={"height": 32, "width": 32})
    theirs = np.asarray(proc(images=images, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess_images(images, config) - theirs).max() <= 1e-5


def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(photo(45, 29, seed=7))
    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 45).astype(np.uint8), (29, 1))  # partial transparency
    rgba.putalpha(Image.fromarray(alpha))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    others = {mode: rgb.convert(mode) for mode in ("L", "CMYK", "1")}
    return {"RGBA": rgba, "P": palette, **others}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1"])
def test_parity_for_other_modes(mode):
    image = _modes()[mode]
    assert image.mode == mode
    ours = preprocess_images([image], TINY)
    theirs = reference([image], TINY)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(load_image(clear, 0)).min() == 255


# --- sources -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_same_output_from_every_source(tmp_path, fmt):
    data = encode(Image.fromarray(photo(61, 43, seed=3)), fmt)
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    decoded = Image.open(path)  # lazy on purpose: load_image must finish the decode
    array = np.asarray(Image.open(path))
    sources = [str(path), path, data, bytearray(data), memoryview(data), decoded, array]
    out = preprocess_images(sources, TINY)
    for i in range(1, len(sources)):
        assert np.array_equal(out[0], out[i]), f"source {i} differs"


def test_exif_orientation_is_applied_to_files(tmp_path):
    image = Image.fromarray(photo(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path, 0).size == (20, 40)


def test_caller_image_is_not_modified():
    image = Image.new("RGBA", (5, 5), (1, 2, 3, 4))
    out = load_image(image, 0)
    assert out is not image and image.mode == "RGBA" and out.mode == "RGB"


# --- 16-bit and float --------------------------------------------------------

GREY16 = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
GREY8 = np.array([[0, 128], [255, 1]], dtype=np.uint8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(path)
    reopened = Image.open(path)
    assert reopened.mode in ("I;16", "I")
    for source in (path, reopened, reopened.convert("I")):
        rgb = np.asarray(load_image(source, 0))
        assert np.array_equal(rgb[..., 0], GREY8)
        assert np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2")])
def test_sixteen_bit_byte_orders(mode, dtype):
    image = Image.frombytes(mode, (2, 2), GREY16.astype(dtype).tobytes())
    assert np.array_equal(np.asarray(load_image(image, 0))[..., 1], GREY8)


def test_arrays_of_every_dtype_convert_alike():
    expected = np.asarray(load_image(GREY8, 0))
    unit = GREY8 / 255.0
    sources = [
        GREY16,
        GREY16[..., None],
        unit,
        unit.astype(np.float32),
        unit.astype(np.float16),
        Image.fromarray(unit.astype(np.float32)),  # mode "F"
    ]
    for source in sources:
        assert np.array_equal(np.asarray(load_image(source, 0)), expected)
    booleans = np.asarray(load_image(np.array([[True, False], [False, True]]), 0))
    assert booleans[0, 0].tolist() == [255, 255, 255] and booleans[0, 1].tolist() == [0, 0, 0]


def test_float_rgba_array_is_composited_on_white():
    rgba = np.zeros((3, 3, 4), dtype=np.float32)  # black, fully transparent
    assert np.asarray(load_image(rgba, 0)).min() == 255


# --- errors ------------------------------------------------------------------


def _half(fmt: str) -> bytes:
    # Big enough that the cut falls in pixel data: the header still parses and
    # only a full decode notices.
    data = encode(Image.fromarray(photo(160, 120, seed=5)), fmt)
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    """A PNG header claiming 20000x20000 pixels, well past PIL's bomb limit."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _bad_items(tmp_path: Path) -> dict[str, tuple[object, list[str]]]:
    nan = np.full((4, 4, 3), 0.5)
    nan.flat[:3] = np.nan
    nan.flat[5] = np.inf
    return {
        "missing file": (str(tmp_path / "nope.png"), [str(tmp_path / "nope.png"), "no such file"]),
        "directory": (tmp_path, ["directory"]),
        "corrupt bytes": (b"this is not an image", ["not an image"]),
        "empty bytes": (b"", ["0 bytes"]),
        "truncated jpeg": (_half("JPEG"), ["truncated"]),
        "truncated png": (_half("PNG"), ["truncated"]),
        "bomb": (_bomb_png(), ["decompression bomb", "400000000"]),
        "zero-size array": (np.zeros((0, 10, 3), np.uint8), ["zero size", "(0, 10, 3)"]),
        "zero-size image": (Image.new("RGB", (0, 5)), ["zero size", "0x5"]),
        "1x1 image": (Image.new("RGB", (1, 1)), ["1x1", "min_side=2"]),
        "1-pixel-wide array": (np.zeros((9, 1), np.uint8), ["1x9"]),
        "two channels": (
            np.zeros((4, 4, 2), np.uint8),
            ["expected HxW or HxWxC with C in 1, 3, 4", "(4, 4, 2)"],
        ),
        "4-d": (np.zeros((1, 4, 4, 3), np.uint8), ["got shape (1, 4, 4, 3)"]),
        "nan and inf": (nan, ["3 NaN", "1 inf"]),
        "float range": (np.linspace(-0.5, 2.0, 16).reshape(4, 4), ["min -0.5", "max 2.0"]),
        "int64": (np.zeros((4, 4), np.int64), ["dtype int64"]),
        "32-bit I": (Image.fromarray(np.full((3, 3), 70000, np.int32)), ["70000", "16-bit"]),
        "python type": (42, ["unsupported image type int"]),
        "url": ("https://example.com/cat.jpg", ["URLs are not fetched"]),
    }


def test_errors_name_the_bad_item(tmp_path):
    good = np.asarray(photo(10, 10))
    for name, (bad, phrases) in _bad_items(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            preprocess_images([good, good, bad], TINY)
        assert caught.value.index == 2, name
        message = str(caught.value)
        assert message.startswith("item 2: "), name
        for phrase in phrases:
            assert phrase in message, f"{name}: {phrase!r} not in {message!r}"
    # Decoding errors must keep PIL's exception, and never loosen PIL globally.
    with pytest.raises(ImageError) as caught:
        load_image(_half("PNG"), 0)
    assert isinstance(caught.value.__cause__, OSError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_opened_by_caller_is_detected(tmp_path, fmt):
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(_half(fmt))
    opened = Image.open(path)  # only the header: fine
    with pytest.raises(ImageError, match="truncated") as caught:
        load_image(opened, 4)
    assert caught.value.index == 4


def test_min_side_is_configurable():
    lenient = ImageConfig(shortest_edge=32, crop_height=32, crop_width=32, min_side=1)
    assert preprocess_images([Image.new("RGB", (1, 1), "red")], lenient).shape == (1, 3, 32, 32)


def test_call_level_errors():
    with pytest.raises(InputError, match="no images given") as caught:
        preprocess_images([], TINY)
    assert caught.value.index is None and not isinstance(caught.value, ImageError)
    for single in (Image.new("RGB", (4, 4)), "cat.png", Path("cat.png"), np.zeros((4, 4, 3), np.uint8), b"x"):
        with pytest.raises(InputError, match="pass a list") as caught:
            preprocess_images(single, TINY)
        assert caught.value.index is None
    with pytest.raises(InputError, match="pass a list"):
        preprocess_images(iter([np.zeros((4, 4), np.uint8)]), TINY)


# --- ImageConfig -------------------------------------------------------------


def test_config_round_trips_through_dict_and_file(tmp_path):
    config = ImageConfig(
        shortest_edge=40,
        crop_height=36,
        crop_width=30,
        rescale_factor=0.5 / 255,
        do_normalize=False,
        image_mean=(0.1, 0.2, 0.3),
        image_std=(0.4, 0.5, 0.6),
        resample=2,
        min_side=5,
    )
    assert ImageConfig.from_preprocessor_config(config.to_dict()) == config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config.to_dict()))
    assert ImageConfig.from_preprocessor_config(tmp_path) == config
    assert ImageConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == config
    assert ImageConfig.from_preprocessor_config(VIT_B32.to_dict()) == VIT_B32
    squash = ImageConfig(
        shortest_edge=8, crop_height=8, crop_width=8, do_center_crop=False, exact_size=(8, 12)
    )
    assert ImageConfig.from_preprocessor_config(squash.to_dict()) == squash
    assert squash.output_shape == (3, 8, 12)


def test_config_defaults_are_openai_clip():
    assert VIT_B32.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert VIT_B32.image_std == (0.26862954, 0.26130258, 0.27577711)
    assert VIT_B32.resample == 3 and VIT_B32.rescale_factor == 1 / 255 and VIT_B32.min_side == 2


def test_config_reads_transformers_save_pretrained(tmp_path):
    proc = clip_processor(
        size={"shortest_edge": 48}, crop_size={"height": 40, "width": 44}, image_mean=[0.5, 0.4, 0.3]
    )
    proc.save_pretrained(tmp_path)
    config = ImageConfig.from_preprocessor_config(tmp_path)
    assert (config.shortest_edge, config.crop_height, config.crop_width) == (48, 40, 44)
    assert config.image_mean == (0.5, 0.4, 0.3) and config.image_std == VIT_B32.image_std
    images = [Image.fromarray(photo(w, h, seed=i)) for i, (w, h) in enumerate(SIZES[:2])]
    theirs = np.asarray(proc(images=images, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess_images(images, config) - theirs).max() <= 1e-5


def test_transformers_reads_to_dict(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PADDED.to_dict()))
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    images = [Image.fromarray(photo(33, 70))]
    theirs = np.asarray(proc(images=images, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess_images(images, PADDED) - theirs).max() <= 1e-5


def test_config_accepts_legacy_int_sizes():
    config = ImageConfig.from_preprocessor_config(
        {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224}
    )
    assert config == VIT_B32


def test_config_refuses_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "absent" / "preprocessor_config.json"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        ImageConfig.from_preprocessor_config(missing)
    with pytest.raises(ModelNotFoundError):
        ImageConfig.from_preprocessor_config(tmp_path)  # folder without the file
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IncompatibleModelError, match="not valid JSON"):
        ImageConfig.from_preprocessor_config(bad)
    foreign = {
        "WhisperFeatureExtractor": {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "sampling_rate": 16000,
        },
        "no 'size'": {"architectures": ["CLIPModel"], "projection_dim": 512},
        "longest_edge": {"size": {"shortest_edge": 800, "longest_edge": 1333}, "crop_size": 224},
        "crop_size None": {"size": 224, "crop_size": None},
        "must be 3": {"size": 224, "crop_size": 224, "image_mean": [0.5, 0.5]},
        "positive integer": {"size": 0, "crop_size": 224},
        "different sizes": {"size": 224, "do_center_crop": False},
    }
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2, 3]")
    with pytest.raises(IncompatibleModelError, match="must be a JSON object, got list"):
        ImageConfig.from_preprocessor_config(listed)
    for phrase, raw in foreign.items():
        with pytest.raises(IncompatibleModelError, match=phrase):
            ImageConfig.from_preprocessor_config(raw)


def test_config_validates_its_own_fields():
    with pytest.raises(InputError, match="crop_height must be a positive integer, got 0"):
        ImageConfig(shortest_edge=32, crop_height=0, crop_width=32)
    with pytest.raises(InputError, match="image_std must be positive"):
        ImageConfig(shortest_edge=32, crop_height=32, crop_width=32, image_std=(1, 0, 1))


# --- the module itself -------------------------------------------------------


def test_examples_in_docstrings_run():
    result = doctest.testmod(preprocess, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_import_does_not_pull_in_torch():
    code = (
        "import clipmatch.inputs.preprocess, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "sdk")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
