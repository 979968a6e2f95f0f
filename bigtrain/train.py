"""The training loop: `run(config, workdir)` from a CLI or a notebook; returns the final metrics."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import pathlib
import re
import time
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from bigtrain import checkpoint, models, optim, resilience, sharding, writers
from bigtrain import config as config_lib
from bigtrain import data as data_lib
from bigtrain import step as step_lib

log = logging.getLogger("bigtrain")

INPUT_BOUND_FRACTION = 0.1  # warn once when more than this share of step time waits for data


def run(
    config: ConfigDict, workdir: str | pathlib.Path, *, stop_at_step: int | None = None
) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    `stop_at_step` ends this call early after that step with a checkpoint saved, as if preempted;
    running again continues to `config.total_steps`. The result has `"preempted": 1.0` when a
    SIGTERM/SIGINT stopped the run early.
    """
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    is_writer = jax.process_index() == 0
    # --- mesh, data, model, optimizer, shardings
    setup = _setup(config)
    mesh, data, tx, create = setup.mesh, setup.data, setup.tx, setup.create
    model, abstract, state_sharding = setup.model, setup.abstract, setup.state_sharding

    # --- restore, or init (optionally from another run's checkpoint)
    ckpt = checkpoint.Checkpointer(
        workdir / "ckpt",
        keep=config.keep_checkpoints,
        keep_best=config.keep_best_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
    )
    _check_compatible(ckpt, config)
    restored = ckpt.restore(abstract, data.train)
    if restored is not None:
        state, _, start = restored
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        init = jax.jit(lambda: step_lib.init_state(create, tx), out_shardings=state_sharding)
        state, start = init(), 0
        if config.init_from.path:
            state = _init_from(state, config.init_from, state_sharding)

    # --- compile (ahead of time: errors and memory use show before step 0)
    train_step, stats = _compile_train_step(config, setup)
    eval_step = _EvalStep(
        jax.jit(
            step_lib.make_eval_step(model, loss_name=config.loss.name),
            out_shardings=sharding.replicated(mesh),
            donate_argnums=2,
        ),
        # Made on device (no host transfer), with the sharding eval_step returns: one compile.
        jax.jit(step_lib.zero_sums, out_shardings=sharding.replicated(mesh)),
    )

    # --- loop
    writer = writers.Writer(
        workdir,
        enabled=is_writer,
        start_step=start,
        total_steps=config.total_steps,
        batch_size=config.batch_size,
    )
    meta = _metadata(config, mesh)
    preemption = resilience.Preemption()
    watchdog = resilience.Watchdog(config.watchdog_secs, workdir / "watchdog_stacks.txt")
    clock = _Clock(start, stats.get("perf/flops_per_step_per_device", 0.0), _peak_flops(config))
    pending: dict[str, Any] | None = None  # step N's metrics, read after step N+1 is dispatched
    final: dict[str, float] = {}
    extra: dict[str, float] = dict(stats)
    last = min(config.total_steps, stop_at_step or config.total_steps)
    last_save = time.monotonic()
    preempted = False
    if start == 0:
        writer.write_text("config", str(config))
    done = start
    steady = contextlib.ExitStack()  # the transfer guard, from the second step on
    try:
        for done in range(start + 1, last + 1):
            if done == start + 2:
                steady.enter_context(jax.transfer_guard(config.transfer_guard))
            t = time.perf_counter()
            batch = data.next_train()
            clock.data_wait += time.perf_counter() - t
            state, metrics = train_step(state, batch)
            watchdog.beat()
            if pending is not None:
                row = _flush(writer, pending, clock, config)
                final.update(row)
                _check_nonfinite(row, config, workdir, data, state)
                pending = None
            preempted = preemption.should_stop(done)
            if done % config.log_every == 0 or done == last or preempted:
                pending = _pending(done, metrics, extra, data)
                extra = {}
            eval_metrics = {}
            if _due(done, config.eval_every, config.total_steps):
                jax.block_until_ready(state)  # queued train steps count as training time
                t = time.perf_counter()
                eval_metrics = evaluate(eval_step, state, data, watchdog)
                pending = pending or _pending(done, None, {}, data)
                pending["extra"] = {**pending["extra"], **eval_metrics}
                clock.paused += time.perf_counter() - t
            timed = _minutes_passed(last_save, config.checkpoint_every_minutes, done)
            if (
                _due(done, config.checkpoint_every, config.total_steps)
                or done == last
                or (timed or preempted)
            ):
                ckpt.save(done, state, data.train, {**meta, "step": done, "metrics": eval_metrics})
                last_save = time.monotonic()
            if preempted:
                break
        if pending is not None:
            row = _flush(writer, pending, clock, config)
            final.update(row)
            _check_nonfinite(row, config, workdir, data, state)
        if start >= last:  # nothing left to train: report the restored model
            final = evaluate(eval_step, state, data, watchdog)

        # --- finish: the last checkpoint is committed (and verified) before returning
        ckpt.close()
    except BaseException:
        _close_quietly(ckpt)  # commit what is in flight; the original error is the one to show
        raise
    finally:
        steady.close()
        watchdog.close()
        preemption.close()
        writer.close()
    if preempted:
        log.warning(
            "stopped by %s at step %d of %d with a checkpoint saved; run the same command "
            "again to resume",
            preemption.signal_name,
            done,
            config.total_steps,
        )
        final["preempted"] = 1.0
    elif done < config.total_steps:
        log.info("stopped at step %d of %d; run again to continue", done, config.total_steps)
    return final


