"""The Triton model repository, written from one description of the served pipeline.

Every config.pbtxt is generated here from the tensor contract
(``clipmatch.contract``) and an export's manifest: model names, tensors,
shapes, dtypes and versions are never kept by hand. Three targets share the
description:

- ``onnxruntime``: platform ``onnxruntime_onnx``, for NVIDIA's tritonserver container;
- ``tensorrt``: platform ``tensorrt_plan``, over the engines of ``clipmatch export --tensorrt``;
- ``python``: the same graphs run by onnxruntime inside Triton's Python
  backend, the only backend the ``nvidia-pytriton`` server has.

Served: the four components; ensembles that name the jobs a client does:
``encode_images`` (pixels -> pooled embedding + tokens, for indexing) and
``encode_texts`` (ids -> pooled embedding + tokens); and ``rescore`` (a query,
its explanation and K cached candidates' image tokens in, the cosine, GI-ITM
and DCSM scores out), a Python-backend model over the batched components.

    >>> from clipmatch.contract import IMAGE_TOWER
    >>> print(render_dims(IMAGE_TOWER.inputs[0], {"image_size": 64}))
    [ 3, 64, 64 ]
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from clipmatch.contract import (
    COMPONENTS,
    IMAGE_TOWER,
    RESCORE_CALLS,
    RESCORE_INPUTS,
    RESCORE_NAME,
    RESCORE_OUTPUTS,
    TEXT_TOWER,
    ComponentSpec,
    TensorSpec,
    identity_parameters,
)
from clipmatch.errors import ConfigError, ModelNotFoundError
from clipmatch.manifest import ExportManifest

__all__ = [
    "TARGETS", "INSTANCE_KINDS", "Batching", "TensorrtAccelerator", "RepositoryConfig", "Ensemble", "ENSEMBLES",
    "write_repository", "render_dims", "model_config_text", "ensemble_config_text", "PLATFORM_BACKENDS", "DEFAULT_MODEL_FILES",
    "TRITON_TYPES", "config_dims",
]

TARGETS = ("onnxruntime", "tensorrt", "python")
_PLATFORM = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_FILE = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.onnx"}
# Triton's platforms and the backend each runs in (its GetBackendTypeFromPlatform); an
# ensemble runs in none. And the file each backend loads by default.
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
                     "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow", "ensemble": None}
DEFAULT_MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "pytorch": "model.pt",
                       "python": "model.py"}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
# Written into every model's parameters; the client compares them with its own manifest.
_PYTHON_MODEL = Path(__file__).with_name("triton_models") / "python_model.py"


@dataclass(frozen=True)
class Batching:
    """How Triton batches and queues one model's requests."""

    max_batch_size: int = 64
    dynamic: bool = True
    preferred_sizes: tuple[int, ...] = (8, 16, 32)
    # Short: under load, batches form while the instance is busy anyway; an idle
    # server should not hold a lone request (measured: 500 us added 0.5 ms to p50).
    max_queue_delay_us: int = 100
    # Back-pressure (Triton's default_queue_policy): past this many waiting requests
    # the server refuses new ones at once ("exceeds maximum queue size"), which
    # clipmatch's client retries with backoff. Off by default: on tritonserver 2.51
    # any queue policy makes the dynamic batcher miss wake-ups, and 5 to 15 of 40
    # sequential K = 100 rescorings here stalled 500 ms (its idle poll) or more,
    # with none without it. 0: unbounded.
    max_queue_size: int = 0
    # A request that waited this long in the queue is refused; 0: no limit (same caveat).
    queue_timeout_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        for name in ("max_queue_delay_us", "max_queue_size", "queue_timeout_us"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [s for s in self.preferred_sizes if s < 1]
        if bad:
            raise ConfigError(f"preferred batch sizes must be >= 1, got {bad}")


@dataclass(frozen=True)
class TensorrtAccelerator:
    """onnxruntime's TensorRT execution provider inside Triton's onnxruntime backend (GPU
    instances only): engines are built from the ONNX graph on first load and cached."""

    precision: str = "FP16"  # or "FP32"
    # Where built engines are kept between server starts (a volume in a container);
    # None: rebuilt at every load, which takes minutes for the image tower.
    engine_cache_path: str | None = None
    max_workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.precision not in ("FP16", "FP32"):
            raise ConfigError(f"TensorRT precision must be FP16 or FP32, got {self.precision!r}")
        if self.max_workspace_bytes < 1:
            raise ConfigError(f"max_workspace_bytes must be >= 1, got {self.max_workspace_bytes}")


INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class RepositoryConfig:
    """Everything a repository is generated from besides the export. ``batching`` overrides
    ``default_batching`` per component name."""

    target: str = "onnxruntime"  # the production path: Triton's native onnxruntime backend
    precision: str = "fp32"
    version: int = 1
    instances: int = 1
    # None: KIND_AUTO for onnxruntime (a GPU where the server has one, else the CPU:
    # KIND_GPU alone is refused by a server without a GPU), KIND_GPU for tensorrt
    # (engines run nowhere else), KIND_CPU for python.
    instance_kind: str | None = None
    rescore_instances: int | None = None  # instances of the rescore model; None: ``instances``
    # onnxruntime intra-op threads per model instance. None: the host's cores shared
    # out among the served graphs. onnxruntime's own default is every core for every
    # session, and four models on one host then fight over the same cores.
    threads_per_model: int | None = None
    host_cores: int | None = None  # cores of the serving host; None: this machine's
    # Zero-filled requests at batch 1 and at the max batch size when a model loads, so
    # the first real request does not pay for memory planning and allocation.
    warmup: bool = True
    tensorrt_accelerator: TensorrtAccelerator | None = None  # onnxruntime target only
    default_batching: Batching = Batching()
    batching: Mapping[str, Batching] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.target == "tensorrt" and self.precision != "fp32":
            raise ConfigError("the tensorrt target serves the engines as built; precision applies to ONNX graphs")
        if self.version < 1 or self.instances < 1:
            raise ConfigError(f"version and instances must be >= 1, got {self.version} and {self.instances}")
        for name in ("rescore_instances", "threads_per_model", "host_cores"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
        if self.instance_kind is not None and self.instance_kind not in INSTANCE_KINDS:
            raise ConfigError(f"instance_kind must be one of {INSTANCE_KINDS}, got {self.instance_kind!r}")
        if self.target == "tensorrt" and self.instance_kind not in (None, "KIND_GPU"):
            raise ConfigError(f"the tensorrt target runs on GPUs only; instance_kind {self.instance_kind} "
                             f"cannot serve it")
        if self.tensorrt_accelerator is not None and self.target != "onnxruntime":
            raise ConfigError("the TensorRT execution accelerator is an onnxruntime backend option; "
                             f"the {self.target} target cannot use it")
        unknown = set(self.batching) - set(COMPONENTS)
        if unknown:
            raise ConfigError(f"batching names unknown components {sorted(unknown)}; known: {sorted(COMPONENTS)}")

    def batching_for(self, component: str) -> Batching:
        return self.batching.get(component, self.default_batching)

    @property
    def kind(self) -> str:
        if self.instance_kind:
            return self.instance_kind
        return {"onnxruntime": "KIND_AUTO", "tensorrt": "KIND_GPU", "python": "KIND_CPU"}[self.target]

    def threads(self, graphs: int) -> int:
        """Intra-op threads for each instance of ``graphs`` onnxruntime-run models."""
        if self.threads_per_model:
            return self.threads_per_model
        cores = self.host_cores or os.cpu_count() or 1
        return max(1, cores // (graphs * self.instances))


@dataclass(frozen=True)
class Ensemble:
    """A served job: one or more component steps; tensors keep the component's names."""

    name: str
    steps: tuple[str, ...]  # component names, run in order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


_RESCORE_MODEL = Path(__file__).with_name("triton_models") / "rescore_model.py"

ENSEMBLES = (
    Ensemble("encode_images", ("image_tower",), IMAGE_TOWER.inputs, IMAGE_TOWER.outputs),
    Ensemble("encode_texts", ("text_tower",), TEXT_TOWER.inputs, TEXT_TOWER.outputs),
)


# -- rendering ----------------------------------------------------------------------------------

def config_dims(spec: TensorSpec, sizes: Mapping[str, int], batched: bool = True) -> list[int]:
    """A tensor's dims as its config states them: after the batch axis (Triton adds the batch
    itself), or all of them for a model with max_batch_size 0; dynamic axes are -1. One value
    per row is ``[1]`` in a batched config (Triton wants a dim; the config reshapes it away)."""
    dims = [-1 if d is None else d for d in spec.shape(sizes)[1 if batched else 0:]]
    return dims or [1]


def render_dims(spec: TensorSpec, sizes: Mapping[str, int], batched: bool = True) -> str:
    return "[ " + ", ".join(map(str, config_dims(spec, sizes, batched))) + " ]"


def _tensor(spec: TensorSpec, sizes: Mapping[str, int], batched: bool) -> str:
    text = f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n'
    text += f"    dims: {render_dims(spec, sizes, batched)}\n"
    if batched and len(spec.dims) == 1:
        text += "    reshape: { shape: [ ] }\n"  # to the graph's (batch,)
    return text + "  }"


def _tensors(kind: str, specs: Sequence[TensorSpec], sizes: Mapping[str, int], batched: bool = True) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(s, sizes, batched) for s in specs) + "\n]\n"


def _instances_and_version(count: int, kind: str, version: int) -> str:
    return (f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"
            f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}\n")


def _parameters(params: Mapping[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(v)} }}\n}}\n'
                   for k, v in params.items())


