"""The plain-XLA factorizations equal LAPACK's, and their implicit gradients equal finite differences."""
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from filters import linalg


def _spd(rng, batch, size):
    a = rng.normal(size=(batch, size, size))
    return a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(size)


def test_factorizations_match_numpy():
    rng = np.random.default_rng(0)
    spd = _spd(rng, 3, 7)
    lower = np.linalg.cholesky(spd)
    strict = np.tril(rng.normal(size=(3, 7, 7)) * 0.5, -1)
    general = rng.normal(size=(3, 7, 7))
    np.testing.assert_allclose(linalg.cholesky(spd), lower, atol=1e-12)
    np.testing.assert_allclose(linalg.lower_inverse(lower), np.linalg.inv(lower), atol=1e-12)
    np.testing.assert_allclose(linalg.unit_lower_inverse(strict), np.linalg.inv(np.eye(7) + strict), atol=1e-12)
    np.testing.assert_allclose(linalg.inverse(general), np.linalg.inv(general), atol=1e-10)


def test_implicit_gradients():
    rng = np.random.default_rng(1)
    spd = _spd(rng, 2, 5)
    symmetric_cholesky = lambda a: linalg.cholesky(0.5 * (a + jnp.swapaxes(a, -1, -2)))
    check_grads(symmetric_cholesky, (spd,), order=1, modes=["rev"])
    check_grads(linalg.lower_inverse, (np.linalg.cholesky(spd),), order=1, modes=["rev"])
    check_grads(linalg.unit_lower_inverse, (np.tril(rng.normal(size=(2, 5, 5)), -1),), order=1, modes=["rev"])
    check_grads(linalg.inverse, (rng.normal(size=(2, 5, 5)) + 3 * np.eye(5),), order=1, modes=["rev"])
