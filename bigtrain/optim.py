"""Optimizers and schedules from config: clip -> optimizer with decay mask -> scaled by schedule."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    end = peak * cfg.end_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction),
        "linear": lambda: optax.linear_schedule(peak, end, decay_steps),
        "constant": lambda: optax.constant_schedule(peak),
    }[cfg.schedule]()
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


SCHEDULES = ("cosine", "linear", "constant")


def decay_mask(params):
    """Weight decay on kernels and embeddings only: no decay on biases and norm scales (ndim 1)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _adamw(cfg, lr):
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


def _sgd(cfg, lr):
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=cfg.momentum or None),
    )


def _lion(cfg, lr):
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd, "lion": _lion}


def build(cfg: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    lr = schedule(cfg, total_steps)
    tx = OPTIMIZERS[cfg.name](cfg, lr)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx, lr
