"""Why a result matched: the DCSM map drawn over the image, one panel per word.

The map is the one DCSM reads (``clipmatch_export/dcsm.py``): the cosine of
every image patch with every text token, z-scored over the map's real,
non-functional cells. Functional words ("left", "no", ...) have learned
columns inside the scorer, not evidence in the image, so they get no panel.
Computed from the tokens the index caches, with numpy; no model call.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipmatch.errors import ShapeError
from clipmatch.inputs.images import load_image
from clipmatch.inputs.preprocess import model_view

__all__ = ["dense_map", "word_maps", "render_heatmap"]


# The DCSM's epsilon under the map's standard deviation (clipmatch_export/models/dcsm.py).
DCSM_EPS = 1e-6


def dense_map(image_tokens: np.ndarray, text_tokens: np.ndarray, mask: np.ndarray,
              functional_ids: np.ndarray) -> np.ndarray:
    """(P, T) the DCSM's dense cosine map of one pair, z-scored as the DCSM z-scores it: over
    the map's real, non-functional cells (docs/methods.md#the-dense-cosine-map). Functional
    and padding columns are left as z-scored cosines; the heatmap draws neither."""
    sim = image_tokens.astype(np.float32) @ text_tokens.astype(np.float32).T  # (P, T)
    cells = (mask > 0) & (functional_ids == 0)
    values = sim[:, cells]
    if values.size == 0:
        return np.zeros_like(sim)
    return (sim - values.mean()) / np.sqrt(values.var() + DCSM_EPS)


def word_maps(image_tokens: np.ndarray, text_tokens: np.ndarray, mask: np.ndarray, functional_ids: np.ndarray,
              input_ids: np.ndarray, special_ids: set[int]) -> tuple[np.ndarray, list[int]]:
    """(words, grid, grid) z-scored patch maps and the token positions they belong to.

    image_tokens (P, D) with CLS first; text_tokens (T, D); the rest (T,). Pass the text
    as the DCSM reads it (cut to its ``dcsm_text_length``) for the map it scores.
    """
    p = image_tokens.shape[0]
    grid = math.isqrt(p - 1)
    if grid * grid != p - 1:
        raise ShapeError(f"image tokens must be CLS + a square grid of patches, got {p}")
    z = dense_map(image_tokens, text_tokens, mask, functional_ids)
    cells = (mask > 0) & (functional_ids == 0)
    keep = [t for t in range(len(mask)) if cells[t] and int(input_ids[t]) not in special_ids]
    return z[1:, keep].T.reshape(len(keep), grid, grid), keep


def render_heatmap(matcher, image, image_tokens: np.ndarray, text: str, out: str | Path, panel: int = 160) -> Path:
    """Write a PNG: the image, then one panel per word of ``text`` with where it matched in red.
    ``image_tokens`` (P, D) are the image's cached tokens (an index row)."""
    tokenizer = matcher.files.tokenizer
    enc = matcher.encode_texts([text])
    batch = matcher.tokenize([text])
    # The text as the DCSM reads it: cut to its length (the causal tower's first L outputs are
    # what it gives the cut text), so the map drawn is the map scored.
    length = matcher.manifest.sizes.get("dcsm_text_length", enc.tokens.shape[1])
    maps, positions = word_maps(np.asarray(image_tokens, np.float32), enc.tokens[0, :length], enc.mask[0, :length],
                                enc.functional_ids[0, :length], batch.input_ids[0, :length], tokenizer.special_ids)
    # The crop the tower saw, not the whole image squashed: the map's patches cover that crop.
    view = model_view(load_image(image, 0), matcher.files.image_config)
    base = Image.fromarray(view).resize((panel, panel), Image.BILINEAR)
    labels = [tokenizer.backend.id_to_token(int(batch.input_ids[0, t])).replace("</w>", "") for t in positions]
    canvas = Image.new("RGB", (panel * (1 + len(maps)), panel + 20), (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, panel + 4), "image", fill=(0, 0, 0))
    top = max(float(maps.max()), 1e-6) if len(maps) else 1.0
    for i, (m, label) in enumerate(zip(maps, labels), start=1):
        heat = np.clip(m / top, 0, 1)  # only positive evidence is drawn
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((panel, panel), Image.BILINEAR))
        alpha = (heat.astype(np.float32) / 255.0)[..., None] * 0.7
        red = np.zeros((panel, panel, 3), np.float32)
        red[..., 0] = 255
        over = (np.asarray(base, np.float32) * (1 - alpha) + red * alpha).astype(np.uint8)
        canvas.paste(Image.fromarray(over), (panel * i, 0))
        draw.text((panel * i + 4, panel + 4), label, fill=(0, 0, 0))
    out = Path(out)
    canvas.save(out)
    return out
