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
    }


def make_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    *,
    loss_name: str,
    label_smoothing: float,
    seed: int,
):
    loss_fn = losses.get(loss_name)
    base_key = jax.random.key(seed)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        rng = jax.random.fold_in(base_key, state["step"])  # a pure function of the step

        def objective(params):
            logits, model_state = model.apply(
                params, state["model_state"], batch["x"], train=True, rng=rng
            )
            logits = logits.astype(jnp.float32)
            loss = loss_fn(logits, batch["y"], label_smoothing).mean()
            return loss, (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "train/loss": loss,
            "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            "train/grad_norm": optax.tree.norm(grads),
            "train/learning_rate": lr(state["step"]),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "model_state": model_state,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: Model, *, loss_name: str):
    loss_fn = losses.get(loss_name)

    def eval_step(state: State, batch: dict, sums: dict) -> dict:
        """Adds this batch's masked sums to `sums`; padded rows (mask 0) count for nothing."""
        logits, _ = model.apply(state["params"], state["model_state"], batch["x"], train=False)
        logits = logits.astype(jnp.float32)
        mask_B = batch["mask"]
        correct_B = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {
            "loss": sums["loss"] + jnp.sum(loss_fn(logits, batch["y"]) * mask_B),
            "correct": sums["correct"] + jnp.sum(correct_B * mask_B),
            "count": sums["count"] + jnp.sum(mask_B),
        }

    return eval_step


def zero_sums() -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
