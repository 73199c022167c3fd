"""The tensor contract: every served component's inputs and outputs, once.

Export names ONNX tensors from these specs, the runtime feeds them, and the
Triton repository generator writes its configs from them. A dimension is an
int (fixed for all models), or a name: either a size read from the model's
manifest (``embed_dim``, ``image_size``, ``num_image_tokens``,
``dcsm_text_length``) or a dynamic axis (``batch``, ``text_length``,
``explanation_length``).

Masks and ids are int64 (what the CLIP text tower takes); everything else
is float32 at the interface, also in fp16 graphs, which cast inside.

    >>> from clipmatch.contract import COMPONENTS
    >>> [t.name for t in COMPONENTS["dcsm"].outputs]
    ['dcsm_logit']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "TensorSpec",
    "ComponentSpec",
    "DYNAMIC_AXES",
    "IMAGE_TOWER",
    "TEXT_TOWER",
    "ENTITY_HEADS",
    "DCSM",
    "COMPONENTS",
    "TOWERS",
    "HEADS",
]

# Axes that vary from call to call. Everything else is fixed by the model.
DYNAMIC_AXES = ("batch", "text_length", "explanation_length")

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[Dim, ...]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int | None, ...]:
        """Concrete shape; dynamic axes stay None.

        >>> TensorSpec("x", "float32", ("batch", "embed_dim")).shape({"embed_dim": 4})
        (None, 4)
        """
        out: list[int | None] = []
        for d in self.dims:
            if isinstance(d, int):
                out.append(d)
            elif d in DYNAMIC_AXES:
                out.append(None)
            else:
                out.append(int(sizes[d]))
        return tuple(out)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str) and d in DYNAMIC_AXES}


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # also the ONNX file stem and the Triton model name
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool = True  # False: one query (batch 1) against ``batch`` candidates

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name)


def _find(specs: tuple[TensorSpec, ...], name: str, component: str) -> TensorSpec:
    for s in specs:
        if s.name == name:
            return s
    raise KeyError(f"{component} has no tensor {name!r}; it has {[s.name for s in specs]}")


def _f32(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, "float32", dims)


def _i64(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, "int64", dims)


# CLS + patches in raster order, post-layernorm, projected, L2-normalised:
# what the image tower gives and what both heads read (and what a gallery caches).
_IMAGE_TOKENS = _f32("image_tokens", "batch", "num_image_tokens", "embed_dim")

IMAGE_TOWER = ComponentSpec(
    "image_tower",
    inputs=(_f32("pixel_values", "batch", 3, "image_size", "image_size"),),
    outputs=(
        # L2-normalised pooled embedding (equal to image_tokens[:, 0]).
        _f32("image_embeds", "batch", "embed_dim"),
        _IMAGE_TOKENS,
    ),
)

TEXT_TOWER = ComponentSpec(
    "text_tower",
    inputs=(
        _i64("input_ids", "batch", "text_length"),
        _i64("attention_mask", "batch", "text_length"),
    ),
    outputs=(
        # L2-normalised pooled embedding, read at each text's own EOT.
        _f32("text_embeds", "batch", "embed_dim"),
        # Every position, final-layernorm, projected, L2-normalised.
        _f32("text_tokens", "batch", "text_length", "embed_dim"),
    ),
)

# One row per (image, text) pair: callers broadcast a query over its candidates.
ENTITY_HEADS = ComponentSpec(
    "entity_heads",
    inputs=(
        _IMAGE_TOKENS,
        _f32("text_tokens", "batch", "text_length", "embed_dim"),
        _i64("text_mask", "batch", "text_length"),
        _f32("explanation_tokens", "batch", "explanation_length", "embed_dim"),
        _i64("explanation_mask", "batch", "explanation_length"),
    ),
    outputs=(
        # GI-ITM: probability that the pair matches.
        _f32("match_prob", "batch"),
        # MMAE: cosine of the gated expert features V* and T*.
        _f32("entity_score", "batch"),
    ),
)

DCSM = ComponentSpec(
    "dcsm",
    inputs=(
        _IMAGE_TOKENS,
        _f32("text_tokens", "batch", "dcsm_text_length", "embed_dim"),
        _i64("text_mask", "batch", "dcsm_text_length"),
        # 0 for an ordinary token, j + 1 for functional word j of the manifest.
        _i64("functional_ids", "batch", "dcsm_text_length"),
    ),
    outputs=(_f32("dcsm_logit", "batch"),),
)

TOWERS = (IMAGE_TOWER, TEXT_TOWER)
HEADS = (ENTITY_HEADS, DCSM)
COMPONENTS: dict[str, ComponentSpec] = {c.name: c for c in TOWERS + HEADS}
