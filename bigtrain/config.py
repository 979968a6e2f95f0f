"""The base config (every key and its default), loading, overrides and validation.

Config files build on `base()`: `config = base(); config.model.name = "vit"; return config`.
The base is locked, so a typo in a config file or on the command line is an error, never a new key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A user error in a config: the message names the key, the value and what is valid."""


def base() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 6000
    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 512  # global; the last eval batch is padded and masked
    c.eval_every = 1000  # steps; 0 = only at the end
    c.log_every = 100
    c.checkpoint_every = 1000  # steps; 0 = only at the end
    c.keep_checkpoints = 3  # the last N steps are kept ...
    c.keep_best_checkpoints = 0  # ... plus the best K by best_metric (measured at eval steps)
    c.best_metric = "eval/accuracy"
    c.best_mode = "max"
    c.checkpoint_every_minutes = 0.0  # also save when this much time passed; 0 = off
    c.nan_policy = "skip"  # skip: drop the update, count it; halt: dump diagnostics, exit 4
    c.nan_max_consecutive = 10  # skip: halt after this many non-finite steps in a row
    # Implicit host<->device transfers in the loop after step 1: allow | log | disallow. "disallow"
    # turns a hidden sync (float(x) on a device array in a hook, say) into an error naming it.
    c.transfer_guard = "allow"
    c.watchdog_secs = 0.0  # exit 70 with all thread stacks if no step completes in time; 0 = off

    c.init_from = ConfigDict()  # partial init of a fresh run from another run's checkpoint
    c.init_from.path = ""  # a workdir or its ckpt/ directory
    c.init_from.parts = "params"  # comma-separated: params, model_state, opt_state
    c.init_from.exclude = ""  # regex of parameter paths to keep at init (e.g. a new head)

    c.data = ConfigDict()
    c.data.name = "mnist1d"
    c.data.standardize = True  # with train-split statistics
    c.data.permute_positions = False  # a fixed spatial shuffle of each input (MNIST-1D paper)
    c.data.num_train = 0  # 0 = the whole train split
    c.data.synthetic_shape = (32, 32, 3)
    c.data.synthetic_classes = 10
    c.data.synthetic_size = 4096
    c.data.read_threads = 2
    c.data.prefetch = 4
    c.data.path = ""  # arrayrecord: the DST folder of `python -m bigtrain.data.convert SRC DST`
    c.data.pp = (
        ""  # train ops, e.g. "decode|resize(32)|flip_lr|standardize"; "" = decode|standardize
    )
    c.data.pp_eval = ""  # eval ops; "" = decode|standardize
    # Consecutive batches per host->device transfer; the step picks its row on the device.
    # -1 = automatic (as many as fit in 16 MiB, <= 256; 1 with workers); 1 = one batch each.
    c.data.chunk = -1
    c.data.workers = -1  # input worker processes; -1 = automatic (0 on <= 2 cores)
    c.data.strict = False  # a bad record mid-stream stops the run instead of being skipped

    c.model = ConfigDict()
    c.model.name = "cnn1d"
    c.model.width = 32
    c.model.depth = 4
    c.model.kernel_size = 5
    c.model.dropout = 0.0
    c.model.variant = ""  # resnet: resnet18|resnet50|cifar; vit: Ti|S|B
    c.model.patch_size = 16
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.remat = "none"  # none | full | dots_saveable: recompute activations per block
    c.model.conv = "auto"  # auto | xla | patches: how convolutions run (bigtrain/models/conv.py)

    c.loss = ConfigDict()
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.0

    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.0
    c.optim.weight_decay = 0.05  # not applied to biases and norm scales
    c.optim.momentum = 0.9  # sgd
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0  # global norm; 0 = off
    c.optim.accum_steps = 1  # gradient accumulation: microbatches per step (lax.scan)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 = all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # multi-slice TPU: how much of `data` spans slices (the rest in-slice)
    c.mesh.dcn_fsdp = 1
    # Logical parameter axis (named by the models) -> mesh axis; big unnamed params go on fsdp.
    c.mesh.rules = (
        "embed=fsdp",
        "conv_out=fsdp",
        "input=fsdp",
        "mlp=tensor",
        "heads=tensor",
        "classes=none",
        "kv=none",
        "conv_in=none",
        "pos=none",
    )
    c.peak_flops_per_device = 0.0  # for perf/mfu; 0 = the device table, or measured on CPU
    c.lock()
    return c


