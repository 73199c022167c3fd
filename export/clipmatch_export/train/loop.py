"""Small pieces every training stage shares: optimiser, schedule, seeding, progress."""
from __future__ import annotations

import math
import sys
import time

import torch


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


class Progress:
    """A one-line progress bar with rate and ETA, on stderr."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = ""):
        self.total, self.done, self.enabled, self.desc = total, initial, enabled, desc
        self.start, self.first = time.perf_counter(), initial
        self.last_print = 0.0
        self.loss: float | None = None

    def update(self, n: int = 1, *, loss: float | None = None) -> None:
        self.done += n
        if loss is not None:
            self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        now = time.perf_counter()
        if self.enabled and (now - self.last_print > 0.5 or self.done == self.total):
            self.last_print = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            loss_text = f" loss {self.loss:.4f}" if self.loss is not None else ""
            sys.stderr.write(f"\r{self.desc} {self.done}/{self.total} {rate:.1f} it/s eta {eta:.0f}s{loss_text}  ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
