"""Losses take integer labels or class probabilities (what mixup/cutmix/onehot make)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigtrain import losses


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_probabilities_give_the_integer_label_loss(name, smoothing):
    logits = jax.random.normal(jax.random.key(0), (8, 5))
    labels = jnp.arange(8) % 5
    fn = losses.get(name)
    hard = fn(logits, labels, smoothing)
    soft = fn(logits, jax.nn.one_hot(labels, 5), smoothing)
    assert hard.shape == (8,)
    np.testing.assert_allclose(soft, hard, rtol=1e-6)


def test_mixed_labels_give_the_mixed_cross_entropy():
    """Cross-entropy is linear in the target: lam * CE(a) + (1 - lam) * CE(b)."""
    logits = jax.random.normal(jax.random.key(1), (6, 4))
    a, b, lam = jnp.array([0, 1, 2, 3, 0, 1]), jnp.array([3, 2, 1, 0, 3, 2]), 0.3
    mixed = lam * jax.nn.one_hot(a, 4) + (1 - lam) * jax.nn.one_hot(b, 4)
    expected = lam * losses.softmax_xent(logits, a) + (1 - lam) * losses.softmax_xent(logits, b)
    np.testing.assert_allclose(losses.softmax_xent(logits, mixed), expected, rtol=1e-5)


def test_hard_labels_are_the_most_probable_class():
    soft = jnp.array([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    np.testing.assert_array_equal(losses.hard_labels(soft), [0, 2])
    np.testing.assert_array_equal(losses.hard_labels(jnp.array([2, 1])), [2, 1])
