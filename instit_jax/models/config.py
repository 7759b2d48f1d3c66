"""Model configuration: frozen dataclasses with named presets.

Numbers come from the model spec (shared/reference/llava_next_spec.md §1). A config holds everything
the device model needs; host-side processing reads the image/tile fields from it too, so the two can
never disagree about tile size, token counts or the AnyRes convention.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

VisionKind = Literal["clip", "siglip"]
TextKind = Literal["llama", "qwen2"]
Convention = Literal["hf", "original"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

VICUNA_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP or SigLIP vision tower, as LLaVA-NeXT uses it."""

    kind: VisionKind
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # as checkpointed (SigLIP in LLaVA checkpoints: 26 of 27)
    num_heads: int
    layer_norm_eps: float
    # Index into the hidden-states tuple (0 = embeddings after pre-LN, i = output of layer i).
    feature_layer: int
    # "default" drops the CLS token (CLIP), "full" keeps every token.
    feature_strategy: Literal["default", "full"]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.tokens_per_side**2

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_computed_layers(self) -> int:
        """Layers that feed the selected hidden state; later ones are never run."""
        n = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"feature_layer {self.feature_layer} out of range for {self.num_layers} layers")
        return n

    @property
    def tokens_per_view(self) -> int:
        """Feature tokens per tile/frame after feature selection."""
        drop_cls = self.has_cls and self.feature_strategy == "default"
        return self.num_patches + (0 if drop_cls or not self.has_cls else 1)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Llama (Vicuna) or Qwen2 decoder."""

    kind: TextKind
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float | None = None  # linear RoPE scaling (positions / factor)
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig:
    """Vision tower + mlp2x_gelu projector + image newline + decoder, and how they run."""

    vision: VisionConfig
    text: TextConfig
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    convention: Convention = "hf"
    template: str = "vicuna_v1"
    image_token_id: int | None = None  # HF placeholder id; None when the vocab has no such row
    projector_bias: bool = True
    video_pool_stride: int = 2  # Inst-IT: bilinear resize by 1/stride after the projector
    max_frames: int = 32
    # Numerics and execution.
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"  # master weights
    vision_dtype: str | None = None  # None = dtype; Inst-IT inference runs the tower in float16
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"
    # Recompute each causal query block's attention scores in the backward pass (layers.causal_attention).
    remat_attention: bool = False
    # Linear layers as one 2-D matmul over flattened rows (faster on XLA:CPU) or as a batched contraction
    # over (b, t, d) (fewer temporaries in the sharded 7B step on TPU; the TPU layouts turn this off).
    flat_matmul: bool = True

    @property
    def pooled_side(self) -> int:
        g = self.vision.tokens_per_side
        return -(-g // self.video_pool_stride)

    @property
    def pooled_tokens_per_frame(self) -> int:
        return self.pooled_side**2

    def replace(self, **changes: Any) -> "LlavaNextConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- presets


def clip_vit_l_336() -> VisionConfig:
    return VisionConfig(
        kind="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_layers=24, num_heads=16, layer_norm_eps=1e-5, feature_layer=-2,
        feature_strategy="default", image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def siglip_so400m_384() -> VisionConfig:
    return VisionConfig(
        kind="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
        num_layers=26, num_heads=16, layer_norm_eps=1e-6, feature_layer=-1,
        feature_strategy="full", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    )


def vicuna_7b() -> LlavaNextConfig:
    """LLaVA-Next-Inst-It-Vicuna-7B: CLIP ViT-L/14-336 + Vicuna-7B v1.5."""
    text = TextConfig(
        kind="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlavaNextConfig(
        vision=clip_vit_l_336(), text=text, image_grid_pinpoints=VICUNA_PINPOINTS,
        template="vicuna_v1",
    )


def qwen2_7b() -> LlavaNextConfig:
    """LLaVA-Next-Inst-It-Qwen2-7B: SigLIP-SO400M-14-384 (26 layers) + Qwen2-7B.

    The checkpoint's pinpoints are not published in the notes; these are the Vicuna set scaled to
    384-pixel tiles. `from_hf_config` on the real config.json replaces them.
    """
    text = TextConfig(
        kind="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        qkv_bias=True, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643,
    )
    pinpoints = tuple((w * 384 // 336, h * 384 // 336) for w, h in VICUNA_PINPOINTS)
    return LlavaNextConfig(
        vision=siglip_so400m_384(), text=text, image_grid_pinpoints=pinpoints, template="qwen_1_5",
    )


def tiny_vicuna() -> LlavaNextConfig:
    """CLIP + Llama shaped like the real thing, small enough for CPU tests (tile 56, 4×4 patches)."""
    vision = dataclasses.replace(
        clip_vit_l_336(), image_size=56, hidden_size=32, intermediate_size=64, num_layers=3,
        num_heads=4,
    )
    text = TextConfig(
        kind="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    pinpoints = tuple((w // 6, h // 6) for w, h in VICUNA_PINPOINTS)
    return LlavaNextConfig(vision=vision, text=text, image_grid_pinpoints=pinpoints, image_token_id=319)


def tiny_qwen2() -> LlavaNextConfig:
    """SigLIP + Qwen2 (GQA 4:2, q/k/v biases, θ=1e6), small enough for CPU tests."""
    vision = dataclasses.replace(
        siglip_so400m_384(), image_size=42, hidden_size=36, intermediate_size=72, num_layers=3,
        num_heads=4,
    )
    text = TextConfig(
        kind="qwen2", vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        qkv_bias=True, max_position_embeddings=32768, eos_token_id=2, pad_token_id=0,
    )
    pinpoints = tuple((w // 8, h // 8) for w, h in VICUNA_PINPOINTS)
    return LlavaNextConfig(
        vision=vision, text=text, image_grid_pinpoints=pinpoints, template="qwen_1_5",
        image_token_id=319,
    )


def demo_model() -> LlavaNextConfig:
    """The embedded demo's model (configs/inst_it.py:demo): CLIP + Llama sized for a CPU. 224-px tiles of
    28-px patches (8×8 per view, 4×4 pooled per video frame). At 112 px with 14-px patches the Set-of-Marks
    label box covers most of a small object's patches: a from-scratch model named one marked object's
    colour at chance after 300 steps, against 43–58% with 224/28 (chance 20%; docs/synthetic.md). Ids
    follow the synthetic tokenizer (data_pipeline/synthetic/tokenizer.py: <s>=1, </s>=2, <pad>=3,
    <image>=4, 512 tokens)."""
    vision = dataclasses.replace(
        clip_vit_l_336(), image_size=224, patch_size=28, hidden_size=96, intermediate_size=192, num_layers=3,
        num_heads=4,
    )
    text = TextConfig(
        kind="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=4, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    pinpoints = ((224, 224), (224, 448), (448, 224), (448, 448))
    # max_frames is a run setting (configs/inst_it.py sets it from the world); HF configs do not carry it.
    return LlavaNextConfig(vision=vision, text=text, image_grid_pinpoints=pinpoints, image_token_id=4)


PRESETS = {
    "vicuna_7b": vicuna_7b,
    "qwen2_7b": qwen2_7b,
    "tiny_vicuna": tiny_vicuna,
    "tiny_qwen2": tiny_qwen2,
    "demo": demo_model,
}


def get_preset(name: str) -> LlavaNextConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- HF config reading


def _rope(text_cfg: Any) -> tuple[float, float | None]:
    """(theta, linear factor) from a 5.x `rope_parameters` dict or 4.x `rope_theta`/`rope_scaling`."""
    params = getattr(text_cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text_cfg, "rope_theta", None))
    scaling = getattr(text_cfg, "rope_scaling", None) or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear"):
        raise NotImplementedError(f"rope type {rope_type!r} is not supported (default and linear are)")
    factor = float(scaling["factor"]) if rope_type == "linear" else None
    return float(theta if theta is not None else 10000.0), factor


def _first(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(source: str | os.PathLike | dict) -> LlavaNextConfig:
    """A config from a transformers LlavaNext config.json (path to file or directory, or a dict)."""
    from transformers import LlavaNextConfig as HFLlavaNextConfig  # heavy import, only here

    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            raw = json.load(f)
    raw.pop("architectures", None)
    hf = HFLlavaNextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    vc, tc = hf.vision_config, hf.text_config

    if vc.model_type == "clip_vision_model":
        kind, mean, std = "clip", CLIP_MEAN, CLIP_STD
    elif vc.model_type == "siglip_vision_model":
        kind, mean, std = "siglip", SIGLIP_MEAN, SIGLIP_STD
    else:
        raise NotImplementedError(f"vision tower {vc.model_type!r} is not supported (clip, siglip)")
    if isinstance(hf.vision_feature_layer, (list, tuple)):
        raise NotImplementedError("multi-layer vision features are not supported")
    vision = VisionConfig(
        kind=kind, image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size, num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads, layer_norm_eps=vc.layer_norm_eps,
        feature_layer=hf.vision_feature_layer, feature_strategy=hf.vision_feature_select_strategy,
        image_mean=mean, image_std=std,
    )
    if tc.model_type not in ("llama", "qwen2"):
        raise NotImplementedError(f"language model {tc.model_type!r} is not supported (llama, qwen2)")
    if getattr(tc, "use_sliding_window", False):
        raise NotImplementedError("Qwen2 sliding-window attention is not supported")
    theta, factor = _rope(tc)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    text = TextConfig(
        kind=tc.model_type, vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size, num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=tc.rms_norm_eps, rope_theta=theta, rope_linear_factor=factor,
        qkv_bias=tc.model_type == "qwen2" or bool(getattr(tc, "attention_bias", False)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        max_position_embeddings=tc.max_position_embeddings,
        bos_token_id=_first(getattr(tc, "bos_token_id", None)),
        eos_token_id=_first(getattr(tc, "eos_token_id", None)),
        pad_token_id=_first(getattr(tc, "pad_token_id", None)),
    )
    if getattr(tc, "mlp_bias", False):
        raise NotImplementedError("Llama MLP biases are not supported")
    if hf.projector_hidden_act != "gelu":
        raise NotImplementedError(f"projector activation {hf.projector_hidden_act!r} (gelu only)")
    return LlavaNextConfig(
        vision=vision, text=text,
        image_grid_pinpoints=tuple(tuple(int(v) for v in p) for p in hf.image_grid_pinpoints),
        convention="hf",
        template="qwen_1_5" if tc.model_type == "qwen2" else "vicuna_v1",
        image_token_id=hf.image_token_id,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
    )


# --------------------------------------------------------------------------- our config as JSON


def config_to_dict(cfg: LlavaNextConfig) -> dict[str, Any]:
    """A JSON-ready dict of every field (nested vision/text dicts, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    try:
        return cls(**{k: _as_tuples(v) for k, v in raw.items()})
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{where}: {err}") from err


def config_from_dict(raw: dict[str, Any]) -> LlavaNextConfig:
    """Inverse of config_to_dict; unknown or missing required fields raise ValueError."""
    raw = dict(raw)
    vision = _build(VisionConfig, raw.pop("vision", None), "vision")
    text = _build(TextConfig, raw.pop("text", None), "text")
    return _build(LlavaNextConfig, {**raw, "vision": vision, "text": text}, "config")
