"""The boundary checks under transformations (issue #12, items 2 and 3): a filter called inside ``jit``
with its arrays closed over runs; a bad value there raises what the docs say (``jax.errors.JaxRuntimeError``
carrying the message, or the `FilterInputError` itself inside ``filters.reraise_input_errors()``), with
no traceback from JAX's callback machinery on stderr."""
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
from tests.support import random_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _closed_over(model=None):
    model = model or dm.bayesian()
    q, k, v, gates = random_inputs(model, time=6, seed=0, dtype=np.float32)
    return filters.compile(model), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(gates["beta"])


def test_jit_over_arrays_closed_over_runs():
    """Arrays closed over by a jitted function are traced there: the value checks must not ask for their
    values at trace time (they did: ConcretizationTypeError). DeltaNet: the checks are the same for every
    model, and its programs compile in a fraction of the Bayesian Layer's time."""
    f, q, k, v, beta = _closed_over(dm.deltanet())
    y = jax.jit(lambda b: f(q, k, v, beta=b)[0])(beta)
    np.testing.assert_allclose(y, f(q, k, v, beta=beta)[0], rtol=1e-5, atol=1e-6)
    state = f(q[:, :3], k[:, :3], v[:, :3], beta=beta[:, :3])[1]        # and a closed-over initial state
    y2 = jax.jit(lambda b: f(q[:, 3:], k[:, 3:], v[:, 3:], initial_state=state, beta=b)[0])(beta[:, 3:])
    np.testing.assert_allclose(y2, y[:, 3:], rtol=1e-4, atol=1e-5)


def test_a_bad_value_under_jit_raises_the_documented_errors():
    f, q, k, v, beta = _closed_over()
    run = jax.jit(lambda b: f(q, k, v, beta=b)[0])
    message = r"beta: 36 invalid entries, first at index \(0, 0, 0\): beta = -.*accepted: finite precisions beta > 0"
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(run(-beta))
    with pytest.raises(filters.FilterInputError, match=message) as info:
        with filters.reraise_input_errors():
            jax.block_until_ready(run(-beta))
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    with filters.reraise_input_errors():                                 # valid values: nothing raised
        jax.block_until_ready(run(beta))
    with pytest.raises(ZeroDivisionError):                              # other errors pass through as they are
        with filters.reraise_input_errors():
            1 / 0


def test_only_our_callback_errors_are_kept_out_of_the_log(caplog):
    """JAX logs every failing host callback with its traceback; the filter drops exactly ours."""
    f, q, k, v, beta = _closed_over()
    with caplog.at_level(logging.ERROR):
        with pytest.raises(jax.errors.JaxRuntimeError):
            jax.block_until_ready(jax.jit(lambda b: f(q, k, v, beta=b)[0])(-beta))

        def failing(x):
            raise KeyError("someone else's callback")

        with pytest.raises(jax.errors.JaxRuntimeError):
            jax.block_until_ready(jax.jit(lambda x: jax.debug.callback(failing, x) or x)(beta))
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert not any(isinstance(e, filters.FilterInputError) for e in logged)
    assert any(isinstance(e, KeyError) for e in logged)


def test_no_traceback_reaches_stderr():
    """As a user sees it: a script that catches the documented error prints nothing else."""
    script = (
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import designmodels as dm, filters\n"
        "f = filters.compile(dm.bayesian())\n"
        "q = k = jnp.ones((1, 4, 2, 3)) / 3 ** 0.5; v = jnp.ones((1, 4, 2, 5))\n"
        "try:\n"
        "    jax.block_until_ready(jax.jit(lambda b: f(q, k, v, beta=b)[0])(-jnp.ones((1, 4, 2))))\n"
        "except jax.errors.JaxRuntimeError as e:\n"
        "    print('caught', 'beta: 8 invalid entries' in str(e))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.strip() == "caught True", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "callback failed" not in proc.stderr, proc.stderr[-3000:]


def test_eager_checks_of_host_and_device_arrays_agree():
    """One path for every value check: numpy and jax inputs get the same message."""
    f, q, k, v, beta = _closed_over()
    bad = np.array(beta)
    bad[0, 2, 1] = np.nan
    messages = []
    for array in (np.asarray, jnp.asarray):
        with pytest.raises(filters.FilterInputError) as info:
            f(array(q), array(k), array(v), beta=array(bad))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("beta: 1 invalid entries, first at index (0, 2, 1): beta = nan")


@pytest.mark.parametrize("backend", ["sequential", "associative", "chunked"])
def test_an_empty_batch_is_checked_and_filtered(backend):
    """A batch of 0 sequences passes the value checks (there is nothing to check) and gives empty outputs
    with the state of 0 sequences, on every lowering (it failed in the checks' argmax before)."""
    model = dm.bayesian()
    f = filters.compile(model, backend=backend)
    q = k = jnp.ones((0, 5, 2, 4)) / 2.0
    y, state = f(q, k, jnp.ones((0, 5, 2, 3)), beta=jnp.ones((0, 5, 2)), log_decay=-jnp.ones((0, 5, 2)))
    assert y.shape == (0, 5, 2, 3) and state.mean.shape == (0, 2, 4, 3)
    assert state.covariance.shape == (0, 2, 4, 4)
