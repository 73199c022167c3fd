"""``clipmatch export``: a CLIP checkpoint (+ heads) -> a folder of checked ONNX graphs.

The folder holds everything the SDK needs and nothing it must not trust:
one ONNX graph per component (fp32, and fp16 for GPU runtimes), the
tokenizer and preprocessor files, ``clipmatch_export.json`` and the parity
report. Every graph is compared with its PyTorch source; the export fails
when any output differs beyond tolerance, after writing the report.
"""
from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from clipmatch.contract import (
    COMPONENTS,
    DCSM,
    ENTITY_IMAGE,
    ENTITY_PAIR,
    ENTITY_QUERY,
    HEADS,
    IMAGE_TOWER,
    TEXT_TOWER,
    TOWERS,
    ComponentSpec,
)
from clipmatch.errors import IncompatibleModelError, ModelNotFoundError, ParityError
from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch.manifest import (
    EXPORT_MANIFEST,
    HEADS_MANIFEST,
    PARITY_REPORT,
    ExportManifest,
    HeadsConfig,
    sha256_file,
    sha256_json,
)
from clipmatch.progress import Progress
from clipmatch_export.models.clip_loader import load_clip
from clipmatch_export.models.heads import load_heads
from clipmatch_export.models.mmae import EntityImage, EntityPair, EntityQuery
from clipmatch_export.models.towers import ImageTower, TextTower
from clipmatch_export.onnx_export import OPSET, convert_fp16, export_component, pin_io_shapes, run_onnx, run_torch, set_metadata
from clipmatch_export.parity import FP16, FP32, ParityReport, TokenIds, Tolerance, compare, random_inputs
from clipmatch_export.versions import versions


@dataclass(frozen=True)
class ExportOptions:
    opset: int = OPSET
    fp16: bool = True  # also write fp16/ graphs for GPU runtimes
    towers_only: bool = False  # export without heads (no rescoring)
    batch_sizes: tuple[int, ...] = (1, 3)  # parity is checked at each
    tolerance: Tolerance = FP32
    fp16_tolerance: Tolerance = FP16
    seed: int = 0
    progress: bool = False  # a progress line on stderr: each graph exported, each checked


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: ExportManifest
    report: ParityReport


