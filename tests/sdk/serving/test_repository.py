"""The generated model repositories: every config parses as Triton's own ModelConfig message."""
from __future__ import annotations

import json
import shutil

import pytest

from clipmatch.contract import COMPONENTS
from clipmatch.errors import ModelNotFoundError
from clipmatch.manifest import EXPORT_MANIFEST
from clipmatch.serving.repository import Batching, RepositoryConfig, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture()
def export_with_engines(export_copy):
    """The tiny export with an engine file named for every component, as `clipmatch export --tensorrt`
    records them (the engines themselves need TensorRT and a GPU; here only their place matters)."""
    manifest = json.loads((export_copy / EXPORT_MANIFEST).read_text())
    (export_copy / "tensorrt").mkdir()
    for name, files in manifest["components"].items():
        (export_copy / "tensorrt" / f"{name}.plan").write_bytes(b"engine bytes for " + name.encode())
        files["tensorrt"] = f"tensorrt/{name}.plan"
    (export_copy / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    return export_copy


@pytest.mark.parametrize("target,platform,file", [("onnxruntime", "onnxruntime_onnx", "model.onnx"),
                                                  ("tensorrt", "tensorrt_plan", "model.plan"),
                                                  ("python", "", "model.onnx")])
def test_every_config_parses_and_names_its_platform_and_file(export_with_engines, tmp_path, target, platform, file):
    out = tmp_path / "repo"
    names = write_repository(export_with_engines, out, RepositoryConfig(target=target))
    assert names == ["image_tower", "text_tower", "entity_image", "entity_query", "entity_pair", "dcsm", "rescore",
                     "encode_images", "encode_texts"]
    manifest = json.loads((export_with_engines / EXPORT_MANIFEST).read_text())
    for name in names[:6]:
        cfg = parse(out / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == platform
        assert cfg.backend == ("python" if target == "python" else "")
        served = out / name / "1" / file
        source = export_with_engines / manifest["components"][name]["tensorrt" if target == "tensorrt" else "fp32"]
        assert served.read_bytes() == source.read_bytes()
        assert (out / name / "1" / "model.py").exists() == (target == "python")
        if COMPONENTS[name].batched:
            assert cfg.max_batch_size == 64 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        else:  # one query against its candidates: Triton cannot batch it with other queries
            assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        kinds = model_config_pb2.ModelInstanceGroup
        assert cfg.instance_group[0].kind == {"python": kinds.KIND_CPU, "onnxruntime": kinds.KIND_AUTO,
                                              "tensorrt": kinds.KIND_GPU}[target]
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["clipmatch_model_identity"] == manifest["identity"]["model"]
    rescore = parse(out / "rescore" / "config.pbtxt")
    assert rescore.backend == "python" and rescore.max_batch_size == 0 and (out / "rescore" / "1" / "model.py").exists()
    assert [t.name for t in rescore.output] == ["cosine", "match_prob", "entity_score", "dcsm_logit"]
    ens = parse(out / "encode_images" / "config.pbtxt")
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == ["image_tower"]


def test_config_matches_the_tensor_contract(export_copy, tmp_path):

    sizes = json.loads((export_copy / EXPORT_MANIFEST).read_text())["sizes"]
    write_repository(export_copy, tmp_path / "repo", RepositoryConfig(target="onnxruntime"))
    for name, spec in COMPONENTS.items():
        cfg = parse(tmp_path / "repo" / name / "config.pbtxt")
        for served, contract in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
            assert [t.name for t in served] == [t.name for t in contract]
            for t, c in zip(served, contract):
                assert model_config_pb2.DataType.Name(t.data_type) == {"float32": "TYPE_FP32",
                                                                       "int64": "TYPE_INT64"}[c.dtype]
                want = [-1 if d is None else d for d in c.shape(sizes)[1 if spec.batched else 0:]] or [1]
                assert list(t.dims) == want, (name, t.name)


def test_batching_and_instances_are_set_from_one_place(export_copy, tmp_path):
    from clipmatch.serving.repository import TensorrtAccelerator

    config = RepositoryConfig(target="onnxruntime", precision="fp16", instances=2, instance_kind="KIND_CPU",
                              rescore_instances=3, host_cores=16,
                              tensorrt_accelerator=TensorrtAccelerator(engine_cache_path="/cache"),
                              default_batching=Batching(16, True, (4, 8, 32), 200, max_queue_size=32,
                                                        queue_timeout_us=1000),
                              batching={"entity_query": Batching(8, False)})
    write_repository(export_copy, tmp_path / "repo", config)
    tower = parse(tmp_path / "repo" / "image_tower" / "config.pbtxt")
    assert tower.max_batch_size == 16 and list(tower.dynamic_batching.preferred_batch_size) == [4, 8]
    assert tower.dynamic_batching.max_queue_delay_microseconds == 200 and tower.instance_group[0].count == 2
    policy = tower.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (32, 1000)
    assert model_config_pb2.ModelQueuePolicy.TimeoutAction.Name(policy.timeout_action) == "REJECT"
    assert tower.parameters["intra_op_thread_count"].string_value == "1"  # 16 cores / (6 graphs x 2 instances)
    assert [(w.batch_size, list(w.inputs["pixel_values"].dims)) for w in tower.model_warmup] == \
        [(1, [3, 32, 32]), (16, [3, 32, 32])]
    trt = tower.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and dict(trt.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30), "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/cache"}
    assert parse(tmp_path / "repo" / "rescore" / "config.pbtxt").instance_group[0].count == 3
    write_repository(export_copy, tmp_path / "defaults", RepositoryConfig(target="onnxruntime"))
    # No queue policy by default: with one, tritonserver 2.51's batcher stalls requests (see Batching).
    assert not parse(tmp_path / "defaults" / "text_tower" / "config.pbtxt").dynamic_batching.HasField(
        "default_queue_policy")
    query = parse(tmp_path / "repo" / "entity_query" / "config.pbtxt")
    assert query.max_batch_size == 8 and not query.HasField("dynamic_batching")
    manifest = json.loads((export_copy / EXPORT_MANIFEST).read_text())
    assert (tmp_path / "repo" / "dcsm" / "1" / "model.onnx").read_bytes() == \
        (export_copy / manifest["components"]["dcsm"]["fp16"]).read_bytes()


def test_missing_engines_and_bad_settings_are_refused_clearly(export_copy, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no tensorrt file for image_tower .*--tensorrt"):
        write_repository(export_copy, tmp_path / "repo", RepositoryConfig(target="tensorrt"))
    with pytest.raises(ValueError, match="target must be one of"):
        RepositoryConfig(target="tensorflow")
    with pytest.raises(ValueError, match="unknown components"):
        RepositoryConfig(batching={"image_encoder": Batching()})
    shutil.rmtree(export_copy / "tensorrt", ignore_errors=True)


def test_cli_writes_a_repository(export_copy, tmp_path, capsys):
    from clipmatch.cli import main

    assert main(["repository", str(export_copy), "--target", "python", "--out", str(tmp_path / "r"),
                 "--max-batch-size", "8", "--preferred-batch-sizes", "2,4"]) == 0
    cfg = parse(tmp_path / "r" / "text_tower" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert "encode_texts" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "fp16/../../outside.onnx"])
def test_a_crafted_manifest_cannot_copy_files_from_outside_the_export(export_copy, tmp_path, name):
    import json

    from clipmatch.errors import IncompatibleModelError

    path = export_copy / "clipmatch_export.json"
    manifest = json.loads(path.read_text())
    manifest["components"]["dcsm"]["fp32"] = name
    path.write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleModelError, match="a file must be a plain path inside the export folder"):
        write_repository(export_copy, tmp_path / "repo", RepositoryConfig(target="python"))
    assert not (tmp_path / "repo" / "dcsm").exists()