# --- loading


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py[:arg]`, applies `key=value` overrides and validates."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found; pass e.g. --config configs/mnist1d.py")
    module_spec = importlib.util.spec_from_file_location(f"bigtrain_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg); see configs/mnist1d.py")
    try:
        config = module.get_config(arg or None)
    except (AttributeError, KeyError) as e:
        raise ConfigError(f"{path}: {_clean(e)}") from None
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} has no value; write --config.{key}=VALUE")
        set_value(config, key, value)
    validate(config)
    return config


def set_value(config: ConfigDict, key: str, text: str) -> None:
    """Sets a dotted key from its command-line text, parsed by the type of its default."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name] if isinstance(node, ConfigDict) and name in node else None
    if not isinstance(node, ConfigDict) or leaf not in node:
        raise ConfigError(_unknown_key(key, config))
    node[leaf] = _parse(key, text, node[leaf])


def _parse(key: str, text: str, default: Any) -> Any:
    kind = type(default)
    if isinstance(default, ConfigDict):
        raise ConfigError(f"{key} is a group of keys ({', '.join(default)}); set one of them")
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind is tuple:
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, list | tuple) else (value,)
    except (ValueError, SyntaxError):
        pass
    raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__} (default: {default!r})")


def _unknown_key(key: str, config: ConfigDict) -> str:
    keys = list(_flat_keys(config))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys: {', '.join(keys)}"
    return f"unknown config key {key!r}: {hint}"


def _flat_keys(config: ConfigDict, prefix: str = "") -> Iterator[str]:
    for name, value in config.items():
        if isinstance(value, ConfigDict):
            yield from _flat_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _clean(e: Exception) -> str:
    return str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\n", " ")


# --- validation


def validate(config: ConfigDict) -> None:
    """Checks keys, types and ranges against the base before anything is compiled."""
    reference = base()
    known = set(_flat_keys(reference))
    for key in _flat_keys(config):
        if key not in known:
            raise ConfigError(_unknown_key(key, reference))
    for key in known:
        value, default = _get(config, key), _get(reference, key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            continue
        if type(value) is not type(default):
            raise ConfigError(
                f"{key}={value!r} has type {type(value).__name__}; "
                f"expected {type(default).__name__} like the default {default!r}"
            )
    for key, ok, valid in _rules():
        if not ok(_get(config, key)):
            raise ConfigError(f"{key}={_get(config, key)!r} is invalid; valid: {valid}")
    if config.model.remat != "none":
        from bigtrain import models

        takes = sorted(n for n in models.MODELS if models.accepts(n, "remat"))
        if not models.accepts(config.model.name, "remat"):
            raise ConfigError(
                f"model.remat={config.model.remat!r} but model {config.model.name!r} has no "
                f"blocks to rematerialize; models that take it: {takes} (or model.remat='none')"
            )
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh sizes {sizes}: at most one axis may be -1 (filled from devices)")


def _rules() -> list[tuple[str, Any, str]]:
    from bigtrain import losses, models, optim
    from bigtrain.data import sources

    positive = (lambda v: v > 0, "> 0")
    non_negative = (lambda v: v >= 0, ">= 0")

    def one_of(names):
        return (lambda v: v in names, " | ".join(sorted(names)))

    table = {
        "seed": non_negative,
        "total_steps": positive,
        "batch_size": positive,
        "eval_batch_size": positive,
        "eval_every": non_negative,
        "log_every": positive,
        "checkpoint_every": non_negative,
        "keep_checkpoints": positive,
        "keep_best_checkpoints": non_negative,
        "best_mode": one_of({"max", "min"}),
        "checkpoint_every_minutes": non_negative,
        "nan_policy": one_of({"skip", "halt"}),
        "nan_max_consecutive": positive,
        "watchdog_secs": non_negative,
        "transfer_guard": one_of({"allow", "log", "disallow"}),
        "init_from.parts": (
            lambda v: set(v.replace(" ", "").split(",")) <= {"params", "model_state", "opt_state"},
            "a comma-separated subset of params, model_state, opt_state",
        ),
        "data.name": one_of(sources.DATASETS),
        "data.num_train": non_negative,
        "data.synthetic_classes": (lambda v: v >= 2, ">= 2"),
        "data.synthetic_size": positive,
        "data.synthetic_shape": (lambda v: len(v) >= 1 and all(d > 0 for d in v), "dims > 0"),
        "data.read_threads": positive,
        "data.prefetch": non_negative,
        "data.workers": (lambda v: v >= -1, "-1 (automatic) or >= 0"),
        "data.chunk": (lambda v: v == -1 or v >= 1, "-1 (automatic) or >= 1"),
        "data.pp": (_valid_ops, "ops joined by |, e.g. resize(32)|flip_lr; see data/ops.py"),
        "data.pp_eval": (_valid_ops, "ops joined by |; see data/ops.py"),
        "model.name": one_of(models.MODELS),
        "model.width": positive,
        "model.depth": positive,
        "model.kernel_size": positive,
        "model.patch_size": positive,
        "model.dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1"),
        "model.dtype": one_of({"float32", "bfloat16", "float16"}),
        "loss.name": one_of(losses.LOSSES),
        "loss.label_smoothing": (lambda v: 0 <= v < 1, "0 <= label_smoothing < 1"),
        "optim.name": one_of(optim.OPTIMIZERS),
        "optim.schedule": one_of(optim.SCHEDULES),
        "optim.learning_rate": positive,
        "optim.warmup_steps": non_negative,
        "optim.end_lr_fraction": (lambda v: 0 <= v <= 1, "0 <= end_lr_fraction <= 1"),
        "optim.weight_decay": non_negative,
        "optim.momentum": (lambda v: 0 <= v < 1, "0 <= momentum < 1"),
        "optim.b1": (lambda v: 0 <= v < 1, "0 <= b1 < 1"),
        "optim.b2": (lambda v: 0 <= v < 1, "0 <= b2 < 1"),
        "optim.clip_norm": non_negative,
        "mesh.data": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
        "mesh.fsdp": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
        "mesh.tensor": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
        "mesh.dcn_data": positive,
        "mesh.dcn_fsdp": positive,
        "mesh.rules": (_valid_rules, "entries like 'embed=fsdp' (axes data, fsdp, tensor, none)"),
        "peak_flops_per_device": non_negative,
        "model.remat": one_of({"none", "full", "dots_saveable"}),
        "model.conv": one_of({"auto", "xla", "patches"}),
        "optim.accum_steps": positive,
    }
    return [(key, check, valid) for key, (check, valid) in table.items()]


def _valid_rules(rules: tuple) -> bool:
    from bigtrain import sharding

    sharding.parse_rules(rules)  # raises ConfigError naming the bad entry
    return True


def _valid_ops(spec: str) -> bool:
    from bigtrain.data import ops

    try:
        ops.parse(spec)
    except ValueError as e:
        raise ConfigError(f"data.pp/pp_eval {spec!r}: {e}") from None
    return True


def _get(config: ConfigDict, key: str) -> Any:
    for name in key.split("."):
        config = config[name]
    return config


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses a variant argument: 'size=S,patch=16' -> {'size': 'S', 'patch': '16'}."""
    if not arg:
        return {}
    out = {}
    for part in arg.split(","):
        name, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"config argument {part!r} must look like name=value")
        out[name.strip()] = value.strip()
    return out
