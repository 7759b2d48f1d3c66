"""Sharded training core: TrainState, the optimizer plan and the Trainer (contract 4)."""

from instit_jax.training.state import TrainState
from instit_jax.training.trainer import Trainer

__all__ = ["TrainState", "Trainer"]
