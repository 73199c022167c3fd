"""Dense Cosine Similarity Maps (DCSM) scorer.

From Kang et al., "Is CLIP ideal? No. Can we fix it? Yes!" (arXiv 2503.08723):
keep the token topology instead of pooling it away, and let a small CNN read
the (image token x text token) cosine map. Fixed relative to the reference:
- the functional-word table is a trained parameter;
- a functional word's column is found at that word's own token positions
  (``functional_ids``, computed by the tokenizer), not by whitespace index;
- each map is normalised with its own statistics, so a pair's score never
  depends on which other pairs share its batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipmatch.manifest import HeadsConfig


class DenseCosineScorer(nn.Module):
    """(image tokens, fixed-length text tokens) pairs -> one unbounded logit each."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        p, l, c = config.num_image_tokens, config.dcsm_text_length, config.dcsm_channels
        self.eps = 1e-6
        # Row j is the learned map column (over image tokens) of functional word j;
        # it lives in normalised-map units, where 0 means "no evidence".
        self.functional_columns = nn.Parameter(0.02 * torch.randn(len(config.functional_words), p))
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(c * p * l, config.dcsm_hidden)
        self.fc2 = nn.Linear(config.dcsm_hidden, 1)

    def dense_map(
        self,
        image_tokens: torch.Tensor,  # (B, P, D) L2-normalised
        text_tokens: torch.Tensor,  # (B, L, D) L2-normalised, zeros at padding
        text_mask: torch.Tensor,  # (B, L) 1 = real token
        functional_ids: torch.Tensor,  # (B, L) 0 = ordinary, j+1 = functional word j
    ) -> torch.Tensor:
        sim = image_tokens @ text_tokens.transpose(1, 2)  # (B, P, L) cosines
        real = (text_mask > 0).unsqueeze(1)  # (B, 1, L)
        functional = (functional_ids > 0).unsqueeze(1)  # (B, 1, L)

        # Per-map z-score over the real, non-functional cells only.
        cells = (real & ~functional).to(sim.dtype).expand_as(sim)  # (B, P, L)
        count = cells.sum(dim=(1, 2)).clamp(min=1.0).view(-1, 1, 1)
        mean = (sim * cells).sum(dim=(1, 2)).view(-1, 1, 1) / count
        var = (((sim - mean) * cells) ** 2).sum(dim=(1, 2)).view(-1, 1, 1) / count
        z = (sim - mean) / torch.sqrt(var + self.eps)

        # Functional words: their column is replaced by the word's learned vector.
        table = F.pad(self.functional_columns, (0, 0, 1, 0))  # (F+1, P), row 0 unused
        learned = F.embedding(functional_ids, table).transpose(1, 2)  # (B, P, L)
        z = torch.where(functional, learned, z)
        return z * real.to(z.dtype)  # padding columns are exact zeros

    def forward(self, image_tokens, text_tokens, text_mask, functional_ids) -> torch.Tensor:
        x = self.dense_map(image_tokens, text_tokens, text_mask, functional_ids).unsqueeze(1)  # (B, 1, P, L)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (B, C, P, L)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x).squeeze(-1)  # (B,)