class _EvalStep(NamedTuple):
    step: Any  # jitted (state, batch, sums) -> sums
    zeros: Any  # jitted () -> the sums to start from


def evaluate(eval_step: _EvalStep, state, data: data_lib.Data, watchdog=None) -> dict[str, float]:
    sums = eval_step.zeros()
    for batch in data.eval_batches():
        sums = eval_step.step(state, batch, sums)
        if watchdog is not None:
            watchdog.beat()
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {
        "eval/loss": float(sums["loss"]) / count,
        "eval/accuracy": float(sums["correct"]) / count,
        "eval/count": count,
    }


class _Clock:
    """Throughput and input-wait bookkeeping between two logged steps."""

    def __init__(self, step: int, flops_per_step: float = 0.0, peak: float = 0.0) -> None:
        self.step, self.time = step, time.perf_counter()
        self.flops_per_step, self.peak = flops_per_step, peak
        self.paused = 0.0  # eval time, excluded from throughput
        self.data_wait = 0.0  # time the loop waited for the next batch
        self.warned_input_bound = False
        self.warming_up = True  # the first interval holds the first read-ahead: not a verdict


def _pending(step: int, train, extra: dict, data) -> dict:
    """A log row waiting for its step's metrics. The skipped-record count is taken now, when
    it covers batches 1..step: by the flush, the next step's batch has been read too."""
    return {
        "step": step,
        "train": train,
        "extra": extra,
        "skipped": getattr(data, "skipped_records", None),
    }


def _flush(writer, pending: dict, clock: _Clock, config: ConfigDict) -> dict:
    row = dict(pending["extra"])
    if pending["train"] is not None:
        row.update({k: float(v) for k, v in jax.device_get(pending["train"]).items()})
        now = time.perf_counter()
        elapsed = now - clock.time - clock.paused
        steps = pending["step"] - clock.step
        if elapsed > 0 and steps > 0:
            row["perf/steps_per_sec"] = steps / elapsed
            row["perf/examples_per_sec"] = steps * config.batch_size / elapsed
            row["perf/data_wait_frac"] = min(clock.data_wait / elapsed, 1.0)
            if clock.flops_per_step and clock.peak:
                row["perf/mfu"] = clock.flops_per_step * steps / elapsed / clock.peak
            if not clock.warming_up:
                _warn_if_input_bound(row["perf/data_wait_frac"], clock, config)
            clock.warming_up = False
        clock.step, clock.time, clock.paused, clock.data_wait = pending["step"], now, 0.0, 0.0
    skipped = pending["skipped"]
    if skipped is not None:
        row["data/skipped_records"] = int(skipped)
    writer.write(pending["step"], row)
    return row


def _warn_if_input_bound(frac: float, clock: _Clock, config: ConfigDict) -> None:
    if frac > INPUT_BOUND_FRACTION and not clock.warned_input_bound:
        clock.warned_input_bound = True
        log.warning(
            "input-bound: %.0f%% of step time waits for data. Try more read threads "
            "(--config.data.read_threads=%d), a deeper prefetch (--config.data.prefetch=%d)%s",
            100 * frac,
            2 * config.data.read_threads,
            2 * max(config.data.prefetch, 1),
            ", or worker processes (--config.data.workers)" if "workers" in config.data else "",
        )


