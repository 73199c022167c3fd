"""The two manifests clipmatch writes, and the model identity they carry.

* The heads manifest (``clipmatch_heads.json``) sits next to a CLIP
  checkpoint with the heads' weights (``clipmatch_heads.safetensors``). It holds
  the :class:`HeadsConfig` needed to rebuild the heads, and the versions that
  produced them.
* The export manifest (``clipmatch_export.json``) sits in an export folder and
  says which ONNX graphs it holds, the model sizes, and the identity of the
  model and tokenizer, which every graph also carries in its ONNX metadata.

Both are plain JSON so that the SDK reads them without torch.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipmatch.errors import ConfigError, IncompatibleModelError, ModelNotFoundError
from clipmatch.fusion import Fusion

__all__ = [
    "DEFAULT_FUNCTIONAL_WORDS",
    "HEADS_MANIFEST",
    "HEADS_WEIGHTS",
    "EXPORT_MANIFEST",
    "PARITY_REPORT",
    "HeadsConfig",
    "HeadsManifest",
    "ExportManifest",
    "sha256_file",
    "sha256_json",
    "read_json_object",
]

HEADS_MANIFEST = "clipmatch_heads.json"
HEADS_WEIGHTS = "clipmatch_heads.safetensors"
EXPORT_MANIFEST = "clipmatch_export.json"
PARITY_REPORT = "parity_report.json"

# The reference DCSM list: words whose CLIP token embeddings carry little
# signal, so their map column is replaced by a learned one.
DEFAULT_FUNCTIONAL_WORDS = (
    "above", "below", "left", "right", "small", "big",
    "not", "no", "without", "but", "absent",
)


@dataclass(frozen=True)
class HeadsConfig:
    """Sizes of the rescoring heads. Every head module receives the whole config.

    >>> HeadsConfig(embed_dim=24, num_image_tokens=17).num_experts
    4
    """

    embed_dim: int  # joint space width of the CLIP towers (projection_dim)
    num_image_tokens: int  # CLS + patches: (image_size // patch_size) ** 2 + 1
    num_experts: int = 4  # K experts of each kind, the EntityCLIP reference value
    mlp_ratio: int = 4  # expert MLP is d -> 4d -> d, as in the reference
    layer_norm_eps: float = 1e-5  # CLIP's own value
    dcsm_text_length: int = 30  # L: text positions in a dense map, the reference value
    # How the DCSM map is read (see clipmatch_export/dcsm.py): "tokens" (where each
    # word points, compared by a small transformer) or "cnn" (the reference CNN).
    dcsm_scorer: str = "tokens"
    dcsm_width: int = 48  # "tokens": transformer width
    dcsm_layers: int = 2  # "tokens": transformer blocks
    dcsm_heads: int = 4  # "tokens": attention heads per block
    dcsm_channels: int = 4  # "cnn": conv width, the reference value
    dcsm_hidden: int = 128  # "cnn": hidden width of the MLP, the reference value
    functional_words: tuple[str, ...] = DEFAULT_FUNCTIONAL_WORDS

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_image_tokens", "num_experts", "mlp_ratio", "dcsm_text_length",
                     "dcsm_width", "dcsm_layers", "dcsm_heads", "dcsm_channels", "dcsm_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"HeadsConfig.{name} must be a positive int, got {value!r}")
        if self.dcsm_scorer not in ("tokens", "cnn"):
            raise ConfigError(f"HeadsConfig.dcsm_scorer must be 'tokens' or 'cnn', got {self.dcsm_scorer!r}")
        if self.dcsm_scorer == "tokens":
            grid = math.isqrt(self.num_image_tokens - 1)
            if grid * grid != self.num_image_tokens - 1:
                raise ConfigError(f"the 'tokens' DCSM scorer needs CLS + a square patch grid; "
                                 f"num_image_tokens={self.num_image_tokens} is not 1 + n*n")
            if self.dcsm_width % self.dcsm_heads:
                raise ConfigError(f"dcsm_width {self.dcsm_width} must be a multiple of dcsm_heads {self.dcsm_heads}")
        words = tuple(self.functional_words)
        for w in words:
            if not isinstance(w, str) or not w or w != w.strip().lower() or " " in w:
                raise ConfigError(f"functional word {w!r} must be one lowercase word without spaces")
        if len(set(words)) != len(words):
            raise ConfigError(f"functional words repeat: {words}")
        object.__setattr__(self, "functional_words", words)

    @property
    def patch_grid(self) -> int:
        """Patches per side: the image tokens are CLS + patch_grid**2 patches in raster order."""
        return math.isqrt(self.num_image_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["functional_words"] = list(self.functional_words)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadsConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise IncompatibleModelError(f"heads config has unknown fields {sorted(unknown)}")
        kwargs = dict(d)
        if "functional_words" in kwargs:
            kwargs["functional_words"] = tuple(kwargs["functional_words"])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise IncompatibleModelError(f"heads config is invalid: {exc}") from exc


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order and whitespace."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; missing or malformed files raise clipmatch errors."""
    if not path.is_file():
        raise ModelNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IncompatibleModelError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IncompatibleModelError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_format(data: Mapping[str, Any], path: Path, fmt: str, version: int) -> None:
    if data.get("format") != fmt:
        raise IncompatibleModelError(f"{path} is not a {fmt} manifest (format={data.get('format')!r})")
    if data.get("format_version") != version:
        raise IncompatibleModelError(
            f"{path} has format_version {data.get('format_version')!r}; this clipmatch reads {version}"
        )


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _fusion_entry(fusion: Fusion | None) -> dict[str, Any]:
    return {} if fusion is None else {"fusion": fusion.to_dict()}


