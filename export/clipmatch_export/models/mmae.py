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
from clipmatch_export.models.towers import eot_positions, gather_positions


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

    def context(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context y (B, S, D): computed once, read by any number of queries."""
        return self.key(y), self.value(y)

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               y_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, Q, D) attends over keys/values (B, S, D); y_mask (B, S), 0 = padding. The
        # context may have batch 1 for B queries (one explanation, K candidates): it broadcasts.
        att = (self.query(x) @ keys.transpose(1, 2)) * self.scale  # (B, Q, S)
        if y_mask is not None:
            # finfo.min, not -inf: an all-padding row stays finite (uniform) instead of NaN.
            att = att.masked_fill(y_mask.unsqueeze(1) == 0, torch.finfo(att.dtype).min)
        att = att.softmax(dim=-1)
        return self.out(att @ values)  # (B, Q, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        return self.attend(x, *self.context(y), y_mask)


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

    def context(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, T, D) each of the context y (B, T, D)."""
        return self.attn.context(self.ln_attn(y))

    def read(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             y_mask: torch.Tensor | None) -> torch.Tensor:
        # h (B, 1, D): the read-out row; keys/values from ``context``.
        h = h + self.attn.attend(self.ln_attn(h), keys, values, y_mask)
        return h + self.mlp(self.ln_mlp(h))  # (B, 1, D)

    def forward(self, x: torch.Tensor, at: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, S, D) query sequence, at (B,) read-out position, y (B, T, D) context.
        # With a single block the read-out position depends only on its own
        # query row, so only that row is computed: O(T) per expert, not O(S*T).
        h = gather_positions(x, at).unsqueeze(1)  # (B, 1, D)
        return self.read(h, *self.context(y), y_mask).squeeze(1)  # (B, D)


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


# -- Served in three parts, split by what each reads -----------------------------------------
#
# The unsplit module takes one (image, text, explanation) row per candidate, so serving it
# recomputes the text side and the explanation's keys and values K times per query, and the
# vision experts (which read the image alone) once per query for every image. Split:
# - image part, per image, once (at indexing): the K vision experts;
# - query part, per query, once: T*, the text side's 2K experts, the text half of GI-ITM's
#   gate, and each explanation expert's keys and values over the explanation;
# - pair part, per candidate: the image side's explanation experts (one query row each,
#   reading the query part's keys and values), V*, the entity score and GI-ITM.
# Same weights, same arithmetic: the parts compose to EntityHeads (tests/export/models/test_models.py).


class EntityImage(nn.Module):
    """image_tokens (N, P, D) -> vision_experts (N, K, D)."""

    def __init__(self, heads: EntityHeads):
        super().__init__()
        self.experts = heads.experts

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        cls = torch.zeros(image_tokens.size(0), dtype=torch.long, device=image_tokens.device)
        return torch.stack([e(image_tokens, cls, image_tokens, None) for e in self.experts.vision], dim=1)


class EntityQuery(nn.Module):
    """(text, explanation) rows -> text_star (B, D), text_experts (B, 2, K, D), text_gate (B, 4, K),
    explanation_keys, explanation_values (B, K, E, D)."""

    def __init__(self, heads: EntityHeads):
        super().__init__()
        self.experts, self.matcher = heads.experts, heads.matcher
        self.d = heads.matcher.head.in_features

    def forward(self, text_tokens, text_mask, explanation_tokens, explanation_mask):
        e, k = self.experts, len(self.experts.text)
        eot = eot_positions(text_mask)
        text_cls = gather_positions(text_tokens, eot)  # (B, D)
        context = [x.context(explanation_tokens) for x in e.explanation]  # K x ((B, E, D), (B, E, D))
        eot_row = text_cls.unsqueeze(1)  # (B, 1, D)
        text = torch.stack([x(text_tokens, eot, text_tokens, text_mask) for x in e.text]
                           + [x.read(eot_row, keys, values, explanation_mask).squeeze(1)
                              for x, (keys, values) in zip(e.explanation, context)], dim=1)  # (B, 2K, D)
        text_star = F.normalize(_gated_sum(e.text_gate(text_cls), text), dim=-1)
        gate = self.matcher.gate  # over [V_cls; T_cls]: the text half and the bias are the query's
        text_gate = F.linear(text_cls, gate.weight[:, self.d:], gate.bias)  # (B, 4K)
        keys = torch.stack([kv[0] for kv in context], dim=1)  # (B, K, E, D)
        values = torch.stack([kv[1] for kv in context], dim=1)
        return text_star, text.unflatten(1, (2, k)), text_gate.unflatten(1, (4, k)), keys, values


class EntityPair(nn.Module):
    """N candidates of one query -> match_prob (N,), entity_score (N,). The query's tensors have batch 1."""

    def __init__(self, heads: EntityHeads):
        super().__init__()
        self.experts, self.matcher = heads.experts, heads.matcher
        self.d = heads.matcher.head.in_features

    def forward(self, image_cls, vision_experts, text_star, text_experts, text_gate, explanation_keys,
                explanation_values, explanation_mask):
        e = self.experts
        row = image_cls.unsqueeze(1)  # (N, 1, D): the image side's experts read the CLS row only
        explained = torch.cat([x.read(row, explanation_keys[:, j], explanation_values[:, j], explanation_mask)
                               for j, x in enumerate(e.explanation)], dim=1)  # (N, K, D)
        image_experts = torch.cat([vision_experts, explained], dim=1)  # (N, 2K, D)
        image_star = F.normalize(_gated_sum(e.image_gate(image_cls), image_experts), dim=-1)
        entity_score = (image_star * text_star).sum(dim=-1)  # (N,)
        everything = torch.cat([image_experts, text_experts.flatten(1, 2).expand(image_cls.size(0), -1, -1)],
                               dim=1)  # (N, 4K, D)
        logits = F.linear(image_cls, self.matcher.gate.weight[:, :self.d]) + text_gate.flatten(1)  # (N, 4K)
        match_prob = self.matcher.head(_gated_sum(logits, everything)).softmax(dim=-1)[:, 1]
        return match_prob, entity_score
