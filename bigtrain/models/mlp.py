"""Logistic regression and MLP on the flattened input.

Shape suffixes: B batch, F flattened input features, D hidden width, C classes.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_part = nnx.with_partitioning
_init = nnx.initializers


def _linear(
    d_in: int, d_out: int, names: tuple[str, str], *, dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_part(_init.lecun_normal(), names),
        bias_init=_part(_init.zeros_init(), names[1:]),
        rngs=rngs,
    )


class LogReg(nnx.Module):
    """One Linear layer from the flattened input to the classes."""

    input_rank = None  # any rank: the input is flattened

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        features = math.prod(input_shape)
        self.head = _linear(
            features, num_classes, ("input", "classes"), dtype=jnp.dtype(dtype), rngs=rngs
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x_BF = x.reshape(x.shape[0], -1)
        logits_BC = self.head(x_BF)
        return logits_BC.astype(jnp.float32)


class MLP(nnx.Module):
    """`depth` hidden Linear+GELU(+dropout) layers of `width`, then a Linear head."""

    input_rank = None  # any rank: the input is flattened

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        dropout: float = 0.0,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        features = math.prod(input_shape)
        self.hidden = nnx.List(
            [
                _linear(
                    features if i == 0 else width,
                    width,
                    ("input" if i == 0 else "embed", "mlp"),
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.dropout = nnx.Dropout(dropout)
        head_in = ("mlp", width) if depth else ("input", features)
        self.head = _linear(
            head_in[1], num_classes, (head_in[0], "classes"), dtype=dtype, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x_BD = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x_BD = jax.nn.gelu(layer(x_BD))
            x_BD = self.dropout(x_BD, deterministic=not train, rngs=rngs)
        logits_BC = self.head(x_BD)
        return logits_BC.astype(jnp.float32)
