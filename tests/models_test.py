import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bigtrain.models import MODELS, build
from bigtrain.models.vit import VARIANTS as VIT_VARIANTS

VOCAB = {"embed", "mlp", "heads", "kv", "classes", "input", "conv_in", "conv_out", "pos", None}

# (name, variant, input_shape): every registry model and variant, on a shape that fits it.
CASES = [
    ("logreg", "", (30,)),
    ("mlp", "", (40, 1)),
    ("cnn1d", "", (40, 1)),
    ("cnn2d", "", (8, 8, 1)),
    ("resnet", "cifar", (32, 32, 3)),
    ("resnet", "", (224, 224, 3)),  # resnet18
    ("resnet", "resnet50", (224, 224, 3)),
    ("vit", "", (32, 32, 3)),  # Ti
    ("vit", "B", (224, 224, 3)),
]
SMALL = [c for c in CASES if c[2] != (224, 224, 3)]
# Built and run for real (with dropout where the model has it). Eager init costs ~0.3 s of
# compilation per param shape on CPU, so cnn2d (cnn1d's code in 2D) is only checked abstractly.
RUN = [c for c in SMALL if c[0] != "cnn2d"]


def model_cfg(name: str, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            name=name,
            width=32,
            depth=4,
            kernel_size=5,
            dropout=0.0,
            variant="",
            patch_size=16,
            dtype="float32",
        )
    )
    cfg.update(overrides)
    return cfg


def key(seed: int) -> jax.Array:
    # Eager init compiles one program per param shape: on CPU ~1-2 s each with the default
    # (partitionable threefry) keys, ~0.3 s with rbg keys. Same code path, other random bits.
    return jax.random.key(seed, impl="rbg")


def make(name, variant="", input_shape=(32, 32, 3), num_classes=7, seed=0, **overrides):
    cfg = model_cfg(name, variant=variant, **overrides)
    return build(cfg, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(key(seed)))


@functools.cache
def concrete(name, variant, input_shape):
    """Shared across tests, so each param shape compiles its initializer once."""
    return make(name, variant, input_shape, dropout=0.1)


@functools.cache
def abstract(name, variant, input_shape, dtype="float32"):
    """Shapes only, nothing allocated: cheap even for ResNet-50 and ViT-B."""
    return nnx.eval_shape(lambda: make(name, variant, input_shape, 1000, dtype=dtype))


def abstract_logits(model: nnx.Module, input_shape, b=3):
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((b, *input_shape), jnp.float32)
    return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def batch(input_shape, b=3, seed=0):
    # One batch size everywhere: eager ops compile once per shape.
    return np.random.default_rng(seed).normal(size=(b, *input_shape)).astype(np.float32)


def test_cases_cover_the_registry():
    assert {name for name, _, _ in CASES} == set(MODELS)