def _check_nonfinite(row: dict, config: ConfigDict, workdir, data, state) -> None:
    """Applies the NaN policy from the guard counters the step reports (one step late)."""
    skipped, streak = row.get("train/nonfinite_steps", 0), row.get("train/nonfinite_streak", 0)
    halt = skipped > 0 if config.nan_policy == "halt" else streak >= config.nan_max_consecutive
    if not halt:
        return
    guard = {k: v.item() for k, v in jax.device_get(state["guard"]).items()}
    bad_step = int(guard["last_bad_step"])
    dump = pathlib.Path(workdir) / "nonfinite.json"
    if jax.process_index() == 0:
        resilience.write_nonfinite_dump(
            dump,
            {
                "step": bad_step,
                "nonfinite": {k: str(guard[f"last_bad_{k}"]) for k in ("loss", "grad_norm")},
                "skipped_steps": int(skipped),
                "longest_streak": int(streak),
                "batch_record_indices": resilience.batch_record_indices(
                    data.num_train, config.seed, config.batch_size, bad_step
                ),
                "policy": {
                    "nan_policy": config.nan_policy,
                    "nan_max_consecutive": config.nan_max_consecutive,
                },
            },
        )
    raise resilience.NonFiniteError(
        f"non-finite loss or gradients at step {bad_step} (loss={guard['last_bad_loss']}, "
        f"grad_norm={guard['last_bad_grad_norm']}): {int(skipped)} step(s) skipped, longest "
        f"streak {int(streak)} (nan_policy={config.nan_policy!r}, nan_max_consecutive="
        f"{config.nan_max_consecutive}). No update from them was applied or saved. "
        f"Diagnostics with the batch's record indices: {dump}"
    )


def _close_quietly(ckpt: checkpoint.Checkpointer) -> None:
    try:
        ckpt.close()
    except Exception as e:  # noqa: BLE001
        log.error("while stopping: %s", e)


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _minutes_passed(since: float, minutes: float, step: int) -> bool:
    """Time-based save decision; multi-process runs take process 0's clock so all agree."""
    if minutes <= 0:
        return False
    passed = time.monotonic() - since >= 60 * minutes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        passed = bool(multihost_utils.broadcast_one_to_all(np.asarray(passed)))
    return passed


