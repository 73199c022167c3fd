"""Training the rescoring heads on frozen towers: DCSM, then MMAE + GI-ITM.

The towers stay frozen so that cosine retrieval, DCSM and the entity heads
all read the same served token features, and so that each head's effect is
measured against the very cosine it rescores. Tower features are computed
once, up front; each step then costs only the heads.

DCSM (docs/methods.md#how-dcsm-is-trained): a batch holds B positives plus, where the data has
them, each one's hard negative caption and image (a matching pair of their
own). Every image is scored against its text, its partner's text, a few
random texts of the batch and, for a positive image, every other hard-negative
caption its record has (as evaluation does); every text likewise against
images, with cross-entropy over each such row and column.

MMAE + GI-ITM (docs/methods.md#how-the-entity-heads-are-trained, towers frozen): InfoNCE on cos(V*, T*) over the
same candidate sets, plus ITM on the positive, the hard partner and the
most confusable random candidate.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipmatch.errors import IncompatibleModelError
from clipmatch.inputs.preprocess import ImageConfig
from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch.manifest import HEADS_MANIFEST, HeadsManifest, sha256_file, sha256_json
from clipmatch_export.models.clip_loader import load_clip
from clipmatch_export.models.heads import ClipmatchHeads, build_heads, heads_config_for, load_heads, save_heads
from clipmatch_export.models.towers import ImageTower, TextTower
from clipmatch_export.synth.entities import NAME_PATTERN, rename_entities
from clipmatch_export.train.clip_trainer import _encode_images
from clipmatch_export.train.configs import HeadsTrainConfig
from clipmatch_export.train.data import Record
from clipmatch_export.train.loop import Progress, cosine_lr, deterministic, make_optimizer, seeded
from clipmatch_export.train.state import (
    clear_features,
    clear_state,
    load_features,
    load_state,
    save_features,
    save_state,
    saved_run,
)


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
    # The other hard-negative captions (negative_captions[1:]), text only: DCSM scores
    # each image against all of them, as evaluation does.
    more_captions: torch.Tensor | None = None  # (N, X, T, D)
    more_caption_mask: torch.Tensor | None = None  # (N, X, T)
    more_caption_functional: torch.Tensor | None = None  # (N, X, T)
    has_more_caption: torch.Tensor | None = None  # (N, X) bool


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
    if set(stages) != {"dcsm", "entity"} and (model_dir / HEADS_MANIFEST).exists():
        _keep_trained(heads, model_dir, [m for m in ("dcsm", "entity") if m not in stages])
    records = list(records)
    # The DCSM stage reads the records as given; the entity stage reads them
    # as ``entity_names`` says (see HeadsTrainConfig).
    dcsm_rows = torch.arange(len(records))
    entity_rows = dcsm_rows
    if config.entity_names != "keep":
        copies, named = anonymised_copies(records, config.seed)
        keep = [i for i in range(len(records)) if config.entity_names == "both" or i not in named]
        entity_rows = torch.cat([torch.tensor(keep, dtype=torch.long), len(records) + torch.arange(len(copies))])
        records += copies
    t0 = time.perf_counter()
    key = sha256_json({"records": [_signature(r) for r in records], "weights": [sha256_file(w) for w in files.weights],
                       "tokenizer": tokenizer.identity, "functional_words": list(heads_config.functional_words)})
    saved = load_features(model_dir, key)
    if saved is not None:
        feats = Features(**{f.name: saved.get(f.name) for f in dataclasses.fields(Features)})
        if progress:
            print(f"tower features for {len(records)} records read back from the interrupted run")
    else:
        feats = compute_features(records, clip, tokenizer,
                                 ImageConfig.from_preprocessor_config(files.preprocessor_config),
                                 heads_config.functional_words, progress=progress)
        save_features(model_dir, key, {f.name: getattr(feats, f.name) for f in dataclasses.fields(Features)
                                       if getattr(feats, f.name) is not None})
    timings = {"features": round(time.perf_counter() - t0, 1)}
    run = {"config": asdict(config), "data": sha256_json([r.caption for r in records] + [str(r.image) for r in records])}
    # A run killed during the entity stage saved every head, DCSM included: resume there.
    waiting = saved_run(model_dir)
    resume_entity = "entity" in stages and waiting == run | {"stage": "entity"}
    if "dcsm" in stages and not resume_entity:
        t0 = time.perf_counter()
        _fit(heads, heads.dcsm, feats, dcsm_rows, config, config.dcsm_epochs, _dcsm_loss, model_dir,
             run | {"stage": "dcsm"}, progress)
        timings["dcsm"] = round(time.perf_counter() - t0, 1)
    if "entity" in stages:
        t0 = time.perf_counter()
        _fit(heads, heads.entity, feats, entity_rows, config, config.entity_epochs, _entity_loss, model_dir,
             run | {"stage": "entity"}, progress)
        timings["entity"] = round(time.perf_counter() - t0, 1)
    manifest = save_heads(heads.eval(), model_dir)
    clear_features(model_dir)
    (model_dir / "training_heads.json").write_text(json.dumps(
        {"stage": "heads", "config": asdict(config), "records": len(records), "seconds": timings}, indent=2))
    return manifest


def _signature(record: Record) -> list:
    """What a record's features depend on: its texts, and its images by path, size and mtime."""
    def image(path):
        if path is None:
            return None
        stat = Path(path).stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    return [record.caption, record.explanation, list(record.negative_captions),
            record.extra.get("negative_explanations"), image(record.image), image(record.negative_image)]


