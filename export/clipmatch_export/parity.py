"""The parity gate: every exported graph against its PyTorch source on fresh random inputs.

Inputs are drawn to look like what the graph sees in service: token ids framed
by BOS/EOT with right padding, L2-normalised token vectors zeroed at padding,
masks of varied lengths, functional-word ids at real positions only.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from clipmatch.contract import DCSM, ENTITY_IMAGE, ENTITY_PAIR, ENTITY_QUERY, IMAGE_TOWER, TEXT_TOWER, ComponentSpec


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    vocab_size: int


@dataclass(frozen=True)
class Tolerance:
    """Pass when |onnx - torch| <= atol + rtol * |torch| everywhere."""

    atol: float
    rtol: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


FP32 = Tolerance(atol=1e-4)
# fp16 keeps ~3 significant digits. Measured here: at most 2e-4 on ViT-B/32-shaped
# towers and 7e-4 on the tiny test model; 2e-3 leaves room for trained weights'
# larger activations and still catches a graph that drifted (outputs are unit
# vectors, cosines, probabilities and O(1) logits).
FP16 = Tolerance(atol=2e-3, rtol=1e-2)


@dataclass
class Check:
    component: str
    precision: str
    batch: int
    shapes: dict[str, list[int]]
    max_abs_diff: dict[str, float]
    passed: bool

    def to_dict(self) -> dict:
        return {"batch": self.batch, "input_shapes": self.shapes, "max_abs_diff": self.max_abs_diff,
                "passed": self.passed}


@dataclass
class ParityReport:
    tolerances: dict[str, Tolerance]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def worst(self, component: str, precision: str) -> float:
        diffs = [max(c.max_abs_diff.values()) for c in self.checks
                 if c.component == component and c.precision == precision]
        return max(diffs) if diffs else float("nan")

    def to_dict(self) -> dict:
        comps: dict[str, dict[str, list]] = {}
        for c in self.checks:
            comps.setdefault(c.component, {}).setdefault(c.precision, []).append(c.to_dict())
        return {"passed": self.passed, "tolerance": {k: v.to_dict() for k, v in self.tolerances.items()},
                "components": comps}


def compare(component: str, precision: str, reference: Mapping[str, np.ndarray],
            candidate: Mapping[str, np.ndarray], tol: Tolerance, feeds: Mapping[str, np.ndarray]) -> Check:
    diffs, ok = {}, True
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            diffs[name], ok = float("inf"), False
            continue
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        diffs[name] = float(err.max()) if err.size else 0.0
        ok &= bool(np.all(err <= tol.atol + tol.rtol * np.abs(ref)))
    batch = int(next(iter(feeds.values())).shape[0])
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return Check(component, precision, batch, shapes, diffs, ok)


def random_inputs(spec: ComponentSpec, sizes: Mapping[str, int], batch: int, rng: np.random.Generator, *,
                  ids: TokenIds, text_length: int, explanation_length: int = 0,
                  num_functional: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one component: ``batch`` rows, text axes at the given lengths."""
    d, p = sizes["embed_dim"], sizes.get("num_image_tokens", 0)
    if spec is IMAGE_TOWER:
        s = sizes["image_size"]
        return {"pixel_values": rng.standard_normal((batch, 3, s, s)).astype(np.float32)}
    if spec is TEXT_TOWER:
        mask = _mask(rng, batch, text_length, min_len=2)
        input_ids = rng.integers(0, ids.vocab_size, (batch, text_length))
        # Keep the specials for framing only, as a tokenizer would.
        specials = np.isin(input_ids, [ids.bos, ids.eos, ids.pad])
        input_ids[specials] = (input_ids[specials] + 3) % ids.vocab_size
        lengths = mask.sum(1)
        input_ids[:, 0] = ids.bos
        input_ids[np.arange(batch), lengths - 1] = ids.eos
        input_ids[mask == 0] = ids.pad
        return {"input_ids": input_ids.astype(np.int64), "attention_mask": mask}
    k = sizes.get("num_experts", 0)
    if spec is ENTITY_IMAGE:
        return {"image_tokens": _unit(rng, (batch, p, d))}
    if spec is ENTITY_QUERY:
        text_mask = _mask(rng, batch, text_length, min_len=2)
        expl_mask = _mask(rng, batch, explanation_length, min_len=1)
        return {
            "text_tokens": _unit(rng, (batch, text_length, d), text_mask),
            "text_mask": text_mask,
            "explanation_tokens": _unit(rng, (batch, explanation_length, d), expl_mask),
            "explanation_mask": expl_mask,
        }
    if spec is ENTITY_PAIR:
        # One query's tensors (batch 1) against ``batch`` candidates; the values need not come
        # from the query part: the gate compares the graph with its PyTorch source, input for input.
        e = explanation_length
        mask = np.zeros((1, e), np.int64)
        mask[0, :int(rng.integers(1, e + 1))] = 1
        normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        return {
            "image_cls": _unit(rng, (batch, d)), "vision_experts": normal(batch, k, d),
            "text_star": _unit(rng, (1, d)), "text_experts": normal(1, 2, k, d), "text_gate": normal(1, 4, k),
            "explanation_keys": normal(1, k, e, d), "explanation_values": normal(1, k, e, d),
            "explanation_mask": mask,
        }
    if spec is DCSM:
        # One query cut to its own length (at most dcsm_text_length), against ``batch`` images.
        length = min(text_length, sizes["dcsm_text_length"])
        mask = np.zeros((1, length), np.int64)
        mask[0, :max(1, int(rng.integers(length // 2, length + 1)))] = 1
        functional = rng.integers(1, num_functional + 1, (1, length)) if num_functional else \
            np.zeros((1, length), np.int64)
        functional = np.where((rng.random((1, length)) < 0.2) & (mask > 0), functional, 0)
        return {
            "image_tokens": _unit(rng, (batch, p, d)),
            "text_tokens": _unit(rng, (1, length, d), mask),
            "text_mask": mask,
            "functional_ids": functional.astype(np.int64),
        }
    raise ValueError(f"no input generator for component {spec.name!r}")


def _mask(rng: np.random.Generator, batch: int, length: int, *, min_len: int) -> np.ndarray:
    lengths = rng.integers(min(min_len, length), length + 1, batch)
    lengths[0] = length  # one full row, so the dynamic axis is really exercised
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)


def _unit(rng: np.random.Generator, shape: tuple[int, ...], mask: np.ndarray | None = None) -> np.ndarray:
    """Random unit vectors, zeroed where ``mask`` is 0 (as the text tower's padding is)."""
    x = rng.standard_normal(shape)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    if mask is not None:
        x *= mask[..., None]
    return x.astype(np.float32)