def _dynamic_batching(batching: Batching) -> str:
    preferred = [s for s in batching.preferred_sizes if s <= batching.max_batch_size]
    text = "dynamic_batching {\n"
    if preferred:
        text += f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
    text += f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n"
    if batching.max_queue_size or batching.queue_timeout_us:
        text += "  default_queue_policy {\n"
        if batching.queue_timeout_us:
            text += (f"    timeout_action: REJECT\n    default_timeout_microseconds: {batching.queue_timeout_us}\n"
                     "    allow_timeout_override: true\n")
        if batching.max_queue_size:
            text += f"    max_queue_size: {batching.max_queue_size}\n"
        text += "  }\n"
    return text + "}\n"


def warmup_shape(spec: TensorSpec, sizes: Mapping[str, int], batch: int | None = None) -> list[int]:
    """A tensor's dims at their largest, text axes at the full context: after the batch axis, or
    (``batch`` given, for an unbatched model) all of them with ``batch`` candidates."""
    longest = {"text_length": sizes["context_length"], "explanation_length": sizes["context_length"],
               "dcsm_length": sizes.get("dcsm_text_length", 0), "batch": batch}
    dims = spec.dims if batch is not None else spec.dims[1:]
    return [d if isinstance(d, int) else longest.get(d) or sizes[d] for d in dims]


