"""Model zoo: `MODELS` maps a config name to a model class; `build` makes one from a config.

Every model is called as `model(x_B..., *, train=False, rngs=None) -> logits_BC` (float32).
Its constructor takes `input_shape`, `num_classes`, `rngs` and the config keys it uses; `build`
passes it just those. Params are float32 and carry logical axis names (`nnx.with_partitioning`).
"""

import inspect
from collections.abc import Callable, Sequence

import ml_collections
from flax import nnx

from bigtrain.models.cnn import CNN1D, CNN2D
from bigtrain.models.mlp import MLP, LogReg
from bigtrain.models.resnet import ResNet
from bigtrain.models.vit import ViT

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "logreg": LogReg,
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet": ResNet,
    "vit": ViT,
}


def _input_rank(name: str) -> int | None:
    """Rank of one example the model expects (channels last); None: any, it flattens."""
    return getattr(MODELS[name], "input_rank", None)


def accepts(name: str, argument: str) -> bool:
    """Whether model `name`'s constructor takes `argument` (config keys it doesn't are ignored)."""
    model_cls = MODELS[name]
    # nnx's metaclass hides a class's own signature behind `(*args, **kwargs)`: read `__init__`.
    init = model_cls.__init__ if isinstance(model_cls, type) else model_cls
    return argument in inspect.signature(init).parameters


def build(
    cfg: ml_collections.ConfigDict,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Builds `MODELS[cfg.name]` for examples of `input_shape`, without a mesh."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; known models: {sorted(MODELS)}")
    input_shape = tuple(input_shape)
    rank = _input_rank(cfg.name)
    if rank is not None and len(input_shape) != rank:
        fits = sorted(n for n in MODELS if _input_rank(n) in (None, len(input_shape)))
        raise ValueError(
            f"model {cfg.name!r} expects rank-{rank} examples (channels last), got input shape "
            f"{input_shape}; models that fit rank {len(input_shape)}: {fits}"
        )
    model_cls = MODELS[cfg.name]
    kwargs = {k: v for k, v in cfg.items() if accepts(cfg.name, k)}
    with nnx.use_eager_sharding(False):  # no mesh yet: annotate params, don't place them
        return model_cls(input_shape=input_shape, num_classes=num_classes, rngs=rngs, **kwargs)
