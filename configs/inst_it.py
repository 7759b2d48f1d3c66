"""Inst-IT training configs: ``--config=configs/inst_it.py:STAGE[,model=NAME][,layout=LAYOUT]``.

STAGE is ``align`` (projector only, LCS-558K), ``stage1`` (LLaVA-NeXT single-image instruction tuning),
``stage2`` (Inst-IT continuous instruction tuning, from stage 1's export), ``demo`` (both stages of a small
model on a synthetic world, evaluated on its bench, on CPU) or ``demo_smoke`` (the demo's path on a few scenes
and steps, for tests). NAME is ``vicuna_7b`` (default) or ``qwen2_7b``. LAYOUT is a TPU slice layout of
instit_jax/training/layouts.py (``v5p-64``, ``v5e-256``: mesh, micro-batches and remat measured to fit
stage 2 of both presets at batch 128 × 6144 tokens). Override
any field on the command line: ``--config.optimizer.lr=2e-5``, ``--config.data.sources[0].path=/data/x``.

Every value the Inst-IT paper publishes is marked ``published`` in ``config.provenance`` (which mirrors the
config's own nesting); values it never published take LLaVA-NeXT's defaults and are marked ``default``;
``inference`` marks our reading of the paper, ``choice`` an implementation choice of this project.
See docs/training.md for the field reference.
"""

from __future__ import annotations

import ml_collections

from data_pipeline.config import data_config
from instit_jax.sharding import DEFAULT_RULES
from instit_jax.training.layouts import apply_layout

STAGES = ("align", "stage1", "stage2", "demo", "demo_smoke")
MODELS = ("vicuna_7b", "qwen2_7b")

# Published dataset sizes (instruction samples), used as mixture weights: "mixed" = drawn in proportion.
INST_IT_SAMPLES = 243_000
LLAVA_NEXT_DATA_SAMPLES = 779_000

# Logical axis -> mesh axis rules (instit_jax/sharding.py explains them): pure FSDP over `fsdp`, batch over
# data×fsdp; `tensor` only takes effect when config.mesh.tensor > 1.
SHARDING_RULES = [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in DEFAULT_RULES]

