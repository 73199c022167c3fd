"""Word-to-patch targets from scene annotations, for CLIP training on data that has them.

A contrastive loss on pooled embeddings never says *where* a word is in the
image, and at this scale the patch tokens do not find out by themselves
(measured on the default model: a caption's words were no closer to their
object's patches than to the background). Every synthetic scene knows its
objects' places, so for each caption token that names a colour, shape or
pattern, the patches of the object(s) having it are its targets. Words after
a negation ("no", "not", "without", "but") name what is absent, and are left
unsupervised. Data without a ``scene`` simply gets no targets.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch_export.synth.world import CANVAS, COLOURS, PATTERNS, RADIUS, SHAPES

_NEGATIONS = {"no", "not", "without", "but"}


def _word_per_token(tokenizer: ClipTokenizer, text: str) -> list[str | None]:
    enc = tokenizer.backend.encode(text)
    spans: dict[int, tuple[int, int]] = {}
    for word, (start, end) in zip(enc.word_ids, enc.offsets):
        if word is not None:
            s, e = spans.get(word, (start, end))
            spans[word] = (min(s, start), max(e, end))
    return [None if w is None else text[spans[w][0]:spans[w][1]].lower() for w in enc.word_ids]


def _patches(obj: Mapping[str, Any], image_size: int, patch_size: int) -> np.ndarray:
    """(P,) bool over CLS + patches: patches whose centre lies inside the object's box."""
    grid = image_size // patch_size
    scale = image_size / CANVAS
    r = RADIUS[obj["size"]] * scale
    centres = (np.arange(grid) + 0.5) * patch_size
    inside = (np.abs(centres[None, :] - obj["x"] * scale) <= r) & (np.abs(centres[:, None] - obj["y"] * scale) <= r)
    return np.concatenate([[False], inside.reshape(-1)])


def _has(obj: Mapping[str, Any], word: str) -> bool:
    if word in COLOURS:
        return obj.get("colour") == word or obj.get("pattern_colour") == word
    if word in SHAPES:
        return obj.get("shape") == word
    return word in PATTERNS and obj.get("pattern") == word


def word_patch_targets(texts: Sequence[str], scenes: Sequence[Mapping[str, Any] | None], tokenizer: ClipTokenizer,
                       width: int, image_size: int, patch_size: int) -> torch.Tensor:
    """(N, width, P) bool: token t of text i should point at patch p of its image."""
    p = (image_size // patch_size) ** 2 + 1
    out = np.zeros((len(texts), width, p), bool)
    for i, (text, scene) in enumerate(zip(texts, scenes)):
        if not scene:
            continue
        negated = False
        for t, word in enumerate(_word_per_token(tokenizer, text)[:width]):
            if word in _NEGATIONS:
                negated = True
            if word is None or negated or not (word in COLOURS or word in SHAPES or word in PATTERNS):
                continue
            for obj in scene["objects"]:
                if _has(obj, word):
                    out[i, t] |= _patches(obj, image_size, patch_size)
    return torch.from_numpy(out)


def localisation_loss(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, targets: torch.Tensor,
                      logit_scale: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass (over its own image's patches) a supervised word puts on its object."""
    s = torch.einsum("btd,bpd->btp", txt_tokens, img_tokens[:, 1:]) * logit_scale.exp()  # (B, T, P-1)
    logp = torch.log_softmax(s, dim=-1)
    tgt = targets[..., 1:]
    supervised = tgt.any(-1)
    if not supervised.any():
        return s.sum() * 0.0
    mass = torch.logsumexp(logp.masked_fill(~tgt, float("-inf")), dim=-1)  # (B, T)
    return -mass[supervised].mean()