@pytest.mark.parametrize("name,variant,input_shape", RUN)
def test_forward_eval_and_train(name, variant, input_shape):
    model = concrete(name, variant, input_shape)
    x = batch(input_shape)
    logits = model(x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    logits = model(x, train=True, rngs=nnx.Rngs(dropout=key(1)))
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("name,variant,input_shape", CASES)
def test_output_shape_of_every_variant(name, variant, input_shape):
    out = abstract_logits(abstract(name, variant, input_shape), input_shape)
    assert out.shape == (3, 1000) and out.dtype == jnp.float32


@pytest.mark.parametrize("name,variant,input_shape", [c for c in RUN if c[0] in ("mlp", "vit")])
def test_dropout_only_in_train_mode(name, variant, input_shape):
    model = concrete(name, variant, input_shape)
    x = batch(input_shape)
    np.testing.assert_array_equal(model(x), model(x, train=False, rngs=nnx.Rngs(dropout=key(1))))
    a = model(x, train=True, rngs=nnx.Rngs(dropout=key(1)))
    b = model(x, train=True, rngs=nnx.Rngs(dropout=key(2)))
    assert not np.allclose(a, model(x)) and not np.allclose(a, b)


@pytest.mark.parametrize("name,variant,input_shape", CASES)
def test_every_param_has_a_logical_spec(name, variant, input_shape):
    state = nnx.state(abstract(name, variant, input_shape), nnx.Param)
    params = dict(nnx.to_flat_state(state))
    specs = list(nnx.to_flat_state(nnx.get_partition_spec(state)))
    assert len(specs) == len(params) > 0
    for path, spec in specs:
        names, shape = tuple(spec.get_value()), params[path].shape
        assert len(names) == len(shape), (path, names, shape)
        assert set(names) <= VOCAB, (path, names)


@pytest.mark.parametrize(
    "name,variant,expected",
    [
        ("resnet", "", 11_689_512),  # torchvision resnet18
        ("resnet", "resnet50", 25_557_032),  # torchvision resnet50
        ("vit", "B", 86_567_656),  # ViT-B/16 (timm vit_base_patch16_224)
    ],
)
def test_param_counts(name, variant, expected):
    model = abstract(name, variant, (224, 224, 3))
    assert num_params(model) == pytest.approx(expected, rel=0.01)


def test_empty_variant_means_resnet18_and_vit_ti():
    shape = (32, 32, 3)
    assert num_params(abstract("resnet", "", shape)) == num_params(
        abstract("resnet", "resnet18", shape)
    )
    assert abstract("vit", "", shape).dim == VIT_VARIANTS["Ti"][0]


def test_unknown_name():
    with pytest.raises(ValueError, match="known models") as e:
        make("transformer")
    assert str(sorted(MODELS)) in str(e.value)


@pytest.mark.parametrize("name,valid", [("resnet", "cifar"), ("vit", "'Ti'")])
def test_unknown_variant(name, valid):
    with pytest.raises(ValueError, match=f"unknown {name} variant 'XL'.*{valid}"):
        make(name, "XL")


def test_wrong_input_rank():
    with pytest.raises(ValueError) as e:
        make("cnn1d", input_shape=(8, 8, 1))
    msg = str(e.value)
    assert "'cnn1d'" in msg and "(8, 8, 1)" in msg
    assert "['cnn2d', 'logreg', 'mlp', 'resnet', 'vit']" in msg
    with pytest.raises(ValueError, match=r"'resnet'.*\(40, 1\).*'cnn1d'"):
        make("resnet", input_shape=(40, 1))


def test_vit_patch_must_divide_image():
    with pytest.raises(ValueError, match="patch_size"):
        make("vit", input_shape=(30, 30, 3), patch_size=8)


BOTTLENECKS = ("resnet", "resnet50", (32, 32, 3))


@pytest.mark.parametrize("name,variant,input_shape", [*SMALL, BOTTLENECKS])
def test_bfloat16_compute_float32_params_and_logits(name, variant, input_shape):
    model = abstract(name, variant, input_shape, dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, train=True))(state, x)
    assert [v.dtype for v in jaxpr.out_avals] == [jnp.float32]
    lines = str(jaxpr).splitlines()
    matmuls = [ln for ln in lines if "dot_general" in ln or "conv_general" in ln]
    assert matmuls and all("bf16" in ln for ln in matmuls), matmuls


def test_batchnorm_stats_update_only_in_train():
    model = concrete("resnet", "cifar", (32, 32, 3))
    x = batch((32, 32, 3)) + 1.0

    def stats():
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    before = stats()
    assert before
    model(x)
    for a, b in zip(before, stats(), strict=True):
        np.testing.assert_array_equal(a, b)
    model(x, train=True)
    assert all(not np.array_equal(a, b) for a, b in zip(before, stats(), strict=True))


def test_init_is_deterministic():
    def params(seed):
        model = make("vit", "", (32, 32, 3), seed=seed)  # the shapes `concrete` compiled
        return jax.tree.leaves(nnx.state(model, nnx.Param))

    first = params(0)
    for a, b in zip(first, params(0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, params(1), strict=True))


def test_runs_under_jit_from_split_state():
    model = concrete("mlp", "", (40, 1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, k):
        return nnx.merge(graphdef, state)(x, train=True, rngs=nnx.Rngs(dropout=k))

    x = batch((40, 1))
    a, b = forward(state, x, key(0)), forward(state, x, key(1))
    assert a.shape == (3, 7) and a.dtype == jnp.float32 and not np.allclose(a, b)
