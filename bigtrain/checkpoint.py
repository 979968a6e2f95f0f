"""Orbax checkpoints of train state + data iterator + run metadata, committed as one step.

- Restore walks back from the newest step: a step that cannot be read is reported and skipped,
  never deleted, so a half-written or damaged latest checkpoint falls back to the previous one.
- Retention is ours, not Orbax's: keep the last N plus the best K by an eval metric, and delete an
  old step only after a newer one has committed and its metadata reads back.
- A save that fails (disk full, unwritable directory) raises `CheckpointSaveError` naming the
  path and the OS error; the steps already on disk are left alone.
"""

from __future__ import annotations

import errno as errno_lib
import json
import logging
import math
import pathlib
import re
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored: stop rather than silently start over."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; earlier checkpoints are intact."""


class Checkpointer:
    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int,
        keep_best: int = 0,
        best_metric: str = "eval/accuracy",
        best_mode: str = "max",
        use_async: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.keep, self.keep_best = keep, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=use_async, create=True
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointSaveError(_describe(e, f"cannot create {self.directory}")) from None
        self._scores: dict[int, float] = {}  # step -> best_metric, for keep-best
        self._unverified: int | None = None  # newest step whose save may still be in flight

    # --- save

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Starts an async save; the arrays are copied before this returns, the write is not."""
        self._finish_previous()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - reported with the path and errno
            raise CheckpointSaveError(
                _describe(e, f"saving step {step} to {self.directory}")
            ) from e
        score = meta.get("metrics", {}).get(self.best_metric)
        if score is not None:
            self._scores[step] = float(score)
        self._unverified = step

    def _finish_previous(self) -> None:
        """Waits for the in-flight save, verifies it, then applies the retention policy."""
        step, self._unverified = self._unverified, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointSaveError(
                _describe(e, f"saving step {step} to {self.directory}")
            ) from e
        if step is None:
            return
        if not self._readable(step):
            raise CheckpointSaveError(
                f"checkpoint step {step} in {self.directory} did not read back after saving; "
                "older checkpoints were kept. Check the disk and rerun to resume."
            )
        self._collect_garbage()

    def _readable(self, step: int) -> bool:
        """The step committed and its metadata and small items parse. (Orbax's item_metadata
        would also open every array's metadata: ~1 s for 600 arrays, on the training thread.)"""
        try:
            self._manager.reload()
            if step not in self._manager.all_steps():
                return False
            root = self.directory / str(step)
            json.loads((root / "state" / "_METADATA").read_text())
            return self.read_meta(step) is not None and any((root / "data").iterdir())
        except Exception:  # noqa: BLE001
            return False

    def _collect_garbage(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep :])
        if self.keep_best:
            sign = -1.0 if self.best_mode == "max" else 1.0
            scored = [s for s in steps if s in self._scores and math.isfinite(self._scores[s])]
            keep |= set(
                sorted(scored, key=lambda s: (sign * self._scores[s], -s))[: self.keep_best]
            )
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    # --- restore

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, data_iter: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest readable step into `abstract_state`'s shardings and `data_iter`.

        Returns (state, meta, step), or None when there is nothing to restore.
        """
        errors, bad_steps = [], []
        for step in reversed(self.steps()):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore(),
            )
            try:
                restored = self._manager.restore(step, args=args)
                _check_finite(restored["state"])
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to an older one
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); falling back to the previous "
                    "one. Nothing is deleted.",
                    step,
                    self.directory,
                    reason,
                )
                errors.append(f"step {step}: {reason}")
                bad_steps.append(step)
                continue
            self._load_scores()
            self._set_aside(bad_steps)
            return restored["state"], dict(restored["meta"]), step
        if errors:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored; nothing was deleted. "
                "If the config changed since they were written, use a new --workdir. "
                "Errors:\n  " + "\n  ".join(errors)
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps newer than the restored one, so training can redo them.

        Nothing is deleted: `STEP.unreadable-TIME` stays for inspection; Orbax ignores it.
        """
        for step in steps:
            target = self.directory / f"{step}.unreadable-{int(time.time())}"
            (self.directory / str(step)).rename(target)
            log.warning("moved unreadable checkpoint step %d aside to %s", step, target)
        if steps:
            self._manager.reload()

    def read_meta(self, step: int) -> dict | None:
        """The run metadata saved with `step`, or None if it cannot be read."""
        try:
            return json.loads((self.directory / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return None

    def _load_scores(self) -> None:
        for step in self.steps():
            meta = self.read_meta(step) or {}
            score = meta.get("metrics", {}).get(self.best_metric)
            if score is not None:
                self._scores[step] = float(score)

    def close(self) -> None:
        """Waits for the last save to commit (raising if it failed), then applies retention."""
        try:
            self._finish_previous()
        finally:
            self._manager.close()


def _check_finite(state: Any) -> None:
    """Raises when a restored state holds NaN/Inf (one compiled reduction over the whole tree)."""
    floats = [x for x in jax.tree.leaves(state) if jax.dtypes.issubdtype(x.dtype, np.floating)]
    if floats and not bool(jax.jit(_all_finite)(floats)):
        raise ValueError("the checkpoint holds non-finite values")


def _all_finite(leaves: list) -> jax.Array:
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def _describe(e: BaseException, what: str) -> str:
    """Names the path and the OS error (errno) behind an Orbax/tensorstore failure."""
    seen, chain = set(), e
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno:
            name = errno_lib.errorcode.get(chain.errno, "?")
            where = f" ({chain.filename})" if chain.filename else ""
            return (
                f"{what} failed: [Errno {chain.errno} {name}] {chain.strerror}{where}. "
                "Earlier checkpoints are intact; free space or fix permissions, then rerun "
                "the same command to resume."
            )
        chain = chain.__cause__ or chain.__context__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    code = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))  # tensorstore's errors
    if code:
        number = int(code.group(1) or code.group(2))
        text = f"[Errno {number} {errno_lib.errorcode.get(number, '?')}] {text}"
    return (
        f"{what} failed: {type(e).__name__}: {text[:500]}. Earlier checkpoints are intact; "
        "fix the cause, then rerun the same command to resume."
    )


def load_arrays(directory: str | pathlib.Path, step: int | None = None) -> dict:
    """The saved train state of `step` (default: the latest) as host numpy arrays, no model needed.

    For analysis and tests: compare runs, inspect parameters in a notebook.
    """
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # Orbax warns about the items we do not ask for
    try:
        # Naming the handler gives item_metadata without a saved sharding: a checkpoint
        # written by several processes (devices this process does not have) reads here too.
        manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        meta = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        manager.close()
    finally:
        absl_log.setLevel(level)
    return jax.tree.map(np.asarray, restored["state"])
