"""Vision Transformer (Dosovitskiy et al., 2021): patch embedding, CLS token, pre-LN blocks.

Shape suffixes: B batch, L tokens (CLS + patches), M key tokens, D embed width, H heads,
K head dim, F mlp hidden, C classes.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigtrain.models import remat as remat_lib

_part = nnx.with_partitioning
_init = nnx.initializers
_normal = _init.truncated_normal(stddev=0.02)

# variant -> (embed width, heads); all have 12 blocks and a 4x MLP.
VARIANTS = {"Ti": (192, 3), "S": (384, 6), "B": (768, 12)}
DEPTH = 12
MLP_RATIO = 4


def _param(
    init: nnx.initializers.Initializer,
    shape: tuple[int, ...],
    names: tuple[str | None, ...],
    rngs: nnx.Rngs,
) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def _linear(d_in: int, d_out: int, names: tuple[str, str], *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_part(_normal, names),
        bias_init=_part(_init.zeros_init(), names[1:]),
        rngs=rngs,
    )


def _layer_norm(d: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        d,
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=_part(_init.ones_init(), ("embed",)),
        bias_init=_part(_init.zeros_init(), ("embed",)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head self-attention; softmax in float32."""

    def __init__(self, dim: int, heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"embed width {dim} is not divisible by {heads} heads")
        k = dim // heads
        self.dtype = dtype
        in_names, out_names = ("embed", "heads", "kv"), ("heads", "kv", "embed")
        zeros = _init.zeros_init()
        self.wq_DHK = _param(_normal, (dim, heads, k), in_names, rngs)
        self.wk_DHK = _param(_normal, (dim, heads, k), in_names, rngs)
        self.wv_DHK = _param(_normal, (dim, heads, k), in_names, rngs)
        self.bq_HK = _param(zeros, (heads, k), in_names[1:], rngs)
        self.bk_HK = _param(zeros, (heads, k), in_names[1:], rngs)
        self.bv_HK = _param(zeros, (heads, k), in_names[1:], rngs)
        self.wo_HKD = _param(_normal, (heads, k, dim), out_names, rngs)
        self.bo_D = _param(zeros, (dim,), ("embed",), rngs)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dt = self.dtype
        x_BLD = x_BLD.astype(dt)
        q_BLHK = jnp.einsum("bld,dhk->blhk", x_BLD, self.wq_DHK[...].astype(dt))
        k_BMHK = jnp.einsum("bmd,dhk->bmhk", x_BLD, self.wk_DHK[...].astype(dt))
        v_BMHK = jnp.einsum("bmd,dhk->bmhk", x_BLD, self.wv_DHK[...].astype(dt))
        q_BLHK = (q_BLHK + self.bq_HK[...].astype(dt)) * q_BLHK.shape[-1] ** -0.5
        k_BMHK = k_BMHK + self.bk_HK[...].astype(dt)
        v_BMHK = v_BMHK + self.bv_HK[...].astype(dt)
        logits_BHLM = jnp.einsum("blhk,bmhk->bhlm", q_BLHK, k_BMHK)
        probs_BHLM = jax.nn.softmax(logits_BHLM.astype(jnp.float32), axis=-1).astype(dt)
        out_BLHK = jnp.einsum("bhlm,bmhk->blhk", probs_BHLM, v_BMHK)
        out_BLD = jnp.einsum("blhk,hkd->bld", out_BLHK, self.wo_HKD[...].astype(dt))
        return out_BLD + self.bo_D[...].astype(dt)


class Block(nnx.Module):
    """Pre-LN transformer block; dropout on each residual branch."""

    def __init__(self, dim: int, heads: int, *, dropout: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.ln1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.ln2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp_in = _linear(dim, MLP_RATIO * dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.mlp_out = _linear(MLP_RATIO * dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x_BLD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        h_BLD = self.attn(self.ln1(x_BLD))
        x_BLD = x_BLD + self.dropout(h_BLD, deterministic=not train, rngs=rngs)
        h_BLF = jax.nn.gelu(self.mlp_in(self.ln2(x_BLD)))
        h_BLD = self.mlp_out(h_BLF)
        return x_BLD + self.dropout(h_BLD, deterministic=not train, rngs=rngs)


class ViT(nnx.Module):
    """ViT-{Ti,S,B}/patch_size classifying from the CLS token."""

    input_rank = 3

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        variant: str = "",
        patch_size: int = 16,
        dropout: float = 0.0,
        dtype: str = "float32",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.remat = remat_lib.check(remat)
        variant = variant or "Ti"
        if variant not in VARIANTS:
            raise ValueError(f"unknown vit variant {variant!r}; valid: {sorted(VARIANTS)}")
        height, width, channels = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"vit: image {height}x{width} is not divisible into {patch_size}x{patch_size} "
                "patches; set patch_size to a divisor of both"
            )
        dim, heads = VARIANTS[variant]
        dtype = jnp.dtype(dtype)
        self.dim, self.dtype = dim, dtype
        self.patch_embed = nnx.Conv(
            channels,
            dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_part(_normal, (None, None, "conv_in", "embed")),
            bias_init=_part(_init.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        num_tokens = 1 + (height // patch_size) * (width // patch_size)
        self.cls_D = _param(_normal, (dim,), ("embed",), rngs)
        self.pos_LD = _param(_normal, (num_tokens, dim), ("pos", "embed"), rngs)
        self.dropout = nnx.Dropout(dropout)
        self.blocks = nnx.List(
            [Block(dim, heads, dropout=dropout, dtype=dtype, rngs=rngs) for _ in range(DEPTH)]
        )
        self.norm = _layer_norm(dim, dtype=dtype, rngs=rngs)
        self.head = _linear(dim, num_classes, ("embed", "classes"), dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        b = x.shape[0]
        patches_BLD = self.patch_embed(x).reshape(b, -1, self.dim)
        cls_B1D = jnp.broadcast_to(self.cls_D[...].astype(self.dtype), (b, 1, self.dim))
        x_BLD = jnp.concatenate([cls_B1D, patches_BLD], axis=1)
        x_BLD = x_BLD + self.pos_LD[...].astype(self.dtype)
        x_BLD = self.dropout(x_BLD, deterministic=not train, rngs=rngs)
        for block in self.blocks:
            x_BLD = remat_lib.call(block, x_BLD, self.remat, train=train, rngs=rngs)
        logits_BC = self.head(self.norm(x_BLD)[:, 0])
        return logits_BC.astype(jnp.float32)