def _keep_trained(heads: ClipmatchHeads, model_dir: Path, modules: Sequence[str]) -> None:
    """Copy the named heads (not trained in this run) from the ones saved in ``model_dir``;
    the heads this run trains start fresh, as in a full run."""
    saved, _ = load_heads(model_dir)
    if saved.config != heads.config:
        raise IncompatibleModelError(
            f"{model_dir} holds heads of another shape ({saved.config.to_dict()}) than this run builds "
            f"({heads.config.to_dict()}); train both stages to replace them")
    for name in modules:
        getattr(heads, name).load_state_dict(getattr(saved, name).state_dict())


def _fit(heads: ClipmatchHeads, module: torch.nn.Module, feats: Features, pool: torch.Tensor,
         config: HeadsTrainConfig, epochs: int, loss_fn, out: Path, run: dict, progress: bool) -> None:
    n = pool.numel()
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * epochs
    optimizer = make_optimizer(module, config.lr, config.weight_decay)
    meta = load_state(out, heads, optimizer, {"run": run})
    start = meta["epoch"] if meta else 0
    module.train()
    bar = Progress(total, initial=start * steps_per_epoch, enabled=progress, desc=run["stage"], unit="steps")
    with deterministic():  # the same seed, the same weights
        for epoch in range(start, epochs):
            order = pool[torch.randperm(n, generator=seeded(config.seed, epoch))]
            gen = seeded(config.seed + 1, epoch)  # negatives' draws, reproducible across a resume
            for b in range(steps_per_epoch):
                rows = order[b * config.batch_size:(b + 1) * config.batch_size]
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(epoch * steps_per_epoch + b, total, config.lr, config.warmup_steps)
                loss = loss_fn(module, feats, rows, config, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                bar.update(loss=loss.item())
            save_state(out, heads, optimizer, {"run": run, "epoch": epoch + 1})
    bar.close()
    module.eval()
    clear_state(out)


# -- candidate sets ---------------------------------------------------------------------------
#
# Scoring every image against every text of a batch costs B^2 head calls.
# Each anchor is instead scored against its positive, its hard-negative
# partner (the swapped caption or image) and a few random in-batch others:
# the hard negatives carry the signal the heads exist for, the random ones
# keep basic content in view, and a step costs O(B).

def _candidates(pos: torch.Tensor, partner: torch.Tensor, n: int, blocked: torch.Tensor, m: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, 2 + m) candidate indices into n items (column 0 is the positive) and a validity mask."""
    rand = torch.randint(n, (pos.numel(), m), generator=gen)
    cand = torch.cat([pos[:, None], partner.clamp(min=0)[:, None], rand], dim=1)
    valid = torch.ones_like(cand, dtype=torch.bool)
    valid[:, 1] = partner >= 0
    # A random pick that is another positive of the anchor (same caption, or the anchor's own
    # positive again) is not a negative: leave it out.
    valid[:, 2:] &= ~blocked.gather(1, rand) & (rand != pos[:, None]) & (rand != partner[:, None])
    return cand, valid


def _ce_first(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with column 0 as the target, invalid candidates masked out."""
    scores = scores.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long))


def _pairs_with_partners(feats: Features, rows: torch.Tensor):
    """Images and texts of a batch: the positives, then each hard negative pair where the data has one.

    Returns classes for both sides (equal class = a match) and, for every item,
    the index of its partner on its own side (-1 when none): I_i <-> I'_i, T_i <-> T'_i.
    """
    b = rows.numel()
    both = feats.has_neg_image[rows] & feats.has_neg_caption[rows]
    if feats.neg_images is None or feats.neg_captions is None:
        both = torch.zeros_like(both)
    neg = rows[both]
    k = neg.numel()
    cls = torch.cat([feats.caption_class[rows], -1 - torch.arange(k)])  # negatives: unique classes
    partner = torch.full((b + k,), -1)
    pos_with = torch.arange(b)[both]
    partner[pos_with] = b + torch.arange(k)
    partner[b + torch.arange(k)] = pos_with
    return neg, cls, partner