# The stacked vision encoder layers, for freezing slices of them (contract: `[a:b]` slices `layers`).
VISION_LAYERS = "vision_tower/encoder/layers"


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
    """"stage2,model=qwen2_7b" -> ("stage2", {"model": "qwen2_7b"})."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if not parts or "=" in parts[0]:
        raise ValueError(f"config argument {arg!r}: start with the stage, one of {STAGES} "
                         f"(e.g. configs/inst_it.py:stage2,model=qwen2_7b)")
    stage, options = parts[0], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in ("model", "layout"):
            raise ValueError(f"config argument {arg!r}: unknown option {part!r} (known: model=NAME, layout=NAME)")
        options[key] = value
    if stage not in STAGES:
        raise ValueError(f"config argument {arg!r}: unknown stage {stage!r}; known: {STAGES}")
    if options.get("model", "vicuna_7b") not in MODELS:
        raise ValueError(f"config argument {arg!r}: unknown model {options['model']!r}; known: {MODELS}")
    return stage, options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    stage, options = parse_arg(arg)
    if stage in ("demo", "demo_smoke"):
        if options:
            given = ", ".join(f"{key}=" for key in options)
            raise ValueError(f"the demo runs its own small model on CPU; {given} does not apply to it")
        return demo_config(smoke=stage == "demo_smoke")
    config = stage_config(stage, options.get("model", "vicuna_7b"))
    if "layout" in options:  # mesh, accumulation and memory settings measured to fit a TPU slice
        apply_layout(config, options["layout"])
    return config


# --------------------------------------------------------------------------- the shared skeleton


def _mark(prov: ml_collections.ConfigDict, dotted: str, note: str) -> None:
    """provenance.<dotted> = note, creating the nesting."""
    node = prov
    *parents, leaf = dotted.split(".")
    for name in parents:
        if name not in node:
            node[name] = ml_collections.ConfigDict()
        node = node[name]
    node[leaf] = note


def run_fields(config: ml_collections.ConfigDict) -> None:
    """Fields of a whole run (shared by the stages of a multi-stage config)."""
    config.workdir = ""  # or --workdir; stage S writes under <workdir>/<S>/
    config.data_root = ""  # relative data/tokenizer paths are resolved against this (then the cwd)
    config.seed = 0
    config.stages = ()  # names of sub-configs to run in order; () = this config is one stage
    config.distributed = ml_collections.ConfigDict(dict(
        # "auto": initialize jax.distributed when the fields below or JAX_COORDINATOR_ADDRESS /
        # JAX_NUM_PROCESSES / JAX_PROCESS_ID or a multi-host TPU/SLURM environment say so.
        mode="auto",  # auto | on | off
        coordinator_address="",
        num_processes=-1,
        process_id=-1,
        initialization_timeout=300,
    ))


def stage_fields(config: ml_collections.ConfigDict, *, stage: str, preset: str) -> None:
    """Every field one stage reads, with LLaVA-NeXT's defaults."""
    config.stage = stage
    config.model = ml_collections.ConfigDict(dict(
        preset=preset,
        # Applied with LlavaNextConfig.replace: bf16 compute over fp32 master weights.
        overrides=ml_collections.ConfigDict(dict(
            dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full", max_frames=32,
        )),
    ))
    config.init = ml_collections.ConfigDict(dict(
        checkpoint="",  # a Flax checkpoint dir (python -m instit_jax.convert ... --to flax)
        from_stage="",  # else: <workdir>/<from_stage>/export, the export of an earlier stage
        allow_random=False,  # else: random init (tiny demo only)
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-5,  # language model
        projector_lr=1e-5,  # multi_modal_projector and image_newline
        vision_lr=2e-6,  # vision tower
        warmup_ratio=0.03,
        schedule="cosine",
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,
        frozen=[],  # path patterns; "[a:b]" slices the stacked layers axis
        total_steps=-1,  # -1: one pass over the data (num_epochs × records / global_batch_size)
    ))
    config.train = ml_collections.ConfigDict(dict(
        grad_accum_steps=1,
        log_every=10,  # metrics fetched, checked for NaN/Inf and logged every N steps
        stop_after=-1,  # > 0: stop (checkpoint, no export) after this many steps, e.g. smoke tests
        preemption_check_every=10,  # multi-host: steps between agreeing on a SIGTERM across hosts
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        save_every=500,
        keep=3,
        async_save=True,
    ))
    config.metrics = ml_collections.ConfigDict(dict(
        peak_flops_per_device=-1.0,  # FLOP/s for MFU; -1 = look up the device kind, 0 = no MFU
        tensorboard=True,
    ))
    config.export = ml_collections.ConfigDict(dict(enabled=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in SHARDING_RULES]))

    prov = config.provenance = ml_collections.ConfigDict()
    nxt = "default: LLaVA-NeXT SFT scripts (finetune_si.sh / OneVision video)"
    for key in ("lr", "projector_lr"):
        _mark(prov, f"optimizer.{key}", nxt)
    _mark(prov, "optimizer.vision_lr", nxt + ", mm_vision_tower_lr")
    _mark(prov, "optimizer.warmup_ratio", nxt)
    _mark(prov, "optimizer.kind", "published: AdamW (Inst-IT §4.1); the fields here are its settings")
    _mark(prov, "optimizer.schedule", "published: cosine (Inst-IT §4.1)")
    _mark(prov, "optimizer.weight_decay", nxt)
    for key in ("b1", "b2", "eps", "clip_norm"):
        _mark(prov, f"optimizer.{key}", "default: HF Trainer AdamW defaults used by LLaVA-NeXT")
    _mark(prov, "optimizer.total_steps", "default: one epoch (LLaVA-NeXT)")
    _mark(prov, "model.overrides.dtype", "published: bfloat16 (Qwen2 model card); LLaVA-NeXT trains bf16")
    _mark(prov, "model.overrides.param_dtype", "choice: fp32 master weights")
    _mark(prov, "model.overrides.remat", "choice: memory (see benchmarks/aot_7b.py)")
    _mark(prov, "mesh", "choice: pure FSDP")
    _mark(prov, "data.pack", "choice: packing with per-segment attention (LLaVA-NeXT pads instead)")


# --------------------------------------------------------------------------- the real recipe


