"""Tests for clipmatch_export.tensorrt_build.

Three groups:
- pure Python (profiles, validation, the order of errors): run everywhere;
- the build flow against a stand-in ``tensorrt`` module written from the
  TensorRT 10 Python API documentation: runs everywhere, checks that our calls
  hang together (flags, profile, timing cache, atomic writes, error reports),
  not that real TensorRT accepts them;
- real TensorRT + GPU (marked ``tensorrt``): skipped where ``import tensorrt``
  fails, which is every machine this project has so far.
"""
from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipmatch.contract import COMPONENTS, DCSM, DYNAMIC_AXES, IMAGE_TOWER, TEXT_TOWER, ComponentSpec
from clipmatch.errors import DependencyError, ExportError, IncompatibleModelError, ModelNotFoundError
from clipmatch_export.tensorrt_build import (
    TIMING_CACHE_NAME,
    ProfileRange,
    build_engine,
    build_engines,
    load_engine_io,
    profile_shapes,
)

SIZES = {"embed_dim": 24, "image_size": 32, "num_image_tokens": 17, "dcsm_text_length": 16, "num_experts": 2}
RNG = ProfileRange(max_text_length=77)

TRT_MISSING = "tensorrt not installed: TensorRT engines are built only where NVIDIA's TensorRT is available"


# -----------------------------------------------------------------------------
# A tiny ONNX graph with a component's tensor names, dtypes and dynamic axes


