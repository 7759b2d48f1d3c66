"""Our LlavaNextConfig → transformers config files: the LlavaNextConfig (the inverse of
models.config.from_hf_config), config.json with the 4.x spellings, and the processor configs."""

from __future__ import annotations

import dataclasses
from typing import Any

from instit_jax.models.config import LlavaNextConfig

IMAGE_TOKEN = "<image>"


def to_hf_config(cfg: LlavaNextConfig, *, image_token_id: int | None = None) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig as HFConfig, Qwen2Config, SiglipVisionConfig

    v, t = cfg.vision, cfg.text
    vision_kw = dict(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
    )
    if v.kind == "clip":
        vision = CLIPVisionConfig(hidden_act="quick_gelu", projection_dim=768, **vision_kw)
    else:
        vision = SiglipVisionConfig(hidden_act="gelu_pytorch_tanh", vision_use_head=False, **vision_kw)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_linear_factor is not None:
        rope = {"rope_type": "linear", "rope_theta": t.rope_theta, "factor": t.rope_linear_factor}
    text_kw = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )
    if t.kind == "llama":
        text = LlamaConfig(attention_bias=t.qkv_bias, mlp_bias=False, **text_kw)
    else:
        if not t.qkv_bias:
            raise ValueError("Qwen2 always has q/k/v biases")
        text = Qwen2Config(use_sliding_window=False, **text_kw)
    token_id = cfg.image_token_id if image_token_id is None else image_token_id
    if token_id is None:
        raise ValueError("an HF config needs an image_token_id (a vocabulary row for <image>)")
    return HFConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=token_id,
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy=v.feature_strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=cfg.projector_bias,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def hf_config_dict(cfg: LlavaNextConfig, image_token_id: int, vocab_rows: int, dtype: str) -> dict[str, Any]:
    """config.json content that transformers 5.x reads, with the 4.x spellings added."""
    text = dataclasses.replace(cfg.text, vocab_size=vocab_rows)
    hf = to_hf_config(cfg.replace(text=text), image_token_id=image_token_id)
    d = hf.to_dict()
    d["architectures"] = ["LlavaNextForConditionalGeneration"]
    d["dtype"] = d["torch_dtype"] = dtype
    d["image_seq_length"] = cfg.vision.tokens_per_view
    d["use_image_newline_parameter"] = True
    tc = d["text_config"]
    tc["rope_theta"] = cfg.text.rope_theta
    if cfg.text.rope_linear_factor is not None:
        tc["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": cfg.text.rope_linear_factor}
    return d


def processor_dicts(cfg: LlavaNextConfig, existing_pre: dict | None, existing_proc: dict | None) -> tuple[dict, dict]:
    """(preprocessor_config.json, processor_config.json): the source's, with the fields the count needs."""
    v = cfg.vision
    pre = dict(existing_pre or (existing_proc or {}).get("image_processor") or {})
    if not pre:
        s = v.image_size
        pre = {
            "image_processor_type": "LlavaNextImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "do_pad": True, "do_convert_rgb": True,
            "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        }
    pre["processor_class"] = "LlavaNextProcessor"
    proc = dict(existing_proc or {})
    proc.update(
        processor_class="LlavaNextProcessor", patch_size=v.patch_size,
        vision_feature_select_strategy=v.feature_strategy, num_additional_image_tokens=int(v.has_cls),
        image_token=IMAGE_TOKEN,
    )
    if "image_processor" in proc:  # 5.x nests the image processor; 4.x reads preprocessor_config.json
        proc["image_processor"] = {k: val for k, val in pre.items() if k != "processor_class"}
    return pre, proc
