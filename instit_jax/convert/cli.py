"""`python -m instit_jax.convert`: HF / original LLaVA-NeXT / Flax checkpoints → Flax or HF.

    python -m instit_jax.convert --src DIR --src_format {hf,llava,flax} --dst DIR --dst_format {flax,hf}
        [--verify] [--tolerance 1e-4] [--dtype {float32,bfloat16,float16}] [--max_shard_size 5GB]
        [--vision_config JSON] [--overwrite_config JSON] [--overwrite]

The output is assembled in a hidden directory beside --dst and renamed into place only when
everything (including --verify) succeeded; on any failure nothing is left at --dst.
Exit status: 0 success, 1 verification above the tolerance, 2 a conversion error or an I/O error
(message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instit_jax.convert.atomic import install, staging_dir
from instit_jax.convert.errors import ConversionError
from instit_jax.convert.hf_writer import DEFAULT_MAX_SHARD_BYTES, write_hf_into
from instit_jax.convert.orbax_io import DEFAULT_FLUSH_BYTES, FlaxCheckpoint, write_flax_into
from instit_jax.convert.safetensors_io import parse_size
from instit_jax.convert.sources import FORMATS, open_source

DST_FORMATS = ("flax", "hf")
DTYPES = ("float32", "bfloat16", "float16")


class VerificationFailed(ConversionError):
    def __init__(self, diff: float, tolerance: float):
        super().__init__(f"max_abs_logit_diff={diff:.6g} exceeds the tolerance {tolerance:g}; nothing was written")
        self.diff, self.tolerance = diff, tolerance


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def convert(
    src: str, src_format: str, dst: str, dst_format: str, *, verify: bool = False, tolerance: float = 1e-4,
    dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
    vision_config: Mapping[str, Any] | None = None, overwrite_config: Mapping[str, Any] | None = None,
    flush_bytes: int = DEFAULT_FLUSH_BYTES, seed: int = 0, log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Convert and (optionally) verify; returns a summary. Raises ConversionError subclasses on bad input."""
    log = log or (lambda _msg: None)
    if src_format not in FORMATS:
        raise ConversionError(f"--src_format must be one of {FORMATS}, got {src_format!r}")
    if dst_format not in DST_FORMATS:
        raise ConversionError(f"--dst_format must be one of {DST_FORMATS}, got {dst_format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if dst == src or dst.startswith(src + os.sep):
        raise ConversionError(f"--dst {dst} must not be the source directory or inside it")
    if os.path.lexists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    max_shard_bytes = parse_size(max_shard_size)

    start = time.time()
    source = open_source(src, src_format, dtype=_dtype(dtype), vision_config=vision_config,
                         overwrite_config=overwrite_config)
    cfg = source.cfg
    log(f"read {src_format} checkpoint {src}: {cfg.vision.kind} + {cfg.text.kind}, "
        f"{len(source.arrays.specs)} parameter arrays, stored as {cfg.param_dtype}")
    summary: dict[str, Any] = {"dst": dst, "dst_format": dst_format}
    staged = staging_dir(dst)
    scratch: list[str] = []
    try:
        log(f"writing {dst_format} checkpoint")
        if dst_format == "flax":
            write_flax_into(staged, cfg, source.arrays, flush_bytes=flush_bytes, log=log)
            for name in source.aux_files():
                shutil.copy2(os.path.join(src, name), os.path.join(staged, name))
        else:
            info = write_hf_into(staged, cfg, source.arrays, aux_dir=src, max_shard_bytes=max_shard_bytes, log=log)
            summary.update(image_token_id=info["image_token_id"], vocab_rows=info["vocab_rows"])
            if info["vocab_rows"] != cfg.text.vocab_size:
                log(f"appended {info['vocab_rows'] - cfg.text.vocab_size} vocabulary rows (mean rows) so that "
                    f"<image> has id {info['image_token_id']}")
        if verify:
            diff = _verify(source, staged, dst_format, scratch, seed, log, cast=dtype is not None)
            summary["max_abs_logit_diff"] = diff
            print(f"max_abs_logit_diff={diff:.6g}", flush=True)
            if not diff <= tolerance:
                raise VerificationFailed(diff, tolerance)
        install(staged, dst, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    summary["seconds"] = round(time.time() - start, 2)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    log(f"wrote {dst} in {summary['seconds']} s (peak RSS {summary['peak_rss_mb']} MB)")
    return summary


def _verify(source: Any, staged: str, dst_format: str, scratch: list[str], seed: int, log, cast: bool) -> float:
    """Pick the HF files and the Flax weights to compare, and compare them.

    HF output: transformers on the written files vs Flax on the source weights. Flax output:
    transformers on the source HF files if there are such (and no --dtype cast made them differ),
    else on an HF export of the written checkpoint, vs Flax on the written checkpoint.
    """
    from instit_jax.convert.verify import max_abs_logit_diff

    if dst_format == "hf":
        with open(os.path.join(staged, "config.json")) as f:
            token_id = json.load(f)["image_token_index"]
        log("verifying: transformers on the written HF files vs Flax on the source weights")
        return max_abs_logit_diff(source.cfg, source.arrays, staged, token_id, seed)
    written = FlaxCheckpoint(staged)
    if source.format == "hf" and not cast:
        hf_dir, token_id = source.directory, written.cfg.image_token_id
        log("verifying: transformers on the source HF files vs Flax on the written checkpoint")
    else:  # no HF files exist: write the written Flax weights as HF into a scratch directory
        hf_dir = staging_dir(staged + "-verify-hf")
        scratch.append(hf_dir)
        token_id = write_hf_into(hf_dir, written.cfg, written, aux_dir=None)["image_token_id"]
        log("verifying: transformers on an HF export of the written checkpoint vs Flax on the written checkpoint")
    return max_abs_logit_diff(written.cfg, written, hf_dir, token_id, seed)


def _json_arg(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        if os.path.isfile(text):
            with open(text) as f:
                value = json.load(f)
        else:
            value = json.loads(text)
    except ValueError as err:
        raise ConversionError(f"not a JSON object or JSON file: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise ConversionError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instit_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="source checkpoint directory")
    p.add_argument("--src_format", required=True, choices=FORMATS)
    p.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dst_format", required=True, choices=DST_FORMATS)
    p.add_argument("--verify", action="store_true", help="compare transformers and Flax logits on a synthetic input")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |logit difference| (float32)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep the source dtype)")
    p.add_argument("--max_shard_size", default="5GB", help="HF output shard size cap (e.g. 500MB, 5GB)")
    p.add_argument("--vision_config", default=None,
                   help="llava source: JSON object (or file) of vision tower fields the weights and the tower "
                        "name do not give, e.g. '{\"num_heads\": 16}'")
    p.add_argument("--overwrite_config", default=None,
                   help="llava source: JSON object (or file) applied over config.json, like LLaVA's overwrite_config")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic verification input")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(
            args.src, args.src_format, args.dst, args.dst_format, verify=args.verify, tolerance=args.tolerance,
            dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
            vision_config=_json_arg(args.vision_config), overwrite_config=_json_arg(args.overwrite_config),
            seed=args.seed,
        )
    except VerificationFailed as err:
        print(f"verification failed: {err}", file=sys.stderr)
        return 1
    except (ConversionError, NotImplementedError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