def tiny_onnx(path, component: ComponentSpec, sizes=SIZES, *, rename=None, fixed_batch=None):
    """Every input is cast to float, averaged to one number per row and summed;
    each output is that sum broadcast to its contract shape. Outputs may only
    have batch and fixed axes (image_tower, entity_pair, dcsm)."""
    rename = rename or {}

    def dims(spec):  # ONNX dims: ints, or a symbol for a dynamic axis
        out = []
        for d in spec.dims:
            if d == "batch" and fixed_batch:
                out.append(fixed_batch)
            elif isinstance(d, str) and d not in DYNAMIC_AXES:
                out.append(int(sizes[d]))
            else:
                out.append(d)
        return out

    nodes, inits, graph_in, pooled = [], [], [], []
    for t in component.inputs:
        name = rename.get(t.name, t.name)
        elem = TensorProto.FLOAT if t.dtype == "float32" else TensorProto.INT64
        graph_in.append(helper.make_tensor_value_info(name, elem, dims(t)))
        nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
        axes = list(range(1, len(t.dims)))
        nodes.append(helper.make_node("ReduceMean", [f"{name}_f"], [f"{name}_m"], axes=axes, keepdims=0))
        pooled.append(f"{name}_m")  # (B,)
    nodes.append(helper.make_node("Sum", pooled, ["s"]))  # (B,)

    graph_out = []
    for t in component.outputs:
        shape = dims(t)
        assert all(isinstance(d, int) for d in shape[1:]), "tiny_onnx: outputs with dynamic non-batch axes"
        rest = shape[1:]
        graph_out.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shape))
        if not rest:
            nodes.append(helper.make_node("Identity", ["s"], [t.name]))
            continue
        axes = numpy_helper.from_array(np.arange(1, len(shape), dtype=np.int64), f"{t.name}_axes")
        w = np.random.default_rng(0).standard_normal((1, *rest)).astype(np.float32)
        inits += [axes, numpy_helper.from_array(w, f"{t.name}_w")]
        nodes.append(helper.make_node("Unsqueeze", ["s", f"{t.name}_axes"], [f"{t.name}_u"]))
        nodes.append(helper.make_node("Mul", [f"{t.name}_u", f"{t.name}_w"], [t.name]))

    graph = helper.make_graph(nodes, component.name, graph_in, graph_out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what opset 17 shipped with; readers older than onnx 1.23 need it
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def contract_io(component: ComponentSpec, sizes=SIZES):
    """What load_engine_io should report for an engine following the contract."""
    io = {}
    for mode, specs in (("input", component.inputs), ("output", component.outputs)):
        for t in specs:
            io[t.name] = (mode, tuple(-1 if d is None else d for d in t.shape(sizes)), t.dtype)
    return io


def test_tiny_onnx_follows_the_contract(tmp_path):
    # The TensorRT tests below never run here; at least their graphs do.
    import onnxruntime as ort

    for comp in (IMAGE_TOWER, DCSM, COMPONENTS["entity_pair"]):
        sess = ort.InferenceSession(str(tiny_onnx(tmp_path / comp.filename, comp)))
        opt = profile_shapes(comp, SIZES, ProfileRange(max_text_length=9, opt_batch=3))
        feeds = {t.name: np.ones(opt[t.name][1], dtype=t.dtype) for t in comp.inputs}
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for t in comp.outputs:
            want = tuple(3 if d is None else d for d in t.shape(SIZES))
            assert outs[t.name].shape == want, (comp.name, t.name)


# -----------------------------------------------------------------------------
# Profiles: pure Python


def test_profile_shapes_image_tower():
    assert profile_shapes(IMAGE_TOWER, SIZES, RNG) == {
        "pixel_values": ((1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32)),
    }


def test_profile_shapes_text_tower():
    assert profile_shapes(TEXT_TOWER, SIZES, RNG) == {
        "input_ids": ((1, 2), (8, 32), (64, 77)),
        "attention_mask": ((1, 2), (8, 32), (64, 77)),
    }


def test_profile_shapes_dcsm_takes_one_query_capped_at_its_text_length():
    # DCSM's text is one query (batch 1) of its own length, at most the manifest's dcsm_text_length.
    assert profile_shapes(DCSM, SIZES, RNG) == {
        "image_tokens": ((1, 17, 24), (8, 17, 24), (64, 17, 24)),
        "text_tokens": ((1, 2, 24), (1, 16, 24), (1, 16, 24)),
        "text_mask": ((1, 2), (1, 16), (1, 16)),
        "functional_ids": ((1, 2), (1, 16), (1, 16)),
    }


def test_profile_shapes_explanations_share_the_text_range():
    shapes = profile_shapes(COMPONENTS["entity_query"], SIZES, RNG)
    assert shapes["explanation_tokens"] == ((1, 2, 24), (8, 32, 24), (64, 77, 24))
    assert shapes["explanation_mask"] == shapes["text_mask"] == ((1, 2), (8, 32), (64, 77))
    pair = profile_shapes(COMPONENTS["entity_pair"], SIZES, RNG)
    assert pair["explanation_keys"] == ((1, 2, 2, 24), (1, 2, 32, 24), (1, 2, 77, 24))  # one query
    assert pair["vision_experts"] == ((1, 2, 24), (8, 2, 24), (64, 2, 24))  # its candidates


@pytest.mark.parametrize("comp", list(COMPONENTS.values()), ids=list(COMPONENTS))
def test_profile_shapes_cover_every_input(comp):
    shapes = profile_shapes(comp, SIZES, RNG)
    assert list(shapes) == [t.name for t in comp.inputs]
    for name, (lo, opt, hi) in shapes.items():
        assert len(lo) == len(opt) == len(hi) == len(comp.input(name).dims)
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_profile_shapes_missing_size_names_dim_and_component():
    with pytest.raises(KeyError, match=r"dcsm\.text_tokens.*dcsm_text_length"):
        profile_shapes(DCSM, {"embed_dim": 24, "num_image_tokens": 17}, RNG)


def test_profile_range_defaults():
    r = ProfileRange(max_text_length=77)
    assert (r.batch, r.text_length) == ((1, 8, 64), (2, 32, 77))
    assert ProfileRange(max_text_length=20).opt_text_length == 20  # capped at the context


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_text_length=77, min_batch=4, opt_batch=2), "min=4, opt=2, max=64"),
        (dict(max_text_length=77, opt_batch=128), "min=1, opt=128, max=64"),
        (dict(max_text_length=77, min_batch=0), "min=0"),
        (dict(max_text_length=16, opt_text_length=32), "min=2, opt=32, max=16"),
        (dict(max_text_length=1), "text length"),
    ],
)
def test_profile_range_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProfileRange(**kwargs)


def test_profile_range_needs_the_context_length():
    with pytest.raises(TypeError):
        ProfileRange()


# -----------------------------------------------------------------------------
# Errors that need no TensorRT, and their order


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, also on a machine that has it."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_engine_without_tensorrt_raises_dependency_error(tmp_path, no_tensorrt):
    onnx_path = tiny_onnx(tmp_path / "image_tower.onnx", IMAGE_TOWER)
    with pytest.raises(DependencyError, match="TensorRT is not installed") as info:
        build_engine(onnx_path, tmp_path / "image_tower.plan", IMAGE_TOWER, SIZES, RNG)
    message = str(info.value)
    assert "pip install tensorrt" in message and "container" in message and "ONNX export" in message
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "image_tower.plan").exists()


def test_load_engine_io_without_tensorrt_raises_dependency_error(tmp_path, no_tensorrt):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(DependencyError, match="TensorRT"):
        load_engine_io(plan)


