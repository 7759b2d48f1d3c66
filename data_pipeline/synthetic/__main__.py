"""``python -m data_pipeline.synthetic --out DIR``: generate (or reuse) the synthetic world.

Prints a short summary and, last, one JSON line with the paths, counts, tokenizer size and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from data_pipeline.synthetic.build import WorldParams, make_world


def main(argv: list[str] | None = None) -> int:
    defaults = WorldParams()
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__)
    ap.add_argument("--out", required=True, help="directory to write the world into")
    for f in dataclasses.fields(WorldParams):
        ap.add_argument(f"--{f.name}", type=int, default=getattr(defaults, f.name))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing world with other parameters")
    args = ap.parse_args(argv)
    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(WorldParams)}
    start = time.perf_counter()
    try:
        paths = make_world(args.out, overwrite=args.overwrite, **params)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    manifest = paths.read_manifest()
    counts, tok = manifest["counts"], manifest["tokenizer"]
    print(f"world: {paths.root}")
    for name, value in counts.items():
        print(f"  {name:24s} {value}")
    print(f"  tokenizer vocab_size      {tok['vocab_size']}")
    print(json.dumps({"root": paths.root, "seconds": round(seconds, 2), "counts": counts,
                      "vocab_size": tok["vocab_size"], "files": manifest["files"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
