"""Where predictions go while a run is under way, and the final file in the official format.

    OUT/progress/<split>_<fmt>.host<NNNNN>.jsonl   append-only, one prediction per line, per host
    OUT/<split>_<fmt>_inference.json             the official predictions file (written at the end)
    OUT/run_info.json                            what produced the predictions (checked on resume)

A rerun reads every host's progress file and generates only what is missing, so a crash costs at most
the batch in flight, and the number of hosts may change between runs. A line cut short by a crash (no
newline at the end) is not a prediction: it is ignored when read and cut off before appending.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

PROGRESS_DIR = "progress"
RUN_INFO = "run_info.json"
# The official predictions file keys, in the official order.
PREDICTION_KEYS = ("question_id", "question", "model_prediction", "ground_truth", "split")


def predictions_path(out_dir: str, split: str, fmt: str) -> str:
    """The official file name (inference_image.py / inference_video.py)."""
    return os.path.join(out_dir, f"{split}_{fmt}_inference.json")


def progress_path(out_dir: str, split: str, fmt: str, process_index: int) -> str:
    return os.path.join(out_dir, PROGRESS_DIR, f"{split}_{fmt}.host{process_index:05d}.jsonl")


def _parse_lines(path: str, data: bytes) -> list[dict[str, Any]]:
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: damaged progress line ({err}); delete the line to regenerate it") from err
        if not isinstance(record, dict) or any(k not in record for k in PREDICTION_KEYS):
            raise ValueError(f"{path}:{n}: a progress line must hold {PREDICTION_KEYS}")
        records.append(record)
    return records


def read_progress(out_dir: str, split: str, fmt: str) -> dict[str, dict[str, Any]]:
    """question_id → prediction record, from every host's progress file (the first record of an id wins)."""
    done: dict[str, dict[str, Any]] = {}
    pattern = os.path.join(out_dir, PROGRESS_DIR, f"{split}_{fmt}.host*.jsonl")
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            for record in _parse_lines(path, f.read()):
                done.setdefault(str(record["question_id"]), record)
    return done


class ProgressWriter:
    """Appends prediction records for one host; each batch is flushed and fsynced before the next starts."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.dropped_partial_line = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):  # a line cut short by a crash: not a prediction, remove it
                with open(path, "r+b") as f:
                    f.truncate(keep)
                self.dropped_partial_line = True
        self.file = open(path, "a", encoding="utf-8")

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.file.write("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ProgressWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_run_info(out_dir: str, info: Mapping[str, Any]) -> None:
    """Record what produces the predictions; refuse to resume a directory written by something else."""
    from tools.annotate.client import atomic_write_json

    path = os.path.join(out_dir, RUN_INFO)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {info.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out_dir} holds predictions made with other settings ({details}); use a new output directory"
            )
        return
    atomic_write_json(path, dict(info))


def write_predictions(out_dir: str, split: str, fmt: str, question_ids: Sequence[str],
                      done: Mapping[str, Mapping[str, Any]]) -> str:
    """The official predictions file: every question, sorted by question_id, official keys only."""
    from tools.annotate.client import atomic_write_json

    missing = [q for q in question_ids if q not in done]
    if missing:
        raise RuntimeError(
            f"{split}/{fmt}: {len(missing)} question(s) have no prediction (e.g. {missing[:5]}); "
            "did a host fail? Rerun to fill them in."
        )
    records = [{k: done[q][k] for k in PREDICTION_KEYS} for q in sorted(question_ids)]
    path = predictions_path(out_dir, split, fmt)
    atomic_write_json(path, records)
    return path