def test_missing_onnx_is_reported_before_tensorrt_is_needed(tmp_path, no_tensorrt):
    with pytest.raises(ModelNotFoundError, match="image_tower.onnx"):
        build_engine(tmp_path / "image_tower.onnx", tmp_path / "x.plan", IMAGE_TOWER, SIZES, RNG)


def test_build_engines_reports_every_missing_file_first(tmp_path, no_tensorrt):
    tiny_onnx(tmp_path / "image_tower.onnx", IMAGE_TOWER)
    with pytest.raises(ModelNotFoundError) as info:
        build_engines(tmp_path, [IMAGE_TOWER, TEXT_TOWER, DCSM], SIZES, RNG)
    assert "text_tower.onnx" in str(info.value) and "dcsm.onnx" in str(info.value)
    assert "image_tower.onnx" not in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_bad_sizes_are_reported_before_tensorrt_is_needed(tmp_path, no_tensorrt):
    onnx_path = tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    with pytest.raises(KeyError, match="dcsm_text_length"):
        build_engine(onnx_path, tmp_path / "dcsm.plan", DCSM, {"embed_dim": 24, "num_image_tokens": 17}, RNG)


def test_bad_arguments_are_reported_before_tensorrt_is_needed(tmp_path, no_tensorrt):
    onnx_path = tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    with pytest.raises(ValueError, match="logger_severity"):
        build_engine(onnx_path, tmp_path / "dcsm.plan", DCSM, SIZES, RNG, logger_severity="LOUD")
    with pytest.raises(ValueError, match="workspace_bytes"):
        build_engine(onnx_path, tmp_path / "dcsm.plan", DCSM, SIZES, RNG, workspace_bytes=0)


# -----------------------------------------------------------------------------
# The build flow against a stand-in `tensorrt` module.
# Written from the TensorRT 10 Python API docs; it records what we ask of it.


class _Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, severity):
        self.severity = severity


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


def _onnx_tensor(vi):
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    return _Tensor(vi.name, dims, dtype)


class _OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse(self, model, path=None):
        try:
            proto = onnx.load_from_string(bytes(model))
            onnx.checker.check_model(proto)
        except Exception as exc:
            self.errors += [f"ModelImporter: failed to parse {path}", f"onnx: {type(exc).__name__}"]
            return False
        self.network.inputs = [_onnx_tensor(vi) for vi in proto.graph.input]
        self.network.outputs = [_onnx_tensor(vi) for vi in proto.graph.output]
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        assert len(lo) == len(opt) == len(hi)
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, entries):
        self.entries = set(entries)

    def serialize(self):
        return b"TC:" + ",".join(sorted(self.entries)).encode()


class _Config:
    def __init__(self):
        self.pools, self.flags, self.profiles = {}, set(), []
        self.cache = None
        self.loaded_cache = None  # the bytes a cache was created from, for the tests

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        blob = bytes(blob)
        if blob and not blob.startswith(b"TC:"):
            return _TimingCache({"<foreign>"})  # TensorRT refuses it in set_timing_cache
        self.loaded_cache = blob
        return _TimingCache(e for e in blob[3:].decode().split(",") if e)

    def set_timing_cache(self, cache, ignore_mismatch):
        if "<foreign>" in cache.entries and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Builder:
    platform_has_fast_fp16 = True
    fail = False  # set on the class by a test
    last = None  # the last (network, config) built, for the tests

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        _Builder.last = (network, config)
        shapes = config.profiles[0].shapes if config.profiles else {}
        for t in network.inputs:
            if -1 in t.shape and t.name not in shapes:
                return None  # TensorRT: dynamic input without a profile
        if self.fail:
            return None
        if config.cache is not None:
            config.cache.entries.update(t.name for t in network.inputs)  # "timings" learnt
        io = [[t.name, "input", t.shape, t.dtype] for t in network.inputs]
        io += [[t.name, "output", t.shape, t.dtype] for t in network.outputs]
        return json.dumps({"io": io}).encode()


class _Engine:
    def __init__(self, io):
        self.io = io

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _row(self, name):
        return next(row for row in self.io if row[0] == name)

    def get_tensor_mode(self, name):
        return _TensorIOMode.INPUT if self._row(name)[1] == "input" else _TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return tuple(self._row(name)[2])

    def get_tensor_dtype(self, name):
        return self._row(name)[3]


class _Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        try:
            return _Engine(json.loads(bytes(data))["io"])
        except ValueError:
            return None


class _TensorIOMode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"


