"""Check a Triton model repository the way the server will, before any server sees it.

Triton's native onnxruntime backend compares each config with its graph
exactly and refuses a model on any difference; the server refuses KIND_GPU
instances on a host without a GPU, ensembles whose wiring does not add up, and
version folders without their file. Each of these shows up only when a model
fails to load on the production host. ``check_repository`` applies the same
rules offline (those of tritonserver 2.51 and its r24.10 onnxruntime backend),
with onnxruntime reading the graphs as the backend does:

- every model: its folder name, version folders and model files, instance kinds
  for the host, dynamic batching and warmup samples;
- onnxruntime models: the backend's comparison of config and graph: input
  count, names, dtypes, ranks, every fixed dim, and the batch dim when
  ``max_batch_size > 0``; inputs may be wider in the graph (``-1``), outputs
  must match exactly;
- ensembles: every step's model present, every input mapped once and from a
  tensor some input or step produces, dtypes and dims consistent along the
  way, and the ensemble's max batch no larger than any step's;
- clipmatch's own models: tensors as the tensor contract says for the sizes the
  config carries (the python target's too: its backend compares nothing itself),
  one model identity across the repository, and the models ``rescore`` calls.
  This is all a TensorRT engine gets here: an engine cannot be opened without
  TensorRT and a GPU.

Models of other backends (pytorch, tensorflow, ...) and configs left to the
server's auto-complete (no inputs or outputs given) are noted, not judged.

    >>> report = check_repository("triton_models", gpus=0)  # doctest: +SKIP
    >>> report.problems  # doctest: +SKIP
    []
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipmatch.contract import COMPONENTS, RESCORE_CALLS, RESCORE_INPUTS, RESCORE_NAME, RESCORE_OUTPUTS, TensorSpec
from clipmatch.errors import DependencyError, ModelNotFoundError
from clipmatch.serving.repository import DEFAULT_MODEL_FILES, ENSEMBLES, PLATFORM_BACKENDS, TRITON_TYPES, config_dims

__all__ = ["RepositoryCheck", "check_repository", "host_gpus"]

_ORT_TYPE = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
             "tensor(bfloat16)": "TYPE_BF16", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
             "tensor(int16)": "TYPE_INT16", "tensor(int8)": "TYPE_INT8", "tensor(uint64)": "TYPE_UINT64",
             "tensor(uint32)": "TYPE_UINT32", "tensor(uint16)": "TYPE_UINT16", "tensor(uint8)": "TYPE_UINT8",
             "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}
_JUDGED = ("onnxruntime", "tensorrt", "python", "ensemble")  # the backends whose rules are applied here


@dataclass
class RepositoryCheck:
    """What was checked, and every problem found (``"model: problem"``)."""

    root: Path
    models: dict[str, str] = field(default_factory=dict)  # name -> backend
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, model: str, message: str) -> None:
        self.problems.append(f"{model}: {message}")

    def summary(self) -> str:
        head = f"{self.root}: {len(self.models)} models checked, {len(self.problems)} problems"
        return "\n".join([head] + [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes])


def host_gpus() -> int:
    """NVIDIA GPUs this machine has (device nodes /dev/nvidia0, /dev/nvidia1, ...)."""
    return sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def check_repository(root: str | Path, *, gpus: int | None = None) -> RepositoryCheck:
    """Check every model of the repository at ``root`` for a server host with ``gpus`` GPUs
    (None: this machine's)."""
    root = Path(root)
    if not root.is_dir():
        raise ModelNotFoundError(f"model repository {root} is not a folder")
    pb, text_format = _protobuf()
    gpus = host_gpus() if gpus is None else gpus
    report = RepositoryCheck(root)
    configs = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            report.add(folder.name, "no config.pbtxt")
            continue
        try:
            configs[folder.name] = text_format.Parse(path.read_text(), pb.ModelConfig())
        except text_format.ParseError as exc:
            report.add(folder.name, f"config.pbtxt is not a valid Triton ModelConfig: {exc}")
    if not configs and not report.problems:
        report.add(str(root), "holds no model folders; write one with `clipmatch repository EXPORT_DIR`")
    for name, cfg in configs.items():
        report.models[name] = _backend(root / name, cfg)
        _check_model(report, root / name, cfg, configs, gpus, pb)
    _check_clipmatch(report, configs, pb)
    return report


def _protobuf():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise DependencyError("checking a repository reads Triton's config schema from tritonclient: "
                              "pip install 'clipmatch[triton]'") from exc
    return model_config_pb2, text_format


def _backend(folder: Path, cfg) -> str:
    """The backend the server runs the model in; without backend or platform, the one its file
    calls for, as Triton picks it."""
    if cfg.backend:
        return cfg.backend
    if cfg.platform:
        return PLATFORM_BACKENDS.get(cfg.platform) or ("ensemble" if cfg.platform == "ensemble" else cfg.platform)
    files = {p.name for p in folder.glob("*/*")}
    return next((b for b, f in DEFAULT_MODEL_FILES.items() if f in files), "?")


# -- one model ------------------------------------------------------------------------------

def _check_model(report: RepositoryCheck, folder: Path, cfg, configs, gpus: int, pb) -> None:
    name, backend = folder.name, _backend(folder, cfg)
    if cfg.name and cfg.name != name:
        report.add(name, f"config.pbtxt names the model {cfg.name!r}; Triton wants the folder's name")
    if backend not in _JUDGED:
        report.notes.append(f"{name}: the {backend} backend's rules are not checked here")
        return
    if backend == "ensemble":
        _check_ensemble(report, name, cfg, configs, pb)
    else:
        _check_instances(report, name, backend, cfg, gpus, pb)
    _check_batching(report, name, cfg, pb)
    auto = backend != "ensemble" and not cfg.input and not cfg.output
    if auto:
        report.notes.append(f"{name}: no inputs or outputs given, left to the server's auto-complete; not compared")
    for version in _versions(report, folder, cfg):
        if backend == "ensemble":
            continue
        filename = cfg.default_model_filename or DEFAULT_MODEL_FILES[backend]
        if not (folder / version / filename).exists():  # onnxruntime also loads a model folder
            report.add(name, f"version {version} has no {filename}")
        elif backend == "onnxruntime" and not auto:
            _check_graph(report, name, cfg, folder / version / filename, pb)
    if backend == "tensorrt":
        report.notes.append(f"{name}: the TensorRT engine is not opened here (that needs TensorRT and a GPU); "
                            "its config is checked against the tensor contract")


def _versions(report: RepositoryCheck, folder: Path, cfg) -> list[str]:
    present = sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
    policy = cfg.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        wanted = [str(v) for v in cfg.version_policy.specific.versions]
        for v in wanted:
            if v not in present:
                report.add(folder.name, f"version {v} is named in version_policy but has no folder")
        return [v for v in wanted if v in present]
    if not present:
        report.add(folder.name, "has no version folder (1/, 2/, ...)")
        return []
    if policy == "all":
        return present
    latest = cfg.version_policy.latest.num_versions if policy == "latest" else 1
    return present[-max(1, latest):]


def _check_instances(report: RepositoryCheck, name: str, backend: str, cfg, gpus: int, pb) -> None:
    kinds = pb.ModelInstanceGroup.Kind
    for group in cfg.instance_group or [None]:
        kind = kinds.Name(group.kind) if group is not None else "KIND_AUTO"
        listed = list(group.gpus) if group is not None else []
        absent = [g for g in listed if g >= gpus]
        # KIND_AUTO becomes GPU only where every GPU it names (or any, if none) exists.
        on_gpu = kind == "KIND_GPU" or (kind == "KIND_AUTO" and gpus > 0 and not absent)
        if kind == "KIND_GPU" and gpus == 0:
            report.add(name, "instance_group KIND_GPU, but the host has no GPU; a server refuses to load it "
                             "(KIND_AUTO takes a GPU where there is one: --instance-kind KIND_AUTO)")
        elif kind == "KIND_GPU" and absent:
            report.add(name, f"instance_group names GPUs {absent}; the host has {gpus}")
        elif kind == "KIND_CPU" and listed:
            report.add(name, f"instance_group KIND_CPU names GPUs {listed}; a server refuses that")
        if backend == "tensorrt" and not on_gpu and kind != "KIND_MODEL":
            report.add(name, f"a TensorRT engine runs on a GPU only; instance_group {kind} on a host with "
                             f"{gpus} GPUs cannot serve it")


def _check_batching(report: RepositoryCheck, name: str, cfg, pb) -> None:
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size > 0:
        too_big = [s for s in cfg.dynamic_batching.preferred_batch_size if s > cfg.max_batch_size]
        if too_big:
            report.add(name, f"preferred batch sizes {too_big} exceed max_batch_size {cfg.max_batch_size}")
    by_name = {t.name: t for t in cfg.input}
    for sample in cfg.model_warmup:
        if cfg.max_batch_size and sample.batch_size > cfg.max_batch_size:
            report.add(name, f"warmup {sample.name!r} has batch_size {sample.batch_size} over max_batch_size "
                             f"{cfg.max_batch_size}")
        missing = sorted(n for n, t in by_name.items() if not t.optional and n not in sample.inputs)
        if missing:
            report.add(name, f"warmup {sample.name!r} gives no data for inputs {missing}")
        for key, value in sample.inputs.items():
            t = by_name.get(key)
            if t is None:
                if not cfg.HasField("sequence_batching"):  # a sequence model's controls are warmed up too
                    report.add(name, f"warmup {sample.name!r} feeds {key!r}, which is not an input")
                continue
            if value.data_type != t.data_type:
                report.add(name, f"warmup {sample.name!r} feeds {key} as {_type_name(pb, value.data_type)}; "
                                 f"the input is {_type_name(pb, t.data_type)}")
            dims = list(value.dims)
            if -1 in dims or not _match_wildcard(dims, list(t.dims)):
                report.add(name, f"warmup {sample.name!r} feeds {key} with dims {dims}; the input has "
                                 f"{list(t.dims)} (-1 needs a concrete size here)")


def _match_wildcard(a: Sequence[int], b: Sequence[int]) -> bool:
    """Same rank, and every dim equal or -1 on either side (Triton's CompareDimsWithWildcard)."""
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _type_name(pb, data_type: int) -> str:
    return pb.DataType.Name(data_type)


# -- a graph against its config: the onnxruntime backend's rules ---------------------------------

def _graph_io(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The declared interface is all that is read; optimising the graph would only cost time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def info(args):
        return {a.name: (_ORT_TYPE.get(a.type, a.type), [d if isinstance(d, int) else -1 for d in a.shape])
                for a in args}
    # Initializers a request may override count as inputs for the names, not for the count.
    return info(session.get_inputs()), info(session.get_overridable_initializers()), info(session.get_outputs())


def _check_graph(report: RepositoryCheck, name: str, cfg, path: Path, pb) -> None:
    try:
        inputs, overridable, outputs = _graph_io(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        report.add(name, f"onnxruntime cannot load {path.name}: {exc}")
        return
    sequence = cfg.sequence_batching
    expected = (sum(not t.optional for t in cfg.input) + len(cfg.batch_input)
                + (len(sequence.control_input) + len(sequence.state) if cfg.HasField("sequence_batching") else 0))
    if len(inputs) != expected:
        report.add(name, f"the configuration expects {expected} graph inputs, the graph has {len(inputs)} "
                         f"({sorted(inputs)})")
    clipmatch = name in COMPONENTS
    for io, graph, exact in ((cfg.input, {**inputs, **overridable}, False), (cfg.output, outputs, True)):
        for t in io:
            if not exact and t.optional and cfg.max_batch_size != 0:
                report.add(name, f"optional input {t.name} is not served to models that batch")
            if t.name not in graph:
                report.add(name, f"{t.name!r} is in the configuration but not in the graph "
                                 f"(which has {sorted(graph)})")
                continue
            dtype, shape = graph[t.name]
            type_name = _type_name(pb, t.data_type)
            if dtype != type_name:
                report.add(name, f"{t.name}: the configuration says {type_name}, the graph {dtype}")
            dims = list(t.reshape.shape if t.HasField("reshape") else t.dims)
            problem = _compare_dims(shape, dims, cfg.max_batch_size, exact)
            if problem:
                hint = (" (a width the graph leaves symbolic, as exports made before clipmatch pinned every "
                        "fixed size have it: export again)") if exact and clipmatch and len(shape) == len(
                    dims) + (cfg.max_batch_size > 0) else ""
                report.add(name, f"{t.name}: {problem}{hint}")


def _compare_dims(model: Sequence[int], dims: Sequence[int], max_batch_size: int, exact: bool) -> str | None:
    """The backend's CompareDimsSupported: with batching the graph's first dim must be -1 and
    the config's dims follow it; a graph dim of -1 accepts any config dim for inputs only.
    A scalar graph tensor is not compared: every config dim must be 1."""
    if not model:
        return None if all(d == 1 for d in dims) else f"the graph tensor is a scalar; the configuration says {list(dims)}"
    if max_batch_size > 0:
        if model[0] != -1:
            return (f"the configuration batches (max_batch_size {max_batch_size}) but the graph's first dim "
                    f"is not a variable batch: graph {list(model)}")
        full = [-1, *dims]
    else:
        full = list(dims)
    if len(model) != len(full) or any((exact or m != -1) and m != d for m, d in zip(model, full)):
        return f"the graph has shape {list(model)}, the configuration {full}"
    return None


# -- ensembles ------------------------------------------------------------------------------------

def _check_ensemble(report: RepositoryCheck, name: str, cfg, configs, pb) -> None:
    batching = cfg.max_batch_size > 0
    tensors: dict[str, tuple[int, list[int], bool, str]] = {}  # name -> dtype, dims, batched, from

    def note(tensor: str, dtype: int, dims, batched: bool, source: str) -> None:
        dims = list(dims)
        if tensor not in tensors:
            tensors[tensor] = (dtype, dims, batched, source)
            return
        dtype0, dims0, batched0, source0 = tensors[tensor]
        full = ([-1] if batched else []) + dims
        full0 = ([-1] if batched0 else []) + dims0
        if dtype0 != dtype:
            report.add(name, f"tensor {tensor}: dtype {_type_name(pb, dtype0)} from {source0}, "
                             f"{_type_name(pb, dtype)} from {source}")
        elif not _match_wildcard(dims0, dims) and not _match_wildcard(full0, full):
            report.add(name, f"tensor {tensor}: shape {full0} from {source0}, {full} from {source}")

    for t in cfg.input:
        note(t.name, t.data_type, t.reshape.shape if t.HasField("reshape") else t.dims, batching, "the ensemble")
    # The server orders the steps by data flow, not by how they are listed.
    produced = {t.name for t in cfg.input} | {v for step in cfg.ensemble_scheduling.step
                                              for v in step.output_map.values()}
    for step in cfg.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            report.add(name, f"step model {step.model_name!r} is not in the repository")
            continue
        if model.max_batch_size and model.max_batch_size < cfg.max_batch_size:
            report.add(name, f"max_batch_size {cfg.max_batch_size} exceeds step {step.model_name}'s "
                             f"{model.max_batch_size}")
        inputs = {t.name: t for t in model.input}
        for key, tensor in step.input_map.items():
            if key not in inputs:
                report.add(name, f"maps {tensor} to {key!r}, which is not an input of {step.model_name}")
            elif tensor not in produced:
                report.add(name, f"step {step.model_name} reads {tensor}, which no input or step gives")
            else:
                t = inputs[key]
                note(tensor, t.data_type, t.dims, model.max_batch_size > 0, step.model_name)
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                report.add(name, f"input {t.name} of {step.model_name} is not mapped")
        outputs = {t.name: t for t in model.output}
        for key, tensor in step.output_map.items():
            if key not in outputs:
                report.add(name, f"maps {key!r} of {step.model_name} to {tensor}, but it has no such output")
                continue
            t = outputs[key]
            note(tensor, t.data_type, t.dims, model.max_batch_size > 0, step.model_name)
    for t in cfg.output:
        if t.name not in produced:
            report.add(name, f"output {t.name} is produced by no step")
        else:
            note(t.name, t.data_type, t.reshape.shape if t.HasField("reshape") else t.dims, batching, "the ensemble")


# -- clipmatch's own models -----------------------------------------------------------------------

def _check_clipmatch(report: RepositoryCheck, configs, pb) -> None:
    identities: dict[str, list[str]] = {}
    sizes = None
    for name, cfg in configs.items():
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        if "clipmatch_model_identity" in params:
            identities.setdefault(params["clipmatch_model_identity"], []).append(name)
            if "clipmatch_sizes" not in params:
                report.add(name, "carries a clipmatch identity but no clipmatch_sizes")
                continue
            try:
                sizes = sizes or json.loads(params["clipmatch_sizes"])
            except ValueError:
                report.add(name, "clipmatch_sizes is not JSON")
    if len(identities) > 1:
        groups = "; ".join(f"{ident[:12]}: {', '.join(names)}" for ident, names in identities.items())
        report.add("repository", f"models of different exports are mixed: {groups}")
    if not identities or sizes is None:
        return
    expected = {c.name: (c.inputs, c.outputs, c.batched) for c in COMPONENTS.values()}
    expected |= {e.name: (e.inputs, e.outputs, True) for e in ENSEMBLES}
    expected[RESCORE_NAME] = (RESCORE_INPUTS, RESCORE_OUTPUTS, False)
    for name, cfg in configs.items():
        if name not in expected:
            continue
        inputs, outputs, batched = expected[name]
        for kind, served, contract in (("input", cfg.input, inputs), ("output", cfg.output, outputs)):
            _check_contract(report, name, kind, served, contract, sizes, batched, pb)
    if RESCORE_NAME in configs:
        absent = [m for m in RESCORE_CALLS if m not in configs]
        if absent:
            report.add(RESCORE_NAME, f"calls {absent}, which the repository does not serve")


def _check_contract(report: RepositoryCheck, name: str, kind: str, served, contract: Iterable[TensorSpec],
                    sizes, batched: bool, pb) -> None:
    contract = list(contract)
    if [t.name for t in served] != [t.name for t in contract]:
        report.add(name, f"{kind}s {[t.name for t in served]} differ from the tensor contract's "
                         f"{[t.name for t in contract]}")
        return
    for t, c in zip(served, contract):
        try:
            want = config_dims(c, sizes, batched)
        except KeyError as exc:
            report.add(name, f"clipmatch_sizes lacks {exc}")
            return
        if list(t.dims) != want:
            report.add(name, f"{kind} {t.name} has dims {list(t.dims)}; the tensor contract gives {want}")
        if _type_name(pb, t.data_type) != TRITON_TYPES[c.dtype]:
            report.add(name, f"{kind} {t.name} is {_type_name(pb, t.data_type)}; the tensor contract says {c.dtype}")