def _warmup(component: ComponentSpec, sizes: Mapping[str, int], max_batch: int) -> str:
    # A batched model is warmed at batch 1 and at its max; an unbatched one takes one request
    # (batch_size 1) of full shapes, with as many candidates as a head call carries.
    samples = []
    for batch in (sorted({1, max_batch}) if component.batched else [max_batch]):
        full = None if component.batched else batch
        inputs = "".join(
            f'    inputs {{\n      key: "{t.name}"\n      value: {{\n        data_type: {TRITON_TYPES[t.dtype]}\n'
            f'        dims: [ {", ".join(map(str, warmup_shape(t, sizes, full)))} ]\n        zero_data: true\n'
            f"      }}\n    }}\n" for t in component.inputs)
        size = batch if component.batched else 1
        samples.append(f'  {{\n    name: "batch_{batch}"\n    batch_size: {size}\n{inputs}  }}')
    return "model_warmup [\n" + ",\n".join(samples) + "\n]\n"


def _accelerator(acc: TensorrtAccelerator) -> str:
    params = {"precision_mode": acc.precision, "max_workspace_size_bytes": str(acc.max_workspace_bytes)}
    if acc.engine_cache_path:
        params |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": acc.engine_cache_path}
    body = "".join(f'        parameters {{ key: "{k}" value: {json.dumps(v)} }}\n' for k, v in params.items())
    return ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            f'      {{\n        name: "tensorrt"\n{body}      }}\n    ]\n  }}\n}}\n')


def model_config_text(component: ComponentSpec, manifest: ExportManifest, config: RepositoryConfig) -> str:
    batching = config.batching_for(component.name)
    batched = component.batched  # else one query against its candidates: no Triton batch axis
    head = f'name: "{component.name}"\n'
    if config.target == "python":
        head += 'backend: "python"\n'
    else:
        head += f'platform: "{_PLATFORM[config.target]}"\n'
    head += f"max_batch_size: {batching.max_batch_size if batched else 0}\n"
    text = head + _tensors("input", component.inputs, manifest.sizes, batched) + _tensors(
        "output", component.outputs, manifest.sizes, batched)
    if batching.dynamic and batched:
        text += _dynamic_batching(batching)
    text += _instances_and_version(config.instances, config.kind, config.version)
    if config.tensorrt_accelerator is not None:
        text += _accelerator(config.tensorrt_accelerator)
    if config.warmup:
        text += _warmup(component, manifest.sizes, batching.max_batch_size)
    params = identity_parameters(manifest)
    if config.target != "tensorrt":  # read by the onnxruntime backend and by triton_models/python_model.py
        params["intra_op_thread_count"] = str(config.threads(len(manifest.components)))
    return text + _parameters(params)


