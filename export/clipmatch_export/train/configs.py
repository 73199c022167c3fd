"""Training configurations, importable without torch (the CLI builds its flags from them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClipTrainConfig:
    """A small CLIP for 64x64 scenes; ignored sizes when fine-tuning a checkpoint."""

    image_size: int = 64  # the synthetic world's canvas
    patch_size: int = 8  # 8x8 patches: P = 65 tokens, fine enough for left/right/above/below
    # 96 wide, 3 deep: ~0.27 s per 128-pair step on 2 cores, so the whole
    # default model trains well inside the 20-minute budget.
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    projection_dim: int = 96
    context_length: int = 32  # captions and explanations here stay under ~25 tokens
    vocab_size: int = 1000
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3  # from scratch; fine-tuning a real CLIP wants ~1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    explanations_as_captions: bool = True  # (image, explanation) pairs teach the look words
    token_loss_weight: float = 1.0  # FILIP-style word-patch term: trains the tokens the heads read
    token_loss_batch: int = 32  # rows of each batch the token term sees (its cost grows with rows squared)
    # Word-to-object-patch term, for data whose records carry a ``scene`` (the synthetic world):
    # it makes the dense map local, which DCSM and the experts read. No scenes, no term.
    localise_weight: float = 1.0


@dataclass(frozen=True)
class HeadsTrainConfig:
    num_experts: int = 2  # K per kind; 2 keeps the default model small (the reference uses 4)
    dcsm_text_length: int = 16
    dcsm_epochs: int = 8
    entity_epochs: int = 3
    batch_size: int = 32
    random_negatives: int = 4  # in-batch negatives per anchor, besides its hard partner
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    entity_temperature: float = 0.05
    itm_weight: float = 1.0
    # What the entity stage does with entity names: "anonymise" trains every
    # entity record under fresh invented names (caption, explanation and
    # negatives alike), so a name carries nothing and the heads must match
    # through the explanation, all they have for an entity never seen named;
    # "both" adds those copies to the named records; "keep" uses names as given.
    entity_names: str = "both"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.entity_names not in ("anonymise", "both", "keep"):
            raise ValueError(f"entity_names must be 'anonymise', 'both' or 'keep', got {self.entity_names!r}")
