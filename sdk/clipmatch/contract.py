"""The tensor contract: every served component's inputs and outputs, once.

Export names ONNX tensors from these specs, the runtime feeds them, and the
Triton repository generator writes its configs from them. A dimension is an
int (fixed for all models), or a name: either a size read from the model's
manifest (``embed_dim``, ``image_size``, ``num_image_tokens``,
``num_experts``, ``dcsm_text_length``) or a dynamic axis (``batch``,
``text_length``, ``explanation_length``, ``dcsm_length``).

A batched component's every tensor starts with ``batch``, and Triton batches
its requests. An unbatched one (``batched=False``) scores one query's
tensors, of batch 1, against ``batch`` candidates; Triton serves it with
``max_batch_size: 0``.

Masks and ids are int64 (what the CLIP text tower takes); everything else
is float32 at the interface, also in fp16 graphs, which cast inside.

    >>> from clipmatch.contract import COMPONENTS
    >>> [t.name for t in COMPONENTS["dcsm"].outputs]
    ['dcsm_logit']
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TensorSpec",
    "ComponentSpec",
    "DYNAMIC_AXES",
    "IMAGE_TOWER",
    "TEXT_TOWER",
    "ENTITY_IMAGE",
    "ENTITY_QUERY",
    "ENTITY_PAIR",
    "ENTITY_PARTS",
    "DCSM",
    "COMPONENTS",
    "TOWERS",
    "HEADS",
]

# Axes that vary from call to call. Everything else is fixed by the model.
# dcsm_length is a query's own length, at most the model's dcsm_text_length.
DYNAMIC_AXES = ("batch", "text_length", "explanation_length", "dcsm_length")

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

# The entity heads (MMAE + GI-ITM), served in three parts split by what each reads
# (clipmatch_export/mmae.py): per image, per query, per (query, candidate) pair.
ENTITY_IMAGE = ComponentSpec(
    "entity_image",
    inputs=(_IMAGE_TOKENS,),
    # The K vision experts: they read the image alone, so an index keeps them beside its tokens.
    outputs=(_f32("vision_experts", "batch", "num_experts", "embed_dim"),),
)

ENTITY_QUERY = ComponentSpec(
    "entity_query",
    inputs=(
        _f32("text_tokens", "batch", "text_length", "embed_dim"),
        _i64("text_mask", "batch", "text_length"),
        _f32("explanation_tokens", "batch", "explanation_length", "embed_dim"),
        _i64("explanation_mask", "batch", "explanation_length"),
    ),
    outputs=(
        _f32("text_star", "batch", "embed_dim"),  # MMAE's gated text feature T*, L2-normalised
        _f32("text_experts", "batch", 2, "num_experts", "embed_dim"),  # text experts, explanation experts
        _f32("text_gate", "batch", 4, "num_experts"),  # GI-ITM's gate logits, text half and bias
        _f32("explanation_keys", "batch", "num_experts", "explanation_length", "embed_dim"),
        _f32("explanation_values", "batch", "num_experts", "explanation_length", "embed_dim"),
    ),
)

ENTITY_PAIR = ComponentSpec(
    "entity_pair",
    inputs=(
        _f32("image_cls", "batch", "embed_dim"),  # image_tokens[:, 0] of each candidate
        _f32("vision_experts", "batch", "num_experts", "embed_dim"),
        *(TensorSpec(t.name, t.dtype, (1, *t.dims[1:])) for t in ENTITY_QUERY.outputs),
        _i64("explanation_mask", 1, "explanation_length"),
    ),
    outputs=(
        # GI-ITM: probability that the pair matches.
        _f32("match_prob", "batch"),
        # MMAE: cosine of the gated expert features V* and T*.
        _f32("entity_score", "batch"),
    ),
    batched=False,
)

ENTITY_PARTS = (ENTITY_IMAGE, ENTITY_QUERY, ENTITY_PAIR)

# One query's text (batch 1, cut to its own length) against its candidates' image tokens.
DCSM = ComponentSpec(
    "dcsm",
    inputs=(
        _IMAGE_TOKENS,
        _f32("text_tokens", 1, "dcsm_length", "embed_dim"),
        _i64("text_mask", 1, "dcsm_length"),
        # 0 for an ordinary token, j + 1 for functional word j of the manifest.
        _i64("functional_ids", 1, "dcsm_length"),
    ),
    outputs=(_f32("dcsm_logit", "batch"),),
    batched=False,
)

TOWERS = (IMAGE_TOWER, TEXT_TOWER)
# The rescoring heads as selectors name them (API, CLI): the entity parts serve one head.
HEAD_NAMES = ("entity", "dcsm")
HEADS = (*ENTITY_PARTS, DCSM)
COMPONENTS: dict[str, ComponentSpec] = {c.name: c for c in TOWERS + HEADS}


# The rescoring job a server may offer as one model: one query (one row) against K cached
# candidates, with their tokens and vision experts (both cached per image). Not an
# ensemble: an ensemble's steps share one batch size, so a Python-backend model calls the
# components instead (serving/triton_models/rescore_model.py). Dims here are full shapes.
RESCORE_NAME = "rescore"
RESCORE_INPUTS = (
    _i64("input_ids", 1, "text_length"),
    _i64("attention_mask", 1, "text_length"),
    _i64("explanation_ids", 1, "explanation_length"),
    _i64("explanation_mask", 1, "explanation_length"),
    _i64("functional_ids", 1, "text_length"),
    _IMAGE_TOKENS,
    _f32("vision_experts", "batch", "num_experts", "embed_dim"),
)
RESCORE_CALLS = (TEXT_TOWER.name, ENTITY_QUERY.name, ENTITY_PAIR.name, DCSM.name)  # the models it sends work to
RESCORE_OUTPUTS = tuple(_f32(n, "batch") for n in ("cosine", "match_prob", "entity_score", "dcsm_logit"))

# Every served model carries its export's identity as config parameters, so a client can
# check that the server runs the model it was built against (backends/triton.py).
IDENTITY_PARAMETERS = ("clipmatch_model_identity", "clipmatch_tokenizer_identity", "clipmatch_sizes")


def identity_parameters(manifest: Any) -> dict[str, str]:
    """The identity parameters of an export manifest (anything with the three fields)."""
    return dict(zip(IDENTITY_PARAMETERS, (manifest.model_identity, manifest.tokenizer_identity,
                                          json.dumps(manifest.sizes, sort_keys=True))))
