"""Sharded training equals single-device training; accumulation equals one big batch (fp32, CPU)."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from instit_jax.sharding import make_mesh, mesh_shape, normalize_rules, logical_to_spec
from instit_jax.training import Trainer
from instit_jax.training.step import next_token_targets
from train_batches import random_params, synthetic_batch, trainer_config

ROWS, LENGTH, VIEWS = 8, 48, 2


def _trainer(mesh, grad_accum=1, devices=None):
    cfg = trainer_config(mesh=mesh, grad_accum=grad_accum, frozen=["vision_tower/encoder/layers[0:1]"])
    return Trainer(cfg, make_mesh(cfg.mesh, devices=devices))


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def setup():
    single = _trainer((1, 1, 1), devices=jax.devices()[:1])
    params = random_params(single.plan, seed=1)
    batch = synthetic_batch(single.model_cfg, ROWS, LENGTH, VIEWS, seed=2)
    return single, params, batch


@pytest.fixture(scope="module")
def mesh_grads(setup):
    """(loss, tokens, grads, sharded params) on the (fsdp=4, tensor=2) mesh, no accumulation."""
    _, params, batch = setup
    return _grads(_trainer((1, 4, 2)), params, batch)


def _grads(trainer, params, batch):
    sharded = trainer.shard_params(params)
    loss, tokens, grads = trainer.loss_and_grads(sharded, trainer.shard_batch(batch))
    return float(loss), int(tokens), _flat(grads), sharded


def test_mesh_shape_resolution():
    assert mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape({"data": 1, "fsdp": 3, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = normalize_rules(None)
    assert logical_to_spec(("embed", "kv_heads", "kv"), (64, 4, 16), rules, mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "kv"), (64, 3, 16), rules, mesh) == P("fsdp", None, None)
    assert logical_to_spec(("layers", "embed"), (3, 30), rules, mesh) == P(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("mystery",), (8,), rules, mesh)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        normalize_rules([["embed", "model"]])


def test_fsdp_tensor_mesh_matches_single_device(setup, mesh_grads):
    single, params, batch = setup
    loss1, tokens1, grads1, _ = _grads(single, params, batch)
    loss8, tokens8, grads8, params8 = mesh_grads
    # The parameters really are split: FSDP on the width, tensor parallel on the vocabulary.
    head = params8["language_model"]["lm_head"]["kernel"]
    assert head.sharding.spec == P("fsdp", "tensor")
    assert len({s.device for s in head.addressable_shards}) == 8

    assert tokens1 == tokens8 > 0
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads8.keys()
    moved = 0
    for path in grads1:
        np.testing.assert_allclose(grads8[path], grads1[path], rtol=1e-5, atol=1e-5, err_msg="/".join(path))
        moved += bool(np.abs(grads1[path]).max() > 0)
    assert moved > len(grads1) // 2  # gradients are not trivially zero


def test_grad_accumulation_equals_one_big_batch(setup, mesh_grads):
    _, params, batch = setup
    loss1, tokens1, grads1, _ = mesh_grads
    loss2, tokens2, grads2, _ = _grads(_trainer((1, 4, 2), grad_accum=2), params, batch)
    assert tokens1 == tokens2
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5, atol=1e-5)
    for path in grads1:
        np.testing.assert_allclose(grads2[path], grads1[path], rtol=1e-5, atol=1e-5, err_msg="/".join(path))

    # The micro-batches (rows a, a+2, ...) hold different numbers of supervised tokens, so a mean
    # of per-micro-batch means would differ: the equality above is a real check of the normaliser.
    _, valid = next_token_targets(batch["labels"], batch["segment_ids"])
    per_micro = [int(np.asarray(valid)[a::2].sum()) for a in range(2)]
    assert per_micro[0] != per_micro[1]


def test_batch_not_divisible_is_rejected(setup):
    _, _, batch = setup
    trainer = _trainer((1, 4, 2), grad_accum=4)  # 8 rows over 4 shards × 4 micro-batches
    with pytest.raises(ValueError, match="not a multiple of batch shards"):
        trainer.shard_batch(batch)
