"""Every conversion error names what is wrong, the CLI exits with status 2, and --dst stays untouched."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from instit_jax.convert.cli import convert, main
from instit_jax.convert.errors import ConfigMismatchError, ConversionError
from test_convert import TINY_HEADS, no_leftovers, save_tiny_hf, save_tiny_llava


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "hf"
    save_tiny_hf("tiny_vicuna", path)
    return path


@pytest.fixture
def src(tiny_hf, tmp_path):
    """A private copy of the tiny HF checkpoint to damage."""
    path = tmp_path / "src"
    shutil.copytree(tiny_hf, path)
    return path


def run(capsys, src, dst, *extra, src_format="hf", dst_format="flax") -> tuple[int, str]:
    code = main(["--src", str(src), "--src_format", src_format, "--dst", str(dst), "--dst_format", dst_format, *extra])
    return code, capsys.readouterr().err


def edit_tensors(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_keys_are_listed(src, tmp_path, capsys):
    gone = ["language_model.model.layers.1.mlp.up_proj.weight", "vision_tower.post_layernorm.bias"]
    edit_tensors(src, lambda t: [t.pop(k) for k in gone])
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "missing keys (2)" in err
    assert "language_model.model.layers.1.mlp.up_proj.weight" in err
    assert "vision_tower.vision_model.post_layernorm.bias" in err  # named in the hub layout
    assert no_leftovers(tmp_path / "out")


def test_unexpected_keys_are_listed(src, tmp_path, capsys):
    edit_tensors(src, lambda t: t.update({"model.extra_head.weight": np.zeros((3, 4), np.float32)}))
    code, err = run(capsys, src, tmp_path / "out", dst_format="hf")
    assert code == 2 and "unexpected keys (1): [model.extra_head.weight]" in err
    assert no_leftovers(tmp_path / "out")


def test_shape_mismatch_names_the_key_and_both_shapes(src, tmp_path, capsys):
    key = "vision_tower.encoder.layers.2.mlp.fc1.weight"
    edit_tensors(src, lambda t: t.update({key: np.zeros((65, 32), np.float32)}))
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "shape mismatches (1)" in err
    assert f"{key}: weights (65, 32) vs config (64, 32)" in err
    assert no_leftovers(tmp_path / "out")


def test_config_that_does_not_match_the_weights(src, tmp_path, capsys):
    with open(src / "config.json") as f:
        raw = json.load(f)
    raw["text_config"]["num_hidden_layers"] = 3
    raw["text_config"]["vocab_size"] = 330
    with open(src / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigMismatchError) as info:
        convert(src, "hf", tmp_path / "out", "flax", log=None)
    message = str(info.value)
    assert "text layers: config 3, weights 2" in message
    assert "vocabulary rows: config 330, weights 320" in message
    assert "language_model.model.layers.2.self_attn.q_proj.weight" in message  # listed as missing
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "text layers: config 3, weights 2" in err and no_leftovers(tmp_path / "out")


def test_truncated_safetensors_file(src, tmp_path, capsys):
    path = src / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "truncated" in err and str(path) in err
    assert no_leftovers(tmp_path / "out")


def test_corrupt_safetensors_header(src, tmp_path, capsys):
    path = src / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{\x00garbage")
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "corrupt header" in err
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))  # header length beyond the file
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "header length" in err and no_leftovers(tmp_path / "out")


def test_index_naming_a_missing_shard(tiny_hf, tmp_path, capsys):
    src = tmp_path / "sharded"
    save_tiny_hf("tiny_vicuna", src, max_shard_size="60KB")
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    os.remove(src / shards[-1])
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "missing shard file" in err and shards[-1] in err


def test_pickled_objects_in_a_bin_file_are_refused(tiny_hf, tmp_path, capsys):
    src = tmp_path / "bin"
    os.makedirs(src)
    shutil.copy(tiny_hf / "config.json", src / "config.json")
    torch.save({"w": torch.zeros(2), "evil": ConversionError("not a tensor")}, src / "pytorch_model.bin")
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "refusing to load" in err


def test_no_weights_at_all(tiny_hf, tmp_path, capsys):
    src = tmp_path / "empty"
    os.makedirs(src)
    shutil.copy(tiny_hf / "config.json", src / "config.json")
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "no weights" in err


def test_llava_tower_fields_that_cannot_be_inferred(tmp_path, capsys):
    save_tiny_llava("tiny_vicuna", tmp_path / "llava")
    code, err = run(capsys, tmp_path / "llava", tmp_path / "out", src_format="llava")
    assert code == 2 and "num_heads" in err and "--vision_config" in err
    # The original key names appear in mismatch reports.
    path = os.path.join(tmp_path / "llava", "model.safetensors")
    tensors = load_file(path)
    del tensors["model.mm_projector.2.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    code, err = run(capsys, tmp_path / "llava", tmp_path / "out", "--vision_config", TINY_HEADS, src_format="llava")
    assert code == 2 and "missing keys (1): [model.mm_projector.2.bias]" in err
    # Without vision tower weights the original code would load another checkpoint: say so.
    tensors = {k: v for k, v in tensors.items() if "vision_tower" not in k}
    save_file(tensors, path, metadata={"format": "pt"})
    code, err = run(capsys, tmp_path / "llava", tmp_path / "out", "--vision_config", TINY_HEADS, src_format="llava")
    assert code == 2 and "no vision tower weights" in err and no_leftovers(tmp_path / "out")


def test_existing_destination_needs_overwrite(tiny_hf, tmp_path, capsys):
    dst = tmp_path / "out"
    os.makedirs(dst)
    (dst / "keep.txt").write_text("mine")
    code, err = run(capsys, tiny_hf, dst)
    assert code == 2 and "already exists" in err and (dst / "keep.txt").read_text() == "mine"
    code, _ = run(capsys, tiny_hf, dst, "--overwrite")
    assert code == 0 and not (dst / "keep.txt").exists() and (dst / "instit_jax_config.json").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def test_failure_while_writing_leaves_nothing_behind(tiny_hf, tmp_path, monkeypatch):
    from instit_jax.convert import sources

    calls = []
    original = sources.HubLeaves.__getitem__

    def flaky(self, path):
        calls.append(path)
        if len(calls) > 5:
            raise OSError("disk on fire")
        return original(self, path)

    monkeypatch.setattr(sources.HubLeaves, "__getitem__", flaky)
    for fmt in ("flax", "hf"):
        calls.clear()
        with pytest.raises(OSError, match="disk on fire"):
            convert(tiny_hf, "hf", tmp_path / fmt, fmt, log=None)
        assert no_leftovers(tmp_path / fmt)
