"""Checkpoint conversion between Hugging Face, original LLaVA-NeXT and Flax."""
