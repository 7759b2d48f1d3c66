"""KV-cache generation vs transformers' generate, token for token (fp32, greedy)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import layout_for, tiny_pair, to_torch_pixels
from instit_jax import generate as gen
from instit_jax.testing import hf_token_rows
from instit_jax.processing.batch import Sample, assemble_batch, image_input, video_input
from instit_jax.processing.image import preprocess_image
from instit_jax.processing.prompts import PLACEHOLDER_ID
from test_model_parity import random_image, spec_for
from test_video_parity import random_frames, reference_video_embeds

NEW = 10
SIZES = [(230, 50), (40, 170), (97, 113)]


def image_prompts(cfg, seed=0):
    """Three prompts of different lengths, each with its own image; our batch and HF's inputs."""
    rng = np.random.default_rng(seed)
    spec = spec_for(cfg)
    samples, views, rows, image_sizes = [], [], [], []
    for i, (w, h) in enumerate(SIZES):
        pixels, plan = preprocess_image(random_image(w, h, 10 + i), spec)
        before, after = rng.integers(3, 300, 4 + 3 * i), rng.integers(3, 300, 5)
        ids = np.concatenate([[1], before, [PLACEHOLDER_ID], after]).astype(np.int32)
        samples.append(Sample(f"p{i}", ids, None, (image_input(pixels, plan),)))
        views.append(pixels)
        rows.append(np.concatenate([[1], before, [cfg.image_token_id] * plan.num_tokens, after]))
        image_sizes.append((h, w))
    ids, mask = hf_token_rows(rows, left_pad=True)  # HF batched generation pads on the left
    hf_inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=to_torch_pixels(views),
                     image_sizes=torch.tensor(image_sizes))
    return assemble_batch(samples, layout_for(cfg)), hf_inputs


def hf_generate(hf, inputs, new_tokens, eos_ids=()):
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=list(eos_ids) or None, pad_token_id=0)
    if "input_ids" in inputs:
        out = out[:, inputs["input_ids"].shape[1]:]
    cfg = gen.SamplingConfig(max_new_tokens=new_tokens, eos_ids=tuple(eos_ids))
    return [gen.trim(r, cfg) for r in out.tolist()]


@pytest.mark.parametrize("preset", ["tiny_vicuna", "tiny_qwen2"])
def test_greedy_matches_hf_on_image_prompts(preset):
    cfg, hf, ours = tiny_pair(preset)
    hf.generation_config.eos_token_id = None
    batch, hf_inputs = image_prompts(cfg)
    generator = gen.Generator(ours)
    expected = hf_generate(hf, hf_inputs, NEW)
    got = generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW))
    assert got == expected
    assert all(len(r) == NEW for r in got)

    # Stop on EOS: make row 0's fourth token an EOS id; HF and we stop there (the EOS is kept).
    eos = expected[0][3]
    stopped = generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW, eos_ids=(eos,)))
    assert stopped == hf_generate(hf, hf_inputs, NEW, eos_ids=(eos,))
    assert stopped[0] == expected[0][: expected[0].index(eos) + 1]


def test_greedy_matches_hf_on_video_frames():
    cfg, hf, ours = tiny_pair("tiny_vicuna")
    hf.generation_config.eos_token_id = None
    frames = random_frames(cfg, seed=5)
    rng = np.random.default_rng(1)
    before, after = rng.integers(3, 300, 6), rng.integers(3, 300, 4)
    ids = np.concatenate([[1], before, [PLACEHOLDER_ID], after]).astype(np.int32)
    visual = video_input(frames, cfg.pooled_tokens_per_frame, max_frames=cfg.max_frames)
    batch = assemble_batch([Sample("v", ids, None, (visual,))], layout_for(cfg))
    with torch.no_grad():
        embeds = reference_video_embeds(hf, cfg, frames, before, after)
    expected = hf_generate(hf, dict(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)), NEW)
    assert gen.Generator(ours).generate(batch, gen.SamplingConfig(max_new_tokens=NEW)) == expected


