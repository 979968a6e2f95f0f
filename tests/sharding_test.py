import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bigtrain import checkpoint, sharding, train
from bigtrain.config import ConfigError, base


def _mesh_cfg(data, fsdp):
    c = base().mesh
    c.data, c.fsdp = data, fsdp
    return c


def test_minus_one_fills_from_device_count():
    assert sharding.mesh_shape(_mesh_cfg(-1, 2), 8) == (4, 2)
    assert sharding.mesh_shape(_mesh_cfg(1, -1), 8) == (1, 8)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        sharding.mesh_shape(_mesh_cfg(-1, 3), 8)


def test_logical_rules_shard_fsdp_only_when_divisible():
    mesh = sharding.make_mesh(_mesh_cfg(2, 4))
    assert sharding.logical_to_mesh(("embed", "mlp"), (64, 32), mesh) == P("fsdp", None)
    assert sharding.logical_to_mesh(("embed", "mlp"), (6, 32), mesh) == P(None, None)
    assert sharding.logical_to_mesh(("classes",), (10,), mesh) == P(None)
    assert sharding.logical_to_mesh((), (3, 3), mesh) == P(None, None)


def _final_params(config, workdir):
    train.run(config, workdir)
    return checkpoint.load_arrays(workdir / "ckpt")["params"]


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_sharded_training_equals_single_device(tiny_config, tmp_path, model):
    """A few SGD steps on 1 device and on meshes 8x1, 2x4, 1x8 give the same params (fp32)."""
    tiny_config.model.name = model
    tiny_config.data.synthetic_shape = (16, 8) if model == "cnn1d" else (16,)
    tiny_config.model.width = 16
    tiny_config.total_steps = 6
    tiny_config.eval_every = tiny_config.checkpoint_every = 0
    results = {}
    for data, fsdp in [(1, 1), (8, 1), (2, 4), (1, 8)]:
        tiny_config.mesh.data, tiny_config.mesh.fsdp = data, fsdp
        results[(data, fsdp)] = _final_params(tiny_config, tmp_path / f"{data}x{fsdp}")
    reference = results.pop((1, 1))
    for mesh, params in results.items():
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"mesh {mesh}")


def test_fsdp_really_shards_the_parameters(tiny_config):
    """With fsdp=8, a 16x32 kernel (logical 'input' x 'mlp') is split 8 ways on its first dim."""
    from flax import nnx

    from bigtrain import models

    mesh = sharding.make_mesh(_mesh_cfg(1, 8))
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(
            lambda: models.build(
                tiny_config.model, input_shape=(16,), num_classes=4, rngs=nnx.Rngs(0)
            )
        )
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(module, nnx.Param)))
    abstract = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    shardings = sharding.param_shardings(logical, abstract, mesh)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert P("fsdp", None) in specs
