"""TensorRT engines from clipmatch's exported ONNX graphs.

One engine (a serialized TensorRT "plan") per served component, each with one
optimisation profile over the contract's dynamic axes (batch, text length),
built through TensorRT's Python API:

    ONNX file -> OnnxParser -> network -> check names against the contract
              -> builder config (workspace, FP16, profile, timing cache)
              -> build_serialized_network -> <name>.plan (written atomically)

The timing cache is shared by every component of a model and written back
after each build, so a rebuild on the same GPU and TensorRT version skips
tactic timing: it is much faster and picks the same kernels again.

What is verified and what is not
--------------------------------
This module is written against the documented TensorRT 10 Python API and has
been built and run nowhere in this project: TensorRT cannot be installed on
the development and CI machines (the PyPI packages are stubs that download
NVIDIA's wheels from a host those machines cannot reach) and the lent GPU
machines carry no TensorRT either. Tested here, without TensorRT:

- ``ProfileRange`` validation and ``profile_shapes`` for every component;
- the order of failures: a missing ONNX file is reported before TensorRT is
  imported, and a missing TensorRT raises ``DependencyError``;
- the sequence of TensorRT calls, against a stand-in module written from the
  same documentation (so it checks our code, not our reading of the API).

Not verified: that a real TensorRT parses our graphs, builds them with these
profiles, reads back its timing cache, or that the engines agree numerically
with onnxruntime. The tests that would show this are marked ``tensorrt`` and
skip where ``import tensorrt`` fails. TensorRT 8.6 (explicit-batch flag) and
11 (no FP16 builder flag) are handled from their documentation, also untried.

    >>> from clipmatch.contract import DCSM
    >>> shapes = profile_shapes(DCSM, {"embed_dim": 8, "num_image_tokens": 5,
    ...                                "dcsm_text_length": 16}, ProfileRange(max_text_length=77))
    >>> shapes["text_mask"]
    ((1, 16), (8, 16), (64, 16))
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipmatch.contract import ComponentSpec
from clipmatch.errors import DependencyError, ExportError, IncompatibleModelError, ModelNotFoundError

__all__ = ["build_for_export", "ProfileRange", "profile_shapes",
           "build_engine", "build_engines", "load_engine_io", "TIMING_CACHE_NAME"]

log = logging.getLogger(__name__)

# One timing cache per engine folder, shared by all components of a model.
TIMING_CACHE_NAME = "timing.cache"

# Axes whose range comes from the text side of ProfileRange. Explanations are
# tokenised by the same text tower, so they share its length limits.
_TEXT_AXES = ("text_length", "explanation_length")

_SEVERITIES = ("VERBOSE", "INFO", "WARNING", "ERROR", "INTERNAL_ERROR")

Shape = tuple[int, ...]


# -----------------------------------------------------------------------------
# Optimisation profile: pure Python, no TensorRT needed


@dataclass(frozen=True, kw_only=True)
class ProfileRange:
    """Shapes one engine accepts: TensorRT tunes kernels for ``opt`` and
    rejects anything outside [min, max] at run time.

    ``max_text_length`` has no default: it is the model's text context length
    (77 for CLIP), read from its manifest.

        >>> ProfileRange(max_text_length=77).opt_text_length
        32
        >>> ProfileRange(max_text_length=16).opt_text_length
        16
    """

    max_text_length: int
    min_batch: int = 1
    opt_batch: int = 8  # a typical server-side dynamic batch; tune per deployment
    max_batch: int = 64  # activation memory grows with it; 64 fits ViT-B on 16 GB
    min_text_length: int = 2  # the shortest CLIP text: start + end tokens
    opt_text_length: int | None = None  # None: 32 (most queries are short), capped at the context

    def __post_init__(self) -> None:
        if self.opt_text_length is None:
            # frozen dataclass: fill the derived default through object.__setattr__
            object.__setattr__(self, "opt_text_length", min(32, self.max_text_length))
        for axis, lo, opt, hi in (
            ("batch", self.min_batch, self.opt_batch, self.max_batch),
            ("text length", self.min_text_length, self.opt_text_length, self.max_text_length),
        ):
            if not 1 <= lo <= opt <= hi:
                raise ValueError(
                    f"profile {axis} range needs 1 <= min <= opt <= max, "
                    f"got min={lo}, opt={opt}, max={hi}"
                )

    @property
    def batch(self) -> tuple[int, int, int]:
        return (self.min_batch, self.opt_batch, self.max_batch)

    @property
    def text_length(self) -> tuple[int, int, int]:
        return (self.min_text_length, self.opt_text_length, self.max_text_length)


def profile_shapes(
    component: ComponentSpec, sizes: Mapping[str, int], rng: ProfileRange
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input of ``component``.

    Dynamic axes take their range from ``rng``; named sizes come from
    ``sizes`` (the model's manifest) and are the same in all three shapes.

        >>> from clipmatch.contract import TEXT_TOWER
        >>> profile_shapes(TEXT_TOWER, {}, ProfileRange(max_text_length=77))["input_ids"]
        ((1, 2), (8, 32), (64, 77))
    """
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for tensor in component.inputs:
        per_axis: list[tuple[int, int, int]] = []  # (min, opt, max) for each axis
        for dim in tensor.dims:
            if isinstance(dim, int):
                per_axis.append((dim, dim, dim))
            elif dim == "batch":
                per_axis.append(rng.batch)
            elif dim in _TEXT_AXES:
                per_axis.append(rng.text_length)
            elif dim == "dcsm_length" and "dcsm_text_length" in sizes:
                # a query cut to its own length, at most DCSM's text length
                per_axis.append(tuple(min(n, int(sizes["dcsm_text_length"])) for n in rng.text_length))
            elif dim in sizes:
                n = int(sizes[dim])
                per_axis.append((n, n, n))
            else:
                raise KeyError(
                    f"{component.name}.{tensor.name} needs size "
                    f"{'dcsm_text_length' if dim == 'dcsm_length' else dim!r}, which the sizes "
                    f"given do not have (they have {sorted(sizes)})"
                )
        # transpose: per-axis triples -> three shapes
        lo, opt, hi = (tuple(axis[k] for axis in per_axis) for k in range(3))
        shapes[tensor.name] = (lo, opt, hi)
    return shapes


