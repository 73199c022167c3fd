"""Contrastive training of the CLIP towers: from scratch, or fine-tuning a checkpoint folder.

The towers trained here are the ones served (``ImageTower``, ``TextTower``:
pooled = normalised CLS / each text's own EOT), tokenisation and image
preprocessing are the SDK's, so what is trained is exactly what is exported.
The result is a Hugging Face CLIP folder that loads like any real checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from clipmatch.errors import DatasetError
from clipmatch.inputs.preprocess import ImageConfig, preprocess_images
from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch.manifest import sha256_json
from clipmatch_export.checkpoint import inspect_checkpoint
from clipmatch_export.models.clip_loader import load_clip
from clipmatch_export.models.towers import ImageTower, TextTower
from clipmatch_export.tokenizer_build import train_clip_tokenizer
from clipmatch_export.train.configs import ClipTrainConfig
from clipmatch_export.train.data import Record
from clipmatch_export.train.localise import localisation_loss, word_patch_targets
from clipmatch_export.train.loop import Progress, cosine_lr, deterministic, make_optimizer, seeded
from clipmatch_export.train.state import clear_state, load_state, save_state


def train_clip(records: Sequence[Record], out_dir: str | Path, config: ClipTrainConfig = ClipTrainConfig(), *,
               init: str | Path | None = None, skip_bad: bool = False, progress: bool = True,
               stop_after: int | None = None) -> Path | None:
    """Train and write a Hugging Face CLIP folder to ``out_dir``; resumes an interrupted run there.

    ``stop_after`` trains at most that many epochs in this call and leaves the
    state to resume (for time-sliced or preemptible jobs); it then returns None.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[tuple[int, str]] = [(i, r.caption) for i, r in enumerate(records)]
    if config.explanations_as_captions:
        pairs += [(i, r.explanation) for i, r in enumerate(records) if r.explanation]

    if init is None:
        train_clip_tokenizer(sorted(set(t for _, t in pairs)), out, vocab_size=config.vocab_size,
                             context_length=config.context_length)
        tokenizer = ClipTokenizer.from_dir(out)
        image_config = _write_preprocessor(out, config.image_size)
        model = _fresh_model(config, tokenizer)
    else:
        files = inspect_checkpoint(init)
        for f in files.tokenizer_files + (files.preprocessor_config,):
            shutil.copyfile(f, out / f.name)
        tokenizer = ClipTokenizer.from_dir(out)
        image_config = ImageConfig.from_preprocessor_config(out / "preprocessor_config.json")
        model, _ = load_clip(init)

    texts = [t for _, t in pairs]
    tokens = tokenizer(texts)
    too_long = np.flatnonzero(tokens.truncated)
    if too_long.size:
        lines = sorted({records[pairs[i][0]].line for i in too_long})
        if not skip_bad:
            raise DatasetError(f"{too_long.size} texts are longer than the {tokenizer.context_length}-token "
                               f"context, first on lines {lines[:10]} (use skip_bad to drop them)")
        keep = np.setdiff1d(np.arange(len(pairs)), too_long)
        pairs, texts = [pairs[i] for i in keep], [texts[i] for i in keep]
        tokens = tokenizer(texts)
        print(f"skipped {too_long.size} over-long texts (lines {lines[:10]}...)")

    pixels = _encode_images([r.image for r in records], image_config)  # (N, 3, S, S) fp16
    image_index = torch.tensor([i for i, _ in pairs])
    ids, mask = torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)
    # Texts repeat ("a red circle" describes many images): identical texts are
    # positives for each other, not negatives, in the contrastive targets.
    _, text_class = np.unique(np.asarray(texts), return_inverse=True)
    text_class = torch.from_numpy(text_class)
    vision = model.config.vision_config
    targets = None
    if config.localise_weight and any(r.extra.get("scene") for r in records):
        targets = word_patch_targets(texts, [records[i].extra.get("scene") for i, _ in pairs], tokenizer,
                                     ids.shape[1], vision.image_size, vision.patch_size)

    image_tower, text_tower = ImageTower(model), TextTower(model)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    run = {"kind": "clip", "config": asdict(config), "init": str(init) if init else None,
           "data": sha256_json(sorted(texts) + [str(r.image) for r in records])}
    meta = load_state(out, model, optimizer, {"run": run})
    start = meta["epoch"] if meta else 0
    if meta:
        print(f"resuming from epoch {start} of {config.epochs}")

    model.train()
    t0 = time.perf_counter()
    bar = Progress(total, initial=start * steps_per_epoch, enabled=progress, desc="clip", unit="steps")
    end = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
    with deterministic():  # the same seed, the same weights
        for epoch in range(start, end):
            order = torch.randperm(len(pairs), generator=seeded(config.seed, epoch))
            for b in range(steps_per_epoch):
                rows = order[b * config.batch_size:(b + 1) * config.batch_size]
                step = epoch * steps_per_epoch + b
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(step, total, config.lr, config.warmup_steps)
                img, img_tokens = image_tower(pixels[image_index[rows]].float())
                width = int(mask[rows].sum(1).max())
                txt, txt_tokens = text_tower(ids[rows, :width], mask[rows, :width])
                loss = contrastive_loss(img, txt, model.logit_scale, text_class[rows], image_index[rows])
                if config.token_loss_weight:
                    # On a sub-batch: the (B, B, P, T) map grows with B squared, and a
                    # smaller batch is enough to shape the token space.
                    sub = slice(0, config.token_loss_batch)
                    loss = loss + config.token_loss_weight * token_loss(
                        img_tokens[sub], txt_tokens[sub], mask[rows, :width][sub], model.logit_scale,
                        text_class[rows][sub], image_index[rows][sub])
                if targets is not None:
                    loss = loss + config.localise_weight * localisation_loss(
                        img_tokens, txt_tokens, targets[rows, :width], model.logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                bar.update(loss=loss.item())
            save_state(out, model, optimizer, {"run": run, "epoch": epoch + 1})
    bar.close()
    if end < config.epochs:
        return None

    model.eval().save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps({
        "stage": "clip", "config": asdict(config), "init": str(init) if init else None, "pairs": len(pairs),
        "images": len(records), "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    clear_state(out)
    return out


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     text_class: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets: same text or same image counts as a match."""
    return _multi_positive_ce(logit_scale.exp() * img @ txt.T, text_class, image_id)


def _multi_positive_ce(logits: torch.Tensor, text_class: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows and over columns of (B, B) logits, spread evenly over every positive."""
    targets = ((text_class[:, None] == text_class[None, :]) | (image_id[:, None] == image_id[None, :])).float()
    loss_i = -(F.log_softmax(logits, dim=1) * targets / targets.sum(1, keepdim=True)).sum(1).mean()
    loss_t = -(F.log_softmax(logits.T, dim=1) * targets.T / targets.T.sum(1, keepdim=True)).sum(1).mean()
    return (loss_i + loss_t) / 2


def token_loss(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor, logit_scale: torch.Tensor,
               text_class: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """Token-level (FILIP-style) contrastive term.

    The pooled loss never trains the last layer's patch outputs nor the
    projected text tokens, yet DCSM and the experts read exactly those. Here a
    pair's similarity is the mean over its words of the best-matching patch
    (and over patches of the best-matching word), so patches and words are
    pulled into one space and the dense map carries local evidence.
    """
    s = torch.einsum("ipd,jtd->ijpt", img_tokens, txt_tokens)  # (B, B, P, T) cosines
    real = txt_mask.bool()[None, :, None, :]  # (1, B, 1, T)
    words = s.masked_fill(~real, -2.0).amax(dim=2)  # (B, B, T) best patch per word
    t2i = (words * txt_mask[None]).sum(-1) / txt_mask.sum(-1)[None]  # (B, B)
    i2t = s.masked_fill(~real, -2.0).amax(dim=3).mean(-1)  # (B, B) best word per patch
    scale = logit_scale.exp()
    return (_multi_positive_ce(scale * t2i, text_class, image_id) + _multi_positive_ce(scale * i2t, text_class, image_id)) / 2


def _fresh_model(config: ClipTrainConfig, tokenizer: ClipTokenizer) -> CLIPModel:
    sizes = dict(hidden_size=config.hidden_size, intermediate_size=4 * config.hidden_size,
                 num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=config.context_length,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                         **sizes),
        vision_config=dict(image_size=config.image_size, patch_size=config.patch_size, **sizes),
        projection_dim=config.projection_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return CLIPModel(clip_config)


def _write_preprocessor(out: Path, size: int) -> ImageConfig:
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(out))
    return ImageConfig.from_preprocessor_config(out / "preprocessor_config.json")


def _encode_images(paths: Sequence[Path], config: ImageConfig, chunk: int = 512) -> torch.Tensor:
    """Every image preprocessed once, kept as fp16 (half the memory; cast back per batch)."""
    parts = []
    for start in range(0, len(paths), chunk):
        parts.append(torch.from_numpy(
            preprocess_images([str(p) for p in paths[start:start + chunk]], config, start_index=start)
        ).half())
    return torch.cat(parts)
