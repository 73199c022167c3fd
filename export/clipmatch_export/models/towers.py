"""The CLIP towers as clipmatch serves them: pooled embedding plus every token.

Both towers project every final-layer token into the joint space and
L2-normalise it, so one tower call feeds cosine retrieval (pooled) and the
rescoring heads (tokens). The pooled embedding is the token CLIP itself pools
(CLS for images, each text's own EOT for texts), so pooled == tokens[pool].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPModel


class ImageTower(nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, D), image_tokens (B, P, D)."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.vision = clip.vision_model
        self.projection = clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, P, H)
        # CLIP applies post_layernorm to CLS only; applying it to every token
        # puts the patches in the same space as the pooled embedding (DCSM spec).
        tokens = self.projection(self.vision.post_layernorm(hidden))  # (B, P, D)
        tokens = F.normalize(tokens, dim=-1)
        return tokens[:, 0], tokens


class TextTower(nn.Module):
    """input_ids, attention_mask (B, T) -> text_embeds (B, D), text_tokens (B, T, D).

    Texts are right-padded and end with EOT, so each text's EOT sits at
    ``attention_mask.sum(-1) - 1``; reading it there (not at the argmax of the
    ids, not at another text's index) works for any vocabulary layout.
    Padding positions come out as exact zeros.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.text = clip.text_model
        self.projection = clip.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        tokens = F.normalize(self.projection(hidden), dim=-1)  # (B, T, D)
        tokens = tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)
        return gather_positions(tokens, eot_positions(attention_mask)), tokens


def eot_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded mask -> (B,) index of each row's last real token."""
    return (mask.sum(-1) - 1).clamp(min=0).long()


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), index (B,) -> (B, D): row b's vector at position index[b]."""
    index = index.view(-1, 1, 1).expand(-1, 1, x.size(-1))
    return x.gather(1, index).squeeze(1)