def _with_negatives(pos: torch.Tensor, negative: torch.Tensor | None, rows: torch.Tensor, neg: torch.Tensor,
                    width: int | None = None) -> torch.Tensor:
    """The batch's positives, then its hard negatives, cut or zero-padded to one length along axis 1
    (``width``, or the longest of the two)."""
    parts = [pos[rows]] + ([negative[neg]] if neg.numel() else [])
    width = width if width is not None else max(p.shape[1] for p in parts)
    return torch.cat([_fit_len(p, width) for p in parts])


def _dcsm_loss(dcsm, feats: Features, rows: torch.Tensor, config: HeadsTrainConfig,
               gen: torch.Generator) -> torch.Tensor:
    L = config.dcsm_text_length
    neg, cls, partner = _pairs_with_partners(feats, rows)
    img = _with_negatives(feats.images, feats.neg_images, rows, neg).float()
    txt = _with_negatives(feats.captions, feats.neg_captions, rows, neg, L).float()
    mask = _with_negatives(feats.caption_mask, feats.neg_caption_mask, rows, neg, L)
    func = _with_negatives(feats.caption_functional, feats.neg_caption_functional, rows, neg, L)
    n = cls.numel()
    same = cls[:, None] == cls[None, :]
    idx = torch.arange(n)
    more, more_valid = None, None
    if feats.more_captions is not None:
        # Texts n.. are the positives' other hard negatives, X per positive.
        x = feats.more_captions.shape[1]
        txt = torch.cat([txt, _fit_len(feats.more_captions[rows].flatten(0, 1), L).float()])
        mask = torch.cat([mask, _fit_len(feats.more_caption_mask[rows].flatten(0, 1), L)])
        func = torch.cat([func, _fit_len(feats.more_caption_functional[rows].flatten(0, 1), L)])
        more = torch.zeros(n, x, dtype=torch.long)
        more_valid = torch.zeros(n, x, dtype=torch.bool)
        b = rows.numel()
        more[:b] = n + torch.arange(b * x).view(b, x)
        more_valid[:b] = feats.has_more_caption[rows]
    # Item i's positive on the other side is item i (images and texts are built in the same order).
    loss = 0.0
    for anchor_is_image in (True, False):
        cand, valid = _candidates(idx, partner, n, same, config.random_negatives, gen)
        if anchor_is_image and more is not None:
            cand, valid = torch.cat([cand, more], 1), torch.cat([valid, more_valid], 1)
        a = idx[:, None].expand_as(cand).reshape(-1)
        c = cand.reshape(-1)
        i_idx, t_idx = (a, c) if anchor_is_image else (c, a)
        scores = dcsm(img[i_idx], txt[t_idx], mask[t_idx], func[t_idx]).view(n, -1)
        loss = loss + _ce_first(scores, valid)
    return loss / 2


# -- MMAE + GI-ITM ------------------------------------------------------------------------------

def _entity_loss(entity, feats: Features, rows: torch.Tensor, config: HeadsTrainConfig,
                 gen: torch.Generator) -> torch.Tensor:
    neg, cls, partner = _pairs_with_partners(feats, rows)
    img = _with_negatives(feats.images, feats.neg_images, rows, neg).float()
    cap = _with_negatives(feats.captions, feats.neg_captions, rows, neg)
    cmask = _with_negatives(feats.caption_mask, feats.neg_caption_mask, rows, neg)
    exp = _with_negatives(feats.explanations, feats.neg_explanations, rows, neg)
    emask = _with_negatives(feats.explanation_mask, feats.neg_explanation_mask, rows, neg)
    cap, exp = cap.float(), exp.float()
    width = int(cmask.sum(1).max())
    cap, cmask = cap[:, :width], cmask[:, :width]
    n = cls.numel()
    same = cls[:, None] == cls[None, :]
    idx = torch.arange(n)
    contrastive, itm = 0.0, 0.0
    for anchor_is_image in (True, False):
        cand, valid = _candidates(idx, partner, n, same, config.random_negatives, gen)
        a = idx[:, None].expand_as(cand).reshape(-1)
        c = cand.reshape(-1)
        i_idx, t_idx = (a, c) if anchor_is_image else (c, a)
        out = entity.experts(img, cap, cmask, exp, emask, pairs=(i_idx, t_idx))
        sim = (out.image_star * out.text_star).sum(-1).view(n, -1) / config.entity_temperature
        contrastive = contrastive + _ce_first(sim, valid)
        # ITM on the positive, the hard partner and the most confusable random candidate.
        logits = entity.matcher(out).view(n, -1, 2)
        with torch.no_grad():
            rand_sim = sim[:, 2:].masked_fill(~valid[:, 2:], float("-inf"))
            hardest = 2 + rand_sim.argmax(1)
            has_rand = valid[:, 2:].any(1)
        picks = [logits[idx, 0], logits[idx[valid[:, 1]], 1], logits[idx[has_rand], hardest[has_rand]]]
        labels = [torch.ones(n), torch.zeros(int(valid[:, 1].sum())), torch.zeros(int(has_rand.sum()))]
        itm = itm + F.cross_entropy(torch.cat(picks), torch.cat(labels).long())
    return (contrastive + config.itm_weight * itm) / 2