def export_model(model_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export, check and describe one model.

    >>> export_model("models/tiny", "exports/tiny")  # doctest: +SKIP
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    clip, files = load_clip(model_dir)
    heads_config: HeadsConfig | None = None
    modules: dict[str, nn.Module] = {IMAGE_TOWER.name: ImageTower(clip), TEXT_TOWER.name: TextTower(clip)}
    heads_identity, fusion = None, None
    if not options.towers_only:
        if not (model_dir / HEADS_MANIFEST).is_file():
            raise ModelNotFoundError(
                f"{model_dir} has no rescoring heads ({HEADS_MANIFEST}); train them, attach untrained ones "
                f"with `clipmatch init-heads {model_dir}`, or export the towers alone with --towers-only"
            )
        heads, heads_manifest = load_heads(model_dir)
        heads_config, heads_identity = heads_manifest.config, heads_manifest.identity
        fusion = heads_manifest.fusion
        modules[ENTITY_IMAGE.name] = EntityImage(heads.entity)
        modules[ENTITY_QUERY.name] = EntityQuery(heads.entity)
        modules[ENTITY_PAIR.name] = EntityPair(heads.entity)
        modules[DCSM.name] = heads.dcsm

    text_cfg, vision_cfg = clip.config.text_config, clip.config.vision_config
    grid = vision_cfg.image_size // vision_cfg.patch_size
    sizes = {
        "embed_dim": clip.config.projection_dim,
        "image_size": vision_cfg.image_size,
        "num_image_tokens": grid * grid + 1,
        "context_length": text_cfg.max_position_embeddings,
    }
    if heads_config is not None:
        _check_heads_fit(heads_config, sizes)
        sizes["dcsm_text_length"] = heads_config.dcsm_text_length
        sizes["num_experts"] = heads_config.num_experts

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files.tokenizer_files + (files.preprocessor_config,):
        shutil.copyfile(f, out_dir / f.name)
    tokenizer = ClipTokenizer.from_dir(out_dir, context_length=sizes["context_length"])
    model_identity = sha256_json({
        "config": clip.config.to_dict() | {"transformers_version": None},
        "weights": [sha256_file(w) for w in files.weights],
        "heads": heads_identity,
    })
    specs = TOWERS + (HEADS if heads_config is not None else ())
    metadata = {
        "clipmatch.model_identity": model_identity,
        "clipmatch.tokenizer_identity": tokenizer.identity,
        "clipmatch.sizes": json.dumps(sizes, sort_keys=True),
    }

    ids = TokenIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, text_cfg.vocab_size)
    report = ParityReport({"fp32": options.tolerance, "fp16": options.fp16_tolerance})
    rng = np.random.default_rng(options.seed)
    num_functional = len(heads_config.functional_words) if heads_config else 0
    components: dict[str, dict[str, str]] = {}
    bar = Progress(2 * len(specs), enabled=options.progress, desc="export", unit="steps")
    for spec in specs:
        module = modules[spec.name]
        # Trace at a middle length and check at a short and the full length, so
        # a length baked into the graph by mistake shows up as a failure.
        lengths = [max(2, sizes["context_length"] // 2), 3, sizes["context_length"]]

        def inputs(batch: int, length: int) -> dict[str, np.ndarray]:
            return random_inputs(spec, sizes, batch, rng, ids=ids, text_length=length,
                                 explanation_length=max(1, length - 1), num_functional=num_functional)

        path = export_component(module, spec, inputs(2, lengths[0]), out_dir / spec.filename, opset=options.opset)
        pin_io_shapes(path, spec, sizes)  # before fp16, which keeps the I/O it is given
        set_metadata(path, metadata | {"clipmatch.component": spec.name, "clipmatch.precision": "fp32"})
        components[spec.name] = {"fp32": spec.filename}
        graphs = [("fp32", path, options.tolerance)]
        if options.fp16:
            path16 = convert_fp16(path, out_dir / "fp16" / spec.filename)
            set_metadata(path16, metadata | {"clipmatch.component": spec.name, "clipmatch.precision": "fp16"})
            components[spec.name]["fp16"] = f"fp16/{spec.filename}"
            graphs.append(("fp16", path16, options.fp16_tolerance))
        bar.update()
        for batch, length in zip(options.batch_sizes, itertools.cycle(lengths[1:])):
            feeds = inputs(batch, length)
            reference = run_torch(module, spec, feeds)
            for precision, graph, tol in graphs:
                report.checks.append(compare(spec.name, precision, reference, run_onnx(graph, spec, feeds), tol, feeds))
        bar.update()
    bar.close()

    manifest = ExportManifest(model_identity, tokenizer.identity, sizes, components, heads_config,
                              options.opset, versions(), fusion)
    (out_dir / PARITY_REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.passed:
        # No manifest: a folder that failed its gate must not load as an export.
        (out_dir / EXPORT_MANIFEST).unlink(missing_ok=True)
        worst = ", ".join(
            f"{c.component}/{c.precision} batch {c.batch}: max |diff| {max(c.max_abs_diff.values()):.3g}"
            for c in report.failures()
        )
        raise ParityError(f"exported graphs disagree with PyTorch beyond tolerance ({worst}); "
                          f"see {out_dir / PARITY_REPORT}")
    manifest.write(out_dir)
    return ExportResult(out_dir, manifest, report)


@contextmanager
def exported(model: str | Path) -> Iterator[Path]:
    """An export of ``model`` to run the SDK on: the folder itself when it is an export,
    else a checked fp32 export in a temporary folder, removed afterwards."""
    if (Path(model) / EXPORT_MANIFEST).is_file():
        yield Path(model)
        return
    with tempfile.TemporaryDirectory(prefix="clipmatch-export-") as tmp:
        yield export_model(model, Path(tmp) / "export", ExportOptions(fp16=False)).out_dir


def _check_heads_fit(config: HeadsConfig, sizes: dict[str, int]) -> None:
    for name in ("embed_dim", "num_image_tokens"):
        if getattr(config, name) != sizes[name]:
            raise IncompatibleModelError(
                f"the heads were built for {name}={getattr(config, name)} but the CLIP towers give {sizes[name]}"
            )


def verify_graph(path: str | Path, spec: ComponentSpec, module: nn.Module, feeds: dict[str, np.ndarray],
                 tol: Tolerance = FP32, precision: str = "fp32"):
    """Re-run the gate for one graph (used to check a graph that was copied or edited)."""
    return compare(spec.name, precision, run_torch(module, spec, feeds), run_onnx(path, spec, feeds), tol, feeds)


__all__ = ["ExportOptions", "ExportResult", "export_model", "exported", "verify_graph", "COMPONENTS"]
