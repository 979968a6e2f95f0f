"""Rematerialization per block: recompute activations in the backward pass to save memory."""

import jax
from flax import nnx

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, redo the rest
}


def check(remat: str) -> str:
    if remat not in POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; valid: {sorted(POLICIES)}")
    return remat


def call(block: nnx.Module, x: jax.Array, remat: str, **kwargs) -> jax.Array:
    """`block(x, **kwargs)`, under `jax.checkpoint` with the named policy unless it is "none".

    Module arguments (rngs) are traced through the transform; the rest (train=...) stay static.
    """
    if remat == "none":
        return block(x, **kwargs)
    graph = {k: v for k, v in kwargs.items() if isinstance(v, nnx.Module | nnx.Rngs)}
    static = {k: v for k, v in kwargs.items() if k not in graph}
    run = nnx.remat(lambda b, y, g: b(y, **g, **static), policy=POLICIES[remat])
    return run(block, x, graph)
