"""The rescoring heads as one module, saved as safetensors plus a JSON manifest."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from clipmatch.errors import IncompatibleModelError
from clipmatch.manifest import HEADS_WEIGHTS, HeadsConfig, HeadsManifest, sha256_file
from clipmatch_export.models.dcsm import DenseCosineScorer
from clipmatch_export.models.mmae import EntityHeads
from clipmatch_export.versions import versions


class ClipmatchHeads(nn.Module):
    """EntityCLIP heads (MMAE + GI-ITM) and the DCSM scorer for one CLIP model."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.entity = EntityHeads(config)
        self.dcsm = DenseCosineScorer(config)


def heads_config_for(clip_config, **overrides) -> HeadsConfig:
    """The heads' sizes that fit a transformers CLIPConfig."""
    vision = clip_config.vision_config
    grid = vision.image_size // vision.patch_size
    return HeadsConfig(embed_dim=clip_config.projection_dim, num_image_tokens=grid * grid + 1, **overrides)


def build_heads(config: HeadsConfig, seed: int = 0) -> ClipmatchHeads:
    """Freshly initialised heads; the same seed gives the same weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ClipmatchHeads(config).eval()
    finally:
        torch.random.set_rng_state(gen_state)


def save_heads(heads: ClipmatchHeads, model_dir: str | Path) -> HeadsManifest:
    model_dir = Path(model_dir)
    weights = model_dir / HEADS_WEIGHTS
    tmp = weights.with_suffix(".tmp")
    state = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    manifest = HeadsManifest(heads.config, sha256_file(weights), versions())
    manifest.write(model_dir)
    return manifest


def load_heads(model_dir: str | Path) -> tuple[ClipmatchHeads, HeadsManifest]:
    model_dir = Path(model_dir)
    manifest = HeadsManifest.read(model_dir)
    weights = model_dir / HEADS_WEIGHTS
    if manifest.weights_sha256 and sha256_file(weights) != manifest.weights_sha256:
        raise IncompatibleModelError(
            f"{weights} does not match the sha256 recorded in its manifest; the files come from different saves"
        )
    heads = ClipmatchHeads(manifest.config)
    state = load_file(str(weights))
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:5]
        unexpected = sorted(set(found) - set(expected))[:5]
        resized = [f"{k} {found[k]} (config wants {expected[k]})"
                   for k in sorted(set(found) & set(expected)) if found[k] != expected[k]][:5]
        raise IncompatibleModelError(
            f"{weights} does not fit the heads its manifest describes: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {resized}"
        )
    heads.load_state_dict(state)
    return heads.eval(), manifest
