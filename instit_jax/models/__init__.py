"""Flax NNX models: vision towers, language models and the LLaVA-NeXT glue."""
