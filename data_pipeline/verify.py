"""Check a built dataset: ``python -m data_pipeline.verify DIR`` (exit 0 = clean, 1 = problems, 2 = unreadable).

For every shard in ``manifest.json``: the file exists and matches the manifest's size and sha256; the
``.idx`` sidecar is well formed, covers the whole file and agrees with the manifest's record count;
every record's length and data CRCs match and its length header agrees with the index; every record
decodes as a :class:`~data_pipeline.schema.Record`. Each problem names the shard and the record. A
shard whose index is unusable is checked by a sequential scan instead (which stops at a broken header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from data_pipeline.records import read_manifest
from data_pipeline.schema import decode_record
from data_pipeline.sources import file_sha256
from data_pipeline.tfrecord import RecordError, ShardReader, read_index, scan_offsets
from instit_jax.processing.errors import SampleError


@dataclasses.dataclass
class VerifyReport:
    shards_checked: int = 0
    records_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_payload(data: bytes, where: str, decode: bool, report: VerifyReport) -> None:
    report.records_checked += 1
    if decode:
        try:
            decode_record(data, where=where)
        except SampleError as e:
            report.problems.append(f"{where}: does not decode: {e.problem}")


def verify_dataset(directory: str, *, decode: bool = True) -> VerifyReport:
    """All problems found in ``directory`` (raises only if the manifest itself is unreadable)."""
    manifest = read_manifest(directory)
    report = VerifyReport()
    total = 0
    for entry in manifest["shards"]:
        path = os.path.join(directory, entry["file"])
        name = entry["file"]
        report.shards_checked += 1
        if not os.path.exists(path):
            report.problems.append(f"{name}: shard file is missing")
            continue
        if "bytes" in entry and os.path.getsize(path) != entry["bytes"]:
            report.problems.append(f"{name}: {os.path.getsize(path)} bytes, manifest says {entry['bytes']}")
        if "sha256" in entry and file_sha256(path) != entry["sha256"]:
            report.problems.append(f"{name}: sha256 differs from the manifest (file changed since the build)")
        try:
            offsets = read_index(path)
        except RecordError as e:
            report.problems.append(f"{name}: bad index: {e.problem}; checking by sequential scan")
            try:
                for k, _, data in scan_offsets(path, verify_crc=True):
                    _check_payload(data, f"{name}#{k}", decode, report)
                    total += 1
            except RecordError as scan_error:
                report.problems.append(f"{name}: record {scan_error.record_index}: {scan_error.problem} (scan stopped)")
            continue
        n = len(offsets) - 1
        if n != entry["num_records"]:
            report.problems.append(f"{name}: index has {n} records, manifest says {entry['num_records']}")
        reader = ShardReader(path, offsets)
        try:
            for k in range(n):
                try:
                    data = reader.read(k, verify_crc=True)
                except RecordError as e:
                    report.problems.append(f"{name}: record {k}: {e.problem}")
                    report.records_checked += 1
                    continue
                _check_payload(data, f"{name}#{k}", decode, report)
        finally:
            reader.close()
        total += n
    if total != manifest.get("num_records", total):
        report.problems.append(f"manifest says {manifest['num_records']} records, shards hold {total}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.verify", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="dataset directory (holds manifest.json)")
    p.add_argument("--no_decode", action="store_true", help="check framing and CRCs only")
    args = p.parse_args(argv)
    try:
        report = verify_dataset(args.dir, decode=not args.no_decode)
    except (OSError, ValueError) as e:
        print(f"verify failed: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(json.dumps({"dir": args.dir, "ok": report.ok, "shards": report.shards_checked,
                      "records": report.records_checked, "problems": len(report.problems)}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
