"""Orbax checkpoints of train state + data iterator + run metadata, committed as one step.

Restore walks back from the newest step: a step that cannot be read is reported and skipped, never
deleted, so a half-written or damaged latest checkpoint falls back to the previous good one.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored: stop rather than silently start over."""


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int, use_async: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Starts an async save; the arrays are copied before this returns, the write is not."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, data_iter: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest readable step into `abstract_state`'s shardings and `data_iter`.

        Returns (state, meta, step), or None when there is nothing to restore.
        """
        errors = []
        for step in reversed(self.steps()):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore(),
            )
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to an older one
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                continue
            return restored["state"], dict(restored["meta"]), step
        if errors:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored; nothing was deleted. "
                "If the config changed since they were written, use a new --workdir. "
                "Errors:\n  " + "\n  ".join(errors)
            )
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_arrays(directory: str | pathlib.Path, step: int | None = None) -> dict:
    """The saved train state of `step` (default: the latest) as host numpy arrays, no model needed.

    For analysis and tests: compare runs, inspect parameters in a notebook.
    """
    manager = ocp.CheckpointManager(pathlib.Path(directory).absolute())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    manager.close()
    return jax.tree.map(np.asarray, restored["state"])
