"""What the runtime returns. Shapes: N images or texts, P image tokens, T text positions, D joint dims, K candidates."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipmatch.errors import InputError, ShapeError

__all__ = ["ImageEncoding", "TextEncoding", "RescoreResult"]


@dataclass(frozen=True)
class ImageEncoding:
    """embeds: (N, D) L2-normalised pooled embeddings, for cosine retrieval.
    tokens: (N, P, D) L2-normalised CLS + patch tokens, for rescoring (worth caching).
    vision_experts: (N, K, D) the entity heads' image part, computed from the tokens
        (``Matcher.with_vision_experts``; worth caching too), or None.
    """

    embeds: np.ndarray
    tokens: np.ndarray
    vision_experts: np.ndarray | None = None

    def __post_init__(self) -> None:
        e, t = np.asarray(self.embeds), np.asarray(self.tokens)
        if e.ndim != 2 or t.ndim != 3:
            raise ShapeError(f"ImageEncoding needs embeds (N, D) and tokens (N, P, D), got {e.shape} and {t.shape}")
        if e.shape[0] != t.shape[0] or e.shape[1] != t.shape[2]:
            raise ShapeError(f"ImageEncoding embeds {e.shape} and tokens {t.shape} do not fit together "
                             "(N and D must agree)")
        v = self.vision_experts
        if v is not None and (np.ndim(v) != 3 or v.shape[0] != e.shape[0] or v.shape[2] != e.shape[1]):
            raise ShapeError(f"ImageEncoding vision_experts must be (N, K, D) = ({e.shape[0]}, K, {e.shape[1]}), "
                             f"got {np.shape(v)}")

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def __getitem__(self, index) -> ImageEncoding:
        index = [index] if isinstance(index, (int, np.integer)) else index
        experts = None if self.vision_experts is None else self.vision_experts[index]
        return ImageEncoding(self.embeds[index], self.tokens[index], experts)

    def with_vision_experts(self, vision_experts: np.ndarray) -> ImageEncoding:
        return ImageEncoding(self.embeds, self.tokens, vision_experts)


@dataclass(frozen=True)
class TextEncoding:
    """embeds: (N, D) L2-normalised pooled embeddings (each text's EOT).
    tokens: (N, T, D) L2-normalised per-position embeddings, zeros at padding.
    mask: (N, T) int64, 1 at real tokens.
    functional_ids: (N, T) int64, j + 1 where a token belongs to functional word j.
    truncated: (N,) bool, True where a text was cut to the context length.
    """

    texts: tuple[str, ...]
    embeds: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    functional_ids: np.ndarray
    truncated: np.ndarray

    def __post_init__(self) -> None:
        n, t = self.tokens.shape[:2] if self.tokens.ndim == 3 else (None, None)
        shapes = {"embeds": self.embeds.shape, "tokens": self.tokens.shape, "mask": self.mask.shape,
                  "functional_ids": self.functional_ids.shape, "truncated": self.truncated.shape}
        ok = (n is not None and len(self.texts) == n and self.embeds.shape == (n, self.tokens.shape[2])
              and self.mask.shape == (n, t) and self.functional_ids.shape == (n, t) and self.truncated.shape == (n,))
        if not ok:
            raise ShapeError(f"TextEncoding of {len(self.texts)} texts has inconsistent shapes {shapes}")
        # A hand-built encoding is checked as the tokenizer's output would hold: a mask of 1s then
        # 0s (at least one 1: the EOT the tower pools at), marks only on real tokens, finite numbers.
        mask, marks = np.asarray(self.mask), np.asarray(self.functional_ids)
        if mask.dtype.kind not in "iub" or marks.dtype.kind not in "iu":
            raise ShapeError(f"TextEncoding mask and functional_ids must be integers, got {mask.dtype} and "
                             f"{marks.dtype}")
        bad = np.flatnonzero(((mask != 0) & (mask != 1)).any(axis=1) | (mask[:, :1] != 1).any(axis=1)
                             | (np.diff(mask.astype(np.int64), axis=1) > 0).any(axis=1)) if t else []
        if len(bad):
            raise ShapeError(f"TextEncoding mask rows {bad[:5].tolist()} are not 1s followed by 0s")
        bad = np.flatnonzero(((marks < 0) | ((mask == 0) & (marks != 0))).any(axis=1)) if t else []
        if len(bad):
            raise ShapeError(f"TextEncoding functional_ids rows {bad[:5].tolist()} are negative or mark padding")
        for name in ("embeds", "tokens"):
            x = np.asarray(getattr(self, name))
            if x.dtype.kind != "f" or not np.isfinite(x).all():
                raise ShapeError(f"TextEncoding {name} must be finite floats (dtype {x.dtype})")

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def row(self, i: int) -> TextEncoding:
        """Text i alone, cut to its own length."""
        n = int(self.mask[i].sum())
        return TextEncoding((self.texts[i],), self.embeds[i:i + 1], self.tokens[i:i + 1, :n],
                            self.mask[i:i + 1, :n], self.functional_ids[i:i + 1, :n], self.truncated[i:i + 1])


@dataclass(frozen=True)
class RescoreResult:
    """Scores of one query against K candidates, each head reported separately.

    cosine: (K,) pooled cosine similarity.
    match_prob: (K,) GI-ITM match probability, None when the entity heads were not run.
    entity_score: (K,) cosine of MMAE's gated features V* and T*, likewise.
    dcsm: (K,) DCSM logit (unbounded, higher is better), None when DCSM was not run.
    explained: the entity heads saw a real explanation; False means the query
        stood in for its own explanation.
    truncated: the query was longer than the text context and was cut.
    explanation_truncated: the explanation was longer than the text context and was cut.
    dcsm_truncated: the query was longer than DCSM's fixed text length; the map
        saw only its first dcsm_text_length tokens.
    timings_ms: wall time of each head's work, query side included ("entity", "dcsm"),
        or of the whole request where one served request ran both ("heads").
    """

    cosine: np.ndarray
    match_prob: np.ndarray | None = None
    entity_score: np.ndarray | None = None
    dcsm: np.ndarray | None = None
    explained: bool = False
    truncated: bool = False
    explanation_truncated: bool = False
    dcsm_truncated: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)

    def order(self, by: str = "cosine") -> np.ndarray:
        """Candidate indices, best first, by one score.

        >>> RescoreResult(cosine=np.array([0.1, 0.9, 0.5])).order().tolist()
        [1, 2, 0]
        """
        scores = getattr(self, by)
        if scores is None:
            raise InputError(f"no {by!r} scores in this result (that head was not run)")
        return np.argsort(-scores, kind="stable")


def format_table(rows: list[dict]) -> str:
    """Rows of one shape as a Markdown table (floats to 4 places), for the commands' output."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
