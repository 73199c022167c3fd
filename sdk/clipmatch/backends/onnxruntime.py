"""Runs an export's ONNX graphs in-process with onnxruntime."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from clipmatch.config import RuntimeConfig
from clipmatch.contract import COMPONENTS
from clipmatch.errors import BackendError, DependencyError, IncompatibleModelError, ModelNotFoundError
from clipmatch.executor import validate_feeds
from clipmatch.manifest import ExportManifest

__all__ = ["OnnxExecutor", "resolve_providers"]

# Best first. TensorRT builds engines on first use and caches nothing unless
# told to, so it is only chosen by "auto" or by name.
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise DependencyError(
            "the in-process runtime needs onnxruntime: pip install 'clipmatch[cpu]' "
            "(or 'clipmatch[gpu]' on a CUDA machine; never both in one environment)"
        ) from exc
    flavours = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            flavours.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(flavours) > 1:
        warnings.warn(
            f"both {' and '.join(flavours)} are installed; they share one folder and the last one "
            "installed wins. Keep exactly one per environment.",
            RuntimeWarning, stacklevel=3,
        )
    return onnxruntime


def resolve_providers(requested: tuple[str, ...] | str | None, available: Sequence[str]) -> list[str]:
    """The providers to use, checked against what this onnxruntime offers.

    >>> resolve_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CPUExecutionProvider']
    >>> resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    if requested is None:
        return ["CPUExecutionProvider"]
    if requested == "auto":
        return [p for p in _AUTO_ORDER if p in available]
    if isinstance(requested, str):
        requested = (requested,)
    absent = [p for p in requested if p not in available]
    if absent:
        raise BackendError(
            f"onnxruntime here offers {list(available)}; {absent} not among them "
            "(CUDA and TensorRT need clipmatch[gpu] on a machine with an NVIDIA driver)"
        )
    return list(requested)


class OnnxExecutor:
    """One onnxruntime session per component of an export."""

    def __init__(self, export_dir: str | Path, manifest: ExportManifest, config: RuntimeConfig):
        ort = _import_onnxruntime()
        self._ort = ort
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.providers = resolve_providers(config.providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        spin = "1" if config.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.sessions = {}
        for name in manifest.components:
            if name not in COMPONENTS:
                raise IncompatibleModelError(f"{self.export_dir}: unknown component {name!r} in the manifest")
            path = self.export_dir / manifest.file(name, config.precision)
            if not path.is_file():
                raise ModelNotFoundError(f"{self.export_dir} is incomplete: {path.name} ({name}) is missing")
            try:
                session = ort.InferenceSession(str(path), options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise IncompatibleModelError(f"onnxruntime cannot load {path}: {exc}") from exc
            self._check_graph(name, path, session)
            self.sessions[name] = session

    def _check_graph(self, name: str, path: Path, session) -> None:
        meta = session.get_modelmeta().custom_metadata_map
        found = (meta.get("clipmatch.model_identity"), meta.get("clipmatch.tokenizer_identity"))
        wanted = (self.manifest.model_identity, self.manifest.tokenizer_identity)
        if found != wanted or meta.get("clipmatch.component") != name:
            raise IncompatibleModelError(
                f"{path} does not belong to this export: it says component {meta.get('clipmatch.component')!r}, "
                f"model {str(found[0])[:12]}, tokenizer {str(found[1])[:12]}; the manifest says {name!r}, "
                f"model {wanted[0][:12]}, tokenizer {wanted[1][:12]}"
            )
        spec = COMPONENTS[name]
        names = [i.name for i in session.get_inputs()]
        if names != [t.name for t in spec.inputs]:
            raise IncompatibleModelError(f"{path} inputs {names} differ from the contract's "
                                         f"{[t.name for t in spec.inputs]}")

    def run(self, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component not in self.sessions:
            raise ModelNotFoundError(f"this export has no {component!r} graph (exported with --towers-only?)")
        validate_feeds(component, feeds, self.manifest.sizes)
        spec = COMPONENTS[component]
        try:
            outputs = self.sessions[component].run([t.name for t in spec.outputs],
                                                   {t.name: feeds[t.name] for t in spec.inputs})
        except Exception as exc:
            raise BackendError(f"onnxruntime failed running {component}: {exc}") from exc
        return dict(zip((t.name for t in spec.outputs), outputs))
