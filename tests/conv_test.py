"""Convolution as patches x kernel equals lax's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from ml_collections import ConfigDict

from bigtrain import models
from bigtrain.config import ConfigError, base, validate
from bigtrain.models import conv as conv_lib
from bigtrain.step import split

CASES = [  # input shape (B, *spatial, Cin), kernel window, Cout, stride, padding
    ((4, 2, 2, 64), (3, 3), 32, 1, ((1, 1), (1, 1))),
    ((4, 1, 1, 64), (3, 3), 16, 1, ((1, 1), (1, 1))),
    ((4, 4, 4, 8), (3, 3), 16, 2, ((1, 1), (1, 1))),
    ((3, 9, 7, 5), (5, 3), 6, 2, "SAME"),
    ((3, 8, 8, 4), (7, 7), 8, 2, ((3, 3), (3, 3))),
    ((2, 6, 6, 3), (1, 1), 4, 2, "VALID"),
    ((5, 40, 1), (5,), 8, 1, "SAME"),
    ((5, 21, 8), (5,), 8, 2, "SAME"),
    ((2, 5, 5, 5, 2), (3, 3, 3), 3, 1, "SAME"),
]


def _dims(rank):
    spatial = "HWD"[:rank]
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


@pytest.mark.parametrize("shape, window, cout, stride, padding", CASES)
def test_patches_equal_lax_conv_and_its_gradients(shape, window, cout, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*window, shape[-1], cout)) * 0.2, jnp.float32)
    strides = (stride,) * len(window)
    dn = _dims(len(window))

    def reference(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

    def ours(x, w):
        return conv_lib.patches_conv(x, w, strides, padding)

    y_ref, y = jax.jit(reference)(x, w), jax.jit(ours)(x, w)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # A loss that weights every output differently, so any misplaced tap shows in the grads.
    probe = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1)))
    for a, b in zip(grad(ours)(x, w), grad(reference)(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def _resnet(conv: str):
    cfg = ConfigDict({"name": "resnet", "variant": "resnet18", "conv": conv})
    return models.build(cfg, input_shape=(32, 32, 3), num_classes=10, rngs=nnx.Rngs(0))


def _count_convs(conv: str) -> int:
    model, params, state = split(_resnet(conv))
    x = jnp.zeros((2, 32, 32, 3))
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, state, x, train=True)[0])(params)
    return str(jaxpr).count("conv_general_dilated")


def test_auto_uses_patches_only_on_small_maps_with_many_channels():
    # ResNet-18 on 32x32: 20 convs; the 3x3 convs on 4x4, 2x2 and 1x1 maps (>= 64 channels in)
    # and the 1x1 shortcuts into them become matmuls: stage 2 to 4 (3 x (4 + 1)) = 15 convs.
    assert _count_convs("xla") == 20
    assert _count_convs("auto") == 20 - 15
    assert _count_convs("patches") == 0


def test_resnet_step_is_the_same_with_either_convolution():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
    results = []
    for conv in ("xla", "patches"):
        model, params, state = split(_resnet(conv))

        def loss(p, model=model, state=state):
            logits, _ = model.apply(p, state, x, train=True)
            return jnp.mean(logits**2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(float(loss_b), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_conv_implementation_is_a_config_error():
    c = base()
    c.model.conv = "winograd"
    with pytest.raises(ConfigError, match="model.conv='winograd' is invalid; valid: auto"):
        validate(c)
