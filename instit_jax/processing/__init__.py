"""Host-side input processing (NumPy/PIL only, never JAX)."""
