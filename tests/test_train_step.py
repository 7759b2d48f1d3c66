"""The train step learns, respects frozen groups and per-module learning rates (tiny model, CPU)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from instit_jax.sharding import make_mesh
from instit_jax.training import Trainer
from instit_jax.training.optimizer import FrozenPattern, ParamPlan, schedule_shape
from train_batches import random_params, synthetic_batch, trainer_config

FROZEN = ["vision_tower/encoder/layers[0:1]", "vision_tower/embeddings", "vision_tower/pre_layrnorm"]
STEPS = 40
LAYERS = ("vision_tower", "encoder", "stacked", "mlp", "fc1", "kernel")


def _host(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def trained():
    """40 steps on one fixed batch (mesh data=2, fsdp=2, tensor=2), with a frozen layer slice and
    three learning rates; returns the params before, after the first and after the last step."""
    cfg = trainer_config(mesh=(2, 2, 2), frozen=FROZEN, lr=3e-3, vision_lr=2e-4, projector_lr=5e-3,
                         schedule="constant", total_steps=100)
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.init_state(0, params=random_params(trainer.plan, seed=3))
    before = _host(state.params)
    batch = trainer.shard_batch(synthetic_batch(trainer.model_cfg, 8, 48, 2, seed=4))
    losses, first = [], None
    for _ in range(STEPS):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        first = first or _host(state.params)
    return trainer, state, losses, (before, first, _host(state.params))


def test_frozen_parameters_bitwise_unchanged(trained):
    trainer, _, _, (before, _, after) = trained
    frozen_leaves = [p for p, leaf in trainer.plan.leaves.items() if leaf.fully_frozen]
    assert ("vision_tower", "embeddings", "patch_kernel") in frozen_leaves
    for path in frozen_leaves:
        assert np.array_equal(after[path], before[path]), path
    # Layer 0 of every stacked vision leaf is frozen; layer 1 (computed, trainable) moves.
    for path, leaf in trainer.plan.leaves.items():
        if leaf.frozen_rows is not None:
            assert np.array_equal(after[path][0], before[path][0]), path
    assert not np.allclose(after[LAYERS][1], before[LAYERS][1])
    # Everything else that receives a gradient moves.
    for path in [("language_model", "lm_head", "kernel"), ("multi_modal_projector", "linear_1", "kernel"),
                 ("image_newline",), ("vision_tower", "encoder", "stacked", "self_attn", "q_proj", "kernel")]:
        assert not np.allclose(after[path], before[path]), path


def test_no_optimizer_state_for_frozen_parts(trained):
    trainer, state, _, _ = trained
    adam = state.opt_state[1]  # chain: clip, adam, learning rates
    mu = traverse_util.flatten_dict(adam.mu)
    assert not any(p[:2] in (("vision_tower", "embeddings"), ("vision_tower", "pre_layrnorm")) for p in mu)
    n_layers = trainer.model_cfg.vision.num_layers
    assert mu[LAYERS].shape == (n_layers - 1,) + trainer.plan.leaves[LAYERS].shape[1:]
    # Moments hold exactly the trainable parameter count (mu and nu), nothing for frozen rows.
    opt_elems = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    counts = trainer.plan.counts()
    assert counts["frozen"] > 0
    assert opt_elems == 2 * counts["trainable"]


def test_per_module_learning_rates(trained):
    """Adam's first step moves each weight by about lr (|m̂/√v̂| = 1): the group's lr shows."""
    _, _, _, (before, first, _) = trained

    def step_size(prefix):
        deltas = [np.abs(first[p] - before[p]).max() for p in before if p[:len(prefix)] == prefix]
        return max(deltas)

    np.testing.assert_allclose(step_size(("language_model",)), 3e-3, rtol=1e-3)
    np.testing.assert_allclose(step_size(("multi_modal_projector",)), 5e-3, rtol=1e-3)
    np.testing.assert_allclose(step_size(("vision_tower", "encoder")), 2e-4, rtol=1e-3)


def test_overfits_a_fixed_batch(trained):
    _, state, losses, _ = trained
    assert np.isfinite(losses).all()
    assert int(state.step) == STEPS
    assert losses[-1] <= 0.1 * losses[0], losses


def test_warmup_cosine_schedule_matches_hf():
    import ml_collections

    shape = schedule_shape(ml_collections.ConfigDict({"total_steps": 20, "warmup_ratio": 0.1, "schedule": "cosine"}))
    warmup = 2  # ceil(0.1 · 20)
    for step in range(21):
        if step < warmup:
            expected = step / warmup
        else:
            expected = 0.5 * (1 + np.cos(np.pi * (step - warmup) / (20 - warmup)))
        np.testing.assert_allclose(float(shape(step)), expected, atol=1e-6)


def test_frozen_patterns_and_decay_mask():
    leaves = {
        ("vision_tower", "encoder", "stacked", "fc", "kernel"): ((4, 2, 2), ("layers", "embed", "mlp")),
        ("vision_tower", "encoder", "stacked", "fc", "bias"): ((4, 2), ("layers", "mlp")),
        ("language_model", "layers", "stacked", "norm", "scale"): ((3, 2), ("layers", "norm")),
        ("language_model", "embed_tokens"): ((5, 2), ("vocab", "embed")),
    }
    plan = ParamPlan.build(leaves, frozen=["vision_tower/encoder/layers[1:3]", "language_model/layers[:3]"])
    fc = plan.leaves[("vision_tower", "encoder", "stacked", "fc", "kernel")]
    assert fc.runs == ((0, 1, False), (1, 3, True), (3, 4, False))
    assert fc.trainable_shape == (2, 2, 2)
    assert plan.leaves[("language_model", "layers", "stacked", "norm", "scale")].fully_frozen
    assert plan.labels("decay") == {
        "vision_tower": {"encoder": {"stacked": {"fc": {"kernel": True, "bias": False}}}},
        "language_model": {"embed_tokens": True},
    }
    tree = traverse_util.unflatten_dict({p: np.arange(np.prod(s)).reshape(s) for p, (s, _) in leaves.items()})
    picked = plan.select(tree)["vision_tower"]["encoder"]["stacked"]["fc"]["kernel"]
    np.testing.assert_array_equal(picked, tree["vision_tower"]["encoder"]["stacked"]["fc"]["kernel"][[0, 3]])

    assert FrozenPattern.parse("vision_tower/encoder/layers[0:12]").matches(("vision_tower", "encoder", "stacked", "x"))
    with pytest.raises(ValueError, match="match no parameter"):
        ParamPlan.build(leaves, frozen=["vision_tower/encodr"])
    with pytest.raises(ValueError, match="no leading layers axis"):
        ParamPlan.build(leaves, frozen=["language_model/embed_tokens[0:2]"])
    with pytest.raises(ValueError, match="outside the 4 layers"):
        ParamPlan.build(leaves, frozen=["vision_tower/encoder/layers[2:9]"])
