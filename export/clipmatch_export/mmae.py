"""Multimodal Attentive Experts (MMAE) and the gated image-text matcher (GI-ITM).

From EntityCLIP (arXiv 2410.17810), with the reference's quirks fixed:
padding masks in every attention, each text read at its own EOT, and the
experts kept for inference instead of discarded after training.

Each expert is one pre-LN block, x <- x + Attn(LN(x), LN(y)); x <- x + MLP(LN(x)),
with one attention head of width d:
- vision experts: self-attention over image tokens, read at token 0;
- text experts: self-attention over caption tokens, read at the caption's EOT;
- explanation experts: cross-attention from image or caption tokens to the
  explanation's tokens; the same weights serve both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipmatch.manifest import HeadsConfig

from .towers import eot_positions, gather_positions


class Attention(nn.Module):
    """Single-head attention; queries and keys may come from different sequences."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        d = config.embed_dim
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.scale = d ** -0.5

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, Q, D) attends over y (B, S, D); y_mask (B, S), 0 = padding
        att = (self.query(x) @ self.key(y).transpose(1, 2)) * self.scale  # (B, Q, S)
        if y_mask is not None:
            # finfo.min, not -inf: an all-padding row stays finite (uniform) instead of NaN.
            att = att.masked_fill(y_mask.unsqueeze(1) == 0, torch.finfo(att.dtype).min)
        att = att.softmax(dim=-1)
        return self.out(att @ self.value(y))  # (B, Q, D)


class MLP(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        d = config.embed_dim
        self.fc = nn.Linear(d, config.mlp_ratio * d)
        self.proj = nn.Linear(config.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Expert(nn.Module):
    """One pre-LN attention block, read out at a single position per row."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        d, eps = config.embed_dim, config.layer_norm_eps
        self.ln_attn = nn.LayerNorm(d, eps=eps)  # one LN for queries and context, as in the spec
        self.attn = Attention(config)
        self.ln_mlp = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, at: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, S, D) query sequence, at (B,) read-out position, y (B, T, D) context.
        # With a single block the read-out position depends only on its own
        # query row, so only that row is computed: O(T) per expert, not O(S*T).
        h = gather_positions(x, at).unsqueeze(1)  # (B, 1, D)
        h = h + self.attn(self.ln_attn(h), self.ln_attn(y), y_mask)
        h = h + self.mlp(self.ln_mlp(h))
        return h.squeeze(1)  # (B, D)


@dataclass
class ExpertOutputs:
    """What the experts produce for a batch of (image, text, explanation) rows.

    image_cls, text_cls: (B, D) the towers' pooled tokens (CLS, EOT).
    image_experts, text_experts: (B, 2K, D) each side's K own-modality experts
        followed by its K explanation experts.
    image_star, text_star: (B, D) gated, L2-normalised V* and T*.
    """

    image_cls: torch.Tensor
    text_cls: torch.Tensor
    image_experts: torch.Tensor
    text_experts: torch.Tensor
    image_star: torch.Tensor
    text_star: torch.Tensor


class MultimodalExperts(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        k, d = config.num_experts, config.embed_dim
        self.vision = nn.ModuleList(Expert(config) for _ in range(k))
        self.text = nn.ModuleList(Expert(config) for _ in range(k))
        self.explanation = nn.ModuleList(Expert(config) for _ in range(k))
        self.image_gate = nn.Linear(d, 2 * k)
        self.text_gate = nn.Linear(d, 2 * k)

    def forward(
        self,
        image_tokens: torch.Tensor,  # (B, P, D)
        text_tokens: torch.Tensor,  # (B, T, D)
        text_mask: torch.Tensor,  # (B, T)
        explanation_tokens: torch.Tensor,  # (B, E, D), each text's own explanation
        explanation_mask: torch.Tensor,  # (B, E)
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ExpertOutputs:
        """Row b pairs image b with text b. With ``pairs = (image_index, text_index)``,
        R pairs of NI images x NT texts are scored instead: experts that read one side
        only (vision, text, and explanation experts on the text side) run once per
        image or text, not once per pair. Same values, a fraction of the work (training).
        """
        cls = torch.zeros(image_tokens.size(0), dtype=torch.long, device=image_tokens.device)
        eot = eot_positions(text_mask)
        image_cls = image_tokens[:, 0]  # (NI, D)
        text_cls = gather_positions(text_tokens, eot)  # (NT, D)

        vision = torch.stack([e(image_tokens, cls, image_tokens, None) for e in self.vision], dim=1)  # (NI, K, D)
        text = torch.stack([e(text_tokens, eot, text_tokens, text_mask) for e in self.text]
                           + [e(text_tokens, eot, explanation_tokens, explanation_mask) for e in self.explanation],
                           dim=1)  # (NT, 2K, D)
        if pairs is not None:
            ii, jj = pairs
            image_cls, vision, text_cls, text = image_cls[ii], vision[ii], text_cls[jj], text[jj]
            explanation_tokens, explanation_mask = explanation_tokens[jj], explanation_mask[jj]
            image_tokens, cls = image_cls.unsqueeze(1), torch.zeros_like(ii)  # only the CLS row is read
        # The image side's explanation experts read both the image and the text's explanation.
        image_explained = torch.stack(
            [e(image_tokens, cls, explanation_tokens, explanation_mask) for e in self.explanation], dim=1)
        image_experts = torch.cat([vision, image_explained], dim=1)  # (B, 2K, D)

        image_star = _gated_sum(self.image_gate(image_cls), image_experts)
        text_star = _gated_sum(self.text_gate(text_cls), text)
        return ExpertOutputs(image_cls, text_cls, image_experts, text,
                             F.normalize(image_star, dim=-1), F.normalize(text_star, dim=-1))


def _gated_sum(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    # gate_logits (B, N), experts (B, N, D) -> (B, D)
    return (gate_logits.softmax(dim=-1).unsqueeze(-1) * experts).sum(dim=1)


class GatedMatcher(nn.Module):
    """GI-ITM: mixes all 4K expert outputs by softmax(W [V_cls; T_cls]) and says match / no match."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        k, d = config.num_experts, config.embed_dim
        self.gate = nn.Linear(2 * d, 4 * k)
        self.head = nn.Linear(d, 2)

    def forward(self, experts: ExpertOutputs) -> torch.Tensor:
        everything = torch.cat([experts.image_experts, experts.text_experts], dim=1)  # (B, 4K, D)
        fused = _gated_sum(self.gate(torch.cat([experts.image_cls, experts.text_cls], dim=-1)), everything)
        return self.head(fused)  # (B, 2) logits: [no match, match]


class EntityHeads(nn.Module):
    """The served entity path: (image, text, explanation) rows -> match_prob, entity_score (B,)."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.experts = MultimodalExperts(config)
        self.matcher = GatedMatcher(config)

    def forward(self, image_tokens, text_tokens, text_mask, explanation_tokens, explanation_mask):
        out = self.experts(image_tokens, text_tokens, text_mask, explanation_tokens, explanation_mask)
        match_prob = self.matcher(out).softmax(dim=-1)[:, 1]
        entity_score = (out.image_star * out.text_star).sum(dim=-1)
        return match_prob, entity_score