def test_stop_sequences_sampling_and_single_compile():
    cfg, _, ours = tiny_pair("tiny_qwen2")
    batch, _ = image_prompts(cfg, seed=4)
    generator = gen.Generator(ours)
    greedy = generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW))
    seq = tuple(greedy[1][2:4])
    stopped = generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW, stop_sequences=(seq,)))
    assert stopped[1] == gen.trim(greedy[1], gen.SamplingConfig(stop_sequences=(seq,)))
    assert tuple(stopped[1][-2:]) == seq

    # top_p close to 0 keeps only the top token: sampling then equals greedy.
    assert generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_p=1e-6)) == greedy
    sampled = [generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW, temperature=2.0, seed=s)) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]

    before = gen._generate_jit._cache_size()
    other, _ = image_prompts(cfg, seed=9)  # other tokens and images, same buckets
    generator.generate(other, gen.SamplingConfig(max_new_tokens=NEW))
    assert gen._generate_jit._cache_size() == before


def test_text_helpers():
    assert gen.cut_at_stop_strings("A. red</s>junk", ["</s>", "###"]) == "A. red"
    assert gen.trim([5, 6, 2, 0, 0], gen.SamplingConfig(eos_ids=(2,))) == [5, 6, 2]


@pytest.mark.parametrize("num_devices", [2, 4])
def test_rows_split_over_devices_give_the_same_tokens(num_devices):
    """Data-parallel generation (rows over devices, params replicated; 3 rows padded to 4) equals HF."""
    import jax

    cfg, hf, ours = tiny_pair("tiny_vicuna")
    hf.generation_config.eos_token_id = None
    batch, hf_inputs = image_prompts(cfg, seed=2)
    generator = gen.Generator(ours, devices=jax.devices()[:num_devices])
    got = generator.generate(batch, gen.SamplingConfig(max_new_tokens=NEW))
    assert got == hf_generate(hf, hf_inputs, NEW)
    assert len(generator.state["language_model"]["norm"]["scale"].value.sharding.device_set) == num_devices


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    return comps


def test_decode_loop_reads_weights_and_prompt_cache_in_place():
    """The compiled decode loop copies neither layer weights nor the prompt's KV buffers per token.

    Slicing stacked layer weights inside the loop, or updating one buffer that the loop also reads,
    made XLA:CPU copy them on every step (decode 22.5 -> 10.3 ms/token on benchmarks/generate.py)."""
    cfg, _, ours = tiny_pair("tiny_qwen2")
    batch, _ = image_prompts(cfg)
    generator = gen.Generator(ours)
    inputs = {k: np.asarray(v) for k, v in gen.left_align(batch).items()
              if k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids")}
    text = gen._generate_jit.lower(generator.graphdef, generator.state, inputs,
                                   gen.SamplingConfig(max_new_tokens=NEW)).compile().as_text()
    comps = _computations(text)
    bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    t = cfg.text
    rows, prompt_len = batch["input_ids"].shape
    decode_ops = [line for body in bodies for line in comps[body]]
    assert decode_ops, "no while loop found in the compiled generator"
    # The loop must not even receive the stacked (layers, ...) decoder weights.
    stacked = {"f32[" + ",".join(map(str, leaf.shape)) + "]"
               for leaf in jax.tree.leaves(nnx.state(ours.language_model.layers)) if leaf.ndim >= 2}
    assert not [s for s in stacked if any(s in line for line in decode_ops)], stacked
    # No copy of a KV buffer as long as the prompt (the per-step copies XLA made of a buffer it both read
    # and updated in place).
    kv_copy = re.compile(rf"= f32\[{rows},{t.num_kv_heads},(\d+),{t.head_dim}\]\S* copy\(")
    copies = [line for line in decode_ops if (m := kv_copy.search(line)) and int(m.group(1)) >= prompt_len]
    assert not copies, copies[:3]
