"""The committed default model: loads like a real checkpoint, exports under the gate, and shows both papers' effects."""
from __future__ import annotations

import json

import pytest

from .conftest import REPO

MODEL = REPO / "models" / "default"
pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="models/default is not present")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    import clipmatch
    from clipmatch_export.evaluation.evaluate import EvalConfig, evaluate
    from clipmatch_export.exporter import ExportOptions, export_model

    out = export_model(MODEL, tmp_path_factory.mktemp("default") / "export", ExportOptions(fp16=False)).out_dir
    return evaluate(clipmatch.Local(out), EvalConfig(per_row=60, gallery_size=360, queries_per_row=40))


def test_recipe_and_size_are_recorded():
    recipe = json.loads((MODEL / "recipe.json").read_text())
    assert recipe["command"].startswith("clipmatch train default") and "seed" in recipe["recipe"]
    size = sum(p.stat().st_size for p in MODEL.iterdir() if p.suffix in (".safetensors", ".json", ".txt"))
    assert size <= 20 * 2**20, size


def test_dense_maps_fix_spatial_relations(table):
    # DCSM's claim on the relation pooled cosine cannot see (README, "The default model").
    spatial = table["image_to_captions"]["spatial"]
    assert spatial["dcsm"] > spatial["cosine"] + 0.25, spatial


def test_explanations_recover_held_out_entities(table):
    # EntityCLIP's claim: a name never seen in training, matched through its explanation.
    i2c, t2i = table["image_to_captions"], table["text_to_image"]
    held = "entity (held-out)"
    assert i2c[held]["match_prob"] > i2c[held]["cosine"] + 0.2, i2c[held]
    assert t2i[held]["match_prob"]["r1"] > t2i[held]["cosine"]["r1"] + 0.2, t2i[held]


# Not there yet in this default model (README, "The default model"): DCSM does not
# beat cosine on binding or negation. A strict xfail fails the suite the day it
# starts to hold, so it gets promoted.
@pytest.mark.xfail(strict=True, reason="DCSM does not beat cosine on binding and negation yet (README)")
def test_dense_maps_fix_binding_and_negation(table):
    i2c = table["image_to_captions"]
    for row in ("binding", "negation"):
        assert i2c[row]["dcsm"] > i2c[row]["cosine"] + 0.1, (row, i2c[row])


def test_towers_learned_content_and_seen_entities(table):
    i2c, t2i = table["image_to_captions"], table["text_to_image"]
    assert i2c["basic"]["cosine"] > i2c["basic"]["chance"] + 0.3, i2c["basic"]
    assert t2i["basic"]["cosine"]["r5"] >= 0.75, t2i["basic"]
    assert i2c["entity (seen)"]["cosine"] >= 0.8, i2c["entity (seen)"]
    # A name never seen in training cannot be matched by cosine: the gap the explanation must bridge.
    assert i2c["entity (held-out)"]["cosine"] < i2c["entity (held-out)"]["chance"], i2c["entity (held-out)"]
