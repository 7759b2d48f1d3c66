"""Media for records: read frame files as encoded bytes, checked by fully decoding them once.

JPEG and PNG files are stored byte-for-byte (no re-encode, no quality loss). Any other format PIL can
read (WebP, BMP, GIF, TIFF, ...) is re-encoded losslessly as PNG. Frames decoded from a video file
(PyAV) are encoded as JPEG, quality 95. A file that is missing or cannot be decoded raises
``SampleError(item, ...)`` naming the file.
"""

from __future__ import annotations

import io
import os

from PIL import Image

from instit_jax.processing.errors import SampleError
from instit_jax.processing.image import load_image

KEPT_FORMATS = ("JPEG", "PNG")
VIDEO_JPEG_QUALITY = 95


def resolve(media_root: str, relative: str) -> str:
    return relative if os.path.isabs(relative) else os.path.join(media_root, relative)


def read_frame(path: str, *, item: str) -> tuple[bytes, str | None]:
    """(encoded bytes to store, original format if it was re-encoded else None)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SampleError(item, f"media file not found: {path}") from None
    except OSError as e:
        raise SampleError(item, f"cannot read media file {path}: {e}") from e
    try:
        image = load_image(raw, sample=item)
    except SampleError as e:
        raise SampleError(item, f"{path}: {e.problem}") from e
    if image.format in KEPT_FORMATS:
        return raw, None
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), image.format or "unknown"


def read_video_file(path: str, *, item: str, max_frames: int) -> tuple[list[bytes], list[float]]:
    """Evenly sampled frames (JPEG bytes) of a video file and their source frame indices."""
    from tools.annotate.inputs import count_video_frames, decode_video_frames  # PyAV only when needed

    from data_pipeline.instructions import even_subsample

    try:
        total = count_video_frames(path)
        keep = even_subsample(total, max_frames)
        decoded = decode_video_frames(path, keep)
    except FileNotFoundError:
        raise SampleError(item, f"media file not found: {path}") from None
    except Exception as e:  # PyAV raises its own error classes (InvalidDataError, ...)
        raise SampleError(item, f"cannot decode video {path}: {type(e).__name__}: {e}") from e
    if total == 0 or len(decoded) != len(keep):
        raise SampleError(item, f"cannot decode video {path}: got {len(decoded)} of {len(keep)} frames")
    frames = []
    for k in keep:
        buf = io.BytesIO()
        Image.fromarray(decoded[k]).save(buf, format="JPEG", quality=VIDEO_JPEG_QUALITY)
        frames.append(buf.getvalue())
    return frames, [float(k) for k in keep]
