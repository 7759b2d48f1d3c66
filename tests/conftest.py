"""Test-wide settings: fp32 parity needs full-precision matmuls; 8 host devices for mesh tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
