"""Greedy inference over Inst-IT Bench, batched, split across hosts, resumable.

Prompts follow the official scripts (inference_image.py / inference_video.py): `"<image>\\n"` + the
subset's pre/post prompt and question (+ option lines), in the model's conversation template; images go
through AnyRes, a video is every frame of its folder in file-name order; at most `max_new_tokens` (128)
new tokens, greedy, stopped at the template's stop string / EOS; the decoded text (special tokens
skipped) is stripped. Predictions are written in the official format.

Hosts: question k of a subset (in question_id order) belongs to host k % process_count. Each host
appends to its own progress file; after a barrier, host 0 writes the official file from all of them
(so the output directory must be on a file system every host sees).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from instit_jax.eval import progress
from instit_jax.eval.bench import BenchError, BenchItem, frame_files, image_source, load_bench
from instit_jax.eval.prompts import FORMATS, SPLITS, user_turn
from instit_jax.generate import Generator, SamplingConfig, generate_text
from instit_jax.models.config import LlavaNextConfig, config_to_dict
from instit_jax.processing.batch import BatchLayout, Sample, assemble_batch
from instit_jax.processing.image import ImageSpec
from instit_jax.processing.media import visual_for_image, visual_for_video
from instit_jax.processing.prompts import USER, get_template, stop_token_ids, tokenize_prompt

MAX_NEW_TOKENS = 128  # the official scripts' max_new_tokens


def geometric_buckets(first: int, last: int, *, ratio: float = 1.25, multiple: int = 1) -> tuple[int, ...]:
    """Sizes from `first` growing by about `ratio` (rounded up to `multiple`) until `last` is covered:
    at most ~25% padding, and few distinct shapes to compile."""
    out, size = [], float(first)
    while True:
        b = int(math.ceil(size / multiple) * multiple)
        if not out or b > out[-1]:
            out.append(b)
        if b >= last:
            return tuple(out)
        size = max(size * ratio, size + 1)


def layout_for(cfg: LlavaNextConfig, batch_size: int, pad_id: int, *, seq_buckets: Sequence[int] | None = None,
               view_buckets: Sequence[int] | None = None) -> BatchLayout:
    """Static shapes for eval batches. Default buckets: sequence lengths up to 256k tokens and views up to
    a full batch of videos, ~25% apart; give a single bucket each to compile exactly one program."""
    max_views = batch_size * max(cfg.max_frames, 1 + max(w * h for w, h in _tile_grids(cfg)))
    return BatchLayout(
        tokens_per_view=cfg.vision.tokens_per_view,
        pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=cfg.vision.image_size,
        seq_buckets=tuple(seq_buckets or geometric_buckets(128, 2**18, multiple=128)),
        view_buckets=tuple(view_buckets or geometric_buckets(1, max_views)),
        pad_id=pad_id,
    )


def _tile_grids(cfg: LlavaNextConfig) -> list[tuple[int, int]]:
    s = cfg.vision.image_size
    return [(-(-w // s), -(-h // s)) for w, h in cfg.image_grid_pinpoints]


class QuestionEncoder:
    """A bench question → a model Sample (prompt ids with one visual placeholder + its visual input)."""

    def __init__(self, cfg: LlavaNextConfig, tokenizer: Any, template: str | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.template = get_template(template or cfg.template)
        self.spec = ImageSpec.from_model_config(cfg)

    def prompt_ids(self, item: BenchItem) -> np.ndarray:
        text = user_turn(item.split, item.fmt, item.question, item.choices)
        return tokenize_prompt(self.tokenizer, self.template, [(USER, text)], sample=item.where)

    def visual(self, item: BenchItem):
        if item.split == "image":
            return visual_for_image(image_source(item), self.spec, sample=item.where)
        paths = frame_files(item)
        if len(paths) > self.cfg.max_frames:
            raise BenchError(
                f"{item.where}: video {item.video_dir} has {len(paths)} frames, more than the model's "
                f"max_frames={self.cfg.max_frames} (the official scripts use every frame; no sub-sampling)"
            )
        frames = []
        for path in paths:
            with open(path, "rb") as f:
                frames.append(f.read())
        return visual_for_video(frames, self.cfg, self.spec, sample=item.where)

    def sample(self, item: BenchItem) -> Sample:
        return Sample(item.question_id, self.prompt_ids(item), None, (self.visual(item),))


@dataclasses.dataclass
class SubsetStats:
    split: str
    fmt: str
    total: int  # questions in the subset
    assigned: int  # questions of this host
    resumed: int  # of those, already predicted by an earlier run
    generated: int  # predicted now
    predictions_path: str | None  # the official file, when this host wrote it
    seconds: float


def run_info(cfg: LlavaNextConfig, *, model_name: str, template: str, max_new_tokens: int) -> dict[str, Any]:
    """What makes predictions comparable; a rerun into the same directory must match it."""
    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return {"model": model_name, "model_config_sha256": digest, "template": template,
            "max_new_tokens": max_new_tokens, "decoding": "greedy"}


def _batches(items: Sequence[BenchItem], size: int) -> Iterator[list[BenchItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _host_placement(process_index: int | None, process_count: int | None) -> tuple[int, int, bool]:
    """(index, count, real multi-process run?) — explicit values simulate hosts in one process."""
    import jax

    real = jax.process_count() > 1
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count, real


def row_devices(batch_size: int) -> list[Any]:
    """This host's devices that share a batch's rows: the most that divide the batch evenly."""
    local = jax.local_devices()
    n = max(d for d in range(1, len(local) + 1) if batch_size % d == 0)
    return local[:n]


def run_bench(
    model: Any,
    tokenizer: Any,
    bench_dir: str,
    out_dir: str,
    *,
    formats: Sequence[str] = FORMATS,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    template: str | None = None,
    video_root: str | None = None,
    seq_buckets: Sequence[int] | None = None,
    view_buckets: Sequence[int] | None = None,
    model_name: str = "in-memory model",
    process_index: int | None = None,
    process_count: int | None = None,
    log: Callable[[str], None] = print,
) -> list[SubsetStats]:
    """Predict every question of the chosen subsets into `out_dir` (official `<split>_<fmt>_inference.json`).

    model: a LlavaNext (its `cfg` gives preprocessing, template and max_frames); tokenizer: a
    transformers fast tokenizer. Resumes from the progress files in `out_dir`. seq_buckets / view_buckets:
    the padded sequence lengths and per-batch view counts to compile for (see `layout_for`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cfg: LlavaNextConfig = model.cfg
    encoder = QuestionEncoder(cfg, tokenizer, template)
    tpl = encoder.template
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_ids=stop_token_ids(tokenizer, tpl), pad_id=pad_id)
    layout = layout_for(cfg, batch_size, pad_id, seq_buckets=seq_buckets, view_buckets=view_buckets)
    host, hosts, real_multihost = _host_placement(process_index, process_count)
    progress.check_run_info(out_dir, run_info(cfg, model_name=model_name, template=tpl.name,
                                              max_new_tokens=max_new_tokens))
    generator = Generator(model, devices=row_devices(batch_size))

    def prepare(chunk: list[BenchItem]) -> dict[str, np.ndarray]:
        samples = [encoder.sample(item) for item in chunk]
        samples += [samples[-1]] * (batch_size - len(samples))  # keep one batch shape; extra rows ignored
        return assemble_batch(samples, layout, batch_size=batch_size)

    stats = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # prepares batch n+1 during batch n
        for split in splits:
            for fmt in formats:
                start = time.perf_counter()
                items = load_bench(bench_dir, split, fmt, video_root=video_root)
                done = progress.read_progress(out_dir, split, fmt)
                mine = [it for k, it in enumerate(items) if k % hosts == host]
                todo = [it for it in mine if it.question_id not in done]
                log(f"[eval] {split}/{fmt}: {len(items)} questions, host {host}/{hosts}: {len(mine)} assigned, "
                    f"{len(mine) - len(todo)} already predicted, {len(todo)} to generate")
                path = progress.progress_path(out_dir, split, fmt, host)
                with progress.ProgressWriter(path) as writer:
                    if writer.dropped_partial_line:
                        log(f"[eval] {path}: removed an incomplete last line (interrupted write)")
                    chunks = list(_batches(todo, batch_size))
                    pending = pool.submit(prepare, chunks[0]) if chunks else None
                    for n, chunk in enumerate(chunks):
                        batch = pending.result()
                        pending = pool.submit(prepare, chunks[n + 1]) if n + 1 < len(chunks) else None
                        texts = generate_text(generator, tokenizer, batch, sampling, stop_strings=(tpl.stop_str,))
                        records = [{"question_id": it.question_id, "question": it.question, "model_prediction": t,
                                    "ground_truth": it.answer, "split": split} for it, t in zip(chunk, texts)]
                        writer.append(records)
                        done.update((r["question_id"], r) for r in records)
                        log(f"[eval] {split}/{fmt}: batch {n + 1}/{len(chunks)} written")
                stats.append(_finish(out_dir, split, fmt, items, host, hosts, real_multihost, len(mine),
                                     len(mine) - len(todo), len(todo), start, log))
    return stats