# -----------------------------------------------------------------------------
# Building


def _import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: wheel present, libnvinfer missing
        raise DependencyError(
            f"TensorRT is not installed ({type(exc).__name__}: {exc}). Building or "
            "reading TensorRT engines needs NVIDIA's TensorRT Python package with a "
            "CUDA GPU and driver: install NVIDIA's wheels (`pip install tensorrt`, "
            "which fetches them from pypi.nvidia.com) or run inside NVIDIA's TensorRT "
            "container (nvcr.io/nvidia/tensorrt). ONNX export does not need it: the "
            "exported .onnx files serve as they are on onnxruntime or Triton's ONNX backend."
        ) from exc
    return trt


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _write_atomic(path: Path, data) -> None:
    """Write ``data`` (bytes or a buffer such as TensorRT's IHostMemory) so that
    ``path`` is either the old file or the complete new one, never half of it:
    Triton may be loading the folder while we write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_io(network, component: ComponentSpec, shapes: Mapping[str, tuple]) -> None:
    """The parsed graph must expose exactly the contract's tensor names, and
    its fixed dims must agree with the profile (else TensorRT fails later with
    a far less readable message)."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    want_in = [t.name for t in component.inputs]
    want_out = [t.name for t in component.outputs]
    if set(inputs) != set(want_in) or set(outputs) != set(want_out):
        raise ExportError(
            f"{component.name}: the ONNX graph's tensors do not follow the contract: "
            f"inputs {sorted(inputs)} (contract {sorted(want_in)}), "
            f"outputs {sorted(outputs)} (contract {sorted(want_out)})"
        )
    for name, graph_shape in inputs.items():
        lo, _, hi = shapes[name]
        if len(graph_shape) != len(lo):
            raise ExportError(
                f"{component.name}.{name}: the graph has rank {len(graph_shape)} "
                f"{graph_shape}, the contract rank {len(lo)}"
            )
        for axis, d in enumerate(graph_shape):
            if d != -1 and not (lo[axis] == hi[axis] == d):
                raise ExportError(
                    f"{component.name}.{name}: axis {axis} is fixed to {d} in the graph "
                    f"{graph_shape}, but the profile wants {lo[axis]}..{hi[axis]} "
                    f"(was the graph exported without dynamic axes, or for other sizes?)"
                )


