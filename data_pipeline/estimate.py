"""How many batches a finite run yields: packing makes it data-dependent, so measure it on a sample.

With ``pack=True`` a row holds several samples, so ``records / global_batch_size`` overstates the
number of steps (about 3× on Inst-IT-like data); a schedule sized by it would never finish decaying.
``estimate_steps`` prepares the first ``num_samples`` draws of the real mixture stream (the same
shuffle, mix and preprocessing as the loader, in this process) and packs them with the loader's
packer, then scales rows per draw to the whole run.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import ml_collections

from data_pipeline.config import check_data_config
from data_pipeline.loader import mixed_indices
from data_pipeline.pack_dataset import PackedRowsIterDataset
from data_pipeline.packing import RowLayout
from data_pipeline.prepare import PrepareSample
from instit_jax.models.config import LlavaNextConfig


def estimate_steps(
    data_cfg: ml_collections.ConfigDict, *, model_cfg: LlavaNextConfig, tokenizer: Any, seed: int,
    num_samples: int = 512,
) -> dict[str, float]:
    """``{"steps", "rows_per_draw", "draws", "sampled"}`` for ``num_epochs`` passes over the mixture.

    Exact when ``num_samples`` covers every draw, one host and no workers; otherwise an estimate
    (each worker/host packs its own stream, whose last window is emitted less densely).
    """
    check_data_config(data_cfg)
    if data_cfg.num_epochs is None:
        raise ValueError("estimate_steps needs a finite data.num_epochs")
    ds, sources, names = mixed_indices(data_cfg, seed=seed, process_index=0, process_count=1)
    draws = len(ds)
    sampled = min(int(num_samples), draws)
    layout = RowLayout.for_model(model_cfg, seq_len=data_cfg.seq_len, max_views=data_cfg.max_views_per_row)
    prepare = PrepareSample(
        sources=sources, names=names, model_cfg=model_cfg, tokenizer=tokenizer,
        template=data_cfg.template or model_cfg.template, layout=layout, max_frames=data_cfg.max_frames,
        on_corrupt=data_cfg.on_corrupt,
    )
    window = int(data_cfg.pack_window) if data_cfg.pack else 1
    prepared = ds[:sampled].map(prepare).to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.read_threads)))
    rows = sum(1 for _ in PackedRowsIterDataset(prepared, layout, window=window, pack=bool(data_cfg.pack),
                                                 source_names=names))
    rows_per_draw = rows / sampled
    steps = math.ceil(draws * rows_per_draw / int(data_cfg.global_batch_size))
    return {"steps": max(1, steps), "rows_per_draw": rows_per_draw, "draws": draws, "sampled": sampled}