def _finish(out_dir: str, split: str, fmt: str, items: Sequence[BenchItem], host: int, hosts: int,
            real_multihost: bool, assigned: int, resumed: int, generated: int, start: float,
            log: Callable[[str], None]) -> SubsetStats:
    """Barrier, then host 0 writes the official file from every host's progress."""
    if real_multihost:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"instit_eval_{split}_{fmt}")
    path = None
    if host == 0:
        done = progress.read_progress(out_dir, split, fmt)
        ids = [it.question_id for it in items]
        stale = sorted(set(done) - set(ids))
        if stale:
            log(f"[eval] {split}/{fmt}: {len(stale)} progress record(s) for questions not in the bench ignored "
                f"(e.g. {stale[:3]})")
        if real_multihost or hosts == 1 or all(q in done for q in ids):
            path = progress.write_predictions(out_dir, split, fmt, ids, done)
            log(f"[eval] {split}/{fmt}: wrote {path}")
        else:
            log(f"[eval] {split}/{fmt}: other hosts' predictions are still missing; the official file is "
                "written by host 0 once all are present")
    return SubsetStats(split, fmt, len(items), assigned, resumed, generated, path, time.perf_counter() - start)


def load_checkpoint(checkpoint: str, tokenizer_path: str | None = None, *, dtype: str | None = None
                    ) -> tuple[Any, Any]:
    """(LlavaNext, tokenizer) from a Flax checkpoint dir (`convert/orbax_io.py`) and its tokenizer
    (`tokenizer_path`, else `<checkpoint>/tokenizer`). `dtype` overrides the activation dtype."""
    import os

    from instit_jax.convert.hf_params import load_into_model
    from instit_jax.convert.orbax_io import load_flax
    from instit_jax.processing.tokenizer import load_tokenizer

    tok_path = tokenizer_path or os.path.join(checkpoint, "tokenizer")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    cfg, arrays = load_flax(checkpoint)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{cfg.text.vocab_size}: they do not belong together")
    return load_into_model(cfg, arrays), tokenizer
