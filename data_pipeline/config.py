"""Training-data configuration: which datasets, how they are mixed, and the shape of the batches.

``data_config(**overrides)`` returns an ``ml_collections.ConfigDict`` (the ``config.data`` section of a
training config). Fields, their defaults and meaning:

=====================  ==========  ====================================================================
field                  default     meaning
=====================  ==========  ====================================================================
``sources``            ``[]``      list of ``{"name", "path", "weight"}``: built dataset dirs
                                   (``data_pipeline.build``) and their mixture weights (> 0, any scale)
``seq_len``            6144        tokens per row (text + visual tokens), every batch is (B, seq_len);
                                   Inst-IT trains with a 6K context (a 32-frame CLIP video is 4608)
``max_views_per_row``  40          Vr: image views/video frames one row can carry; pixels are
                                   (B, Vr, S, S, 3). Samples with more views are cut before the
                                   first visual that does not fit (or skipped, see packing). The
                                   vision tower runs on all B·Vr views, padding included: size it
                                   to the data (40 = a 32-frame video + a 5-view image + 3)
``global_batch_size``  8           rows per step over all hosts (divisible by the host count)
``max_frames``         32          videos with more frames are skipped and counted (never resampled,
                                   frame references in the text would no longer match)
``template``           None        chat template name; None = the model config's ``template``
``tokenizer``          ""          path of the tokenizer (dir or tokenizer.json), for callers that
                                   load it with ``instit_jax.processing.tokenizer.load_tokenizer``
``num_workers``        0           worker processes for decode/preprocess/tokenize/pack (0 = in process)
``shuffle_seed``       None        data-order seed; None = the ``seed`` given to ``make_loader``
``pack``               True        pack several samples per row (segment ids); False = one per row
``on_corrupt``         "error"     "error" | "skip": CRC-corrupt / unparsable records raise, or are
                                   skipped and counted in ``stats/skipped_corrupt``
``num_epochs``         None        None = endless; n = n × (sum of dataset sizes) draws from the
                                   mixture (= n passes when there is one dataset)
``verify_crc``         True        check each record's CRC32C on read
``pack_window``        64          samples read before they are packed together (best-fit
                                   decreasing); larger = fuller rows, more host memory and a longer
                                   replay after a restore
``read_threads``       2           threads per process running decode/preprocess (PIL releases the GIL)
``prefetch``           2           ready batches buffered per worker process
=====================  ==========  ====================================================================
"""

from __future__ import annotations

from typing import Any

import ml_collections

ON_CORRUPT = ("error", "skip")


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The data section with its defaults, ``overrides`` applied (unknown keys are an error)."""
    cfg = ml_collections.ConfigDict(
        {
            "sources": [],
            "seq_len": 6144,
            "max_views_per_row": 40,
            "global_batch_size": 8,
            "max_frames": 32,
            "template": ml_collections.FieldReference(None, field_type=str),
            "tokenizer": "",
            "num_workers": 0,
            "shuffle_seed": ml_collections.FieldReference(None, field_type=int),
            "pack": True,
            "on_corrupt": "error",
            "num_epochs": ml_collections.FieldReference(None, field_type=int),
            "verify_crc": True,
            "pack_window": 64,
            "read_threads": 2,
            "prefetch": 2,
        }
    )
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise KeyError(f"unknown data config field(s) {unknown}; known: {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first field with an impossible value."""
    if not cfg.sources:
        raise ValueError("data config: `sources` is empty (need at least one {name, path, weight})")
    names = set()
    for k, src in enumerate(cfg.sources):
        missing = {"name", "path"} - set(src)
        if missing:
            raise ValueError(f"data config: sources[{k}] lacks {sorted(missing)}")
        if src["name"] in names:
            raise ValueError(f"data config: source name {src['name']!r} appears twice")
        names.add(src["name"])
        weight = src.get("weight", 1.0)
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"data config: sources[{k}] ({src['name']}) weight must be > 0, got {weight!r}")
    for field in ("seq_len", "max_views_per_row", "global_batch_size", "max_frames", "pack_window", "read_threads",
                  "prefetch"):
        if int(cfg[field]) < 1:
            raise ValueError(f"data config: {field} must be >= 1, got {cfg[field]}")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"data config: num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data config: on_corrupt must be one of {ON_CORRUPT}, got {cfg.on_corrupt!r}")
    if cfg.num_epochs is not None and int(cfg.num_epochs) < 1:
        raise ValueError(f"data config: num_epochs must be >= 1 or None, got {cfg.num_epochs}")
