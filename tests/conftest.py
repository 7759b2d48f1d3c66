"""Test-wide settings: fp32 parity needs full-precision matmuls; 8 host devices for mesh tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Tests run on CPU; with libtpu installed (for the AOT tests) JAX would otherwise probe for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
