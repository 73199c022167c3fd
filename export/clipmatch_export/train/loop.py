"""Small pieces every training stage shares: optimiser, schedule, seeding, progress."""
from __future__ import annotations

import math

import torch

from clipmatch.progress import Progress

__all__ = ["make_optimizer", "cosine_lr", "seeded", "Progress"]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norms, biases, embeddings' scale stay undecayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def seeded(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch): a resumed run shuffles exactly as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)
