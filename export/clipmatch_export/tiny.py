"""Random CLIP checkpoints in Hugging Face format, built on the spot.

They have every file a real checkpoint has (config, safetensors weights, a
CLIP-style tokenizer, a preprocessor config), so everything that loads a real
CLIP can be exercised on them: a tiny one in seconds, and one of ViT-B/32's
shape for measuring at the size users run (latency does not depend on the
weights).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from clipmatch_export.checkpoint import inspect_checkpoint
from clipmatch_export.models.heads import build_heads, heads_config_for, save_heads
from clipmatch_export.tokenizer_build import default_corpus, train_clip_tokenizer


def build_tiny_clip(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 24,
    vocab_size: int = 1000,
    context_length: int = 77,
) -> Path:
    """Write a random CLIP checkpoint folder and return its path.

    >>> build_tiny_clip("/tmp/tiny-clip")  # doctest: +SKIP
    PosixPath('/tmp/tiny-clip')
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_clip_tokenizer(default_corpus(), out, vocab_size=vocab_size, context_length=context_length)
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    sizes = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                 num_hidden_layers=num_layers, num_attention_heads=num_heads)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=context_length,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **sizes),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **sizes),
        projection_dim=projection_dim,
    )
    _save_random(config, out, seed, image_size)
    return out


def add_random_heads(model_dir: str | Path, *, seed: int = 0, **overrides):
    """Attach freshly initialised heads to a checkpoint folder (untrained: for plumbing and tests)."""
    files = inspect_checkpoint(model_dir)  # a missing or non-CLIP folder is refused before anything is sized
    config = heads_config_for(CLIPConfig.from_dict(files.config), **overrides)
    return save_heads(build_heads(config, seed), model_dir)


def build_vit_b32(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random CLIP of ViT-B/32's shape (``CLIPConfig()`` defaults: 768-wide 12-layer vision at
    224 px in 32 px patches, 512-wide 12-layer text, 512-d joint space)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_clip_tokenizer(default_corpus(), out)
    config = CLIPConfig()
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 0, 1, 1
    _save_random(config, out, seed, 224)
    return out


def _save_random(config: CLIPConfig, out: Path, seed: int, image_size: int) -> None:
    """Weights drawn from ``seed`` (the caller's RNG state is kept), saved with a preprocessor config."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPModel(config).eval()
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(str(out))
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(out))
