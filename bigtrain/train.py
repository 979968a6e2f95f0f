"""The training loop: `run(config, workdir)` from a CLI or a notebook; returns the final metrics."""

from __future__ import annotations

import importlib.metadata
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bigtrain import checkpoint, models, optim, sharding, writers
from bigtrain import config as config_lib
from bigtrain import data as data_lib
from bigtrain import step as step_lib

log = logging.getLogger("bigtrain")


def run(
    config: ConfigDict, workdir: str | pathlib.Path, *, stop_at_step: int | None = None
) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    `stop_at_step` ends this call early after that step with a checkpoint saved, as if preempted;
    running again continues to `config.total_steps`.
    """
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    is_writer = jax.process_index() == 0

    # --- mesh and data
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh)
    sharding.check_batch(config.eval_batch_size, mesh, key="eval_batch_size")
    data = data_lib.build(config, mesh)

    # --- model, optimizer, sharded init
    tx, lr = optim.build(config.optim, config.total_steps)

    def create() -> nnx.Module:
        return models.build(
            config.model,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            rngs=nnx.Rngs(config.seed),
        )

    model, logical, abstract = _describe(create, tx)
    state_sharding = _state_shardings(abstract, logical, tx, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )

    # --- restore or init
    ckpt = checkpoint.Checkpointer(workdir / "ckpt", keep=config.keep_checkpoints)
    restored = ckpt.restore(abstract, data.train)
    if restored is not None:
        state, _, start = restored
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        init = jax.jit(lambda: step_lib.init_state(create, tx), out_shardings=state_sharding)
        state, start = init(), 0

    # --- compile (ahead of time, so step 0 is not slow and errors come before training)
    batch_sharding = {
        "x": sharding.batch_sharding(mesh, 1 + len(data.input_shape)),
        "y": sharding.batch_sharding(mesh, 1),
    }
    batch_spec = {
        "x": jax.ShapeDtypeStruct(
            (config.batch_size, *data.input_shape), np.float32, sharding=batch_sharding["x"]
        ),
        "y": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=batch_sharding["y"]),
    }
    t0 = time.perf_counter()
    train_step = (
        jax.jit(
            step_lib.make_train_step(
                model,
                tx,
                lr,
                loss_name=config.loss.name,
                label_smoothing=config.loss.label_smoothing,
                seed=config.seed,
            ),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        .lower(abstract, batch_spec)
        .compile()
    )
    eval_step = jax.jit(
        step_lib.make_eval_step(model, loss_name=config.loss.name), donate_argnums=2
    )
    compile_secs = time.perf_counter() - t0
    log.info("compiled the train step in %.1f s; %s", compile_secs, _param_summary(abstract))

    # --- loop
    writer = writers.Writer(
        workdir,
        enabled=is_writer,
        start_step=start,
        total_steps=config.total_steps,
        batch_size=config.batch_size,
    )
    meta = _metadata(config, mesh)
    pending: dict[str, Any] | None = None  # step N's metrics, read after step N+1 is dispatched
    clock = {"step": start, "time": time.perf_counter(), "paused": 0.0}
    final: dict[str, float] = {}
    first_row_extra = {"perf/compile_secs": compile_secs}
    last = min(config.total_steps, stop_at_step or config.total_steps)
    if start == 0:
        writer.write_text("config", str(config))
    done = start
    for done in range(start + 1, last + 1):
        state, metrics = train_step(state, data.next_train())
        if pending is not None:
            final.update(_flush(writer, pending, clock, config.batch_size))
            pending = None
        if done % config.log_every == 0 or done == last:
            pending = {"step": done, "train": metrics, "extra": first_row_extra}
            first_row_extra = {}
        if _due(done, config.eval_every, config.total_steps):
            jax.block_until_ready(state)  # queued train steps count as training time, not eval
            t = time.perf_counter()
            pending = pending or {"step": done, "train": None, "extra": {}}
            pending["extra"] = dict(pending["extra"])
            pending["extra"].update(evaluate(eval_step, state, data))
            clock["paused"] += time.perf_counter() - t
        if _due(done, config.checkpoint_every, config.total_steps) or done == last:
            ckpt.save(done, state, data.train, {**meta, "step": done})
    if pending is not None:
        final.update(_flush(writer, pending, clock, config.batch_size))
    if start >= last:  # nothing left to train: report the restored model
        final = evaluate(eval_step, state, data)

    # --- finish: the last checkpoint is committed before returning
    ckpt.close()
    writer.close()
    if done < config.total_steps:
        log.info("stopped at step %d of %d; run again to continue", done, config.total_steps)
    return final


def evaluate(eval_step, state, data: data_lib.Data) -> dict[str, float]:
    sums = step_lib.zero_sums()
    for batch in data.eval_batches():
        sums = eval_step(state, batch, sums)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {
        "eval/loss": float(sums["loss"]) / count,
        "eval/accuracy": float(sums["correct"]) / count,
        "eval/count": count,
    }


def _flush(writer: writers.Writer, pending: dict, clock: dict, batch_size: int) -> dict:
    row = dict(pending["extra"])
    if pending["train"] is not None:
        row.update({k: float(v) for k, v in jax.device_get(pending["train"]).items()})
        now = time.perf_counter()
        elapsed = now - clock["time"] - clock["paused"]
        steps = pending["step"] - clock["step"]
        if elapsed > 0 and steps > 0:
            row["perf/steps_per_sec"] = steps / elapsed
            row["perf/examples_per_sec"] = steps * batch_size / elapsed
        clock.update(step=pending["step"], time=now, paused=0.0)
    writer.write(pending["step"], row)
    return row


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _describe(create, tx):
    """The model's graph, the params' logical axis names and the abstract train state."""
    with nnx.use_eager_sharding(False):
        abstract_module = nnx.eval_shape(create)
    model, _, _ = step_lib.split(abstract_module)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_module, nnx.Param)))
    abstract = jax.eval_shape(lambda: step_lib.init_state(create, tx))
    return model, logical, abstract


def _state_shardings(abstract: dict, logical: dict, tx, mesh) -> dict:
    params = sharding.param_shardings(logical, abstract["params"], mesh)
    rep = sharding.replicated(mesh)
    opt = _optimizer_shardings(tx, abstract["opt_state"], params, rep)
    return {
        "step": rep,
        "params": params,
        "model_state": jax.tree.map(lambda _: rep, abstract["model_state"]),
        "opt_state": opt,
    }


def _optimizer_shardings(tx, abstract_opt, param_sharding, rep):
    """Moments shaped like params are sharded like params; everything else is replicated."""
    import optax

    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_sharding,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def _param_summary(abstract: dict) -> str:
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    return f"{n:,} parameters"


def _metadata(config: ConfigDict, mesh) -> dict:
    versions = {}
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        versions["bigtrain"] = importlib.metadata.version("bigtrain")
    except importlib.metadata.PackageNotFoundError:
        versions["bigtrain"] = None
    return {
        "config": config.to_dict(),
        "versions": versions,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
    }
