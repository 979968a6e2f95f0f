"""Pure train/eval steps over a plain-dict train state; jit and shardings are the caller's.

State: {"step": int32, "params": dict, "model_state": dict (e.g. BatchNorm statistics),
"opt_state": optax state}. Plain dicts keep checkpoints readable without the model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigtrain import losses

State = dict


@dataclasses.dataclass(frozen=True)
class Model:
    """The static half of an NNX module (its graph) plus how to rebuild a callable from arrays."""

    graphdef: nnx.GraphDef

    def apply(self, params, model_state, x, *, train: bool, rng: jax.Array | None = None):
        """Returns (logits, new_model_state)."""
        module = nnx.merge(self.graphdef, params, model_state)
        rngs = nnx.Rngs(dropout=rng) if rng is not None else None
        logits = module(x, train=train, rngs=rngs)
        return logits, nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))


def split(module: nnx.Module) -> tuple[Model, dict, dict]:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef), nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(create: Callable[[], nnx.Module], tx: optax.GradientTransformation) -> State:
    _, params, model_state = split(create())
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": tx.init(params),
        "guard": init_guard(),
    }


def init_guard() -> dict:
    """Counters of non-finite steps: total skipped, current and longest streak, the last one."""
    i32 = lambda v: jnp.full((), v, jnp.int32)
    f32 = lambda v: jnp.full((), v, jnp.float32)
    return {
        "skipped": i32(0),
        "streak": i32(0),
        "max_streak": i32(0),
        "last_bad_step": i32(-1),
        "last_bad_loss": f32(0.0),
        "last_bad_grad_norm": f32(0.0),
    }


def make_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    *,
    loss_name: str,
    label_smoothing: float,
    seed: int,
    accum_steps: int = 1,
    chunk: int = 1,
):
    """`chunk` > 1: the batch argument stacks `chunk` consecutive batches (K, B, ...) and the
    step takes row `step % chunk`, so one transfer feeds K steps (`data/pipeline.py:Prefetch`)."""
    loss_fn = losses.get(loss_name)
    base_key = jax.random.key(seed)

    def microbatch(params, model_state, x, y, rng):
        """Summed loss, correct count, new model state and gradients of the summed loss."""

        def objective(p):
            logits, new_state = model.apply(p, model_state, x, train=True, rng=rng)
            logits = logits.astype(jnp.float32)
            correct = jnp.sum(jnp.argmax(logits, -1) == losses.hard_labels(y))
            return loss_fn(logits, y, label_smoothing).sum(), (new_state, correct)

        (loss_sum, (new_state, correct)), grads = jax.value_and_grad(objective, has_aux=True)(
            params
        )
        return loss_sum, correct, new_state, grads

    def accumulate(params, model_state, x, y, rng):
        """Sums over `accum_steps` microbatches with lax.scan; microbatch a takes rows a::A, so
        each device keeps its own rows and the sums do not depend on how the batch is split."""
        a = accum_steps
        split = lambda t: t.reshape(t.shape[0] // a, a, *t.shape[1:]).swapaxes(0, 1)

        def body(carry, inputs):
            grads, loss_sum, correct, state = carry
            x_a, y_a, i = inputs
            ls, c, state, g = microbatch(params, state, x_a, y_a, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads, g), loss_sum + ls, correct + c, state), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), model_state)
        (grads, loss_sum, correct, state), _ = jax.lax.scan(
            body, init, (split(x), split(y), jnp.arange(a))
        )
        return loss_sum, correct, state, grads

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        rng = jax.random.fold_in(base_key, state["step"])  # a pure function of the step
        if chunk > 1:
            row = state["step"] % chunk
            batch = {
                k: jax.lax.dynamic_index_in_dim(v, row, keepdims=False) for k, v in batch.items()
            }
        x, y = batch["x"], batch["y"]
        n = x.shape[0]  # the true example count: every row of a train batch is real
        run = microbatch if accum_steps == 1 else accumulate
        loss_sum, correct, model_state, grad_sums = run(
            state["params"], state["model_state"], x, y, rng
        )
        grads = jax.tree.map(lambda g: g / n, grad_sums)
        loss, accuracy = loss_sum / n, correct / n

        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        )
        # A non-finite step changes nothing but the step counter and the guard's counts.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        guard = _update_guard(state["guard"], finite, state["step"] + 1, loss, grad_norm)
        metrics = {
            "train/loss": loss,
            "train/accuracy": accuracy,
            "train/grad_norm": grad_norm,
            "train/learning_rate": lr(state["step"]),
            "train/nonfinite_steps": guard["skipped"],
            "train/nonfinite_streak": guard["max_streak"],
        }
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "model_state": keep(model_state, state["model_state"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "guard": guard,
        }
        return new_state, metrics

    return train_step


def _update_guard(g: dict, finite: jax.Array, step: jax.Array, loss, grad_norm) -> dict:
    bad = ~finite
    streak = jnp.where(finite, 0, g["streak"] + 1)
    return {
        "skipped": g["skipped"] + bad.astype(jnp.int32),
        "streak": streak,
        "max_streak": jnp.maximum(g["max_streak"], streak),
        "last_bad_step": jnp.where(bad, step, g["last_bad_step"]),
        "last_bad_loss": jnp.where(bad, loss, g["last_bad_loss"]),
        "last_bad_grad_norm": jnp.where(bad, grad_norm, g["last_bad_grad_norm"]),
    }


def make_eval_step(model: Model, *, loss_name: str):
    loss_fn = losses.get(loss_name)

    def eval_step(state: State, batch: dict, sums: dict) -> dict:
        """Adds this batch's masked sums to `sums`; padded rows (mask 0) count for nothing."""
        logits, _ = model.apply(state["params"], state["model_state"], batch["x"], train=False)
        logits = logits.astype(jnp.float32)
        mask_B = batch["mask"]
        hard_B = losses.hard_labels(batch["y"])
        correct_B = (jnp.argmax(logits, -1) == hard_B).astype(jnp.float32)
        return {
            "loss": sums["loss"] + jnp.sum(loss_fn(logits, batch["y"]) * mask_B),
            "correct": sums["correct"] + jnp.sum(correct_B * mask_B),
            "count": sums["count"] + jnp.sum(mask_B),
        }

    return eval_step


def zero_sums() -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
