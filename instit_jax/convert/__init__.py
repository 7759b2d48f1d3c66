"""Checkpoint conversion between Hugging Face, original LLaVA-NeXT and Flax.

CLI: `python -m instit_jax.convert --help` (instit_jax/convert/cli.py). Library entry points
(imported lazily, so `import instit_jax.convert` stays cheap):

* `save_flax(dir, cfg, arrays)`, `load_flax(dir) -> (cfg, arrays)`, `FlaxCheckpoint(dir)` — orbax_io
* `save_hf(dir, cfg, arrays, aux_dir=...)` — hf_writer
* `open_source(dir, fmt)` — sources;  `convert(src, src_format, dst, dst_format, ...)` — cli
"""

_EXPORTS = {
    "save_flax": "orbax_io", "load_flax": "orbax_io", "FlaxCheckpoint": "orbax_io",
    "save_hf": "hf_writer", "open_source": "sources", "convert": "cli",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