# -- name-swapped copies ---------------------------------------------------------------------------

def anonymised_copies(records: Sequence[Record], seed: int) -> tuple[list[Record], set[int]]:
    """Entity records again, every name swapped for a fresh invented one, consistently
    within the record (caption, explanation, negatives and their explanations);
    and the positions of the records copied."""
    rng = np.random.default_rng(seed + 31)
    out, copied = [], set()
    for i, r in enumerate(records):
        if not r.explanation or not NAME_PATTERN.search(r.caption):
            continue
        copied.add(i)
        names: dict[str, str] = {}

        def swap(text: str | None) -> str | None:
            return None if text is None else rename_entities(text, names, rng)

        extra = dict(r.extra)
        if extra.get("negative_explanations"):
            extra["negative_explanations"] = [swap(e) for e in extra["negative_explanations"]]
        out.append(dataclasses.replace(r, caption=swap(r.caption), explanation=swap(r.explanation),
                                       negative_captions=tuple(swap(n) for n in r.negative_captions), extra=extra))
    return out, copied


# -- features ---------------------------------------------------------------------------------

@torch.no_grad()
def compute_features(records: Sequence[Record], clip, tokenizer: ClipTokenizer, image_config: ImageConfig,
                     functional_words: Sequence[str], *, batch: int = 256, progress: bool = True) -> Features:
    image_tower, text_tower = ImageTower(clip).eval(), TextTower(clip).eval()
    # Images and texts encoded, counted as they go: every record's image and caption and
    # explanation, and its negatives where it has them.
    n = len(records)
    more = min(_MORE_NEGATIVES, max((len(r.negative_captions) - 1 for r in records), default=0))
    total = n * (3 + more) + sum(r.negative_image is not None for r in records) + \
        2 * n * any(r.negative_captions for r in records)
    bar = Progress(total, enabled=progress, desc="tower features", unit="items")

    def images(paths):
        pixels = _encode_images(paths, image_config)
        out = []
        for i in range(0, len(paths), batch):
            out.append(image_tower(pixels[i:i + batch].float())[1].half())
            bar.update(len(out[-1]))
        return torch.cat(out)

    def texts(items):
        tok = tokenizer(items, functional_words=functional_words)
        ids, mask = torch.from_numpy(tok.input_ids), torch.from_numpy(tok.attention_mask)
        out = []
        for i in range(0, len(items), batch):
            out.append(text_tower(ids[i:i + batch], mask[i:i + batch])[1].half())
            bar.update(len(out[-1]))
        return torch.cat(out), mask, torch.from_numpy(tok.functional_ids)

    t0 = time.perf_counter()
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
    feats = Features(img, cap, cmask, cfunc, exp, emask, torch.from_numpy(caption_class), neg_img, has_ni,
                     ncap, ncmask, ncfunc, nexp, nemask, has_nc)
    x = min(_MORE_NEGATIVES, max((len(r.negative_captions) - 1 for r in records), default=0))
    if x > 0:
        more = [[r.negative_captions[j] if j < len(r.negative_captions) else r.caption for j in range(1, x + 1)]
                for r in records]
        tokens, mask, func = texts([c for row in more for c in row])
        feats.more_captions = tokens.view(n, x, *tokens.shape[1:])
        feats.more_caption_mask = mask.view(n, x, -1)
        feats.more_caption_functional = func.view(n, x, -1)
        feats.has_more_caption = torch.tensor([[j < len(r.negative_captions) for j in range(1, x + 1)]
                                               for r in records])
    bar.close()
    if progress:
        print(f"tower features for {n} records in {time.perf_counter() - t0:.1f} s")
    return feats


_MORE_NEGATIVES = 3  # hard-negative captions per record beyond the first, at most


def _fit_len(x: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad axis 1 to ``length`` (the text tower is causal: cutting is exact)."""
    x = x[:, :length]
    if x.shape[1] < length:
        pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
        x = F.pad(x, pad)
    return x