@pytest.fixture
def fake_trt(monkeypatch):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = _Logger, _Builder, _OnnxParser, _Runtime
    trt.TensorIOMode = _TensorIOMode
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.nptype = lambda dtype: np.dtype(dtype).type
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(_Builder, "fail", False)
    monkeypatch.setattr(_Builder, "last", None)
    return trt


def test_fake_build_engines_follow_the_contract(tmp_path, fake_trt):
    comps = [IMAGE_TOWER, DCSM, COMPONENTS["entity_pair"]]
    for c in comps:
        tiny_onnx(tmp_path / c.filename, c)
    plans = build_engines(tmp_path, comps, SIZES, RNG)

    out = tmp_path / "tensorrt"
    assert plans == {c.name: out / f"{c.name}.plan" for c in comps}
    for c in comps:
        assert load_engine_io(plans[c.name]) == contract_io(c)
    assert (out / TIMING_CACHE_NAME).read_bytes().startswith(b"TC:")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c.name}.plan" for c in comps] + [TIMING_CACHE_NAME]
    )  # no temp files left behind

    network, config = _Builder.last  # entity_pair, the last one built
    assert network.flags == 0  # TensorRT 10: explicit batch always, no flag
    assert config.pools == {"WORKSPACE": 4 << 30}
    assert config.flags == {"FP16"}
    dynamic = {n: s for n, s in profile_shapes(COMPONENTS["entity_pair"], SIZES, RNG).items() if s[0] != s[2]}
    assert config.profiles[0].shapes == dynamic  # fully static inputs need no entry


def test_fake_timing_cache_is_shared_and_reused(tmp_path, fake_trt):
    for c in (IMAGE_TOWER, DCSM):
        tiny_onnx(tmp_path / c.filename, c)
    build_engines(tmp_path, [IMAGE_TOWER, DCSM], SIZES, RNG)
    cache = tmp_path / "tensorrt" / TIMING_CACHE_NAME
    first = cache.read_bytes()
    assert b"pixel_values" in first and b"functional_ids" in first  # both builds wrote to one file

    build_engines(tmp_path, [IMAGE_TOWER], SIZES, RNG)
    _, config = _Builder.last
    assert config.loaded_cache == first  # the rebuild started from the saved timings
    assert cache.read_bytes() == first  # nothing new to learn


def test_fake_foreign_timing_cache_is_replaced(tmp_path, fake_trt, caplog):
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00 from another GPU")
    with caplog.at_level(logging.WARNING):
        build_engine(tmp_path / "dcsm.onnx", tmp_path / "dcsm.plan", DCSM, SIZES, RNG, timing_cache_path=cache)
    assert "starting an empty one" in caplog.text
    assert cache.read_bytes().startswith(b"TC:")


def test_fake_no_timing_cache_path_writes_no_cache(tmp_path, fake_trt):
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    build_engine(tmp_path / "dcsm.onnx", tmp_path / "out" / "dcsm.plan", DCSM, SIZES, RNG, fp16=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dcsm.plan"]
    _, config = _Builder.last
    assert config.flags == set() and config.cache is None


def test_fake_tensorrt_8_asks_for_explicit_batch(tmp_path, fake_trt):
    fake_trt.__version__ = "8.6.1"
    fake_trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    build_engine(tmp_path / "dcsm.onnx", tmp_path / "dcsm.plan", DCSM, SIZES, RNG)
    network, _ = _Builder.last
    assert network.flags == 1 << 0


def test_fake_tensorrt_11_without_fp16_flag_still_builds(tmp_path, fake_trt, caplog):
    fake_trt.BuilderFlag = types.SimpleNamespace()  # TensorRT 11 removed BuilderFlag.FP16
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    with caplog.at_level(logging.WARNING):
        build_engine(tmp_path / "dcsm.onnx", tmp_path / "dcsm.plan", DCSM, SIZES, RNG)
    assert "no FP16 builder flag" in caplog.text
    assert (tmp_path / "dcsm.plan").is_file()


def test_fake_parser_errors_are_all_reported(tmp_path, fake_trt):
    bad = tmp_path / "dcsm.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError) as info:
        build_engine(bad, tmp_path / "dcsm.plan", DCSM, SIZES, RNG)
    message = str(info.value)
    assert message.startswith("dcsm:") and "2 error(s)" in message
    assert "ModelImporter" in message and "onnx:" in message
    assert not (tmp_path / "dcsm.plan").exists()


def test_fake_wrong_tensor_names_are_refused(tmp_path, fake_trt):
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM, rename={"text_mask": "attention_mask"})
    with pytest.raises(ExportError, match=r"dcsm: .*attention_mask.*contract \['functional_ids'"):
        build_engine(tmp_path / "dcsm.onnx", tmp_path / "dcsm.plan", DCSM, SIZES, RNG)


