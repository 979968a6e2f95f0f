"""Classification losses: each returns per-example values (B,) so masking is the caller's.

Labels are integer classes (B,) or class probabilities (B, C), as mixup/cutmix/onehot make
them (`data/ops.py`); label smoothing applies to either."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    soft = labels.ndim == 2
    targets_BC = labels.astype(jnp.float32) if soft else jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(targets_BC, smoothing) if smoothing else targets_BC


def hard_labels(labels: jax.Array) -> jax.Array:
    """Integer classes (B,): soft labels (B, C) count as their most probable class."""
    return jnp.argmax(labels, -1) if labels.ndim == 2 else labels


def softmax_xent(logits_BC, labels_B, smoothing: float = 0.0):
    targets_BC = _targets(labels_B, logits_BC.shape[-1], smoothing)
    return optax.softmax_cross_entropy(logits_BC, targets_BC)


def sigmoid_xent(logits_BC, labels_B, smoothing: float = 0.0):
    """Binary cross-entropy per class (one-vs-rest), summed over classes."""
    targets_BC = _targets(labels_B, logits_BC.shape[-1], smoothing)
    return optax.sigmoid_binary_cross_entropy(logits_BC, targets_BC).sum(-1)


def mse(logits_BC, labels_B, smoothing: float = 0.0):
    """Squared error against (smoothed) one-hot targets, summed over classes."""
    targets_BC = _targets(labels_B, logits_BC.shape[-1], smoothing)
    return jnp.sum(jnp.square(logits_BC - targets_BC), axis=-1)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent, "mse": mse}


def get(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
