"""`clipmatch repository --check`: the server's own load-time rules, applied offline and in CI."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tritonclient.grpc")
onnx = pytest.importorskip("onnx")

from clipmatch.cli import main  # noqa: E402
from clipmatch.manifest import EXPORT_MANIFEST  # noqa: E402
from clipmatch.serving.repository import RepositoryConfig, write_repository  # noqa: E402
from clipmatch.serving.repository_check import check_repository  # noqa: E402


def with_engines(export, tmp_path):
    """A copy of an export with an engine file named for every component, as `clipmatch export --tensorrt`
    records them (real engines need TensorRT and a GPU; the check cannot open them anyway)."""
    copy = shutil.copytree(export, tmp_path / "export")
    manifest = json.loads((copy / EXPORT_MANIFEST).read_text())
    (copy / "tensorrt").mkdir()
    for name, files in manifest["components"].items():
        (copy / "tensorrt" / f"{name}.plan").write_bytes(b"engine bytes")
        files["tensorrt"] = f"tensorrt/{name}.plan"
    (copy / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.fixture(params=["tiny", "default"])
def export(request, tiny_export_dir, default_export_dir):
    return tiny_export_dir if request.param == "tiny" else default_export_dir


@pytest.mark.parametrize("target,precision", [("onnxruntime", "fp32"), ("onnxruntime", "fp16"),
                                              ("tensorrt", "fp32"), ("python", "fp32")])
def test_every_generated_repository_passes(export, tmp_path, target, precision):
    source = with_engines(export, tmp_path) if target == "tensorrt" else export
    write_repository(source, tmp_path / "repo", RepositoryConfig(target=target, precision=precision))
    report = check_repository(tmp_path / "repo", gpus=1 if target == "tensorrt" else 0)
    assert report.ok, report.summary()
    assert len(report.models) == 9
    assert any("TensorRT engine is not opened" in n for n in report.notes) == (target == "tensorrt")


@pytest.fixture()
def repo(tiny_export_dir, tmp_path):
    out = tmp_path / "repo"
    write_repository(tiny_export_dir, out, RepositoryConfig(target="onnxruntime"))
    assert check_repository(out, gpus=0).ok
    return out


def test_a_graph_with_a_symbolic_width_fails_as_the_backend_would(repo):
    """What exports made before the dims were pinned hold: `text_embeds: [batch, Iftext_embeds_dim_1]`."""
    path = repo / "text_tower" / "1" / "model.onnx"
    model = onnx.load(str(path))
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "Iftext_embeds_dim_1"
    onnx.save(model, str(path))
    problems = check_repository(repo, gpus=0).problems
    assert len(problems) == 1
    assert problems[0].startswith("text_tower: text_embeds: the graph has shape [-1, -1], the configuration [-1, 24]")


def test_kind_gpu_is_refused_for_a_cpu_host_and_kind_auto_is_not(tiny_export_dir, tmp_path):
    write_repository(tiny_export_dir, tmp_path / "gpu", RepositoryConfig(target="onnxruntime", instance_kind="KIND_GPU"))
    problems = check_repository(tmp_path / "gpu", gpus=0).problems
    assert len(problems) == 6 and all("KIND_GPU, but the host has no GPU" in p for p in problems), problems
    assert check_repository(tmp_path / "gpu", gpus=1).ok
    write_repository(tiny_export_dir, tmp_path / "auto", RepositoryConfig(target="onnxruntime"))
    assert check_repository(tmp_path / "auto", gpus=0).ok and check_repository(tmp_path / "auto", gpus=2).ok


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("edit,problem", [
    (("text_tower/config.pbtxt", 'name: "attention_mask"', 'name: "mask"'),
     "text_tower: 'mask' is in the configuration but not in the graph"),
    (("dcsm/config.pbtxt", "data_type: TYPE_INT64", "data_type: TYPE_INT32"),
     "dcsm: text_mask: the configuration says TYPE_INT32, the graph TYPE_INT64"),
    (("image_tower/config.pbtxt", "dims: [ 3, 32, 32 ]", "dims: [ 3, 64, 64 ]"),
     "image_tower: pixel_values: the graph has shape [-1, 3, 32, 32], the configuration [-1, 3, 64, 64]"),
    (("encode_texts/config.pbtxt", 'input_map { key: "attention_mask" value: "attention_mask" }',
      'input_map { key: "attention_mask" value: "mask" }'),
     "encode_texts: step text_tower reads mask, which no input or step gives"),
    (("encode_images/config.pbtxt", "max_batch_size: 64", "max_batch_size: 128"),
     "encode_images: max_batch_size 128 exceeds step image_tower's 64"),
    (("entity_pair/config.pbtxt", "versions: [ 1 ]", "versions: [ 2 ]"),
     "entity_pair: version 2 is named in version_policy but has no folder"),
    (("text_tower/config.pbtxt", "dims: [ 77 ]", "dims: [ -1 ]"),
     "text_tower: warmup 'batch_1' feeds input_ids with dims [-1]"),
    (("dcsm/config.pbtxt", 'name: "dcsm"', 'name: "dcsm2"'),
     "dcsm: config.pbtxt names the model 'dcsm2'; Triton wants the folder's name"),
])
def test_each_kind_of_mistake_is_named(repo, edit, problem):
    file, old, new = edit
    _edit(repo / file, old, new)
    problems = check_repository(repo, gpus=0).problems
    assert any(p.startswith(problem) for p in problems), problems


def test_what_triton_accepts_is_not_refused(repo):
    """Rules the server does not have: ensemble steps in any order, a model of a backend not judged here."""
    text = (repo / "encode_texts" / "config.pbtxt").read_text()
    (repo / "two_steps").mkdir()
    (repo / "two_steps" / "1").mkdir()
    step = text[text.index("    {\n      model_name"):text.index("\n  ]\n}")]
    listed_late = step.replace('value: "text_embeds"', 'value: "mid_embeds"', 1)
    (repo / "two_steps" / "config.pbtxt").write_text(
        text.replace('name: "encode_texts"', 'name: "two_steps"').replace(step, step + ",\n" + listed_late, 1)
        .replace('key: "text_embeds" value: "text_embeds"', 'key: "text_embeds" value: "text_embeds"', 1))
    (repo / "torch_model" / "1").mkdir(parents=True)
    (repo / "torch_model" / "1" / "model.pt").write_bytes(b"")
    (repo / "torch_model" / "config.pbtxt").write_text('name: "torch_model"\nplatform: "pytorch_libtorch"\n')
    report = check_repository(repo, gpus=0)
    assert report.ok, report.summary()
    assert any(n.startswith("torch_model: the pytorch backend's rules are not checked") for n in report.notes)


def test_missing_files_and_mixed_exports_are_named(repo, other_export_dir, tmp_path):
    (repo / "dcsm" / "1" / "model.onnx").unlink()
    write_repository(other_export_dir, tmp_path / "other", RepositoryConfig(target="onnxruntime"))
    shutil.rmtree(repo / "text_tower")
    shutil.copytree(tmp_path / "other" / "text_tower", repo / "text_tower")
    problems = check_repository(repo, gpus=0).problems
    assert "dcsm: version 1 has no model.onnx" in problems
    assert any(p.startswith("repository: models of different exports are mixed") for p in problems), problems


def test_cli_check_exits_1_and_names_the_problems(repo, tiny_export_dir, tmp_path, capsys):
    assert main(["repository", str(tiny_export_dir), "--out", str(tmp_path / "ok"), "--check", "--gpus", "0"]) == 0
    assert "9 models checked, 0 problems" in capsys.readouterr().out
    _edit(repo / "dcsm" / "config.pbtxt", "KIND_AUTO", "KIND_GPU")
    assert main(["repository", "--check", "--out", str(repo), "--gpus", "0"]) == 1
    assert "problem: dcsm: instance_group KIND_GPU, but the host has no GPU" in capsys.readouterr().out
