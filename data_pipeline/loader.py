"""The training input pipeline: built datasets → fixed-shape packed batches, checkpointable.

Pipeline (Grain 0.2.18 dataset API), per dataset k of ``data_cfg.sources``::

    MapDataset.range(len(open_dataset(path)))    record indices of the indexed TFRecord shards
      .shuffle(seed_k).repeat()                   global shuffle, a new permutation every epoch
      .map(tag k)                                 → (k, record index)

then ``MapDataset.mix(datasets, weights)`` (deterministic interleave in the weight proportions),
``[:total]`` when ``num_epochs`` is set, ``[process_index::process_count]`` for this host, and
``.map(PrepareSample)`` (read the record, decode, AnyRes/video preprocessing, tokenization, fitting
to a row) → ``.to_iter_dataset`` → ``PackedRowsIterDataset`` (packing) → ``.batch(per-host batch)`` →
``.mp_prefetch(num_workers)``. With workers, everything up to the batch runs in the worker processes,
each on its own slice of the host's stream; the output is deterministic for a given worker count
(changing ``num_workers`` between save and restore changes the order — keep it fixed for a run).

Batches are dicts of NumPy arrays: ``input_ids, labels, visual_index, positions, segment_ids``
(B, L) int32, ``pixels`` (B, Vr, S, S, 3) float32, and ``stats/...`` int64 scalars (see
``pack_dataset``). The iterator's ``get_state()/set_state()`` and ``grain.checkpoint.CheckpointSave
/ CheckpointRestore`` (Orbax) give exact resumption.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipeline.config import check_data_config
from data_pipeline.pack_dataset import MIN_SHM_BYTES, PackedRowsIterDataset, RowCollator
from data_pipeline.packing import RowLayout
from data_pipeline.prepare import PrepareSample
from data_pipeline.records import open_dataset
from instit_jax.models.config import LlavaNextConfig

def _absl_flags_workaround() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch workers and fails when absl flags were never
    parsed (google/grain#1355, fixed after 0.2.18); the documented workaround is to mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _Tag:
    """position in dataset k's shuffled stream → (k, record index): picklable, unlike a lambda."""

    def __init__(self, k: int, size: int):
        self.k, self.size = k, size

    def __call__(self, index: int) -> tuple[int, int]:
        return self.k, int(index) % self.size


def _source_seed(seed: int, k: int) -> int:
    """An independent 32-bit shuffle seed per dataset (seed + k would reuse permutations across epochs)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say (tests and tools pass them)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


def mixed_indices(
    data_cfg: ml_collections.ConfigDict, *, seed: int, process_index: int, process_count: int
) -> tuple[grain.MapDataset, list[Any], list[str]]:
    """This host's stream of (dataset k, record index), with the opened sources and their names.

    Mixing and shuffling act on indices only; records are read afterwards (in the workers) by
    ``PrepareSample``, which also turns a skipped corrupt record into a counted skip (Grain would
    silently drop a None coming out of a source).
    """
    shuffle_seed = seed if data_cfg.shuffle_seed is None else data_cfg.shuffle_seed
    names = [src["name"] for src in data_cfg.sources]
    sources = [open_dataset(src["path"], verify_crc=data_cfg.verify_crc, on_corrupt=data_cfg.on_corrupt)
               for src in data_cfg.sources]
    for name, source in zip(names, sources):
        if len(source) == 0:
            raise ValueError(f"data source {name!r} has no records")
    parts = [
        grain.MapDataset.range(len(source)).shuffle(_source_seed(shuffle_seed, k)).repeat().map(_Tag(k, len(source)))
        for k, source in enumerate(sources)
    ]
    weights = [float(src.get("weight", 1.0)) for src in data_cfg.sources]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    if data_cfg.num_epochs is not None:
        ds = ds[: int(data_cfg.num_epochs) * sum(len(s) for s in sources)]
    return ds[process_index::process_count], sources, names


def build_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    model_cfg: LlavaNextConfig,
    tokenizer: Any,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The host's dataset of batches (see the module docstring); ``make_loader`` iterates it."""
    check_data_config(data_cfg)
    process_index, process_count = _process(process_index, process_count)
    if data_cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {data_cfg.global_batch_size} is not divisible by "
                         f"{process_count} processes")
    host_batch = data_cfg.global_batch_size // process_count
    ds, sources, names = mixed_indices(data_cfg, seed=seed, process_index=process_index,
                                       process_count=process_count)

    layout = RowLayout.for_model(model_cfg, seq_len=data_cfg.seq_len, max_views=data_cfg.max_views_per_row)
    prepare = PrepareSample(
        sources=sources, names=names, model_cfg=model_cfg, tokenizer=tokenizer,
        template=data_cfg.template or model_cfg.template, layout=layout, max_frames=data_cfg.max_frames,
        on_corrupt=data_cfg.on_corrupt,
    )
    window = int(data_cfg.pack_window) if data_cfg.pack else host_batch
    rows = PackedRowsIterDataset(
        ds.map(prepare).to_iter_dataset(
            grain.ReadOptions(num_threads=int(data_cfg.read_threads), prefetch_buffer_size=window)
        ),
        layout, window=window, pack=bool(data_cfg.pack), source_names=names,
    )
    batches = rows.batch(host_batch, batch_fn=RowCollator(layout, host_batch))
    if data_cfg.num_workers > 0:
        _absl_flags_workaround()
        options = grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
        batches = grain.experimental.WithOptionsIterDataset(batches, options).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers),
                                         per_worker_buffer_size=int(data_cfg.prefetch))
        )
    return batches


def make_loader(
    data_cfg: ml_collections.ConfigDict,
    *,
    model_cfg: LlavaNextConfig,
    tokenizer: Any,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_state: dict[str, Any] | None = None,
) -> grain.DatasetIterator:
    """An iterator of this host's batches with ``get_state()/set_state()`` (contract 3).

    ``start_state``: a state from ``get_state()`` (or restored by Orbax) to continue from. Call
    ``close()`` on the iterator when done to stop worker processes.
    """
    it = iter(build_dataset(data_cfg, model_cfg=model_cfg, tokenizer=tokenizer, seed=seed,
                            process_index=process_index, process_count=process_count))
    if start_state is not None:
        it.set_state(start_state)
    return it
