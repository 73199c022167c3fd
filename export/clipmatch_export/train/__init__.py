"""Training: a small CLIP from scratch (or fine-tuned), the DCSM scorer and the EntityCLIP heads."""
