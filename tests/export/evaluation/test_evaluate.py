"""`clipmatch eval` on a real export: the table's shape, its chance column, its protocols."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import clipmatch  # noqa: E402
from clipmatch_export.evaluation.evaluate import COLUMNS, ROWS, EvalConfig, _examples, evaluate, format_markdown  # noqa: E402
from clipmatch_export.synth.entities import HELD_OUT_ENTITIES  # noqa: E402
from clipmatch_export.synth.forms import satisfies  # noqa: E402


@pytest.fixture(scope="module")
def result(tiny_export_dir):
    return evaluate(clipmatch.Local(tiny_export_dir), EvalConfig(per_row=6, gallery_size=36, queries_per_row=4,
                                                                   shortlist=8))


def test_rows_hold_the_phenomena_they_name():
    rows = _examples(6, seed=99)
    assert [r for r in ROWS if len(rows[r]) == 6] == list(ROWS)
    assert all(ex.entity in HELD_OUT_ENTITIES for ex in rows["entity (held-out)"])
    assert all(ex.entity not in HELD_OUT_ENTITIES for ex in rows["entity (seen)"])
    for row in ("basic", "binding", "spatial", "negation"):
        assert {ex.phenomenon for ex in rows[row]} == {row}
    for ex in rows["spatial"]:
        assert satisfies(ex.scene, ex.form) and ex.negative_captions


def test_table_covers_every_row_and_column_with_rates(result):
    i2c, t2i = result["image_to_captions"], result["text_to_image"]
    assert list(i2c) == list(ROWS) and list(t2i) == list(ROWS)
    for row in ROWS:
        assert set(COLUMNS) <= set(i2c[row]) and i2c[row]["n"] == 6
        assert all(0.0 <= i2c[row][c] <= 1.0 for c in COLUMNS)
        for c in COLUMNS:
            assert 0.0 <= t2i[row][c]["r1"] <= t2i[row][c]["r5"] <= 1.0
    # Chance for image -> K captions is the mean of 1/K over the examples.
    rows = _examples(6, EvalConfig().seed)
    expected = np.mean([1 / (1 + len(ex.negative_captions)) for ex in rows["spatial"]])
    assert abs(i2c["spatial"]["chance"] - expected) < 1e-9
    text = format_markdown(result)
    assert all(row in text for row in ROWS) and "R@1 / R@5" in text