def _attach_timing_cache(config, path: Path) -> None:
    """Attach the timing cache in ``path`` to ``config``, or an empty one when
    there is none yet or it is unusable. TensorRT refuses a cache made on
    another GPU or TensorRT version (ignore_mismatch=False: its timings would
    mislead here); we then start afresh rather than fail the build."""
    if path.is_file():
        try:
            cache = config.create_timing_cache(path.read_bytes())
            if cache is not None and config.set_timing_cache(cache, False):
                return
            reason = "was refused by TensorRT (made on another GPU or TensorRT version?)"
        except Exception as exc:  # a corrupt cache is not worth failing a build over
            reason = f"is unusable ({exc})"
        log.warning("timing cache %s %s; starting an empty one", path, reason)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    component: ComponentSpec,
    sizes: Mapping[str, int],
    rng: ProfileRange,
    *,
    fp16: bool = True,
    timing_cache_path: str | os.PathLike | None = None,
    workspace_bytes: int = 4 << 30,
    logger_severity: str = "WARNING",
) -> Path:
    """Build one TensorRT engine from ``onnx_path`` and write it to ``engine_path``.

    Checks that need no TensorRT (the file exists, the sizes cover the
    contract) run first, so they are reported on any machine.

        build_engine("export/dcsm.onnx", "export/tensorrt/dcsm.plan", DCSM,
                     manifest_sizes, ProfileRange(max_text_length=77))
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    cache_path = None if timing_cache_path is None else Path(timing_cache_path)
    if logger_severity not in _SEVERITIES:
        raise ValueError(f"logger_severity must be one of {_SEVERITIES}, got {logger_severity!r}")
    if workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
    if not onnx_path.is_file():
        raise ModelNotFoundError(f"{component.name}: ONNX file {onnx_path} does not exist")
    shapes = profile_shapes(component, sizes, rng)

    trt = _import_tensorrt()
    t0 = time.perf_counter()
    # The logger, builder, network and parser must all stay alive until the
    # plan is serialized: the parser owns the weights the network points at.
    logger = trt.Logger(getattr(trt.Logger, logger_severity))
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # no CUDA device or driver: pybind returns nullptr
        raise ExportError(f"{component.name}: could not create a TensorRT builder (is a CUDA GPU visible?): {exc}") from exc

    # TensorRT 10 networks are always explicit-batch and the flag is deprecated;
    # TensorRT 8 needs it, or it builds an implicit-batch network.
    flags = 0
    if _trt_major(trt) < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)

    parser = trt.OnnxParser(network, logger)
    # path= lets the parser find weights kept beside the graph (the dynamo
    # exporter writes them to <file>.onnx.data).
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"{component.name}: TensorRT's ONNX parser rejected {onnx_path} "
            f"({len(errors)} error(s)):\n  " + "\n  ".join(errors or ["(no error reported)"])
        )
    _check_io(network, component, shapes)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        # FP16 is a request, not an order: TensorRT keeps fp32 where fp16 is
        # slower or unsupported. TensorRT 11 dropped the flag (strong typing):
        # there precision follows the graph, so export an fp16 graph instead.
        flag = getattr(trt.BuilderFlag, "FP16", None)
        if flag is None:
            log.warning("%s: TensorRT %s has no FP16 builder flag; precision follows the ONNX graph",
                        component.name, trt.__version__)
        elif getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(flag)
        else:
            log.warning("%s: this GPU has no fast FP16; building in fp32", component.name)

    # One profile over the dynamic axes. Fully static inputs need no entry.
    dynamic = {
        network.get_input(i).name
        for i in range(network.num_inputs)
        if -1 in tuple(network.get_input(i).shape)
    }
    if dynamic:
        profile = builder.create_optimization_profile()
        for name in sorted(dynamic):
            profile.set_shape(name, *shapes[name])
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(f"{component.name}: TensorRT refused the optimisation profile {shapes}")

    if cache_path is not None:
        _attach_timing_cache(config, cache_path)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"{component.name}: TensorRT could not build an engine from {onnx_path} "
            f"(profile {shapes}); its log above says why"
        )
    _write_atomic(engine_path, plan)
    if cache_path is not None:
        # Now holds the old entries plus this build's timings.
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    log.info("%s: built %s in %.1f s", component.name, engine_path, time.perf_counter() - t0)
    return engine_path


def build_engines(
    export_dir: str | os.PathLike,
    components: Sequence[ComponentSpec],
    sizes: Mapping[str, int],
    rng: ProfileRange,
    *,
    out_dir: str | os.PathLike | None = None,
    fp16: bool = True,
) -> dict[str, Path]:
    """One engine per component: ``<export_dir>/<name>.onnx`` ->
    ``<out_dir>/<name>.plan`` (out_dir defaults to ``<export_dir>/tensorrt``),
    all sharing ``<out_dir>/timing.cache``.

    Every ONNX file is looked for before TensorRT is imported, so a broken
    export is reported on any machine, and before a long build starts.

        build_engines("export", COMPONENTS.values(), manifest_sizes,
                      ProfileRange(max_text_length=77))
    """
    export_dir = Path(export_dir)
    out = Path(out_dir) if out_dir is not None else export_dir / "tensorrt"
    missing = [export_dir / c.filename for c in components if not (export_dir / c.filename).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"cannot build TensorRT engines: missing ONNX file(s) {', '.join(map(str, missing))}"
        )
    cache = out / TIMING_CACHE_NAME
    return {
        c.name: build_engine(
            export_dir / c.filename, out / f"{c.name}.plan", c, sizes, rng,
            fp16=fp16, timing_cache_path=cache,
        )
        for c in components
    }


def build_for_export(export_dir: str | os.PathLike, *, opt_batch: int = 8, max_batch: int = 64,
                     fp16: bool = True) -> dict[str, Path]:
    """Engines for every component of a clipmatch export, recorded in its manifest.

    The text axes range up to the model's context length; the manifest gains
    a ``tensorrt`` entry per component, which the Triton repository uses.
    """
    from clipmatch.contract import COMPONENTS
    from clipmatch.manifest import ExportManifest

    export_dir = Path(export_dir)
    manifest = ExportManifest.read(export_dir)
    rng = ProfileRange(max_text_length=manifest.sizes["context_length"], opt_batch=min(opt_batch, max_batch),
                       max_batch=max_batch)
    engines = build_engines(export_dir, [COMPONENTS[n] for n in manifest.components], manifest.sizes, rng,
                            fp16=fp16)
    for name, path in engines.items():
        manifest.components[name]["tensorrt"] = path.relative_to(export_dir).as_posix()
    manifest.write(export_dir)
    return engines


# -----------------------------------------------------------------------------
# Reading an engine back


def load_engine_io(engine_path: str | os.PathLike) -> dict[str, tuple[str, Shape, str]]:
    """Deserialize an engine and list its IO tensors, in engine order:
    ``{name: (mode, shape, dtype)}`` with mode "input" or "output", -1 for a
    dynamic axis, and a numpy dtype name.

    Needs TensorRT and a GPU; used to check an engine against the contract:

        load_engine_io("export/tensorrt/dcsm.plan")["dcsm_logit"]
        # ('output', (-1,), 'float32')
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ModelNotFoundError(f"TensorRT engine {engine_path} does not exist")
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise IncompatibleModelError(
            f"TensorRT {trt.__version__} could not load {engine_path}: a plan only loads "
            "on the TensorRT version and GPU kind that built it"
        )
    io: dict[str, tuple[str, Shape, str]] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        try:
            dtype_name = np.dtype(trt.nptype(dtype)).name
        except (TypeError, KeyError, ValueError):  # types numpy lacks (bf16, fp8)
            dtype_name = str(dtype)
        io[name] = (mode, tuple(engine.get_tensor_shape(name)), dtype_name)
    return io
