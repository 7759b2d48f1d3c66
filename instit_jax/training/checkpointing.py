"""Run checkpoints: Orbax CheckpointManager over train state, data-iterator state and run counters.

Layout under ``<stage dir>/checkpoints/``::

    <step>/state/       TrainState (step, params, opt_state, rng): Orbax StandardSave, OCDBT, sharded
    <step>/data_iter/   process_<i>-of-<n>.json: each host's Grain iterator state (grain's Orbax handler)
    <step>/meta/        JSON: stage, step, summed loader stats/ counters

Saves are asynchronous (the arrays are copied off device, then written in the background); a step
directory appears under its final name only once complete, so `latest_step` never sees a torn one.
Restoring needs the same process count (the iterator files are per host).

`PreemptionSignal` turns SIGTERM into a flag the loop polls: the loop then saves and exits cleanly.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

STATE, DATA_ITER, META = "state", "data_iter", "meta"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class RunCheckpointer:
    """Keep-N, async checkpoints of one stage; the loop decides when to save."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        ocp = _ocp()
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=(STATE, DATA_ITER, META), options=options)
        self._last_saved = self.manager.latest_step()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any]) -> bool:
        """Start saving `step` (returns False if it is already saved). All processes must call it."""
        if self._last_saved is not None and step <= self._last_saved:
            return False
        ocp = _ocp()
        save_iter, _ = _grain_args()
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA_ITER: save_iter(data_iter),
            META: ocp.args.JsonSave(dict(meta)),
        })
        self.manager.save(step, args=args, force=True)
        self._last_saved = step
        return True

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict[str, Any]]:
        """(state placed per `abstract_state`'s shardings, meta); `data_iter` is repositioned in place."""
        ocp = _ocp()
        _, restore_iter = _grain_args()
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA_ITER: restore_iter(data_iter),
            META: ocp.args.JsonRestore(),
        })
        restored = self.manager.restore(step, args=args)
        return restored[STATE], dict(restored[META] or {})

    def wait(self) -> None:
        """Block until the background part of the last save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class PreemptionSignal:
    """SIGTERM sets a flag (nothing else happens in the handler); the loop asks `should_stop(step)`."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> PreemptionSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, step: int, check_every: int) -> bool:
        """Single process: the flag. Several: whether any process got the signal, agreed every
        `check_every` steps (a collective, so all processes stop at the same step)."""
        if jax.process_count() == 1:
            return self.received
        if step % max(check_every, 1):
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(self.received)], np.int32))
        return bool(np.max(flags))