def stage_config(stage: str, model: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    run_fields(config)
    stage_fields(config, stage=stage, preset=model)
    prov = config.provenance
    qwen = model == "qwen2_7b"
    template = "qwen_1_5" if qwen else "vicuna_v1"
    _mark(prov, "data.template", "published: vicuna_v1 (Inst-IT inference scripts)" if not qwen
          else "inference: qwen_1_5, the LLaVA-NeXT convention for Qwen2")

    if stage == "align":
        config.data = data_config(
            sources=[dict(name="lcs558k", path="", weight=1.0)],
            seq_len=2048, max_views_per_row=8, global_batch_size=256, max_frames=1, template="plain",
            num_epochs=1,
        )
        config.optimizer.lr = config.optimizer.projector_lr = 1e-3
        config.optimizer.frozen = ["vision_tower", "language_model", "image_newline"]
        config.model.overrides.max_frames = 1
        _mark(prov, "data.sources", "published: LCS-558K for vision-language alignment (Inst-IT §4.1)")
        _mark(prov, "optimizer.frozen", "default: LLaVA pretraining tunes the projector only")
        _mark(prov, "optimizer.lr", "default: LLaVA pretraining lr 1e-3")
        _mark(prov, "optimizer.projector_lr", "default: LLaVA pretraining lr 1e-3")
        _mark(prov, "data.global_batch_size", "default: LLaVA pretraining batch 256")
        _mark(prov, "data.seq_len", "default: LLaVA model_max_length 2048")
        _mark(prov, "data.template", "default: LLaVA pretraining 'plain' template")
        config.init.checkpoint = ""  # the base model (vision tower + LLM) as a Flax dir
    elif stage == "stage1":
        config.data = data_config(
            sources=[dict(name="llava_next_data", path="", weight=1.0)],
            seq_len=4096, max_views_per_row=10, global_batch_size=128, max_frames=1, template=template,
            num_epochs=1,
        )
        config.model.overrides.max_frames = 1
        config.init.from_stage = "align"
        _mark(prov, "data.sources", "published: LLaVA-NeXT-Data single-image SFT (Inst-IT §4.1)")
        _mark(prov, "data.seq_len", "default: LLaVA-NeXT model_max_length 4096")
        _mark(prov, "data.global_batch_size", "default: LLaVA-NeXT SFT global batch 128")
        _mark(prov, "optimizer.frozen", "default: mm_tunable_parts=vision_tower,mlp_adapter,language_model")
    elif stage == "stage2":
        # Qwen2's SigLIP gives 196 pooled tokens per frame: 32 frames (6272) overflow the 6K context.
        frames = 28 if qwen else 32
        config.data = data_config(
            sources=[
                dict(name="inst_it", path="", weight=float(INST_IT_SAMPLES)),
                dict(name="llava_next_data", path="", weight=float(LLAVA_NEXT_DATA_SAMPLES)),
            ],
            seq_len=6144, max_views_per_row=frames, global_batch_size=128, max_frames=frames,
            template=template, num_epochs=1,
        )
        config.model.overrides.max_frames = frames
        # What feeds the first 12 layers is frozen with them: the embeddings, and CLIP's pre-layernorm
        # (SigLIP has none).
        config.optimizer.frozen = ["vision_tower/embeddings"] + ([] if qwen else ["vision_tower/pre_layrnorm"]) + [
            f"{VISION_LAYERS}[0:12]"]
        config.init.from_stage = "stage1"
        _mark(prov, "data.sources", "published: Inst-IT Dataset mixed with LLaVA-NeXT-Data (Inst-IT §4.1); "
              "inference: weights proportional to the published sizes (243K, 779K)")
        _mark(prov, "data.seq_len", "published: 6K LLM context (Inst-IT §4.1)")
        _mark(prov, "data.max_frames", "published: at most 32 frames (Inst-IT §4.1)" if not qwen else
              "inference: 28, since 32 SigLIP frames (6272 tokens) exceed the published 6K context")
        _mark(prov, "data.global_batch_size", "default: LLaVA-NeXT SFT global batch 128")
        _mark(prov, "optimizer.frozen", "published: first 12 vision-encoder layers frozen (Inst-IT §4.1); "
              "inference: the patch embeddings and pre-LN that feed them too")
        _mark(prov, "init.from_stage", "published: continues from the stage-1 single-image model")
    else:
        raise ValueError(f"unknown stage {stage!r}")
    _mark(prov, "data.tokenizer", "required: the tokenizer of the base LLM (exported with each stage)")
    return config


# --------------------------------------------------------------------------- the demo


# Synthetic world for the demo (data_pipeline.synthetic.WorldParams); its tokenizer sets the vocabulary.
DEMO_WORLD = dict(seed=0, num_images=400, num_videos=120, bench_images=50, bench_videos=25, image_size=224,
                  max_frames=8, vocab_size=512)
# `demo_smoke`: the same path through every stage on a world of a few scenes, a few steps each (tests).
SMOKE_WORLD = dict(DEMO_WORLD, num_images=12, num_videos=4, bench_images=4, bench_videos=2)


def demo_stage(stage: str, *, smoke: bool = False) -> ml_collections.ConfigDict:
    """One demo stage: the demo model (models/config.py:demo_model) on a CPU-sized batch, sized so that
    world, both stages and both evaluations finish in minutes on 2 CPU cores."""
    config = ml_collections.ConfigDict()
    stage_fields(config, stage=stage, preset="demo")
    world = SMOKE_WORLD if smoke else DEMO_WORLD
    config.model.overrides = ml_collections.ConfigDict(dict(
        # float32 on CPU: bf16 matmuls are no faster there and the tiny model learns better in fp32.
        dtype="float32", param_dtype="float32", scan_layers=True, remat="none", max_frames=world["max_frames"],
        text=dict(vocab_size=world["vocab_size"]),
    ))
    sources = [dict(name="synthetic_images", path="datasets/images", weight=1.0)]
    if stage == "stage2":  # the recipe's mix: Inst-IT data together with the stage-1 data
        sources.append(dict(name="synthetic_inst_it", path="datasets/inst_it", weight=2.0))
    config.data = data_config(
        sources=sources, seq_len=512, max_views_per_row=8, global_batch_size=8, max_frames=world["max_frames"],
        tokenizer="synthetic/tokenizer", template="vicuna_v1",
    )
    config.optimizer.lr = config.optimizer.projector_lr = 3e-3
    config.optimizer.vision_lr = 1e-3
    config.optimizer.warmup_ratio = 0.1
    config.optimizer.total_steps = 3 if smoke else (120 if stage == "stage1" else 180)
    config.train.log_every = 1 if smoke else 10
    config.checkpoint.save_every = 0  # one checkpoint at the end of the stage (saves cost seconds on CPU)
    config.checkpoint.keep = 1
    config.metrics.peak_flops_per_device = 0.0
    if stage == "stage1":
        config.init.allow_random = True
    else:
        config.init.from_stage = "stage1"
        # The recipe freezes the first 12 of 24 vision layers (and what feeds them): here the first of the 2
        # layers the demo tower computes, with the patch embeddings and the pre-layernorm.
        config.optimizer.frozen = ["vision_tower/embeddings", "vision_tower/pre_layrnorm", f"{VISION_LAYERS}[0:1]"]
    return config


def demo_config(*, smoke: bool = False) -> ml_collections.ConfigDict:
    world = SMOKE_WORLD if smoke else DEMO_WORLD
    eval_batch = 8 if smoke else 50
    config = ml_collections.ConfigDict()
    run_fields(config)
    config.workdir = "runs/demo_smoke" if smoke else "runs/demo"
    config.stages = ("stage1", "stage2")
    config.stage1 = demo_stage("stage1", smoke=smoke)
    config.stage2 = demo_stage("stage2", smoke=smoke)
    config.demo = ml_collections.ConfigDict(dict(
        # "module:function" hooks around the stages: `prepare(config, workdir)` runs first (synthetic world +
        # TFRecord datasets under data_dir); `finish(config, workdir, exports)` runs after the last stage with
        # {stage: export dir} (bench evaluation of every stage, the score table, the final JSON line).
        prepare="instit_jax.demo:prepare",
        finish="instit_jax.demo:finish",
        data_dir="",  # "" = <workdir>/demo_data; the stages' relative data paths resolve against it
        seed=0,
        num_shards=2,
        world=dict(world),
        # Greedy decoding stops at EOS; the world's answers are short, so 48 new tokens never cut one (the
        # official 128 only costs time on a model that rambles). One sequence and one view bucket: the
        # eval compiles one prefill and one decode program for all four subsets and both stages.
        eval=dict(batch_size=eval_batch, max_new_tokens=8 if smoke else 48,
                  seq_buckets=[640], view_buckets=[eval_batch * world["max_frames"]]),
    ))
    return config
