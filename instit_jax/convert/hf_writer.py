"""Write a transformers LLaVA-NeXT checkpoint in the hub layout (A) from Flax leaves, streaming.

Output: `config.json` (plus 4.x spellings: `torch_dtype`, text `rope_theta`/`rope_scaling`),
`generation_config.json`, `model.safetensors` or size-capped shards with
`model.safetensors.index.json`, `preprocessor_config.json` + `processor_config.json` (with
`patch_size`, `vision_feature_select_strategy`, `num_additional_image_tokens`, `image_token`, so the
processor expands `<image>` to the right count), and the source's tokenizer files.

The `<image>` vocabulary row. transformers merges visual features at the positions of
`image_token_index`, so the HF model needs such an id inside its vocabulary. Checkpoints converted
from HF already have one (`cfg.image_token_id`). Original LLaVA-NeXT checkpoints do not (they splice
features at a -200 sentinel), so the writer picks an id deterministically:
  * with a tokenizer in the source: the id of `<image>` if present, else the id the tokenizer assigns
    when `<image>` is added as a special token (len(tokenizer): 32000 for Vicuna, 151646 for Qwen2);
  * without one: the first id past the embedding rows.
If that id is outside the embedding matrix, rows are appended up to the next multiple of 64 (32000 →
32064, like llava-hf). Appended `embed_tokens` rows are the mean embedding and appended `lm_head` rows
the mean output row (float64 means, cast to the stored dtype), so those ids get an average logit and
are not favoured in decoding (llava-hf instead sampled random rows: its logits for such ids differ).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from instit_jax.convert.atomic import install, release_memory, staging_dir
from instit_jax.convert.errors import ConversionError
from instit_jax.convert.hf_config import IMAGE_TOKEN, hf_config_dict, processor_dicts
from instit_jax.convert.hf_params import param_entries, to_hf_tensor
from instit_jax.convert.orbax_io import check_leaves, shapes_of
from instit_jax.convert.safetensors_io import ShardedSafetensorsWriter, TensorInfo
from instit_jax.convert.sources import AUX_FILES, TOKENIZER_FILES, storage_dtype
from instit_jax.models.config import LlavaNextConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_VOCAB_LEAVES = {("language_model", "embed_tokens"), ("language_model", "lm_head", "kernel")}


def _load_tokenizer(directory: str | None) -> Any:
    if directory is None or not any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it complains about the non-HF config.json of original checkpoints
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
    except Exception as err:  # many tokenizer classes, many failure types
        warnings.warn(f"cannot load the tokenizer in {directory} ({err}); copying its files unchanged")
        return None


def image_token_plan(cfg: LlavaNextConfig, tokenizer: Any) -> tuple[int, int, bool]:
    """(image token id, HF vocabulary rows, whether `<image>` must be added to the tokenizer)."""
    rows = cfg.text.vocab_size
    if cfg.image_token_id is not None:
        if not 0 <= cfg.image_token_id < rows:
            raise ConversionError(f"image_token_id {cfg.image_token_id} outside the {rows}-row vocabulary")
        return cfg.image_token_id, rows, False
    add = False
    if tokenizer is None:
        token_id = rows
    elif IMAGE_TOKEN in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        token_id, add = len(tokenizer), True
    new_rows = rows if token_id < rows else -(-(token_id + 1) // 64) * 64
    return token_id, new_rows, add


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _append_rows(tensor_vd: np.ndarray, rows: int) -> np.ndarray:
    """Pad a (V, D) matrix to `rows` rows with its mean row (accumulated in float64)."""
    extra = rows - tensor_vd.shape[0]
    if extra <= 0:
        return tensor_vd
    mean = tensor_vd.astype(np.float64).mean(axis=0, keepdims=True).astype(tensor_vd.dtype)
    return np.concatenate([tensor_vd, np.repeat(mean, extra, axis=0)], axis=0)


def write_hf_into(directory: str, cfg: LlavaNextConfig, arrays: Mapping[tuple[str, ...], Any], *,
                  aux_dir: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write into the existing empty `directory`. Returns {"image_token_id", "vocab_rows", "files"}."""
    specs = shapes_of(arrays)
    check_leaves(cfg, specs, "parameters to write")
    tokenizer = _load_tokenizer(aux_dir)
    token_id, vocab_rows, add_token = image_token_plan(cfg, tokenizer)

    entries = param_entries(cfg)
    tensor_specs = []
    for e in entries:
        shape = e.hub_shape
        if e.path in _VOCAB_LEAVES:
            shape = (vocab_rows,) + shape[1:]
        tensor_specs += [(k, TensorInfo(shape, specs[e.path].dtype)) for k in e.hub_keys]
    writer = ShardedSafetensorsWriter(directory, tensor_specs, max_shard_bytes)
    for e in entries:
        leaf = np.asarray(arrays[e.path])
        if log:
            log(f"  {'/'.join(e.path)} {leaf.dtype}{tuple(leaf.shape)}")
        for i, key in enumerate(e.hub_keys):
            tensor = to_hf_tensor(leaf[i] if e.stacked else leaf, e.rule)
            if e.path in _VOCAB_LEAVES:
                tensor = _append_rows(tensor, vocab_rows)
            writer.write(key, tensor)
        del leaf, tensor
        release_memory()
    files = writer.close()

    _write_json(os.path.join(directory, "config.json"), hf_config_dict(cfg, token_id, vocab_rows, storage_dtype(specs)))
    files.append("config.json")

    present = [n for n in AUX_FILES if aux_dir and os.path.isfile(os.path.join(aux_dir, n))]
    if tokenizer is not None and add_token:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != token_id:
            raise AssertionError("the tokenizer gave <image> another id than planned")
        files += [os.path.basename(p) for p in tokenizer.save_pretrained(directory)]
        if log:
            log(f"  added {IMAGE_TOKEN} to the tokenizer (id {token_id})")
        # The re-saved tokenizer replaces the files listing tokens; base vocabularies and templates it
        # did not write are copied unchanged.
        stale = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
        present = [n for n in present if n not in stale and n not in files]
    for name in present:
        if name not in ("preprocessor_config.json", "processor_config.json", "generation_config.json"):
            shutil.copy2(os.path.join(aux_dir, name), os.path.join(directory, name))
            files.append(name)

    gen = _read_json(os.path.join(aux_dir, "generation_config.json")) if aux_dir else None
    if gen is None:
        t = cfg.text
        gen = {k: v for k, v in (("bos_token_id", t.bos_token_id), ("eos_token_id", t.eos_token_id),
                                 ("pad_token_id", t.pad_token_id)) if v is not None}
    _write_json(os.path.join(directory, "generation_config.json"), gen)
    pre, proc = processor_dicts(
        cfg,
        _read_json(os.path.join(aux_dir, "preprocessor_config.json")) if aux_dir else None,
        _read_json(os.path.join(aux_dir, "processor_config.json")) if aux_dir else None,
    )
    _write_json(os.path.join(directory, "preprocessor_config.json"), pre)
    _write_json(os.path.join(directory, "processor_config.json"), proc)
    files += ["generation_config.json", "preprocessor_config.json", "processor_config.json"]
    return {"image_token_id": token_id, "vocab_rows": vocab_rows, "files": sorted(set(files))}


def save_hf(directory: str | os.PathLike, cfg: LlavaNextConfig, arrays: Mapping[tuple[str, ...], Any], *,
            aux_dir: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False) -> dict[str, Any]:
    """Atomically write an HF checkpoint directory from {Flax path: array} (see the module docstring)."""
    staged = staging_dir(directory)
    try:
        info = write_hf_into(staged, cfg, arrays, aux_dir=aux_dir, max_shard_bytes=max_shard_bytes)
        install(staged, directory, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return info
