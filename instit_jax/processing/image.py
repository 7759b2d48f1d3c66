"""Host-side image loading and pixel preprocessing (NumPy + PIL only).

Numerics match transformers' PIL backend (``LlavaNextImageProcessorPil``, ``CLIPImageProcessorPil``),
which is also what the original LLaVA-NeXT code computes (spec D4):

* resizing is PIL bicubic on the uint8 RGB image (a same-size resize is an exact copy in PIL);
* rescale is ``float32(float64(uint8) * (1/255))``;
* normalize is ``(x - float32(mean)) / float32(std)`` in float32.

Outputs are channels-last (NHWC / HWC) float32; transformers produces the same values in NCHW.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .anyres import AnyResPlan, Convention, Pinpoints, parse_pinpoints, plan_anyres
from .errors import SampleError
from instit_jax.models.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VICUNA_PINPOINTS, LlavaNextConfig

# The vision-tower constants live with the model config (one place for each fact).
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = CLIP_MEAN, CLIP_STD

RESCALE_FACTOR = 1 / 255
_BICUBIC = Image.Resampling.BICUBIC

AlphaMode = Literal["white", "drop"]


@dataclass(frozen=True)
class ImageSpec:
    """How one vision tower wants its pixels, plus the AnyRes grid configuration."""

    tile_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pinpoints: tuple[tuple[int, int], ...]
    convention: Convention
    frame_crop: bool  # video frames: CLIP resizes the short side + centre-crops; SigLIP squashes.

    def __post_init__(self) -> None:
        # Accept any pinpoint spelling (string, list) but store a hashable, validated tuple.
        pairs = parse_pinpoints(self.pinpoints, self.tile_size)
        object.__setattr__(self, "pinpoints", tuple(pairs))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def clip_336(cls, pinpoints: Pinpoints = VICUNA_PINPOINTS, convention: Convention = "hf") -> ImageSpec:
        return cls(336, 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pinpoints, convention, frame_crop=True)

    @classmethod
    def siglip_384(cls, pinpoints: Pinpoints, convention: Convention = "hf") -> ImageSpec:
        return cls(384, 14, SIGLIP_MEAN, SIGLIP_STD, pinpoints, convention, frame_crop=False)

    @classmethod
    def from_model_config(cls, cfg: LlavaNextConfig) -> ImageSpec:
        """The pixels and AnyRes grid a model config expects."""
        v = cfg.vision
        return cls(v.image_size, v.patch_size, v.image_mean, v.image_std, cfg.image_grid_pinpoints,
                   cfg.convention, frame_crop=v.kind == "clip")

    @property
    def tokens_per_side(self) -> int:
        return self.tile_size // self.patch_size

    def plan(self, width: int, height: int, *, sample: str | None = None) -> AnyResPlan:
        return plan_anyres(
            width,
            height,
            tile_size=self.tile_size,
            patch_size=self.patch_size,
            pinpoints=self.pinpoints,
            convention=self.convention,
            sample=sample,
        )


def load_image(
    source: str | os.PathLike | bytes, *, sample: str, exif_transpose: bool = False
) -> Image.Image:
    """Open and fully decode an image, so that truncated or corrupt files fail here, naming the sample.

    ``exif_transpose=False`` keeps the raw pixel layout like the original Inst-IT scripts
    (``Image.open``); transformers' ``load_image`` applies ``ImageOps.exif_transpose`` (pass True).
    Truncated files are detected because PIL refuses them while ``ImageFile.LOAD_TRUNCATED_IMAGES``
    is False (its default); code that flips that global also disables this check.
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        image = Image.open(fp)
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as err:
        raise SampleError(sample, f"image file not found: {err.filename}") from err
    except UnidentifiedImageError as err:
        where = "" if isinstance(source, (bytes, bytearray)) else f" ({os.fspath(source)})"
        raise SampleError(sample, f"not a readable image (unknown format or corrupt header){where}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports truncated / corrupt data as OSError or SyntaxError (some broken headers) and
        # oversized images as DecompressionBombError; keep its message, it says what went wrong.
        raise SampleError(sample, f"cannot decode image: {err}") from err
    if image.width < 1 or image.height < 1:
        raise SampleError(sample, f"image has no pixels ({image.width}x{image.height})")
    return image


def to_rgb(image: Image.Image, *, sample: str | None, alpha: AlphaMode = "white") -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, L, CMYK, I;16, ...) to RGB.

    ``alpha="white"`` (default) composites transparency onto a white background, exactly like
    transformers 5.x ``convert_to_rgb`` (the HF processors' ``do_convert_rgb``): an image counts as
    transparent when it has an "A" band or a ``transparency`` entry (palette / tRNS images).
    ``alpha="drop"`` is PIL's plain ``convert("RGB")`` (alpha discarded, hidden colours kept), which is
    what transformers 4.x ``convert_to_rgb`` and hence the original LLaVA-NeXT CLIP processor did.
    Modes without alpha go through ``convert("RGB")`` either way. RGB images are returned unchanged
    unless they carry a ``transparency`` colour (RGB PNG with tRNS), which HF also composites.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if image.width < 1 or image.height < 1:
        raise SampleError(sample, f"image has no pixels ({image.width}x{image.height})")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not (has_alpha and alpha == "white"):
        return image
    try:
        if alpha == "white" and has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise SampleError(sample, f"cannot convert mode {image.mode!r} to RGB: {err}") from err


def _require_rgb(image: Image.Image) -> None:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (use to_rgb first), got mode {image.mode!r}")


def _resize(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL bicubic resize on uint8 RGB -> (H, W, 3) uint8. Same size is an exact copy in PIL."""
    return np.asarray(image.resize((width, height), resample=_BICUBIC), dtype=np.uint8)


def _rescale_normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., 3) -> float32, with transformers' PIL-backend dtype order (see module docstring)."""
    scaled = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    return (scaled - mean32) / std32


def anyres_views_uint8(image: Image.Image, plan: AnyResPlan) -> np.ndarray:
    """The AnyRes views before rescaling: (num_views, S, S, 3) uint8, base view first (spec §4.3-4.4)."""
    _require_rgb(image)
    if image.size != (plan.width, plan.height):
        raise ValueError(f"plan is for {plan.width}x{plan.height}, image is {image.width}x{image.height}")
    s = plan.tile_size
    views = np.empty((plan.num_views, s, s, 3), dtype=np.uint8)
    # Base view: whole image squashed to S x S (aspect not kept, no padding).
    views[0] = _resize(image, s, s)
    # Tiles: aspect-preserving resize pasted on a black canvas (0 in uint8, i.e. before normalizing).
    canvas = np.zeros((plan.canvas_h, plan.canvas_w, 3), dtype=np.uint8)
    resized = _resize(image, plan.resized_w, plan.resized_h)
    canvas[plan.pad_top : plan.pad_top + plan.resized_h, plan.pad_left : plan.pad_left + plan.resized_w] = resized
    tiles = canvas.reshape(plan.grid_rows, s, plan.grid_cols, s, 3).transpose(0, 2, 1, 3, 4)
    views[1:] = tiles.reshape(plan.n_tiles, s, s, 3)  # row-major tile order
    return views


def preprocess_anyres(
    image: Image.Image, plan: AnyResPlan, *, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """AnyRes pixel stack (num_views, S, S, 3) float32 NHWC, base view first then tiles row-major.

    ``image`` must already be RGB (``to_rgb``) and of the planned size. Equals transformers'
    ``LlavaNextImageProcessorPil`` ``pixel_values[0, :num_views]`` transposed to NHWC, for the canvas the
    plan's convention chose. The per-view resize/centre-crop of the HF/CLIP processor is omitted because
    on S x S views it is the identity (PIL same-size resize copies; the crop takes everything).
    """
    return _rescale_normalize(anyres_views_uint8(image, plan), mean, std)


def preprocess_frame(
    image: Image.Image, *, size: int, mean: Sequence[float], std: Sequence[float], crop: bool
) -> np.ndarray:
    """One video frame -> (S, S, 3) float32 (spec §5.1 / Appendix A).

    ``crop=True`` (CLIP): resize the short side to S with the long side ``int(S * long / short)``,
    bicubic, then centre-crop S x S at top=(h-S)//2, left=(w-S)//2. ``crop=False`` (SigLIP): bicubic
    resize straight to S x S.
    """
    _require_rgb(image)
    if crop:
        w, h = image.size
        if w <= h:  # tie goes to this branch, as in transformers' get_resize_output_image_size
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        pixels = _resize(image, new_w, new_h)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = pixels[top : top + size, left : left + size]
    else:
        pixels = _resize(image, size, size)
    return _rescale_normalize(pixels, mean, std)


def preprocess_image(
    image: Image.Image, spec: ImageSpec, *, sample: str | None = None, alpha: AlphaMode = "white"
) -> tuple[np.ndarray, AnyResPlan]:
    """Convenience: to_rgb + plan + preprocess_anyres for one single-image sample."""
    rgb = to_rgb(image, sample=sample, alpha=alpha)
    plan = spec.plan(rgb.width, rgb.height, sample=sample)
    return preprocess_anyres(rgb, plan, mean=spec.mean, std=spec.std), plan


def preprocess_video_frame(
    image: Image.Image, spec: ImageSpec, *, sample: str | None = None, alpha: AlphaMode = "white"
) -> np.ndarray:
    """Convenience: to_rgb + preprocess_frame with the spec's tower settings."""
    rgb = to_rgb(image, sample=sample, alpha=alpha)
    return preprocess_frame(rgb, size=spec.tile_size, mean=spec.mean, std=spec.std, crop=spec.frame_crop)
