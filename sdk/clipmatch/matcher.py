"""The matcher core: everything but running graphs.

Preprocessing, tokenisation, batching, broadcasting a query over its
candidates and assembling scores happen here, once, for every backend. A
backend is an :class:`~clipmatch.executor.Executor`; ``Local`` plugs in
onnxruntime, a Triton client plugs in the server.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipmatch.config import RuntimeConfig
from clipmatch.contract import DCSM, ENTITY_IMAGE, ENTITY_PAIR, ENTITY_PARTS, ENTITY_QUERY, HEAD_NAMES, IMAGE_TOWER, TEXT_TOWER
from clipmatch.errors import IncompatibleModelError, InputError, ModelNotFoundError, ShapeError
from clipmatch.executor import Executor
from clipmatch.inputs.preprocess import ImageConfig, preprocess_images
from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch.manifest import ExportManifest
from clipmatch.results import ImageEncoding, RescoreResult, TextEncoding

__all__ = ["Matcher", "ModelFiles", "HEAD_NAMES"]



@dataclass(frozen=True)
class ModelFiles:
    """The client-side half of an export: manifest, tokenizer and image preprocessing."""

    root: Path
    manifest: ExportManifest
    tokenizer: ClipTokenizer
    image_config: ImageConfig

    @classmethod
    def load(cls, export_dir: str | Path) -> ModelFiles:
        root = Path(export_dir)
        manifest = ExportManifest.read(root)
        tokenizer = ClipTokenizer.from_dir(root, context_length=manifest.sizes["context_length"])
        if tokenizer.identity != manifest.tokenizer_identity:
            raise IncompatibleModelError(
                f"the tokenizer files in {root} are not the ones this export was made with "
                f"(identity {tokenizer.identity[:12]}, manifest says {manifest.tokenizer_identity[:12]})"
            )
        preprocessor = root / "preprocessor_config.json"
        if not preprocessor.is_file():
            raise ModelNotFoundError(f"{root} is incomplete: preprocessor_config.json is missing")
        image_config = ImageConfig.from_preprocessor_config(preprocessor)
        size = manifest.sizes["image_size"]
        if image_config.output_shape != (3, size, size):
            raise IncompatibleModelError(
                f"{preprocessor} produces images of shape {image_config.output_shape}; "
                f"the image tower takes (3, {size}, {size})"
            )
        return cls(root, manifest, tokenizer, image_config)


class Matcher:
    """Encode images and texts, score them by cosine, rescore a shortlist with the heads."""

    def __init__(self, files: ModelFiles, executor: Executor, config: RuntimeConfig):
        self.files = files
        self.executor = executor
        self.config = config

    # -- what the model offers -------------------------------------------------

    @property
    def manifest(self) -> ExportManifest:
        return self.files.manifest

    @property
    def heads(self) -> tuple[str, ...]:
        """The rescoring heads this model serves."""
        have = set(self.manifest.components)
        entity = {c.name for c in ENTITY_PARTS} <= have
        return tuple(h for h, served in zip(HEAD_NAMES, (entity, DCSM.name in have)) if served)

    # -- encoding --------------------------------------------------------------

    def encode_images(self, images: Sequence[Any] | ImageEncoding) -> ImageEncoding:
        """Pooled embeddings and tokens for images given as paths, bytes, PIL images or arrays.

        >>> enc = matcher.encode_images(["cat.jpg", open("dog.png", "rb").read()])  # doctest: +SKIP
        >>> enc.embeds.shape, enc.tokens.shape  # doctest: +SKIP
        ((2, 512), (2, 50, 512))
        """
        if isinstance(images, ImageEncoding):
            return images
        items = _as_list(images, "images")
        embeds, tokens = [], []
        step = self.config.image_batch_size
        for start in range(0, len(items), step):
            # One batch at a time: peak memory is one batch of pixels, and an
            # error still names the item's index in the caller's list.
            pixels = preprocess_images(items[start:start + step], self.files.image_config, start_index=start)
            out = self.executor.run(IMAGE_TOWER.name, {"pixel_values": pixels})
            embeds.append(out["image_embeds"])
            tokens.append(out["image_tokens"])
        return ImageEncoding(np.concatenate(embeds), np.concatenate(tokens))

    def with_vision_experts(self, encoding: ImageEncoding) -> ImageEncoding:
        """``encoding`` with the entity heads' image part computed from its tokens (kept if there).

        They read the image alone, so they are computed once per image and cached with
        the tokens (the gallery index stores them); rescoring computes them when missing.
        """
        if encoding.vision_experts is not None or "entity" not in self.heads:
            return encoding
        parts, step = [], self.config.image_batch_size
        for start in range(0, len(encoding), step):
            tokens = np.ascontiguousarray(encoding.tokens[start:start + step], np.float32)
            parts.append(self.executor.run(ENTITY_IMAGE.name, {"image_tokens": tokens})["vision_experts"])
        return encoding.with_vision_experts(np.concatenate(parts))

    def tokenize(self, texts: Sequence[str]):
        """The token batch the text tower and DCSM are fed, functional words marked for this model's heads."""
        heads = self.manifest.heads
        return self.files.tokenizer(list(texts), functional_words=heads.functional_words if heads else ())

    def encode_texts(self, texts: Sequence[str] | TextEncoding) -> TextEncoding:
        """Pooled embeddings and per-token embeddings; texts over the context are cut and flagged.

        >>> enc = matcher.encode_texts(["a red cube left of a blue ball"])  # doctest: +SKIP
        >>> enc.truncated.tolist()  # doctest: +SKIP
        [False]
        """
        if isinstance(texts, TextEncoding):
            return texts
        items = _as_list(texts, "texts")
        batch = self.tokenize(items)
        embeds, tokens = [], []
        step = self.config.text_batch_size
        for start in range(0, len(items), step):
            rows = slice(start, start + step)
            # Each chunk is cut to its own longest text: shorter graphs, same values.
            width = int(batch.lengths[rows].max())
            out = self.executor.run(TEXT_TOWER.name, {
                "input_ids": np.ascontiguousarray(batch.input_ids[rows, :width]),
                "attention_mask": np.ascontiguousarray(batch.attention_mask[rows, :width]),
            })
            embeds.append(out["text_embeds"])
            tokens.append(_pad_axis1(out["text_tokens"], batch.input_ids.shape[1]))
        return TextEncoding(tuple(items), np.concatenate(embeds), np.concatenate(tokens),
                            batch.attention_mask, batch.functional_ids, np.asarray(batch.truncated, bool))

    # -- scoring ---------------------------------------------------------------

    def cosine(self, images: Sequence[Any] | ImageEncoding, texts: Sequence[str] | TextEncoding) -> np.ndarray:
        """(N images, M texts) cosine similarities of the pooled embeddings.

        Pass ``encode_texts(...)`` rather than strings to see which texts were
        cut to the context (``TextEncoding.truncated``).
        """
        image_embeds = self.encode_images(images).embeds
        text_embeds = self.encode_texts(texts).embeds
        _check_embeds(image_embeds, text_embeds.shape[1])
        return image_embeds @ text_embeds.T

    def rescore(
        self,
        query: str | TextEncoding,
        candidates: Sequence[Any] | ImageEncoding,
        *,
        explanation: str | TextEncoding | None = None,
        heads: Iterable[str] | None = None,
    ) -> RescoreResult:
        """Score one query against K candidate images with cosine and the rescoring heads.

        ``explanation`` describes what the query names (an entity's look); the
        entity heads read it. Without one, the query stands in for its own
        explanation and ``result.explained`` is False. ``heads`` picks from
        ``self.heads`` (default: all of them).

        >>> r = matcher.rescore("the Kestrel-7 valve", shortlist,
        ...                     explanation="a blue cylinder with yellow stripes")  # doctest: +SKIP
        >>> r.order("match_prob")[:3]  # doctest: +SKIP
        """
        wanted = self._wanted_heads(heads)
        q = self._one_text(query, "query")
        cands = self.encode_images(candidates)
        if len(cands) == 0:
            raise InputError("no candidates given")
        _check_embeds(cands.embeds, q.embeds.shape[1])
        cosine = cands.embeds @ q.embeds[0]
        result: dict[str, Any] = {"cosine": cosine, "truncated": bool(q.truncated[0]), "timings_ms": {}}
        k = len(cands)

        if "entity" in wanted:
            t = time.perf_counter()
            expl = q if explanation is None else self._one_text(explanation, "explanation")
            query = self.executor.run(ENTITY_QUERY.name, {
                "text_tokens": q.tokens, "text_mask": q.mask,
                "explanation_tokens": expl.tokens, "explanation_mask": expl.mask,
            })
            cands = self.with_vision_experts(cands)
            out = self._run_candidates(ENTITY_PAIR.name, k, {
                "image_cls": cands.tokens[:, 0], "vision_experts": cands.vision_experts,
            }, {**query, "explanation_mask": expl.mask})
            result.update(match_prob=out["match_prob"], entity_score=out["entity_score"],
                          explained=explanation is not None,
                          explanation_truncated=explanation is not None and bool(expl.truncated[0]))
            result["timings_ms"]["entity"] = (time.perf_counter() - t) * 1e3

        if "dcsm" in wanted:
            t = time.perf_counter()
            n = int(q.mask[0].sum())
            # The text tower is causal, so its first L outputs are exactly what it gives for
            # the text cut to L tokens; and DCSM scores a text cut to its own length as it
            # scores it padded (clipmatch_export/dcsm.py). So the query goes cut to min(n, L).
            length = min(n, self.manifest.sizes["dcsm_text_length"])
            out = self._run_candidates(DCSM.name, k, {"image_tokens": cands.tokens}, {
                "text_tokens": q.tokens[:, :length], "text_mask": q.mask[:, :length],
                "functional_ids": q.functional_ids[:, :length],
            })
            result.update(dcsm=out["dcsm_logit"], dcsm_truncated=n > self.manifest.sizes["dcsm_text_length"])
            result["timings_ms"]["dcsm"] = (time.perf_counter() - t) * 1e3
        return RescoreResult(**result)

    # -- helpers ---------------------------------------------------------------

    def _wanted_heads(self, heads: Iterable[str] | None) -> tuple[str, ...]:
        if heads is None:
            return self.heads
        wanted = (heads,) if isinstance(heads, str) else tuple(heads)
        unknown = [h for h in wanted if h not in HEAD_NAMES]
        if unknown:
            raise InputError(f"unknown heads {unknown}; choose from {list(HEAD_NAMES)}")
        absent = [h for h in wanted if h not in self.heads]
        if absent:
            raise ModelNotFoundError(f"this model serves heads {list(self.heads)}; {absent} not among them "
                                     "(exported with --towers-only?)")
        return wanted

    def _one_text(self, text: str | TextEncoding, what: str) -> TextEncoding:
        if isinstance(text, TextEncoding):
            if len(text) != 1:
                raise ShapeError(f"{what} must be one text, got an encoding of {len(text)}")
            return text.row(0)
        if not isinstance(text, str):
            raise InputError(f"{what} must be a str, got {type(text).__name__}")
        return self.encode_texts([text]).row(0)

    def _run_candidates(self, component: str, k: int, candidates: dict[str, np.ndarray],
                        query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An unbatched head over K candidates in chunks of ``pair_batch_size``; the query's
        tensors (batch 1) go with every chunk as they are."""
        outputs: dict[str, list[np.ndarray]] = {}
        step = self.config.pair_batch_size
        for start in range(0, k, step):
            feeds = {name: np.ascontiguousarray(x[start:start + step]) for name, x in candidates.items()}
            out = self.executor.run(component, {**feeds, **{n: np.ascontiguousarray(x) for n, x in query.items()}})
            for name, value in out.items():
                outputs.setdefault(name, []).append(value)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}


def _check_embeds(image_embeds: np.ndarray, dims: int) -> None:
    """Cached image embeddings must come from this model and hold numbers."""
    if image_embeds.shape[1] != dims:
        raise ShapeError(f"image embeddings have {image_embeds.shape[1]} dims, text embeddings {dims}: "
                         "they come from different models")
    bad = np.flatnonzero(~np.isfinite(image_embeds).all(axis=1))
    if bad.size:
        raise ShapeError(f"image embeddings hold NaN or inf in rows {bad[:10].tolist()}")


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, bytes, bytearray, np.ndarray)) or not isinstance(items, Iterable):
        raise InputError(f"{what} must be a list (got one {type(items).__name__}); wrap a single item in [...]")
    items = list(items)
    if not items:
        raise InputError(f"no {what} given")
    return items


def _pad_axis1(x: np.ndarray, width: int) -> np.ndarray:
    if x.shape[1] == width:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return np.pad(x, pad)