def _read_fusion(data: Mapping[str, Any], path: Path) -> Fusion | None:
    if data.get("fusion") is None:
        return None
    try:
        return Fusion.from_dict(data["fusion"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise IncompatibleModelError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class HeadsManifest:
    """What ``clipmatch_heads.json`` holds."""

    FORMAT = "clipmatch.heads"
    VERSION = 1

    config: HeadsConfig
    weights_sha256: str
    versions: dict[str, str] = field(default_factory=dict)
    # Search fusion weights fitted for these heads; not part of the identity,
    # since refitting them changes no graph and no index.
    fusion: Fusion | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "format_version": self.VERSION,
            "heads": self.config.to_dict(),
            "weights": HEADS_WEIGHTS,
            "weights_sha256": self.weights_sha256,
            "versions": dict(self.versions),
            **_fusion_entry(self.fusion),
        }

    @property
    def identity(self) -> str:
        return sha256_json({"heads": self.config.to_dict(), "weights": self.weights_sha256})

    def write(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / HEADS_MANIFEST
        _write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, model_dir: str | Path) -> HeadsManifest:
        path = Path(model_dir) / HEADS_MANIFEST
        data = read_json_object(path, "heads manifest")
        _check_format(data, path, cls.FORMAT, cls.VERSION)
        if not (Path(model_dir) / HEADS_WEIGHTS).is_file():
            raise ModelNotFoundError(f"{path} names weights {HEADS_WEIGHTS}, which are missing from {model_dir}")
        return cls(
            config=HeadsConfig.from_dict(data.get("heads") or {}),
            weights_sha256=str(data.get("weights_sha256", "")),
            versions=dict(data.get("versions") or {}),
            fusion=_read_fusion(data, path),
        )


@dataclass(frozen=True)
class ExportManifest:
    """What ``clipmatch_export.json`` holds: the graphs of one export and their identity.

    ``sizes`` names every model size the tensor contract refers to
    (``embed_dim``, ``image_size``, ``num_image_tokens``, ``context_length`` and,
    with heads, ``dcsm_text_length``). ``components`` maps a component name to
    its files by precision (``{"fp32": "image_tower.onnx", "fp16": ...}``).
    """

    FORMAT = "clipmatch.export"
    VERSION = 1

    model_identity: str
    tokenizer_identity: str
    sizes: dict[str, int]
    components: dict[str, dict[str, str]]
    heads: HeadsConfig | None = None
    opset: int = 17
    versions: dict[str, str] = field(default_factory=dict)
    fusion: Fusion | None = None  # carried over from the heads manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "format_version": self.VERSION,
            "identity": {"model": self.model_identity, "tokenizer": self.tokenizer_identity},
            "sizes": dict(self.sizes),
            "components": {k: dict(v) for k, v in self.components.items()},
            "heads": None if self.heads is None else self.heads.to_dict(),
            "opset": self.opset,
            "versions": dict(self.versions),
            **_fusion_entry(self.fusion),
        }

    def write(self, export_dir: str | Path) -> Path:
        path = Path(export_dir) / EXPORT_MANIFEST
        _write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, export_dir: str | Path) -> ExportManifest:
        root = Path(export_dir)
        if not root.is_dir():
            raise ModelNotFoundError(f"export folder not found: {root}")
        path = root / EXPORT_MANIFEST
        if not path.is_file():
            raise ModelNotFoundError(
                f"{root} is not a clipmatch export: {EXPORT_MANIFEST} is missing "
                f"(make one with `clipmatch export MODEL_DIR {root}`)"
            )
        data = read_json_object(path, "export manifest")
        _check_format(data, path, cls.FORMAT, cls.VERSION)
        identity = data.get("identity") or {}
        heads = data.get("heads")
        try:
            return cls(
                model_identity=str(identity["model"]),
                tokenizer_identity=str(identity["tokenizer"]),
                sizes={k: int(v) for k, v in data["sizes"].items()},
                components={k: dict(v) for k, v in data["components"].items()},
                heads=None if heads is None else HeadsConfig.from_dict(heads),
                opset=int(data.get("opset", 17)),
                versions=dict(data.get("versions") or {}),
                fusion=_read_fusion(data, path),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IncompatibleModelError(f"{path} is incomplete or malformed: {exc!r}") from exc

    def __post_init__(self) -> None:
        # Every file an export names lies inside the export: a crafted manifest must not make a
        # repository (or a session) read whatever the user can (../../secret, /etc/...).
        for component, files in self.components.items():
            for kind, name in files.items():
                rel = Path(str(name))
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise IncompatibleModelError(f"the export manifest names {name!r} for {component} {kind}: a "
                                                 "file must be a plain path inside the export folder")

    def file(self, component: str, precision: str = "fp32") -> str:
        try:
            return self.components[component][precision]
        except KeyError:
            have = {k: sorted(v) for k, v in self.components.items()}
            raise ModelNotFoundError(
                f"this export has no {precision} graph for {component!r}; it has {have}"
            ) from None