def _setup(config: ConfigDict) -> SimpleNamespace:
    """Everything a run or an ahead-of-time compile needs, before any array is allocated."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh)
    sharding.check_batch(config.eval_batch_size, mesh, key="eval_batch_size")
    per_device = config.batch_size // sharding.data_parallel_size(mesh)
    if per_device % config.optim.accum_steps:
        raise config_lib.ConfigError(
            f"optim.accum_steps={config.optim.accum_steps} must divide the per-device batch "
            f"{per_device} (batch_size {config.batch_size} over {dict(mesh.shape)})"
        )
    data = data_lib.build(config, mesh)
    tx, lr = optim.build(config.optim, config.total_steps)

    def create() -> nnx.Module:
        return models.build(
            config.model,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            rngs=nnx.Rngs(config.seed),
        )

    model, logical, abstract = _describe(create, tx)
    rules = sharding.parse_rules(config.mesh.rules)
    state_sharding = _state_shardings(abstract, logical, tx, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    return SimpleNamespace(
        mesh=mesh,
        data=data,
        tx=tx,
        lr=lr,
        create=create,
        model=model,
        abstract=abstract,
        state_sharding=state_sharding,
    )


def _compile_train_step(config: ConfigDict, setup: SimpleNamespace):
    """Compiles the step for the configured mesh; returns it and its memory/FLOP figures."""
    mesh, data = setup.mesh, setup.data
    k = data.chunk  # batches per transfer: the step's input is (k, B, ...) when k > 1
    lead = (k,) if k > 1 else ()
    shapes = {
        "x": (*lead, config.batch_size, *data.input_shape),
        "y": (*lead, config.batch_size, *data.label_shape),
    }
    y_dtype = np.float32 if data.label_shape else np.int32  # soft labels: class probabilities
    batch_sharding = {
        key: sharding.batch_sharding(mesh, len(shape), chunked=k > 1)
        for key, shape in shapes.items()
    }
    batch_spec = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding[key])
        for (key, shape), dtype in zip(shapes.items(), (np.float32, y_dtype), strict=True)
    }
    t0 = time.perf_counter()

    def lower(accum_steps: int):
        step_fn = step_lib.make_train_step(
            setup.model,
            setup.tx,
            setup.lr,
            loss_name=config.loss.name,
            label_smoothing=config.loss.label_smoothing,
            seed=config.seed,
            accum_steps=accum_steps,
            chunk=k,
        )
        return jax.jit(
            step_fn,
            in_shardings=(setup.state_sharding, batch_sharding),
            out_shardings=(setup.state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        ).lower(setup.abstract, batch_spec)

    compiled = lower(config.optim.accum_steps).compile()
    stats = {"perf/compile_secs": time.perf_counter() - t0, **_program_stats(compiled, setup)}
    if config.optim.accum_steps > 1:
        # XLA's cost analysis counts a scan's body once: take the FLOPs of the same step
        # without accumulation (lowered, not compiled; the global program over the devices).
        cost = lower(1).cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        if cost and "flops" in cost:
            stats["perf/flops_per_step_per_device"] = float(cost["flops"]) / mesh.devices.size
    log.info(
        "compiled the train step in %.1f s; %s; per device: params+optimizer %s, step "
        "temporaries %s, %.3g FLOPs/step",
        stats["perf/compile_secs"],
        _param_summary(setup.abstract),
        _mib(stats["memory/state_bytes_per_device"]),
        _mib(stats.get("memory/temp_bytes_per_device", 0)),
        stats.get("perf/flops_per_step_per_device", 0),
    )
    return compiled, stats


def _program_stats(compiled, setup) -> dict[str, float]:
    """Per-device state bytes (from the shardings) and what XLA reports for the program."""
    state_bytes = sum(
        int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
        for a in jax.tree.leaves(setup.abstract)
    )
    stats = {"memory/state_bytes_per_device": float(state_bytes)}
    try:
        mem = compiled.memory_analysis()
        stats["memory/argument_bytes_per_device"] = float(mem.argument_size_in_bytes)
        stats["memory/temp_bytes_per_device"] = float(mem.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        log.warning("no memory analysis from this backend (%s); memory/* not reported", e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        stats["perf/flops_per_step_per_device"] = float(cost.get("flops", 0.0))
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        log.warning("no cost analysis from this backend (%s); perf/mfu not reported", e)
    return stats


def compile_only(config: ConfigDict) -> dict[str, float]:
    """Compiles the train step for the configured mesh and reports memory and FLOPs; no training."""
    config_lib.validate(config)
    setup = _setup(config)
    _, stats = _compile_train_step(config, setup)
    stats["mesh"] = dict(setup.mesh.shape)
    stats["devices"] = setup.mesh.devices.size
    stats["parameters"] = sum(
        int(np.prod(a.shape)) for a in jax.tree.leaves(setup.abstract["params"])
    )
    return stats


def build_step(config: ConfigDict) -> SimpleNamespace:
    """The compiled train step, a fresh sharded state and the data, without the loop.

    For benchmarks and notebooks:
    `b = build_step(c); state, metrics = b.step(b.init(), b.data.next_train())`.
    The step donates its state argument; keep only the state it returns.
    """
    config_lib.validate(config)
    setup = _setup(config)
    step, stats = _compile_train_step(config, setup)
    init = jax.jit(
        lambda: step_lib.init_state(setup.create, setup.tx), out_shardings=setup.state_sharding
    )
    return SimpleNamespace(**vars(setup), step=step, stats=stats, init=init)


# Dense bf16 peak FLOP/s per chip (vendor figures). CPU: measured at start-up.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def _peak_flops(config: ConfigDict) -> float:
    if config.peak_flops_per_device:
        return config.peak_flops_per_device
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    if device.platform == "cpu":
        return measured_cpu_peak()
    log.warning("no peak FLOP/s known for %r; set peak_flops_per_device for perf/mfu", kind)
    return 0.0


@functools.cache
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 n×n matmul on one device, best of `repeats`."""
    a = jax.device_put(np.ones((n, n), np.float32), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _describe(create, tx):
    """The model's graph, the params' logical axis names and the abstract train state."""
    with nnx.use_eager_sharding(False):
        abstract_module = nnx.eval_shape(create)
    model, _, _ = step_lib.split(abstract_module)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_module, nnx.Param)))
    abstract = jax.eval_shape(lambda: step_lib.init_state(create, tx))
    return model, logical, abstract


