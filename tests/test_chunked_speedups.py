"""The fast forms equal the plain ones: the channel-wise pairwise product by recursive halving against the
full decay tensor (stable for very strong decays), and the recursive Cholesky / triangular inverses
against numpy, with their implicit gradients against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from filters import chunked, linalg


def _pairwise_inputs(rng, lead, chunk, channels, strength):
    x = rng.normal(size=(*lead, chunk, channels))
    y = rng.normal(size=(*lead, chunk, channels))
    log_a = -rng.uniform(0, strength, size=(*lead, chunk, channels))
    log_a[..., ::3, 0] = 0.0                                     # some steps and channels without decay
    return x, y, np.cumsum(log_a, -2)


@pytest.mark.parametrize("chunk", [3, 4, 8, 17, 40, 64])
@pytest.mark.parametrize("strength", [0.3, 50.0])
def test_pairwise_channels_matches_dense(chunk, strength):
    rng = np.random.default_rng(chunk)
    x, y, b = _pairwise_inputs(rng, (1, 2, 3), chunk, 5, strength)
    for strict in (False, True):
        fast = np.asarray(chunked._pairwise(x, y, b, strict=strict))
        dense = np.asarray(chunked._pairwise_dense(x, y, b, strict))
        assert fast.shape == (1, 2, 3, chunk, chunk)
        assert np.all(np.isfinite(fast))
        np.testing.assert_allclose(fast, dense, rtol=1e-12, atol=1e-12)


def test_pairwise_channels_gradients_strong_decay():
    rng = np.random.default_rng(1)
    x, y, b = _pairwise_inputs(rng, (1, 2), 24, 4, 50.0)
    weights = rng.normal(size=(1, 2, 24, 24))
    for strict in (False, True):
        fast = jax.grad(lambda *a: jnp.sum(weights * chunked._pairwise(*a, strict=strict)), (0, 1, 2))(x, y, b)
        dense = jax.grad(lambda *a: jnp.sum(weights * chunked._pairwise_dense(*a, strict)), (0, 1, 2))(x, y, b)
        for f, d in zip(fast, dense):
            assert np.all(np.isfinite(f))
            np.testing.assert_allclose(f, d, rtol=1e-10, atol=1e-10)


def test_pairwise_float32_strong_decay_is_finite():
    rng = np.random.default_rng(2)
    x, y, b = (jnp.asarray(z, jnp.float32) for z in _pairwise_inputs(rng, (2,), 64, 8, 50.0))
    out = chunked._pairwise(x, y, b, strict=False)
    grads = jax.grad(lambda *a: jnp.sum(chunked._pairwise(*a, strict=True) ** 2), (0, 1, 2))(x, y, b)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(out, chunked._pairwise_dense(x, y, b, False), rtol=1e-5, atol=1e-5)


def _spd(rng, batch, size):
    a = rng.normal(size=(batch, size, size))
    return a @ np.swapaxes(a, -1, -2) / size + 0.5 * np.eye(size)


@pytest.mark.parametrize("size", [1, 5, 8, 9, 17, 64])
def test_recursive_factorizations_match_numpy(size):
    rng = np.random.default_rng(size)
    spd = _spd(rng, 2, size)
    lower = np.linalg.cholesky(spd)
    factor, inverse = linalg.cholesky_with_inverse(spd)
    np.testing.assert_allclose(factor, lower, atol=1e-12)
    np.testing.assert_allclose(inverse, np.linalg.inv(lower), atol=1e-10)
    np.testing.assert_allclose(linalg.cholesky(spd), lower, atol=1e-12)
    np.testing.assert_allclose(linalg.lower_inverse(lower), np.linalg.inv(lower), atol=1e-10)
    strict = np.tril(rng.normal(size=(2, size, size)) * 0.3, -1)
    np.testing.assert_allclose(linalg.unit_lower_inverse(strict), np.linalg.inv(np.eye(size) + strict),
                               rtol=1e-10, atol=1e-10)
    factor32 = linalg.cholesky(jnp.asarray(spd, jnp.float32))
    assert factor32.dtype == jnp.float32
    np.testing.assert_allclose(factor32, lower, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [1, 9, 64])
def test_library_factorizations_match_numpy(size):
    """The branch that GPUs and TPUs take (jax.lax.linalg), called directly so that it runs here too
    (one call at a time: jaxlib 0.10's CPU LAPACK only deadlocks when several run at once)."""
    rng = np.random.default_rng(size)
    spd = _spd(rng, 2, size)
    lower = np.linalg.cholesky(spd)
    factor, inverse = jax.jit(linalg._library_cholesky_and_inverse)(spd)
    np.testing.assert_allclose(factor, lower, atol=1e-12)
    np.testing.assert_allclose(inverse, np.linalg.inv(lower), atol=1e-10)
    np.testing.assert_allclose(jax.jit(linalg._library_lower_inverse)(lower), np.linalg.inv(lower), atol=1e-10)


def test_recursive_factorizations_gradients():
    rng = np.random.default_rng(3)
    spd = _spd(rng, 2, 11)                                       # 11 > 8: through the recursion
    symmetric = lambda a: 0.5 * (a + jnp.swapaxes(a, -1, -2))
    check_grads(lambda a: linalg.cholesky(symmetric(a)), (spd,), order=1, modes=["rev"])
    check_grads(lambda a: linalg.cholesky_with_inverse(symmetric(a)), (spd,), order=1, modes=["rev"])
    check_grads(linalg.lower_inverse, (np.linalg.cholesky(spd),), order=1, modes=["rev"])
    check_grads(linalg.unit_lower_inverse, (np.tril(rng.normal(size=(2, 11, 11)) * 0.3, -1),), order=1,
                modes=["rev"])
    # The pair's gradient is that of the two separate factorizations.
    w1, w2 = rng.normal(size=(2, 2, 11, 11))
    pair = jax.grad(lambda a: jnp.sum(w1 * linalg.cholesky_with_inverse(a)[0])
                    + jnp.sum(w2 * linalg.cholesky_with_inverse(a)[1]))(spd)
    separate = jax.grad(lambda a: jnp.sum(w1 * linalg.cholesky(a))
                        + jnp.sum(w2 * linalg.lower_inverse(linalg.cholesky(a))))(spd)
    np.testing.assert_allclose(pair, separate, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "bayesian"])
