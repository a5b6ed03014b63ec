"""The shape legend is checked while the tests run (``MBD_CHECK_SHAPES=1``, tests/conftest.py): a kernel
reference, a lowering or a layer helper given, or returning, an array whose dimensions disagree with
its annotations fails at the call, naming the argument and the dimensions bound so far."""
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import designmodels as dm
import filters
from filters import chunked, sequential, shapes
from filters.checks import prepare
from tests.support import random_inputs

B, T, H, K, V = 2, 6, 3, 4, 5


def test_shape_checks_are_on_in_the_tests_and_cost_nothing_otherwise(monkeypatch):
    assert shapes.CHECK

    def f(x: shapes.Mean) -> shapes.Mean:
        return x

    assert shapes.typed(f) is not f
    monkeypatch.setattr(shapes, "CHECK", False)
    assert shapes.typed(f) is f


def test_a_state_in_the_transposed_layout_is_caught_at_the_kernel_reference():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    chunked.additive(q, k, v, None, np.zeros((B, H, K, V)), chunk_size=4)
    with pytest.raises(TypeCheckError, match=r"(?s)initial_state.*K=4.*V=5"):
        chunked.additive(q, k, v, None, np.zeros((B, H, V, K)), chunk_size=4)
    with pytest.raises(TypeCheckError, match="parameter 'noise'"):
        chunked.covariance_pass(q, k, None, np.zeros((B, T, H, 1)), np.ones((B, T, H)),
                                np.broadcast_to(np.eye(K), (B, H, K, K)), chunk_size=4, variance=False)


def test_a_lowering_whose_result_disagrees_with_its_inputs_is_caught(monkeypatch):
    model = dm.gated_deltanet()
    structure = filters.analyze(model)
    q, k, v, gates = random_inputs(model, batch=B, time=T, heads=H, key_dim=K, value_dim=V)
    x = prepare(structure, q, k, v, gates)
    state = filters.FilterState(jnp.zeros((B, H, K, V)))
    assert sequential.run(structure, x, state).y.shape == (B, T, H, V)
    # a step whose readout drops all heads but one: the lowering's result no longer matches its state
    real_step = sequential.kalman.step
    monkeypatch.setattr(sequential.kalman, "step", lambda *a: (lambda y, s, d: (y[:, :1], s, d))(*real_step(*a)))
    with pytest.raises(TypeCheckError, match="return value of filters.sequential.run"):
        sequential.run(structure, x, state)
