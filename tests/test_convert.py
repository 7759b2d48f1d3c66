"""Checkpoint conversion: HF ↔ Flax round trips, original LLaVA-NeXT → Flax/HF, file formats, --verify.

Tiny random transformers models (tests/hf_reference.tiny_pair) are saved with save_pretrained and
converted with the library entry point `convert` (the CLI's body); tensors are compared bit for bit
(read back with the `safetensors` package, not our reader), logits within 1e-4 in float32.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_reference import tiny_pair
from instit_jax.convert.cli import convert, main
from instit_jax.convert.hf_params import flax_arrays_from_hf, to_hub_key
from instit_jax.convert.llava_config import from_llava_config
from instit_jax.convert.orbax_io import FlaxCheckpoint, load_flax
from instit_jax.models.config import from_hf_config
from test_model_parity import build

TOL = 1e-4
PRESETS = ["tiny_vicuna", "tiny_qwen2"]
IMAGE = [(97, 113)]


# --------------------------------------------------------------------------- helpers (also used by test_convert_errors)


def save_tiny_hf(preset: str, directory, *, dtype=torch.float32, max_shard_size=None) -> None:
    _, hf, _ = tiny_pair(preset)
    model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)


def hub_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory, keys normalised to the hub layout, read by `safetensors`."""
    from safetensors import safe_open

    names = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    out = {}
    for name in names:
        with safe_open(os.path.join(directory, name), "np") as f:
            for key in f.keys():
                out[to_hub_key(key)] = f.get_tensor(key)
    return out


def assert_bit_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, a.shape, b.dtype, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


