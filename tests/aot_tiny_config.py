"""A tiny trainer config for AOT tests: `--config=tests/aot_tiny_config.py[:fsdp,tensor]`."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_batches import trainer_config  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    fsdp, tensor = (int(x) for x in (arg or "-1,1").split(","))
    config = trainer_config(mesh=(1, fsdp, tensor), frozen=["vision_tower/encoder/layers[0:1]"],
                            overrides={"dtype": "bfloat16", "remat": "full"})
    config.data = ml_collections.ConfigDict({"global_batch_size": 8, "seq_len": 64, "max_views_per_row": 2})
    return config