def ensemble_config_text(ensemble: Ensemble, manifest: ExportManifest, config: RepositoryConfig) -> str:
    # An ensemble batches no larger than its smallest step.
    max_batch = min(config.batching_for(s).max_batch_size for s in ensemble.steps)
    text = f'name: "{ensemble.name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
    text += _tensors("input", ensemble.inputs, manifest.sizes) + _tensors("output", ensemble.outputs,
                                                                          manifest.sizes)
    steps = []
    for name in ensemble.steps:
        c = COMPONENTS[name]
        maps = "".join(f'      input_map {{ key: "{t.name}" value: "{t.name}" }}\n' for t in c.inputs)
        maps += "".join(f'      output_map {{ key: "{t.name}" value: "{t.name}" }}\n' for t in c.outputs)
        steps.append(f'    {{\n      model_name: "{name}"\n      model_version: {config.version}\n{maps}    }}')
    text += "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    return text + _parameters(identity_parameters(manifest))


def rescore_config_text(manifest: ExportManifest, config: RepositoryConfig) -> str:
    text = f'name: "{RESCORE_NAME}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += _tensors("input", RESCORE_INPUTS, manifest.sizes, batched=False)
    text += _tensors("output", RESCORE_OUTPUTS, manifest.sizes, batched=False)
    text += _instances_and_version(config.rescore_instances or config.instances, "KIND_CPU", config.version)
    return text + _parameters(identity_parameters(manifest))


# -- writing ------------------------------------------------------------------------------------

def _source_file(manifest: ExportManifest, export_dir: Path, component: str, config: RepositoryConfig) -> Path:
    files = manifest.components[component]
    key = "tensorrt" if config.target == "tensorrt" else config.precision
    if key not in files:
        hint = ("build them with `clipmatch export --tensorrt` on a machine with TensorRT and a GPU"
                if key == "tensorrt" else "export again without --no-fp16")
        raise ModelNotFoundError(f"{export_dir} has no {key} file for {component} ({hint})")
    path = export_dir / files[key]
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is named in {export_dir}'s manifest but missing")
    return path


def write_repository(export_dir: str | Path, out_dir: str | Path, config: RepositoryConfig = RepositoryConfig()
                     ) -> list[str]:
    """Write the repository for one export and return the served model names.

    Existing model folders of the same names are replaced; anything else in
    ``out_dir`` is left alone.
    """
    export_dir, out = Path(export_dir), Path(out_dir)
    manifest = ExportManifest.read(export_dir)
    components = [c for c in COMPONENTS.values() if c.name in manifest.components]  # contract order
    sources = {c.name: _source_file(manifest, export_dir, c.name, config) for c in components}
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for c in components:
        folder = _fresh(out / c.name)
        version = folder / str(config.version)
        version.mkdir()
        shutil.copyfile(sources[c.name], version / _FILE[config.target])
        if config.target == "python":
            shutil.copyfile(_PYTHON_MODEL, version / "model.py")
        (folder / "config.pbtxt").write_text(model_config_text(c, manifest, config))
        names.append(c.name)
    if set(RESCORE_CALLS) <= set(manifest.components):
        folder = _fresh(out / RESCORE_NAME)
        (folder / str(config.version)).mkdir()
        shutil.copyfile(_RESCORE_MODEL, folder / str(config.version) / "model.py")
        (folder / "config.pbtxt").write_text(rescore_config_text(manifest, config))
        names.append(RESCORE_NAME)
    for e in ENSEMBLES:
        if not set(e.steps) <= set(manifest.components):
            continue
        folder = _fresh(out / e.name)
        (folder / str(config.version)).mkdir()  # Triton wants a version folder, empty for an ensemble
        (folder / "config.pbtxt").write_text(ensemble_config_text(e, manifest, config))
        names.append(e.name)
    return names


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def with_batching(config: RepositoryConfig, **changes) -> RepositoryConfig:
    """The same config with every component's batching changed (e.g. ``dynamic=False``)."""
    return replace(config, default_batching=replace(config.default_batching, **changes),
                   batching={k: replace(v, **changes) for k, v in config.batching.items()})
