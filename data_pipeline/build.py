"""Build a record dataset: ``python -m data_pipeline.build --out DIR [inputs...]`` or :func:`build_dataset`.

Steps: read every input (``sources.read_items``: annotation checks, instruction conversion) in the main
process; give each converted item to one shard (contiguous runs of items, balanced by sample count, so a
shard's contents depend only on the inputs and options); write the shards (in worker processes when
``num_workers > 0``): load and check each item's media, encode its records, write
``<name>-SSSSS-of-NNNNN.tfrecord`` + ``.idx`` under temporary names and rename; then write
``manifest.json``. Output bytes do not depend on the worker count.

Resuming: each finished shard leaves ``.build/<shard>.json`` (its record count, size, sha256, skipped
items and the build fingerprint). A rerun with the same inputs and options keeps those shards and writes
only the missing ones. A directory holding a different build is refused unless ``overwrite=True``.

Counting: every input entry is an item; ``items_in = items_converted + items_skipped``; a skipped item
(bad annotation, missing/undecodable media, a record that fails validation) is listed with its id, input
file and reason. ``records_written`` counts records (one item can give several).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys

import numpy as np
from tqdm import tqdm

from data_pipeline.instructions import MAX_FRAMES, Templates, load_templates
from data_pipeline.media_files import read_frame, read_video_file, resolve
from data_pipeline.records import MANIFEST, MANIFEST_FORMAT
from data_pipeline.schema import SCHEMA_VERSION, Record, encode_record
from data_pipeline.sources import INPUT_KINDS, InputSpec, Item, file_sha256, read_items
from data_pipeline.tfrecord import TFRecordWriter, index_path
from instit_jax.processing.errors import SampleError

STATE_DIR = ".build"
ROOT_SEPARATOR = "::"
SHARD_FILE = re.compile(r".+-\d{5}-of-\d{5}\.tfrecord(\.idx)?(\.tmp)?")


def shard_name(name: str, shard: int, num_shards: int) -> str:
    return f"{name}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def parse_input(kind: str, arg: str, media_root: str | None) -> InputSpec:
    """``FILE`` or ``FILE::ROOT``; the root defaults to ``media_root``, else the JSON file's folder."""
    path, _, root = arg.partition(ROOT_SEPARATOR)
    root = root or media_root or os.path.dirname(os.path.abspath(path))
    return InputSpec(kind, path, root)


