"""README command 1: the demo runs end to end on the default model, Triton included."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")


@pytest.mark.skipif(not (REPO / "models" / "default" / "config.json").is_file(), reason="no default model")
def test_demo_runs_the_default_model_in_process_and_on_triton():
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "demo", "--repeats", "3"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    for row in ("binding", "spatial", "negation", "entity (held-out)"):
        assert f"[{row}] query:" in text
    diff = float(re.search(r"served rescore vs in-process, max\|diff\| over all scores: (\S+)", text).group(1))
    assert diff <= 1e-5
    # The held-out entity query: read through its explanation, the heads find it; cosine does not.
    block = text[text.index("[entity (held-out)]"):]
    heads = re.search(r"\| match_prob \| (.+?) \|", block).group(1)
    assert heads.split()[0] == "yes", block[:600]
