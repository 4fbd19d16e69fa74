"""KD loss (METHOD.md §2) against values computed by hand on fixed logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdprune_jax import losses


def _softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


S = [2.0, 0.5, -1.0]
T = [1.0, 3.0, 0.0]
Y = 0


def _hand(alpha, tau):
    # Everything below in plain Python floats: an independent reference.
    ps = _softmax(S)
    ce = -math.log(ps[Y])
    pt, pst = _softmax([v / tau for v in T]), _softmax([v / tau for v in S])
    kl = sum(a * math.log(a / b) for a, b in zip(pt, pst))
    return (1 - alpha) * ce + alpha * tau * tau * kl


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_loss_matches_hand_computation(alpha, tau):
    got = losses.kd_loss(jnp.array([S]), jnp.array([T]), jnp.array([Y]), kd_weight=alpha,
                         temperature=tau)
    assert got.shape == (1,)
    np.testing.assert_allclose(float(got[0]), _hand(alpha, tau), rtol=1e-5)


def test_known_constants():
    # alpha = 0: CE of logits (2, .5, -1) for class 0 = log(e^2 + e^.5 + e^-1) - 2.
    ce = math.log(math.exp(2) + math.exp(0.5) + math.exp(-1)) - 2
    assert abs(ce - 0.2413) < 1e-4
    got = losses.kd_loss(jnp.array([S]), None, jnp.array([Y]), kd_weight=0.0, temperature=4.0)
    np.testing.assert_allclose(float(got[0]), ce, rtol=1e-6)
    # Identical student and teacher logits: the KL term is exactly zero.
    same = losses.kd_loss(jnp.array([S]), jnp.array([S]), jnp.array([Y]), kd_weight=1.0,
                          temperature=4.0)
    assert abs(float(same[0])) < 1e-6


def test_teacher_gets_no_gradient_and_is_per_example():
    s = jnp.array([S, T])
    t = jnp.array([T, S])
    y = jnp.array([0, 2])
    g_t = jax.grad(lambda t: losses.kd_loss(s, t, y, kd_weight=0.5, temperature=2.0).sum())(t)
    assert float(jnp.abs(g_t).max()) == 0.0
    per = losses.kd_loss(s, t, y, kd_weight=0.5, temperature=2.0)
    one = losses.kd_loss(s[1:], t[1:], y[1:], kd_weight=0.5, temperature=2.0)
    np.testing.assert_allclose(per[1], one[0], rtol=1e-6)


def test_temperature_scaling_gradient_magnitude():
    # tau^2 keeps the KD gradient's scale comparable across temperatures (Hinton et al.):
    # for large tau the gradient wrt s approaches (s - t) / C (zero-mean logits), independent
    # of tau.
    s = jnp.array([[0.3, -0.2, -0.1]])
    t = jnp.array([[-0.1, 0.4, -0.3]])
    g = jax.grad(lambda s: losses.kd_loss(s, t, jnp.array([0]), kd_weight=1.0,
                                          temperature=100.0).sum())(s)
    np.testing.assert_allclose(np.asarray(g[0]), (np.asarray(s - t)[0]) / 3, atol=2e-3)


def test_a_kd_weight_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="kd_weight == 0"):
        losses.kd_loss(jnp.array([S]), None, jnp.array([0]), kd_weight=0.5, temperature=1.0)
