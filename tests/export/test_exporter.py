"""`clipmatch export`: graphs, metadata, the parity gate and its report."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from clipmatch.contract import COMPONENTS  # noqa: E402
from clipmatch.errors import ModelNotFoundError, ParityError  # noqa: E402
from clipmatch.manifest import EXPORT_MANIFEST, HEADS_MANIFEST, PARITY_REPORT, ExportManifest  # noqa: E402
from clipmatch_export.exporter import ExportOptions, export_model, verify_graph  # noqa: E402
from clipmatch_export.models.heads import load_heads  # noqa: E402
from clipmatch_export.parity import FP32, Tolerance  # noqa: E402

from ..conftest import PYTHON  # noqa: E402


def test_every_component_exported_checked_and_reported(tiny_export):
    out = tiny_export.out_dir
    report = json.loads((out / PARITY_REPORT).read_text())
    assert report["passed"] is True
    assert set(report["components"]) == set(COMPONENTS)
    for name, by_precision in report["components"].items():
        onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
        assert {c["batch"] for c in by_precision["fp32"]} == {1, 3}  # two batch sizes
        worst32 = max(max(c["max_abs_diff"].values()) for c in by_precision["fp32"])
        worst16 = max(max(c["max_abs_diff"].values()) for c in by_precision["fp16"])
        assert worst32 <= 1e-4, (name, worst32)
        assert worst16 <= 2e-3, (name, worst16)
        assert (out / "fp16" / f"{name}.onnx").is_file()


def test_text_graphs_have_dynamic_lengths(tiny_export):
    checks = json.loads((tiny_export.out_dir / PARITY_REPORT).read_text())["components"]["text_tower"]["fp32"]
    assert len({c["input_shapes"]["input_ids"][1] for c in checks}) == 2  # two text lengths
    model = onnx.load(str(tiny_export.out_dir / "text_tower.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "text_length"]


def test_every_graph_declares_the_contracts_exact_dims(tiny_export):
    """Fixed sizes concrete, only the contract's dynamic axes symbolic (Triton's native backend
    compares them with the config exactly), in the fp32 and the fp16 graphs alike."""
    sizes = tiny_export.manifest.sizes
    for name, files in tiny_export.manifest.components.items():
        spec = COMPONENTS[name]
        for rel in files.values():
            graph = onnx.load(str(tiny_export.out_dir / rel)).graph
            declared = {v.name: [d.dim_param if d.HasField("dim_param") else d.dim_value
                                 for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
            for t in spec.inputs + spec.outputs:
                want = [d if s is None else s for d, s in zip(t.dims, t.shape(sizes))]
                assert declared[t.name] == want, (rel, t.name)


def test_pinning_the_dims_changes_no_number(tiny_model_dir, tmp_path):
    """The same trace, with and without its declared dims pinned, gives bit-identical outputs."""
    from clipmatch.inputs.tokenizer import ClipTokenizer
    from clipmatch_export.models.clip_loader import load_clip
    from clipmatch_export.models.towers import TextTower
    from clipmatch_export.onnx_export import export_component, pin_io_shapes, run_onnx
    from clipmatch_export.parity import TokenIds, random_inputs

    clip, _ = load_clip(tiny_model_dir)
    spec = COMPONENTS["text_tower"]
    sizes = {"embed_dim": clip.config.projection_dim, "context_length": 77}
    tok = ClipTokenizer.from_dir(tiny_model_dir, context_length=77)
    ids = TokenIds(tok.bos_id, tok.eos_id, tok.pad_id, clip.config.text_config.vocab_size)
    rng = np.random.default_rng(0)
    path = export_component(TextTower(clip), spec, random_inputs(spec, sizes, 2, rng, ids=ids, text_length=9),
                            tmp_path / "text_tower.onnx")
    (tmp_path / "pinned.onnx").write_bytes(path.read_bytes())
    pin_io_shapes(tmp_path / "pinned.onnx", spec, sizes)
    assert onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim[1].dim_param  # symbolic before
    for batch, length in ((1, 4), (3, 77)):
        feeds = random_inputs(spec, sizes, batch, rng, ids=ids, text_length=length)
        a, b = run_onnx(path, spec, feeds), run_onnx(tmp_path / "pinned.onnx", spec, feeds)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_graph_metadata_carries_identity(tiny_export):
    manifest = ExportManifest.read(tiny_export.out_dir)
    assert manifest == tiny_export.manifest
    for name, files in manifest.components.items():
        for precision, rel in files.items():
            meta = {p.key: p.value for p in onnx.load(str(tiny_export.out_dir / rel)).metadata_props}
            assert meta["clipmatch.model_identity"] == manifest.model_identity
            assert meta["clipmatch.tokenizer_identity"] == manifest.tokenizer_identity
            assert meta["clipmatch.component"] == name and meta["clipmatch.precision"] == precision


def test_gate_catches_a_graph_that_drifted(tiny_model_dir, tiny_export, tmp_path):
    """Nudge one weight of the exported DCSM graph: the gate must see it."""
    from clipmatch_export.parity import TokenIds, random_inputs

    model = onnx.load(str(tiny_export.out_dir / "dcsm.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(weight).copy()
    arr.flat[0] += 0.05
    weight.CopyFrom(onnx.numpy_helper.from_array(arr, weight.name))
    onnx.save(model, str(tmp_path / "dcsm.onnx"))

    heads, manifest = load_heads(tiny_model_dir)
    feeds = random_inputs(COMPONENTS["dcsm"], tiny_export.manifest.sizes, 4, np.random.default_rng(1),
                          ids=TokenIds(0, 1, 1, 100), text_length=16, num_functional=11)
    assert verify_graph(tiny_export.out_dir / "dcsm.onnx", COMPONENTS["dcsm"], heads.dcsm, feeds).passed
    drifted = verify_graph(tmp_path / "dcsm.onnx", COMPONENTS["dcsm"], heads.dcsm, feeds)
    assert not drifted.passed and drifted.max_abs_diff["dcsm_logit"] > FP32.atol


def test_export_fails_and_writes_no_manifest_when_parity_fails(model_copy, tmp_path):
    out = tmp_path / "strict"
    # Zero tolerance: fp32 rounding differences between PyTorch and onnxruntime now count.
    with pytest.raises(ParityError, match="beyond tolerance") as err:
        export_model(model_copy, out, ExportOptions(tolerance=Tolerance(atol=0.0), fp16=False))
    assert PARITY_REPORT in str(err.value)
    assert not (out / EXPORT_MANIFEST).exists()
    assert json.loads((out / PARITY_REPORT).read_text())["passed"] is False


def test_heads_are_required_unless_towers_only(model_copy, tmp_path):
    (model_copy / HEADS_MANIFEST).unlink()
    with pytest.raises(ModelNotFoundError, match="init-heads"):
        export_model(model_copy, tmp_path / "x")


def test_identity_follows_the_weights(model_copy, tiny_export, tmp_path):
    from clipmatch_export.tiny import add_random_heads

    add_random_heads(model_copy, seed=5, num_experts=2, dcsm_text_length=16)
    other = export_model(model_copy, tmp_path / "other", ExportOptions(fp16=False)).manifest
    assert other.model_identity != tiny_export.manifest.model_identity
    assert other.tokenizer_identity == tiny_export.manifest.tokenizer_identity


def test_cli_export_and_rank(model_copy, tmp_path):
    out = tmp_path / "cli-export"
    run = subprocess.run([PYTHON, "-m", "clipmatch.cli", "export", str(model_copy), str(out), "--no-fp16"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in COMPONENTS:
        assert f"{name}" in run.stdout and (out / f"{name}.onnx").is_file()
    from PIL import Image

    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 40), colour).save(paths[-1])
    run = subprocess.run([PYTHON, "-m", "clipmatch.cli", "rank", str(out), *paths, "-q", "a red square",
                          "--json", "--by", "dcsm"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert sorted(r["image"] for r in result["results"]) == sorted(paths)
    dcsm = [r["dcsm"] for r in result["results"]]
    assert dcsm == sorted(dcsm, reverse=True)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    run = subprocess.run([PYTHON, "-m", "clipmatch.cli", "export", str(tmp_path / "missing"), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "model folder not found" in run.stderr and "Traceback" not in run.stderr


def test_cli_tensorrt_without_tensorrt_says_so(model_copy, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here; this checks the message where it is not")
    run = subprocess.run([PYTHON, "-m", "clipmatch.cli", "export", str(model_copy), str(tmp_path / "o"),
                          "--no-fp16", "--tensorrt"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "TensorRT" in run.stderr and "Traceback" not in run.stderr
    # The ONNX export itself finished and is usable without TensorRT.
    assert (tmp_path / "o" / EXPORT_MANIFEST).is_file()
