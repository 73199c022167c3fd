"""Shared fixtures: one tiny random CLIP checkpoint with heads, exported once per session."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP in Hugging Face format, with untrained heads (dcsm_text_length 16)."""
    pytest.importorskip("torch")
    from clipmatch_export.tiny import add_random_heads, build_tiny_clip

    path = build_tiny_clip(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    add_random_heads(path, seed=0, num_experts=2, dcsm_text_length=16)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    from clipmatch_export.exporter import export_model

    return export_model(tiny_model_dir, tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_export) -> Path:
    return tiny_export.out_dir


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, for tests that break it."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture()
def export_copy(tiny_export_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_export_dir, tmp_path / "export"))


@pytest.fixture(scope="session")
def local(tiny_export_dir):
    import clipmatch

    return clipmatch.Local(tiny_export_dir, intra_op_threads=1)


def sdk_only_env(blocked: str | None = None) -> dict[str, str]:
    """Environment for a subprocess that must find clipmatch but must not find torch
    (nor, by default, clipmatch_export; ``blocked`` names what else to hide)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "no_torch"), str(REPO / "sdk")])
    if blocked is not None:
        env["CLIPMATCH_TEST_BLOCK"] = blocked
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def other_export_dir(tmp_path_factory) -> Path:
    """A second tiny model (another seed, so another identity), exported without fp16 graphs."""
    pytest.importorskip("torch")
    from clipmatch_export.exporter import ExportOptions, export_model
    from clipmatch_export.tiny import add_random_heads, build_tiny_clip

    root = tmp_path_factory.mktemp("other")
    path = build_tiny_clip(root / "model", seed=1)
    add_random_heads(path, seed=1, num_experts=2, dcsm_text_length=16)
    return export_model(path, root / "export", ExportOptions(fp16=False)).out_dir


@pytest.fixture(scope="session")
def default_export_dir(tmp_path_factory) -> Path:
    """The default model (models/default), exported with its fp16 graphs."""
    pytest.importorskip("torch")
    from clipmatch_export.exporter import export_model

    return export_model(REPO / "models" / "default", tmp_path_factory.mktemp("default") / "export").out_dir


def write_images(folder: Path, n: int, start: int = 0, side: int = 24) -> list[str]:
    """``n`` random RGB PNGs in ``folder`` (seeded by ``start``): a gallery on real files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths

