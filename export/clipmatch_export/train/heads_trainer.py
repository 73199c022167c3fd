"""Training the rescoring heads on frozen towers: DCSM, then MMAE + GI-ITM.

The towers stay frozen so that cosine retrieval, DCSM and the entity heads
all read the same served token features, and so that each head's effect is
measured against the very cosine it rescores. Tower features are computed
once, up front; each step then costs only the heads.

DCSM (methods.md §1): a batch holds B positives plus, where the data has
them, each one's hard negative caption and image. The pair-score matrix over
all images x all texts is trained with cross-entropy over rows and columns.

MMAE + GI-ITM (methods.md §2, towers frozen): InfoNCE on cos(V*, T*) over all
(image, text + explanation) pairs of the batch, plus ITM on the positives, the
hardest in-batch negatives and the data's hard negatives.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipmatch.manifest import HeadsManifest, sha256_json
from clipmatch.preprocess import ImageConfig
from clipmatch.tokenizer import ClipTokenizer

from ..clip_loader import load_clip
from ..heads import ClipmatchHeads, build_heads, heads_config_for, save_heads
from ..towers import ImageTower, TextTower
from .clip_trainer import _encode_images
from .configs import HeadsTrainConfig
from .data import Record
from .loop import Progress, cosine_lr, make_optimizer, seeded
from .state import clear_state, load_state, save_state, saved_run


@dataclass
class Features:
    """Frozen tower outputs for every record (fp16 to halve memory; cast per batch)."""

    images: torch.Tensor  # (N, P, D)
    captions: torch.Tensor  # (N, T, D)
    caption_mask: torch.Tensor  # (N, T)
    caption_functional: torch.Tensor  # (N, T)
    explanations: torch.Tensor  # (N, E, D)
    explanation_mask: torch.Tensor  # (N, E)
    caption_class: torch.Tensor  # (N,) equal captions share a class
    neg_images: torch.Tensor | None  # (N, P, D), rows without one are zeros
    has_neg_image: torch.Tensor  # (N,) bool
    neg_captions: torch.Tensor | None  # (N, T, D)
    neg_caption_mask: torch.Tensor | None
    neg_caption_functional: torch.Tensor | None
    neg_explanations: torch.Tensor | None  # (N, E, D)
    neg_explanation_mask: torch.Tensor | None
    has_neg_caption: torch.Tensor  # (N,) bool


def train_heads(records: Sequence[Record], model_dir: str | Path, config: HeadsTrainConfig = HeadsTrainConfig(), *,
                stages: Sequence[str] = ("dcsm", "entity"), progress: bool = True) -> HeadsManifest:
    """Train the heads for the CLIP checkpoint in ``model_dir`` and save them next to it."""
    model_dir = Path(model_dir)
    clip, files = load_clip(model_dir)
    for p in clip.parameters():
        p.requires_grad_(False)
    tokenizer = ClipTokenizer.from_dir(model_dir)
    heads_config = heads_config_for(clip.config, num_experts=config.num_experts,
                                    dcsm_text_length=config.dcsm_text_length)
    heads = build_heads(heads_config, seed=config.seed)
    t0 = time.perf_counter()
    feats = compute_features(records, clip, tokenizer, ImageConfig.from_preprocessor_config(files.preprocessor_config),
                             heads_config.functional_words, progress=progress)
    timings = {"features": round(time.perf_counter() - t0, 1)}
    run = {"config": asdict(config), "data": sha256_json([r.caption for r in records] + [str(r.image) for r in records])}
    # A run killed during the entity stage saved every head, DCSM included: resume there.
    waiting = saved_run(model_dir)
    resume_entity = "entity" in stages and waiting == run | {"stage": "entity"}
    if "dcsm" in stages and not resume_entity:
        t0 = time.perf_counter()
        _fit(heads, heads.dcsm, feats, config, config.dcsm_epochs, _dcsm_loss, model_dir, run | {"stage": "dcsm"},
             progress)
        timings["dcsm"] = round(time.perf_counter() - t0, 1)
    if "entity" in stages:
        t0 = time.perf_counter()
        _fit(heads, heads.entity, feats, config, config.entity_epochs, _entity_loss, model_dir,
             run | {"stage": "entity"}, progress)
        timings["entity"] = round(time.perf_counter() - t0, 1)
    manifest = save_heads(heads.eval(), model_dir)
    (model_dir / "training_heads.json").write_text(json.dumps(
        {"stage": "heads", "config": asdict(config), "records": len(records), "seconds": timings}, indent=2))
    return manifest


def _fit(heads: ClipmatchHeads, module: torch.nn.Module, feats: Features, config: HeadsTrainConfig, epochs: int,
         loss_fn, out: Path, run: dict, progress: bool) -> None:
    n = feats.images.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * epochs
    optimizer = make_optimizer(module, config.lr, config.weight_decay)
    meta = load_state(out, heads, optimizer, {"run": run})
    start = meta["epoch"] if meta else 0
    module.train()
    bar = Progress(total, initial=start * steps_per_epoch, enabled=progress, desc=run["stage"])
    for epoch in range(start, epochs):
        order = torch.randperm(n, generator=seeded(config.seed, epoch))
        for b in range(steps_per_epoch):
            rows = order[b * config.batch_size:(b + 1) * config.batch_size]
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(epoch * steps_per_epoch + b, total, config.lr, config.warmup_steps)
            loss = loss_fn(module, feats, rows, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            bar.update(loss=loss.item())
        save_state(out, heads, optimizer, {"run": run, "epoch": epoch + 1})
    bar.close()
    module.eval()
    clear_state(out)


# -- DCSM ------------------------------------------------------------------------------------

def _dcsm_loss(dcsm, feats: Features, rows: torch.Tensor, config: HeadsTrainConfig) -> torch.Tensor:
    L = config.dcsm_text_length
    img = [feats.images[rows]]
    txt, mask, func = [_fit_len(feats.captions[rows], L)], [_fit_len(feats.caption_mask[rows], L)], \
        [_fit_len(feats.caption_functional[rows], L)]
    img_class, txt_class = [feats.caption_class[rows]], [feats.caption_class[rows]]
    # Each hard negative pair (swapped image, swapped caption) is a positive pair of its own.
    both = feats.has_neg_image[rows] & feats.has_neg_caption[rows]
    if feats.neg_images is not None and feats.neg_captions is not None and both.any():
        neg = rows[both]
        img.append(feats.neg_images[neg])
        txt.append(_fit_len(feats.neg_captions[neg], L))
        mask.append(_fit_len(feats.neg_caption_mask[neg], L))
        func.append(_fit_len(feats.neg_caption_functional[neg], L))
        # Negative pairs get classes of their own: -1 - index, unique in the batch.
        own = -1 - torch.arange(int(both.sum()))
        img_class.append(own)
        txt_class.append(own)
    img, txt, mask, func = torch.cat(img).float(), torch.cat(txt).float(), torch.cat(mask), torch.cat(func)
    img_class, txt_class = torch.cat(img_class), torch.cat(txt_class)
    ni, nt = img.shape[0], txt.shape[0]
    scores = dcsm(img.repeat_interleave(nt, 0), txt.repeat(ni, 1, 1), mask.repeat(ni, 1), func.repeat(ni, 1))
    scores = scores.view(ni, nt)
    target = (img_class[:, None] == txt_class[None, :]).float()
    return _multi_positive_ce(scores, target)


# -- MMAE + GI-ITM ------------------------------------------------------------------------------

def _entity_loss(entity, feats: Features, rows: torch.Tensor, config: HeadsTrainConfig) -> torch.Tensor:
    b = rows.numel()
    img = feats.images[rows].float()
    cap, cmask = feats.captions[rows].float(), feats.caption_mask[rows]
    exp, emask = feats.explanations[rows].float(), feats.explanation_mask[rows]
    # Every (image i, text j) pair of the batch: V* depends on text j's explanation.
    ii = torch.arange(b).repeat_interleave(b)
    jj = torch.arange(b).repeat(b)
    out = entity.experts(img[ii], cap[jj], cmask[jj], exp[jj], emask[jj])
    sim = (out.image_star * out.text_star).sum(-1).view(b, b) / config.entity_temperature
    cls = feats.caption_class[rows]
    target = (cls[:, None] == cls[None, :]).float()
    loss = _multi_positive_ce(sim, target)

    # ITM: positives, then for each image its most confusable wrong text and vice versa.
    logits = entity.matcher(out).view(b, b, 2)
    with torch.no_grad():
        hard = sim.detach().masked_fill(target.bool(), float("-inf"))
        has_neg = torch.isfinite(hard).any(1)
        text_for_image = hard.argmax(1)
        image_for_text = hard.argmax(0)
    idx = torch.arange(b)
    itm_logits = [logits[idx, idx], logits[idx[has_neg], text_for_image[has_neg]],
                  logits[image_for_text[has_neg], idx[has_neg]]]
    itm_labels = [torch.ones(b), torch.zeros(int(has_neg.sum())), torch.zeros(int(has_neg.sum()))]
    # The data's own hard negatives: the look-alike's name and explanation for this image.
    if feats.neg_captions is not None and feats.has_neg_caption[rows].any():
        neg = rows[feats.has_neg_caption[rows]]
        keep = feats.has_neg_caption[rows]
        extra = entity.experts(img[keep], feats.neg_captions[neg].float(), feats.neg_caption_mask[neg],
                               feats.neg_explanations[neg].float(), feats.neg_explanation_mask[neg])
        itm_logits.append(entity.matcher(extra))
        itm_labels.append(torch.zeros(int(keep.sum())))
    itm = F.cross_entropy(torch.cat(itm_logits), torch.cat(itm_labels).long())
    return loss + config.itm_weight * itm


def _multi_positive_ce(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows and columns; rows or columns without a positive are left out."""
    def side(s, t):
        keep = t.sum(1) > 0
        s, t = s[keep], t[keep]
        return -(F.log_softmax(s, dim=1) * t / t.sum(1, keepdim=True)).sum(1).mean()
    return (side(scores, target) + side(scores.T, target.T)) / 2


# -- features ---------------------------------------------------------------------------------

@torch.no_grad()
def compute_features(records: Sequence[Record], clip, tokenizer: ClipTokenizer, image_config: ImageConfig,
                     functional_words: Sequence[str], *, batch: int = 256, progress: bool = True) -> Features:
    image_tower, text_tower = ImageTower(clip).eval(), TextTower(clip).eval()

    def images(paths):
        pixels = _encode_images(paths, image_config)
        return torch.cat([image_tower(pixels[i:i + batch].float())[1].half() for i in range(0, len(paths), batch)])

    def texts(items):
        tok = tokenizer(items, functional_words=functional_words)
        ids, mask = torch.from_numpy(tok.input_ids), torch.from_numpy(tok.attention_mask)
        out = torch.cat([text_tower(ids[i:i + batch], mask[i:i + batch])[1].half() for i in range(0, len(items), batch)])
        return out, mask, torch.from_numpy(tok.functional_ids)

    t0 = time.perf_counter()
    n = len(records)
    caps = [r.caption for r in records]
    expl = [r.explanation or r.caption for r in records]
    img = images([r.image for r in records])
    cap, cmask, cfunc = texts(caps)
    exp, emask, _ = texts(expl)
    _, caption_class = np.unique(np.asarray(caps), return_inverse=True)

    has_ni = torch.tensor([r.negative_image is not None for r in records])
    neg_img = None
    if has_ni.any():
        neg_img = torch.zeros_like(img)
        neg_img[has_ni] = images([r.negative_image for r in records if r.negative_image is not None])
    has_nc = torch.tensor([bool(r.negative_captions) for r in records])
    ncap = ncmask = ncfunc = nexp = nemask = None
    if has_nc.any():
        negs = [r.negative_captions[0] if r.negative_captions else r.caption for r in records]
        neg_expl = [(r.extra.get("negative_explanations") or [None])[0] or n_ for r, n_ in zip(records, negs)]
        ncap, ncmask, ncfunc = texts(negs)
        nexp, nemask, _ = texts(neg_expl)
    if progress:
        print(f"tower features for {n} records in {time.perf_counter() - t0:.1f} s")
    return Features(img, cap, cmask, cfunc, exp, emask, torch.from_numpy(caption_class), neg_img, has_ni,
                    ncap, ncmask, ncfunc, nexp, nemask, has_nc)


def _fit_len(x: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad axis 1 to ``length`` (the text tower is causal: cutting is exact)."""
    x = x[:, :length]
    if x.shape[1] < length:
        pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
        x = F.pad(x, pad)
    return x
