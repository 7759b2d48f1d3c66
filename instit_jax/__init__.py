"""instit-jax: Inst-IT on LLaVA-NeXT, in JAX."""