@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_lowerings_keep_float32_products_under_a_lower_default_precision(name, backend):
    """A user who sets a bf16 / TF32 default for matmuls (or a GPU's own default) still gets float32
    filters: every lowering pins its products to full float32 (the tests otherwise run with a float32
    default, conftest.py). On a CPU, XLA computes float32 products in full anyway; this bites on GPUs."""
    import designmodels as dm
    import filters
    from tests.support import random_inputs, relative_error

    model = dm.NAMED_MODELS[name]()
    q, k, v, gates = random_inputs(model, batch=1, time=150, heads=2, key_dim=16, value_dim=16, seed=4)
    reference = filters.compile(model, backend="sequential")(q, k, v, **gates)[0]
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    with jax.default_matmul_precision("bfloat16"):
        y = filters.compile(model, backend=backend)(as32(q), as32(k), as32(v),
                                                    **{n: as32(g) for n, g in gates.items()})[0]
    assert relative_error(y, reference) < 2e-5


@pytest.mark.parametrize("name", ["linear_attention", "deltanet"])
def test_no_decay_has_no_cumulative_sum(name):
    """Without a decay the chunked lowering uses b = 0 directly: a cumulative sum of a constant would be
    folded element by element by XLA at compile time (seconds per layer at batch 256 on a GPU)."""
    import designmodels as dm
    import filters
    from tests.support import random_inputs

    model = dm.NAMED_MODELS[name]()
    q, k, v, gates = random_inputs(model, batch=2, time=16, heads=2, key_dim=4, value_dim=3, dtype=np.float32)
    run = filters.compile(model, backend="chunked", chunk_size=8)
    text = jax.jit(lambda *a, **g: run(*a, validate=False, **g)).lower(q, k, v, **gates).as_text()
    assert "cumsum" not in text and "reduce_window" not in text