def assign_shards(items: list[Item], num_shards: int) -> list[list[Item]]:
    """Converted items in order, cut into ``num_shards`` contiguous runs of about equal sample counts
    (an item is never split: all records of a video entry land in one shard)."""
    kept = [it for it in items if it.skip_reason is None]
    sizes = np.asarray([len(it.samples) for it in kept], dtype=np.int64)
    total = max(int(sizes.sum()), 1)
    # An item goes to the shard its middle sample falls in (in half-sample units, integers only).
    middle2 = 2 * (np.cumsum(sizes) - sizes) + sizes
    shard_of = np.minimum((middle2 * num_shards) // (2 * total), num_shards - 1)
    shards: list[list[Item]] = [[] for _ in range(num_shards)]
    for item, s in zip(kept, shard_of.tolist()):
        shards[s].append(item)
    return shards


# ----------------------------------------------------------------------------- one shard (runs in workers)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    out: str
    file: str
    fingerprint: str
    items: tuple[Item, ...]
    media_roots: tuple[str, ...]  # per input index
    max_frames: int


def item_records(item: Item, media_root: str, max_frames: int) -> list[Record]:
    """All records of one item, media loaded and checked; SampleError (naming a file) if any fails."""
    cache: dict[str, tuple[bytes, str | None]] = {}  # a frame shared by several samples is read once
    records = []
    for sample, video in zip(item.samples, item.video_files):
        metadata = dict(sample.metadata)
        if video:
            frames, timestamps = read_video_file(resolve(media_root, video[0]), item=item.item_id, max_frames=max_frames)
        else:
            frames, reencoded = [], {}
            for rel in sample.frame_files:
                path = resolve(media_root, rel)
                if path not in cache:
                    cache[path] = read_frame(path, item=item.item_id)
                data, original = cache[path]
                frames.append(data)
                if original:
                    reencoded[rel] = original
            timestamps = sample.timestamps
            if reencoded:
                metadata["reencoded_as_png"] = reencoded
        try:
            records.append(Record(sample.id, sample.source, sample.media_kind, tuple(frames), tuple(timestamps),
                                  sample.turns, sample.instance_ids, metadata))
        except SampleError as e:
            raise SampleError(item.item_id, f"sample {sample.id}: {e.problem}") from e
    return records


def write_shard(task: ShardTask) -> dict:
    """Write one shard + index, then its state file; returns the state."""
    path = os.path.join(task.out, task.file)
    skipped, by_task, written_items = [], {}, 0
    with TFRecordWriter(path) as writer:
        for item in task.items:
            try:
                records = item_records(item, task.media_roots[item.input_index], task.max_frames)
            except SampleError as e:
                skipped.append({"item": item.item_id, "reason": e.problem})
                continue
            written_items += 1
            for r in records:
                writer.write(encode_record(r))
                key = f"{r.source}:{r.metadata.get('task', '')}"
                by_task[key] = by_task.get(key, 0) + 1
        num_records = len(writer)
    state = {
        "fingerprint": task.fingerprint, "file": task.file, "num_records": num_records,
        "bytes": os.path.getsize(path), "sha256": file_sha256(path), "items_written": written_items,
        "records_by_task": dict(sorted(by_task.items())), "skipped": skipped,
    }
    _write_json(_state_path(task.out, task.file), state)
    return state


def _state_path(out: str, file: str) -> str:
    return os.path.join(out, STATE_DIR, file + ".json")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _finished_state(out: str, file: str, fingerprint: str) -> dict | None:
    """The state of a shard a previous run finished with the same fingerprint, else None."""
    try:
        with open(_state_path(out, file), encoding="utf-8") as f:
            state = json.load(f)
        path = os.path.join(out, file)
        if (state.get("fingerprint") == fingerprint and os.path.exists(index_path(path))
                and os.path.getsize(path) == state.get("bytes")):
            return state
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------- the whole build


def _fingerprint(inputs, hashes, num_shards, name, seed, max_frames, templates) -> str:
    spec = {
        "schema_version": SCHEMA_VERSION, "num_shards": num_shards, "name": name, "seed": seed,
        "max_frames": max_frames, "templates": templates.to_dict(),
        "inputs": [{"kind": s.kind, "sha256": h, "media_root": os.path.abspath(s.media_root)}
                   for s, h in zip(inputs, hashes)],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()


def _clear_previous(out: str, fingerprint: str, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` delete) a different build living in ``out``."""
    state_dir = os.path.join(out, STATE_DIR)
    names = os.listdir(state_dir) if os.path.isdir(state_dir) else []
    states = [os.path.join(state_dir, f) for f in names if f.endswith(".json")]
    manifest_path = os.path.join(out, MANIFEST)
    prints = set()
    for p in states + ([manifest_path] if os.path.exists(manifest_path) else []):
        try:
            with open(p, encoding="utf-8") as f:
                prints.add(json.load(f).get("fingerprint"))
        except (OSError, ValueError, AttributeError):
            prints.add(None)
    if not prints or prints == {fingerprint}:
        return
    if not overwrite:
        raise FileExistsError(f"{out} holds a different build (other inputs or options); "
                              "use a new output directory or overwrite=True (--overwrite)")
    # Only files this builder names: <name>-NNNNN-of-NNNNN.tfrecord, its .idx and their temporaries.
    for p in os.listdir(out):
        if SHARD_FILE.fullmatch(p):
            os.remove(os.path.join(out, p))
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)


def build_dataset(
    out: str,
    *,
    instit_image_json: str | list[str] = (),
    instit_video_json: str | list[str] = (),
    llava_json: str | list[str] = (),
    media_root: str | None = None,
    num_shards: int = 1,
    name: str = "instit",
    seed: int = 0,
    max_frames: int = MAX_FRAMES,
    templates: Templates | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Build (or finish building) a dataset in ``out``; returns the manifest. Input arguments take a
    path or a list of paths, each ``FILE`` or ``FILE::MEDIA_ROOT`` (see :func:`parse_input`)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+(-?[A-Za-z0-9_.]+)*", name):
        raise ValueError(f"name must be letters, digits, '_', '.', '-' (got {name!r})")
    templates = templates or Templates()
    inputs = [parse_input(kind, arg, media_root)
              for kind, args in zip(INPUT_KINDS, (instit_image_json, instit_video_json, llava_json))
              for arg in ([args] if isinstance(args, str) else list(args))]
    if not inputs:
        raise ValueError("no inputs: give instit_image_json, instit_video_json and/or llava_json")
    hashes = [file_sha256(s.path) if os.path.exists(s.path) else None for s in inputs]
    for s, h in zip(inputs, hashes):
        if h is None:
            raise FileNotFoundError(f"input file not found: {s.path}")

    items = read_items(inputs, templates=templates, seed=seed, max_frames=max_frames)
    fingerprint = _fingerprint(inputs, hashes, num_shards, name, seed, max_frames, templates)
    os.makedirs(out, exist_ok=True)
    _clear_previous(out, fingerprint, overwrite)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)

    roots = tuple(s.media_root for s in inputs)
    files = [shard_name(name, s, num_shards) for s in range(num_shards)]
    tasks, states = [], {}
    for file, shard_items in zip(files, assign_shards(items, num_shards)):
        state = _finished_state(out, file, fingerprint)
        if state is not None:
            states[file] = state
        else:
            tasks.append(ShardTask(out, file, fingerprint, tuple(shard_items), roots, max_frames))

    total = sum(len(it.samples) for it in items)
    with tqdm(total=total, unit="sample", desc=f"build {name}", disable=not progress, file=sys.stderr) as bar:
        bar.update(total - sum(len(it.samples) for t in tasks for it in t.items))
        if num_workers <= 0:
            for task in tasks:
                states[task.file] = write_shard(task)
                bar.update(sum(len(it.samples) for it in task.items))
        else:
            # spawn: safe even when the caller has JAX (threads) running; workers import only this package.
            ctx = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
                running = {pool.submit(write_shard, t): t for t in tasks}
                for done in futures.as_completed(running):
                    task = running[done]
                    states[task.file] = done.result()
                    bar.update(sum(len(it.samples) for it in task.items))

    manifest = _manifest(name, inputs, hashes, items, files, states, fingerprint, seed, max_frames, templates)
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _manifest(name, inputs, hashes, items, files, states, fingerprint, seed, max_frames, templates) -> dict:
    media_skips = {s["item"]: s["reason"] for f in files for s in states[f]["skipped"]}
    skipped, per_input = [], [dict(items_in=0, items_converted=0, items_skipped=0) for _ in inputs]
    for it in items:
        reason = it.skip_reason or media_skips.get(it.item_id)
        counts = per_input[it.input_index]
        counts["items_in"] += 1
        if reason is None:
            counts["items_converted"] += 1
        else:
            counts["items_skipped"] += 1
            skipped.append({"item": it.item_id, "input": inputs[it.input_index].path, "entry": it.entry_index,
                            "reason": reason})
    by_task: dict[str, int] = {}
    for f in files:
        for key, n in states[f]["records_by_task"].items():
            by_task[key] = by_task.get(key, 0) + n
    counts = {
        "items_in": len(items),
        "items_converted": sum(c["items_converted"] for c in per_input),
        "items_skipped": len(skipped),
        "records_written": sum(states[f]["num_records"] for f in files),
        "records_by_task": dict(sorted(by_task.items())),
    }
    converted_written = sum(states[f]["items_written"] for f in files)
    adds_up = counts["items_in"] == counts["items_converted"] + counts["items_skipped"]
    if not adds_up or converted_written != counts["items_converted"]:
        raise AssertionError(f"item counts do not add up: {counts}, items written by shards: {converted_written}")
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "fingerprint": fingerprint,
        "num_shards": len(files),
        "num_records": counts["records_written"],
        "shards": [{"file": f, "num_records": states[f]["num_records"], "bytes": states[f]["bytes"],
                    "sha256": states[f]["sha256"]} for f in files],
        "counts": counts,
        "inputs": [{"kind": s.kind, "path": s.path, "media_root": s.media_root, "sha256": h, **c}
                   for s, h, c in zip(inputs, hashes, per_input)],
        "options": {"seed": seed, "max_frames": max_frames, "templates": templates.to_dict()},
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.build", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("inputs (each repeatable; FILE or FILE::MEDIA_ROOT)")
    src.add_argument("--instit_image_json", action="append", default=[], metavar="FILE", help="Inst-IT image annotations")
    src.add_argument("--instit_video_json", action="append", default=[], metavar="FILE", help="Inst-IT video annotations")
    src.add_argument("--llava_json", action="append", default=[], metavar="FILE", help="LLaVA conversation JSON")
    src.add_argument("--media_root", default=None,
                     help="root for relative media paths of inputs without ::ROOT (default: the JSON file's folder)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--name", default="instit", help="shard file prefix")
    p.add_argument("--seed", type=int, default=0, help="seed for the user-turn wording")
    p.add_argument("--max_frames", type=int, default=MAX_FRAMES, help="frames per video sample (evenly subsampled)")
    p.add_argument("--templates", default=None, help="JSON file of user-turn templates (keys of instructions.Templates)")
    p.add_argument("--num_workers", type=int, default=0, help="worker processes (0 = in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = build_dataset(
            args.out, instit_image_json=args.instit_image_json, instit_video_json=args.instit_video_json,
            llava_json=args.llava_json, media_root=args.media_root, num_shards=args.num_shards, name=args.name,
            seed=args.seed, max_frames=args.max_frames,
            templates=load_templates(args.templates) if args.templates else None,
            num_workers=args.num_workers, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (OSError, ValueError) as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 2
    for s in manifest["skipped"]:
        print(f"skipped {s['item']}: {s['reason']}", file=sys.stderr)
    print(json.dumps({"out": args.out, **{k: v for k, v in manifest["counts"].items() if k != "records_by_task"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
