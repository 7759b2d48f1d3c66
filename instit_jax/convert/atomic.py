"""Outputs appear whole or not at all: build in a hidden directory beside the target, then rename."""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid

from instit_jax.convert.errors import ConversionError


def staging_dir(final: str | os.PathLike) -> str:
    """A fresh directory `.NAME.tmp-PID-RANDOM` beside `final` (same file system, so installing is a rename)."""
    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    return path


def install(staged: str, final: str | os.PathLike, *, overwrite: bool) -> None:
    """Move a finished staging directory to `final` (replacing an existing one only when `overwrite`)."""
    final = os.path.abspath(os.fspath(final))
    if os.path.lexists(final):
        if not overwrite:
            raise ConversionError(f"{final} already exists (pass overwrite / --overwrite to replace it)")
        old = f"{staged}.old"
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)


def release_memory() -> None:
    """Give freed heap back to the OS (glibc), so a long conversion's RSS follows its live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
