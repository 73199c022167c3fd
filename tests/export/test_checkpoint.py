"""Checkpoint folders: what is refused, what is never unpickled, heads round-trip."""
from __future__ import annotations

import json
import pickle

import pytest

from clipmatch.errors import IncompatibleModelError, ModelNotFoundError
from clipmatch.manifest import HEADS_MANIFEST, HEADS_WEIGHTS, HeadsManifest
from clipmatch_export.checkpoint import inspect_checkpoint


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        inspect_checkpoint(tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match="config.json is missing"):
        inspect_checkpoint(tmp_path)


def test_not_a_clip_checkpoint(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match="'bert' checkpoint"):
        inspect_checkpoint(model_copy)


def test_incomplete_checkpoint_lists_everything_missing(model_copy):
    for name in ("tokenizer.json", "vocab.json", "preprocessor_config.json"):
        (model_copy / name).unlink()
    with pytest.raises(ModelNotFoundError) as err:
        inspect_checkpoint(model_copy)
    assert "tokenizer.json (or vocab.json and merges.txt)" in str(err.value)
    assert "preprocessor_config.json" in str(err.value)


def test_sharded_checkpoint_with_a_missing_shard(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002"):
        inspect_checkpoint(model_copy)


class _Tripwire:
    """Unpickling this writes a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_and_never_loaded(model_copy, tmp_path):
    tripwire = tmp_path / "unpickled"
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(tripwire))))
    # Next to safetensors: the safetensors are used and the pickle is left alone.
    pytest.importorskip("torch")
    from clipmatch_export.models.clip_loader import load_clip

    load_clip(model_copy)
    assert not tripwire.exists()
    # Pickle only: refused with a message saying why and what to do.
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(IncompatibleModelError, match="never unpickles"):
        load_clip(model_copy)
    assert not tripwire.exists()


def test_heads_round_trip_and_tamper_detection(model_copy):
    torch = pytest.importorskip("torch")
    from clipmatch_export.models.heads import build_heads, load_heads, save_heads

    heads, manifest = load_heads(model_copy)
    assert manifest == HeadsManifest.read(model_copy)
    assert manifest.config.num_experts == 2 and manifest.config.dcsm_text_length == 16
    assert "torch" in manifest.versions
    fresh = build_heads(manifest.config, seed=123)
    save_heads(fresh, model_copy)
    reloaded, _ = load_heads(model_copy)
    for (k, a), (_, b) in zip(fresh.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    # Weights replaced behind the manifest's back.
    data = bytearray((model_copy / HEADS_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (model_copy / HEADS_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(IncompatibleModelError, match="sha256"):
        load_heads(model_copy)


def test_heads_manifest_errors(model_copy):
    (model_copy / HEADS_MANIFEST).write_text("{not json")
    with pytest.raises(IncompatibleModelError, match="not valid JSON"):
        HeadsManifest.read(model_copy)
    (model_copy / HEADS_MANIFEST).write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(IncompatibleModelError, match="not a clipmatch.heads manifest"):
        HeadsManifest.read(model_copy)


def test_weights_missing_a_tensor_are_refused(model_copy):
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    from clipmatch_export.models.clip_loader import load_clip

    state = load_file(str(model_copy / "model.safetensors"))
    name = next(k for k in state if k.endswith("text_projection.weight"))
    del state[name]
    save_file(state, str(model_copy / "model.safetensors"))
    with pytest.raises(IncompatibleModelError, match="missing keys: .*text_projection"):
        load_clip(model_copy)


def test_heads_that_do_not_fit_their_manifest_are_refused(model_copy):
    pytest.importorskip("torch")
    from clipmatch_export.models.heads import load_heads

    manifest = json.loads((model_copy / HEADS_MANIFEST).read_text())
    manifest["heads"]["dcsm_text_length"] = 20  # the weights were built for 16
    (model_copy / HEADS_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleModelError, match=r"wrong shapes .*dcsm\.reader\.position"):
        load_heads(model_copy)


def test_init_heads_checks_the_folder_first(tmp_path, model_copy):
    pytest.importorskip("torch")
    from clipmatch_export.tiny import add_random_heads

    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        add_random_heads(tmp_path / "absent")
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match="'bert'"):
        add_random_heads(model_copy)
