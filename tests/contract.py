"""The contract every sequence model here keeps, a compiled filter or a layer alike, as assertions:

* **step equals parallel**: the whole sequence at once equals a prefix at once (or none) and then the
  rest one step at a time from the state it returned (decoding);
* **batching**: every sequence of a batch alone gives its rows of the batched result;
* **dtypes**: the outputs and the state have the dtypes the model promises for its inputs;
* **gradients**: finite, and reaching every input or parameter that the output depends on.

A model is given as two functions: ``parallel(inputs, state) -> (y, state)`` on inputs whose leaves are
``[B, T, ...]`` (``state=None``: the initial one), and ``step(state, inputs_t) -> (y_t, state)`` on one
time step of them (``[B, ...]``).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _time_slice(inputs, start, stop=None):
    return jax.tree_util.tree_map(lambda a: a[:, start:stop], inputs)


def _batch_slice(tree, start, stop):
    return jax.tree_util.tree_map(lambda a: None if a is None else a[start:stop], tree)


def assert_step_equals_parallel(parallel, step, inputs, *, split: int = 0, state=None, rtol=1e-10,
                                atol=1e-12):
    """``parallel`` on all ``T`` steps equals ``parallel`` on the first ``split`` (none if 0) and ``step``
    on the others, readouts and final state alike."""
    time = jax.tree_util.tree_leaves(inputs)[0].shape[1]
    y_full, final_full = parallel(inputs, state)
    ys = []
    if split:
        y_prefix, state = parallel(_time_slice(inputs, 0, split), state)
        ys.append(y_prefix)
    for t in range(split, time):
        y_t, state = step(state, jax.tree_util.tree_map(lambda a: a[:, t], inputs))
        ys.append(y_t[:, None])
    chex.assert_trees_all_close(jnp.concatenate(ys, 1), y_full, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(state, final_full, rtol=rtol, atol=atol)


def assert_batch_independent(parallel, inputs, *, rtol=1e-10, atol=1e-12):
    """Each sequence alone gives its rows of the batched readouts and final state."""
    y, final = parallel(inputs, None)
    batch = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    for b in range(batch):
        y_b, final_b = parallel(_batch_slice(inputs, b, b + 1), None)
        chex.assert_trees_all_close((y_b, final_b), _batch_slice((y, final), b, b + 1), rtol=rtol, atol=atol)


def assert_dtypes(parallel, inputs, *, readout, state):
    """The readouts have dtype ``readout`` and every array of the final state dtype ``state``."""
    y, final = parallel(inputs, None)
    chex.assert_type(y, readout)
    chex.assert_type(jax.tree_util.tree_leaves(final), state)


def assert_gradients_reach(loss, args, *, jit: bool = True):
    """``jax.grad(loss)`` with respect to every leaf of ``args``: finite everywhere, and non-zero for
    every leaf (each one reaches the loss). Returns the gradients."""
    grad = jax.grad(loss)
    grads = (jax.jit(grad) if jit else grad)(args)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    chex.assert_tree_all_finite(grads)
    zero = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))]
    assert not zero, f"no gradient reaches {zero}"
    return grads
