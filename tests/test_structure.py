"""The structure analysis: every declaration reduces to typed facts (kinds, fixed constants as numbers or
arrays, each run-time input's domain), which is all the compiler, the layers and the tests read."""
import math

import jax
import numpy as np
import pytest

import designmodels as dm
import filters
import layers
from designmodels import Domain
from tests.support import random_inputs, relative_error

# name -> (family, transition, noise, {input: (domain, trailing)})
NAMED_FACTS = {
    "linear_attention": ("additive", "identity", "none", {}),
    "retnet": ("additive", "scalar", "none", {}),
    "gla": ("additive", "diagonal", "none", {"log_decay": (Domain.LOG_DECAY, ("K",))}),
    "mamba2": ("additive", "scalar", "none", {"log_decay": (Domain.LOG_DECAY, ()),
                                              "input_scale": (Domain.INPUT_SCALE, ())}),
    "deltanet": ("reset", "identity", "none", {"beta": (Domain.WRITE_STRENGTH, ())}),
    "gated_deltanet": ("reset", "scalar", "none", {"log_decay": (Domain.LOG_DECAY, ()),
                                                   "beta": (Domain.WRITE_STRENGTH, ())}),
    "longhorn": ("reset", "identity", "none", {"beta": (Domain.PRECISION, ())}),
    "bayesian": ("exact", "scalar", "none", {"log_decay": (Domain.LOG_DECAY, ()), "beta": (Domain.PRECISION, ())}),
}


@pytest.mark.parametrize("name", sorted(NAMED_FACTS))
def test_named_models_reduce_to_their_facts(name):
    structure = filters.analyze(dm.NAMED_MODELS[name]())
    family, transition, noise, inputs = NAMED_FACTS[name]
    assert (structure.family, structure.transition, structure.noise) == (family, transition, noise)
    assert {s.name: (s.domain, s.trailing) for s in structure.inputs} == inputs
    assert structure.name == name
    hash(structure)                                           # usable as a static argument of jit


def test_fixed_constants_are_numbers_and_arrays():
    retnet = dm.retnet(gamma=0.9).structure
    assert retnet.fixed_transition == pytest.approx(math.log(0.9))
    channel = dm.DesignModel(transition=dm.DiagonalDecay((0.5, 1.0)), noise=dm.Stationary(0.7)).structure
    assert channel.fixed_transition == pytest.approx((math.log(0.5), 0.0))
    assert channel.stationary.isotropic and channel.stationary.variance == 0.7
    np.testing.assert_array_equal(channel.stationary_covariance(2), 0.7 * np.eye(2))
    full = np.array([[2.0, 0.5], [0.5, 1.0]])
    towards_prior = dm.DesignModel(prior=dm.Prior(dm.FullCovariance(full)), transition=dm.ScalarDecay(None),
                                   noise=dm.Stationary(), observation=dm.KeyValueObservation(3.0)).structure
    assert towards_prior.key_dim == 2 and not towards_prior.prior.isotropic
    np.testing.assert_array_equal(towards_prior.prior_covariance(2), full)
    np.testing.assert_array_equal(towards_prior.stationary_covariance(2), full)   # forgets towards the prior
    assert towards_prior.fixed_precision == 3.0 and towards_prior.inputs[0].domain is Domain.LOG_DECAY
    walk = dm.bayesian(prior_variance=0.5, process_noise=0.25).structure
    assert walk.noise == "random_walk" and walk.fixed_process_noise == 0.25 and walk.prior.variance == 0.5
    assert dm.bayesian(process_noise=0.0).structure.noise == "none"
    longhorn, deltanet = dm.longhorn().structure, dm.deltanet().structure
    assert (longhorn.reset_variance, longhorn.write_strength) == (1.0, False)
    assert (deltanet.reset_variance, deltanet.write_strength) == (None, True)
    dense = dm.DesignModel(transition=dm.DenseTransition(np.eye(3) * 0.5)).structure
    assert dense.fixed_transition == ((0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.5))


def test_the_gate_heads_follow_the_domain_of_each_input():
    """A write strength gets DeltaNet's sigmoid (below one), a precision the bounded one (up to beta_max):
    decided by `Domain`, never by the wording of a message."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8)) * 30
    for model, low, high in ((dm.deltanet(), 0.0, 1.0), (dm.longhorn(), 1e-2, 16.0)):
        gates, _ = layers.Gates(model, num_heads=2, key_dim=4).init_with_output(jax.random.PRNGKey(1), x)
        beta = np.asarray(gates["beta"])
        assert np.all((beta >= low) & (beta <= high)) and beta.max() > 0.99 * high, model.name


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_longhorn_with_a_decay_is_gated_deltanet_with_longhorns_write_strength(backend):
    """``longhorn(decay="input")``: ``S_t = (I - eps_t k_t k_t^T) a_t S_{t-1} + eps_t k_t v_t^T`` with
    ``eps_t = beta_t / (1 + beta_t |k_t|^2)``, i.e. Gated DeltaNet with the write strength ``eps_t``; without
    the decay (the default) the model is Longhorn as before (`NAMED_FACTS`)."""
    model = dm.longhorn(decay="input")
    structure = filters.analyze(model)
    assert (structure.family, structure.transition, structure.reset_variance) == ("reset", "scalar", 1.0)
    assert {s.name: s.domain for s in structure.inputs} == {"log_decay": Domain.LOG_DECAY, "beta": Domain.PRECISION}
    q, k, v, gates = random_inputs(model, time=9, seed=3, unit_keys=False)
    y, final = filters.compile(model, backend=backend)(q, k, v, **gates)
    eps = gates["beta"] / (1 + gates["beta"] * np.sum(k * k, -1))
    y_ref, final_ref = filters.compile(dm.gated_deltanet(), backend="sequential")(
        q, k, v, log_decay=gates["log_decay"], beta=eps)
    assert relative_error(y, y_ref) < 1e-10 and relative_error(final.mean, final_ref.mean) < 1e-10
    with pytest.raises(dm.DesignModelError, match=r"longhorn\(decay=\.\.\.\): got 'inptu' \(did you mean 'input'\?\); "
                                                  r"accepted: 'none' or 'input'"):
        dm.longhorn(decay="inptu")