def test_fake_graph_without_dynamic_batch_is_refused(tmp_path, fake_trt):
    tiny_onnx(tmp_path / "image_tower.onnx", IMAGE_TOWER, fixed_batch=1)
    with pytest.raises(ExportError, match=r"pixel_values: axis 0 is fixed to 1 .* 1\.\.64"):
        build_engine(tmp_path / "image_tower.onnx", tmp_path / "x.plan", IMAGE_TOWER, SIZES, RNG)


def test_fake_graph_for_other_sizes_is_refused(tmp_path, fake_trt):
    tiny_onnx(tmp_path / "image_tower.onnx", IMAGE_TOWER, sizes={**SIZES, "image_size": 64})
    with pytest.raises(ExportError, match="axis 2 is fixed to 64"):
        build_engine(tmp_path / "image_tower.onnx", tmp_path / "x.plan", IMAGE_TOWER, SIZES, RNG)


def test_fake_failed_build_leaves_old_plan_and_no_temp_files(tmp_path, fake_trt):
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM)
    plan = tmp_path / "out" / "dcsm.plan"
    build_engine(tmp_path / "dcsm.onnx", plan, DCSM, SIZES, RNG)
    before = plan.read_bytes()
    _Builder.fail = True
    with pytest.raises(ExportError, match="dcsm: TensorRT could not build"):
        build_engine(tmp_path / "dcsm.onnx", plan, DCSM, SIZES, RNG)
    assert plan.read_bytes() == before
    assert [p.name for p in plan.parent.iterdir()] == ["dcsm.plan"]


def test_fake_unloadable_plan_is_incompatible(tmp_path, fake_trt):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"\x00garbage")
    with pytest.raises(IncompatibleModelError, match="could not load"):
        load_engine_io(plan)
    with pytest.raises(ModelNotFoundError):
        load_engine_io(tmp_path / "missing.plan")


# -----------------------------------------------------------------------------
# Real TensorRT and a GPU. Skipped wherever `import tensorrt` fails.


@pytest.fixture
def trt():
    trt = pytest.importorskip("tensorrt", reason=TRT_MISSING)
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # TensorRT without a usable CUDA device
        pytest.skip(f"tensorrt is installed but cannot create a builder (no CUDA GPU?): {exc}")
    return trt


@pytest.mark.tensorrt
def test_trt_engines_follow_the_contract(tmp_path, trt):
    comps = [IMAGE_TOWER, DCSM]
    for c in comps:
        tiny_onnx(tmp_path / c.filename, c)
    small = ProfileRange(max_text_length=77, max_batch=8, opt_batch=4)
    plans = build_engines(tmp_path, comps, SIZES, small)
    for c in comps:
        assert load_engine_io(plans[c.name]) == contract_io(c)


@pytest.mark.tensorrt
def test_trt_timing_cache_is_written_and_reused(tmp_path, trt):
    tiny_onnx(tmp_path / "image_tower.onnx", IMAGE_TOWER)
    small = ProfileRange(max_text_length=77, max_batch=8, opt_batch=4)
    build_engines(tmp_path, [IMAGE_TOWER], SIZES, small)
    cache = tmp_path / "tensorrt" / TIMING_CACHE_NAME
    first = cache.read_bytes()
    assert len(first) > 0

    # Rebuild from the saved cache: it must be accepted (no fallback to an
    # empty cache) and keep what it held.
    plans = build_engines(tmp_path, [IMAGE_TOWER], SIZES, small)
    assert len(cache.read_bytes()) >= len(first)
    assert load_engine_io(plans["image_tower"]) == contract_io(IMAGE_TOWER)


@pytest.mark.tensorrt
def test_trt_parser_errors_name_the_component(tmp_path, trt):
    bad = tmp_path / "dcsm.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="dcsm: TensorRT's ONNX parser rejected"):
        build_engine(bad, tmp_path / "dcsm.plan", DCSM, SIZES, RNG)


@pytest.mark.tensorrt
def test_trt_wrong_tensor_names_are_refused(tmp_path, trt):
    tiny_onnx(tmp_path / "dcsm.onnx", DCSM, rename={"text_mask": "attention_mask"})
    with pytest.raises(ExportError, match="do not follow the contract"):
        build_engine(tmp_path / "dcsm.onnx", tmp_path / "dcsm.plan", DCSM, SIZES, RNG)
