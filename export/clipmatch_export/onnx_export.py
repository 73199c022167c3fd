"""Exports one component to ONNX, names every tensor from the contract, and runs graphs for parity."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from clipmatch.contract import ComponentSpec
from clipmatch.errors import ExportError

OPSET = 17  # onnxruntime >= 1.14 and Triton 23.x+ onnxruntime backends all run it


def export_component(module: nn.Module, spec: ComponentSpec, example: Mapping[str, np.ndarray],
                     path: str | Path, *, opset: int = OPSET) -> Path:
    """Trace ``module`` on ``example`` and write ``path``, with the contract's names and dynamic axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[t.name])) for t in spec.inputs)
    dynamic = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs if t.dynamic_axes()}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo, but it
            # is ~10x faster here, keeps weights inside one file, and its output
            # is checked against PyTorch below, so it is kept deliberately.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(), args, str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"exporting {spec.name} to {path} failed: {exc}") from exc
    return path


_ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


def pin_io_shapes(path: str | Path, spec: ComponentSpec, sizes: Mapping[str, int]) -> None:
    """Write every graph input and output with the contract's exact dims.

    The tracer leaves some output widths symbolic (``text_embeds: [batch,
    Iftext_embeds_dim_1]``): onnxruntime does not mind, but Triton's native
    onnxruntime backend compares a config's dims with the graph's exactly and
    refuses ``[-1, 96]`` against ``[-1, -1]``. Fixed sizes become concrete and
    only the contract's dynamic axes stay symbolic, under the contract's names.
    Only declared shapes change, never a node, so no number can move (the
    parity gate still runs on the pinned graph).
    """
    model = onnx.load(str(path))
    declared = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        value = declared.get(t.name)
        if value is None:
            raise ExportError(f"{path}: the graph has no tensor {t.name!r} ({spec.name} in the contract)")
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != _ONNX_DTYPE[t.dtype]:
            raise ExportError(f"{path}: {t.name} is ONNX type {tensor_type.elem_type}, the contract says {t.dtype}")
        shape = t.shape(sizes)
        if len(tensor_type.shape.dim) != len(shape):
            raise ExportError(f"{path}: {t.name} has rank {len(tensor_type.shape.dim)}, the contract "
                              f"says {len(shape)} ({t.dims})")
        for dim, want, name in zip(tensor_type.shape.dim, shape, t.dims):
            if dim.HasField("dim_value") and want is not None and dim.dim_value != want:
                raise ExportError(f"{path}: {t.name} has {dim.dim_value} where the contract says {name}={want}")
            dim.Clear()
            if want is None:  # a dynamic axis: keep it symbolic, under the contract's name
                dim.dim_param = name
            else:
                dim.dim_value = want
    try:
        # Strict inference fails if a pinned dim contradicts what the nodes compute.
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"{path}: the contract's shapes contradict the graph: {exc}") from exc
    onnx.save(model, str(path))


def set_metadata(path: str | Path, props: Mapping[str, str]) -> None:
    """Write ``props`` into the graph's metadata_props (kept by onnxruntime and Triton)."""
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and arithmetic, fp32 inputs and outputs (so callers and configs stay unchanged)."""
    # onnxruntime's converter knows its own fp16 kernels; the casts it adds at
    # the inputs need a re-sort before the graph is valid ONNX again.
    from onnxruntime.transformers.onnx_model import OnnxModel

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.topological_sort()
    onnx.save(model.model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return dst


def run_torch(module: nn.Module, spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.numpy() for t, o in zip(spec.outputs, out)}


def run_onnx(path: str | Path, spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run([t.name for t in spec.outputs], {t.name: feeds[t.name] for t in spec.inputs})
    return dict(zip((t.name for t in spec.outputs), outputs))