def _state_shardings(abstract: dict, logical: dict, tx, mesh, rules=None) -> dict:
    params = sharding.param_shardings(logical, abstract["params"], mesh, rules)
    rep = sharding.replicated(mesh)
    replicate = lambda tree: jax.tree.map(lambda _: rep, tree)
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,  # moments shaped like params are sharded like params
        abstract["opt_state"],
        params,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return {
        "step": rep,
        "params": params,
        "model_state": replicate(abstract["model_state"]),
        "opt_state": opt,
        "guard": replicate(abstract["guard"]),
    }


def _check_compatible(ckpt: checkpoint.Checkpointer, config: ConfigDict) -> None:
    """Stops when the workdir's checkpoints come from a different model or dataset."""
    steps = ckpt.steps()
    meta = next((m for m in map(ckpt.read_meta, reversed(steps)) if m), None) if steps else None
    if not meta or "config" not in meta:
        return
    diffs = resilience.config_differences(meta["config"], config.to_dict())
    bad = resilience.incompatible(diffs)
    if bad:
        lines = "\n  ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in bad)
        raise config_lib.ConfigError(
            f"the checkpoints in {ckpt.directory} were written by a different run:\n  {lines}\n"
            "Use a new --workdir, or start a new run from them with "
            "--config.init_from.path=OLD_WORKDIR (and init_from.parts / init_from.exclude)."
        )
    if diffs:
        log.info("resuming with changed settings: %s", ", ".join(f"{k}={b!r}" for k, _, b in diffs))


def _init_from(state: dict, cfg: ConfigDict, state_sharding: dict) -> dict:
    """Copies the chosen parts of another run's latest checkpoint into a fresh state."""
    path = pathlib.Path(cfg.path)
    source = path / "ckpt" if (path / "ckpt").is_dir() else path
    try:
        saved = checkpoint.load_arrays(source)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise config_lib.ConfigError(f"init_from.path={cfg.path!r}: {e}") from None
    exclude = re.compile(cfg.exclude) if cfg.exclude else None
    loaded = 0
    for part in [p.strip() for p in cfg.parts.split(",") if p.strip()]:
        flat_new = dict(jax.tree.leaves_with_path(state[part]))
        flat_old = {_leaf_name(p): v for p, v in jax.tree.leaves_with_path(saved[part])}
        replaced = {}
        for path_, leaf in flat_new.items():
            name = _leaf_name(path_)
            if exclude is not None and exclude.search(name):
                continue
            if name not in flat_old:
                raise config_lib.ConfigError(
                    f"init_from: {part}/{name} is not in {source}; exclude it with "
                    "--config.init_from.exclude=REGEX"
                )
            if flat_old[name].shape != leaf.shape:
                raise config_lib.ConfigError(
                    f"init_from: {part}/{name} has shape {flat_old[name].shape} in {source} but "
                    f"{leaf.shape} here; exclude it with --config.init_from.exclude=REGEX"
                )
            replaced[path_] = flat_old[name].astype(leaf.dtype)
            loaded += 1
        state[part] = _replace_leaves(state[part], replaced)
        state[part] = jax.device_put(state[part], state_sharding[part])
    log.info("initialized %d arrays (%s) from %s", loaded, cfg.parts, source)
    return state


def _leaf_name(path) -> str:
    """'hidden/0/kernel': the same name whether keys are ints (NNX) or strings (restored)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _replace_leaves(tree: Any, replaced: dict) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: replaced.get(p, x), tree)


def _param_summary(abstract: dict) -> str:
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    return f"{n:,} parameters"


def _metadata(config: ConfigDict, mesh) -> dict:
    versions = {}
    for name in ("bigtrain", "jax", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "config": config.to_dict(),
        "versions": versions,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
    }