# Spec §10.1: original LLaVA-NeXT key names, written here independently of the converter's table.
_LLAVA_NAMES = (
    (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.language_model\.", "model."),
)


def llava_key(key: str) -> str:
    for pattern, replacement in _LLAVA_NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key  # model.image_newline, lm_head.weight are unchanged


def llava_config(cfg) -> dict:
    t, v = cfg.text, cfg.vision
    qwen = t.kind == "qwen2"
    return dict(
        architectures=["LlavaQwenForCausalLM" if qwen else "LlavaLlamaForCausalLM"],
        model_type="llava_qwen" if qwen else "llava_llama",
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
        mm_vision_tower="test/tiny-random-tower", mm_hidden_size=v.hidden_size, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres", image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_spatial_pool_stride=2,
        mm_spatial_pool_mode="bilinear", mm_newline_position="no_token", tokenizer_model_max_length=4096,
    )


def save_tiny_llava(preset: str, directory) -> None:
    """The tiny HF model's weights under original LLaVA-NeXT names, with an original config.json."""
    from safetensors.torch import save_file

    cfg, hf, _ = tiny_pair(preset)
    os.makedirs(directory, exist_ok=True)
    save_file({llava_key(k): v.contiguous() for k, v in hf.state_dict().items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(llava_config(cfg), f)


TINY_HEADS = '{"num_heads": 4}'  # the one tower field neither the weights nor an unknown name give


def hf_logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits[0].numpy()


def flax_logits(cfg, arrays, batch, n: int) -> np.ndarray:
    from instit_jax.convert import verify

    return verify.flax_logits(cfg, arrays, batch)[:n]


def no_leftovers(directory) -> bool:
    parent, name = os.path.split(os.path.abspath(directory))
    return not os.path.exists(directory) and not [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for preset in PRESETS:
        out[preset] = str(tmp_path_factory.mktemp(preset) / "hf")
        save_tiny_hf(preset, out[preset])
    return out


# --------------------------------------------------------------------------- HF → Flax → HF


@pytest.mark.parametrize("preset", PRESETS)
def test_hf_to_flax_to_hf_is_bit_exact_and_loads_in_transformers(preset, hf_dirs, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    cfg, hf, _ = tiny_pair(preset)
    src = hf_dirs[preset]
    convert(src, "hf", tmp_path / "flax", "flax", log=None)
    convert(tmp_path / "flax", "flax", tmp_path / "hf", "hf", log=None)

    # Flax checkpoint: our config (stored dtype recorded) and the HF table's arrays, bit for bit.
    flax_cfg, arrays = load_flax(tmp_path / "flax")
    assert flax_cfg == from_hf_config(src).replace(param_dtype="float32")
    expected = flax_arrays_from_hf(hf.state_dict(), cfg)
    assert set(arrays) == set(expected)
    for path, value in expected.items():
        assert_bit_equal(arrays[path], value, path)

    # HF output: every tensor of the source, same name (hub layout), dtype and bytes.
    source, back = hub_tensors(src), hub_tensors(tmp_path / "hf")
    assert set(back) == set(source)
    for key in source:
        assert_bit_equal(back[key], source[key], key)
    assert not any(k.startswith("model.") for k in back), "hub layout (A) expected"
    assert any(k.startswith("vision_tower.vision_model.") for k in back), "4.x-loadable vision keys"
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json"} <= files

    batch, hf_inputs, (n,) = build(cfg, IMAGE)
    reference = hf_logits(hf, hf_inputs)
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert np.max(np.abs(hf_logits(reloaded, hf_inputs) - reference)) <= TOL
    assert np.max(np.abs(flax_logits(flax_cfg, arrays, batch, n) - reference)) <= TOL


# --------------------------------------------------------------------------- original LLaVA-NeXT


@pytest.mark.parametrize("preset", PRESETS)
def test_original_llava_checkpoint_to_flax_and_hf(preset, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    cfg, hf, _ = tiny_pair(preset)
    save_tiny_llava(preset, tmp_path / "llava")
    verify = preset == "tiny_qwen2"  # --verify through an HF export of the written Flax checkpoint (once)
    result = convert(tmp_path / "llava", "llava", tmp_path / "flax", "flax", verify=verify,
                     vision_config=json.loads(TINY_HEADS), log=None)
    assert result.get("max_abs_logit_diff", 0) <= TOL
    convert(tmp_path / "llava", "llava", tmp_path / "hf", "hf", vision_config=json.loads(TINY_HEADS), log=None)

    flax_cfg, arrays = load_flax(tmp_path / "flax")
    assert flax_cfg.convention == "original" and flax_cfg.image_token_id is None
    assert flax_cfg.template == ("qwen_1_5" if preset == "tiny_qwen2" else "vicuna_v1")
    assert flax_cfg.vision == cfg.vision and flax_cfg.text == cfg.text
    assert flax_cfg.image_grid_pinpoints == cfg.image_grid_pinpoints

    batch, hf_inputs, (n,) = build(cfg, IMAGE)
    reference = hf_logits(hf, hf_inputs)
    assert np.max(np.abs(flax_logits(flax_cfg, arrays, batch, n) - reference)) <= TOL

    # HF output: <image> gets the first id past the 320 rows; rows appended to a multiple of 64.
    with open(tmp_path / "hf" / "config.json") as f:
        hf_config = json.load(f)
    vocab = cfg.text.vocab_size
    assert hf_config["image_token_index"] == vocab and hf_config["text_config"]["vocab_size"] == 384
    tensors = hub_tensors(tmp_path / "hf")
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        source = {k: v.numpy() for k, v in hf.state_dict().items()}["lm_head.weight" if "lm_head" in key
                                                                     else "model.language_model.embed_tokens.weight"]
        assert_bit_equal(tensors[key][:vocab], source, key)
        appended = np.broadcast_to(source.astype(np.float64).mean(0), (384 - vocab, source.shape[1]))
        np.testing.assert_allclose(tensors[key][vocab:], appended, rtol=1e-6, atol=0)
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = hf_inputs["input_ids"]
    hf_inputs = dict(hf_inputs, input_ids=torch.where(ids == cfg.image_token_id, vocab, ids))
    assert np.max(np.abs(hf_logits(reloaded, hf_inputs)[:, :vocab] - reference)) <= TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_original_llava_with_tokenizer_gives_a_working_hf_processor(preset, tmp_path):
    """<image> is added to the tokenizer, and the processor expands it to the count the model expects."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from tokenizers_for_tests import llama_like_tokenizer

    save_tiny_llava(preset, tmp_path / "llava")
    llama_like_tokenizer().save_pretrained(tmp_path / "llava")
    convert(tmp_path / "llava", "llava", tmp_path / "hf", "hf", vision_config=json.loads(TINY_HEADS), log=None)

    with open(tmp_path / "hf" / "config.json") as f:
        token_id = json.load(f)["image_token_index"]
    with open(tmp_path / "hf" / "processor_config.json") as f:
        proc_cfg = json.load(f)
    cfg, _, _ = tiny_pair(preset)
    assert proc_cfg["patch_size"] == 14 and proc_cfg["image_token"] == "<image>"
    assert proc_cfg["vision_feature_select_strategy"] == cfg.vision.feature_strategy
    assert proc_cfg["num_additional_image_tokens"] == (1 if cfg.vision.kind == "clip" else 0)

    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_token_id == token_id == len(llama_like_tokenizer())
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 130, 3), dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == token_id).sum()) > cfg.vision.tokens_per_view
    with torch.no_grad():
        model(**inputs)  # transformers raises if the <image> count differs from the features


def test_hf_processor_and_tokenizer_files_travel_through_flax(tmp_path):
    """An HF checkpoint saved with its processor (5.x layout) → Flax → HF: the processor still works."""
    import dataclasses

    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    from hf_reference import randomize_
    from instit_jax.convert.hf_config import to_hf_config
    from instit_jax.models.config import tiny_vicuna
    from tokenizers_for_tests import llama_like_tokenizer

    tok = copy.deepcopy(llama_like_tokenizer())
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    base = tiny_vicuna()
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=576), image_token_id=image_id)
    hf = LlavaNextForConditionalGeneration(to_hf_config(cfg)).eval()
    randomize_(hf, 3)
    hf.save_pretrained(tmp_path / "src")
    s = cfg.vision.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
    )
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14, image_token="<image>",
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       ).save_pretrained(tmp_path / "src")

    convert(tmp_path / "src", "hf", tmp_path / "flax", "flax", log=None)
    assert {"tokenizer.json", "processor_config.json"} <= set(os.listdir(tmp_path / "flax"))
    convert(tmp_path / "flax", "flax", tmp_path / "hf", "hf", log=None)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_token_id == image_id
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 40, 3), dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image>\nWhat color? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_array_equal(model(**inputs).logits.numpy(), hf(**inputs).logits.numpy())


# --------------------------------------------------------------------------- file formats


def test_sharded_bf16_checkpoint_stays_bf16_and_round_trips(tmp_path):
    import ml_dtypes

    save_tiny_hf("tiny_vicuna", tmp_path / "src", dtype=torch.bfloat16, max_shard_size="60KB")
    assert os.path.isfile(tmp_path / "src" / "model.safetensors.index.json")
    convert(tmp_path / "src", "hf", tmp_path / "flax", "flax", log=None)
    ckpt = FlaxCheckpoint(tmp_path / "flax")
    assert ckpt.cfg.param_dtype == "bfloat16"
    assert {info.dtype for info in ckpt.specs.values()} == {np.dtype(ml_dtypes.bfloat16)}

    convert(tmp_path / "flax", "flax", tmp_path / "hf", "hf", max_shard_size="50KB", log=None)
    with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = {n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")}
    assert len(shards) > 2 and set(index["weight_map"].values()) == shards
    source, back = hub_tensors(tmp_path / "src"), hub_tensors(tmp_path / "hf")
    per_shard: dict[str, list[int]] = {}
    for key, shard in index["weight_map"].items():
        per_shard.setdefault(shard, []).append(back[key].nbytes)
    assert all(sum(sizes) <= 50_000 or len(sizes) == 1 for sizes in per_shard.values())
    assert set(back) == set(source)
    for key in source:
        assert_bit_equal(back[key], source[key], key)
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"

    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16


def test_streaming_safetensors_writer_agrees_with_the_safetensors_package(tmp_path):
    """Shards, index, mixed dtypes (alignment), and our reader on files of the reference writer."""
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from instit_jax.convert.safetensors_io import CheckpointReader, ShardedSafetensorsWriter, TensorInfo

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),  # 30 bytes: next f32 would be misaligned
        "b": rng.standard_normal((7,)).astype(np.float32),
        "c": rng.integers(0, 9, (2, 2)).astype(np.int64),
        "d": rng.standard_normal((40, 40)).astype(np.float16),
        "e": np.array(True),
    }
    specs = [(k, TensorInfo(v.shape, v.dtype)) for k, v in tensors.items()]
    os.makedirs(tmp_path / "ours")
    writer = ShardedSafetensorsWriter(tmp_path / "ours", specs, max_shard_bytes=1000)
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    assert "model.safetensors.index.json" in files and len(files) > 3
    for name in files[:-1]:
        with safe_open(tmp_path / "ours" / name, "np") as f:
            for key in f.keys():
                assert_bit_equal(f.get_tensor(key), tensors[key], key)
    ours = CheckpointReader(tmp_path / "ours")
    assert set(ours.keys()) == set(tensors)
    os.makedirs(tmp_path / "ref")
    save_file(tensors, str(tmp_path / "ref" / "model.safetensors"))
    ref = CheckpointReader(tmp_path / "ref")
    for k, v in tensors.items():
        assert_bit_equal(ours.read(k), v, k)
        assert_bit_equal(ref.read(k), v, k)


def test_pytorch_bin_checkpoints_single_and_sharded(hf_dirs, tmp_path):
    cfg, hf, _ = tiny_pair("tiny_vicuna")
    state = hf.state_dict()  # in-memory (5.x) names: another key layout the reader must accept
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for d in (single, sharded):
        os.makedirs(d)
        with open(os.path.join(hf_dirs["tiny_vicuna"], "config.json")) as f, open(d / "config.json", "w") as g:
            g.write(f.read())
    torch.save(state, single / "pytorch_model.bin")
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    with open(sharded / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}, f)

    expected = flax_arrays_from_hf(state, cfg)
    for d in (single, sharded):
        convert(d, "hf", tmp_path / f"{d.name}_flax", "flax", log=None)
        _, arrays = load_flax(tmp_path / f"{d.name}_flax")
        for path, value in expected.items():
            assert_bit_equal(arrays[path], value, path)


def test_dtype_option_casts_floating_weights(hf_dirs, tmp_path):
    import ml_dtypes

    cfg, hf, _ = tiny_pair("tiny_qwen2")
    convert(hf_dirs["tiny_qwen2"], "hf", tmp_path / "flax", "flax", dtype="bfloat16", log=None)
    flax_cfg, arrays = load_flax(tmp_path / "flax")
    assert flax_cfg.param_dtype == "bfloat16"
    for path, value in flax_arrays_from_hf(hf.state_dict(), cfg).items():
        assert_bit_equal(arrays[path], value.astype(ml_dtypes.bfloat16), path)


def test_save_flax_and_load_flax_library_api(tmp_path):
    """What training uses: save a model's parameters (flat or nested), load them back exactly."""
    from flax import nnx

    from instit_jax.convert.orbax_io import nest, save_flax
    from instit_jax.models.llava_next import LlavaNext

    cfg, _, ours = tiny_pair("tiny_vicuna")
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    save_flax(tmp_path / "ckpt", cfg, params)
    loaded_cfg, arrays = load_flax(tmp_path / "ckpt")
    assert loaded_cfg == cfg
    model = nnx.eval_shape(lambda: LlavaNext(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, nest(arrays))
    for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(ours, nnx.Param))):
        assert_bit_equal(np.asarray(var[...]), np.asarray(want[...]), path)
    with pytest.raises(Exception, match="already exists"):
        save_flax(tmp_path / "ckpt", cfg, params)


# --------------------------------------------------------------------------- CLI and --verify


def test_verify_prints_the_difference_and_the_exit_code_follows_the_tolerance(hf_dirs, tmp_path, capsys):
    src = hf_dirs["tiny_qwen2"]
    args = ["--src", src, "--src_format", "hf", "--dst_format", "flax", "--verify"]
    assert main(args + ["--dst", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^max_abs_logit_diff=(\S+)$", out, re.M)
    assert match, out
    diff = float(match.group(1))
    assert 0 <= diff <= TOL

    args[args.index("flax")] = "hf"  # the other direction: transformers runs the written files
    code = main(args + ["--dst", str(tmp_path / "strict"), "--tolerance", "0"])
    captured = capsys.readouterr()
    assert f"max_abs_logit_diff=" in captured.out
    if diff > 0:
        assert code == 1 and "exceeds the tolerance" in captured.err
        assert no_leftovers(tmp_path / "strict")
    else:
        assert code == 0


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "instit_jax.convert", "--help"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for flag in ("--src_format", "--dst_format", "--verify", "--tolerance", "--dtype", "--vision_config"):
        assert flag in out.stdout


# --------------------------------------------------------------------------- configs


def test_original_config_reading_of_the_real_model_families():
    from instit_jax.models import config as C

    vicuna = C.vicuna_7b()
    raw = llava_config(vicuna)
    raw.update(mm_vision_tower="openai/clip-vit-large-patch14-336", image_grid_pinpoints="[(336, 672), (672, 336)]")
    cfg = from_llava_config(raw)
    assert cfg.vision == C.clip_vit_l_336() and cfg.text == vicuna.text and cfg.convention == "original"
    assert cfg.image_grid_pinpoints == ((336, 672), (672, 336)) and cfg.template == "vicuna_v1"

    qwen = C.qwen2_7b()
    raw = llava_config(qwen)
    raw.update(model_type="llava", mm_vision_tower="google/siglip-so400m-patch14-384",
               mm_hidden_size=1152, image_grid_pinpoints="(1x1),...,(2x2)")  # LLaVA's range syntax
    cfg = from_llava_config(raw)
    assert cfg.text.kind == "qwen2" and cfg.text == qwen.text and cfg.template == "qwen_1_5"
    assert cfg.vision == C.siglip_so400m_384()  # 26 layers, last hidden state, every token
    assert cfg.image_grid_pinpoints == ((384, 384), (384, 768), (768, 384), (768, 768))

    with pytest.raises(NotImplementedError, match="mm_projector_type"):
        from_llava_config({**raw, "mm_projector_type": "linear"})
    with pytest.raises(ValueError, match="mm_hidden_size"):
        from_llava_config({**raw, "mm_hidden_size": 1024})


@pytest.mark.parametrize("preset", ["vicuna_7b", "qwen2_7b", "tiny_vicuna", "tiny_qwen2"])
def test_our_config_json_round_trip(preset):
    from instit_jax.models import config as C

    cfg = C.get_preset(preset).replace(param_dtype="bfloat16", convention="original")
    assert C.config_from_dict(json.loads(json.dumps(C.config_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        C.config_from_dict({**C.config_to_dict(cfg), "colour": "red"})
