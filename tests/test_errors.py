"""Bad declarations and bad inputs fail loudly, naming the field and what is accepted."""
import numpy as np
import pytest

import designmodels as dm
import filters
from tests.support import random_inputs


@pytest.mark.parametrize("build,match", [
    (lambda: dm.IsotropicCovariance(0.0), r"IsotropicCovariance.variance: got 0.0; accepted: a finite number > 0"),
    (lambda: dm.IsotropicCovariance(float("nan")), r"IsotropicCovariance.variance"),
    (lambda: dm.DiagonalCovariance((1.0, -1.0)), r"DiagonalCovariance.variances: .*every variance > 0"),
    (lambda: dm.FullCovariance([[1.0, 2.0], [2.0, 1.0]]), r"FullCovariance.matrix: .*smallest eigenvalue -1.*positive-definite"),
    (lambda: dm.FullCovariance([[1.0, 0.5], [0.0, 1.0]]), r"FullCovariance.matrix: .*non-symmetric"),
    (lambda: dm.FullCovariance([1.0, 2.0]), r"FullCovariance.matrix: .*square K x K"),
    (lambda: dm.ScalarDecay(1.5), r"ScalarDecay.decay: got 1.5; accepted: a number in \(0, 1\]"),
    (lambda: dm.ScalarDecay(0.0), r"ScalarDecay.decay"),
    (lambda: dm.DiagonalDecay((0.5, 0.0)), r"DiagonalDecay.decays: .*every decay in \(0, 1\]"),
    (lambda: dm.RandomWalk(-0.1), r"RandomWalk.variance: got -0.1"),
    (lambda: dm.KeyValueObservation(0.0), r"KeyValueObservation.precision: got 0.0; accepted: a finite number > 0"),
    (lambda: dm.KeyValueObservation(-2.0), r"KeyValueObservation.precision"),
    (lambda: dm.Reset(variance=-1.0), r"Reset.variance"),
    (lambda: dm.retnet(gamma=1.2), r"ScalarDecay.decay: got 1.2"),
    (lambda: dm.bayesian(prior_variance=-1.0), r"IsotropicCovariance.variance: got -1.0"),
    (lambda: dm.bayesian(noise="brownian"), r"noise=.*'brownian'.*accepted: 'random_walk', 'stationary' or 'key'"),
    (lambda: dm.DesignModel(observation=dm.LatentInput(), covariance=dm.Reset()),
     r"DesignModel.covariance: Reset needs an observation"),
    (lambda: dm.DesignModel(noise=dm.RandomWalk(0.1), covariance=dm.Reset()),
     r"DesignModel.noise: .*Reset overwrites the predicted covariance"),
    (lambda: dm.DesignModel(transition=dm.DenseTransition(None), noise=dm.Stationary()),
     r"DesignModel.noise: Stationary noise .* dense transition"),
    (lambda: dm.DesignModel(prior=dm.Prior(dm.DiagonalCovariance((1.0, 2.0))),
                            transition=dm.DiagonalDecay((0.5, 0.5, 0.5))), r"different key dimensions"),
    (lambda: dm.DesignModel(observation=dm.KeyValueObservation(2.0), covariance=dm.Reset(write_strength=True)),
     r"write strength at run time"),
    (lambda: dm.DesignModel(transition="identity"), r"DesignModel.transition: got 'identity'; accepted: an instance of Identity"),
])
def test_bad_declarations_name_the_field(build, match):
    with pytest.raises(dm.DesignModelError, match=match):
        build()


def test_unknown_backend_lists_the_accepted_ones():
    with pytest.raises(filters.BackendError, match=r"backend='cuda': unknown; accepted: 'auto', 'sequential', "
                                                   r"'associative', 'chunked', 'pallas'"):
        filters.compile(dm.deltanet(), backend="cuda")


def test_diagnostics_need_a_backend_that_reports_them():
    with pytest.raises(filters.BackendError, match=r"diagnostics=True: .*accepted: backend='sequential'"):
        filters.compile(dm.bayesian(), backend="associative", diagnostics=True)


def test_compile_rejects_what_is_not_a_design_model():
    with pytest.raises(TypeError, match="expected a designmodels.DesignModel, got str"):
        filters.compile("gated_deltanet")


def _inputs(model, **kw):
    return random_inputs(model, batch=2, time=3, heads=2, key_dim=4, value_dim=5, seed=0, **kw)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, g: (q[0], k, v, g), r"q: got rank 3, shape \(3, 2, 4\); expected an array of rank 4 with layout \[B, T, H, K\]"),
    (lambda q, k, v, g: (q, k[:, :2], v, g), r"k: got shape \(2, 2, 2, 4\); expected the shape of q"),
    (lambda q, k, v, g: (q, k, v[:, :, :1], g), r"v: got shape \(2, 3, 1, 5\); expected \[B, T, H, V\]"),
    (lambda q, k, v, g: (q, k, v, {**g, "beta": g["beta"][..., None]}), r"beta: got shape \(2, 3, 2, 1\); expected \[B, T, H\]"),
    (lambda q, k, v, g: (q, k, v, {"log_decay": g["log_decay"]}), r"beta: missing; .*\[B, T, H\]"),
    (lambda q, k, v, g: (q, k, v, {**g, "log_decya": g["log_decay"]}), r"log_decya: not an input .*accepted keyword inputs: log_decay, beta"),
    (lambda q, k, v, g: (q, k, v, {**g, "log_decay": -g["log_decay"]}), r"log_decay: .*invalid entries.*accepted: finite log decays <= 0"),
    (lambda q, k, v, g: (q, k, v, {**g, "beta": 1.5 + g["beta"]}), r"beta: .*invalid.*0 <= beta_t \|k_t\|\^2 < 1.*not representable"),
    (lambda q, k, v, g: (q, k, v, {**g, "beta": -g["beta"]}), r"beta: .*invalid"),
    (lambda q, k, v, g: (q * np.nan, k, v, g), r"q: .*invalid entries.*accepted: finite values"),
    (lambda q, k, v, g: (q.astype(np.int32), k, v, g), r"q: got dtype int32; accepted: a floating dtype"),
])
def test_bad_inputs_say_what_is_accepted(mutate, match):
    model = dm.gated_deltanet()
    q, k, v, gates = mutate(*_inputs(model))
    with pytest.raises(filters.FilterInputError, match=match):
        filters.compile(model, backend="sequential")(q, k, v, **gates)


@pytest.mark.parametrize("beta", [0.0, -1.0, np.inf])
def test_non_positive_precision_is_rejected(beta):
    model = dm.bayesian()
    q, k, v, gates = _inputs(model)
    with pytest.raises(filters.FilterInputError, match=r"beta: .*accepted: finite precisions beta > 0"):
        filters.compile(model)(q, k, v, beta=np.full_like(gates["beta"], beta))


def test_deltanet_step_larger_than_one_is_not_representable():
    model = dm.deltanet()
    q, k, v, gates = _inputs(model)
    with pytest.raises(filters.FilterInputError, match="not representable as a design model"):
        filters.compile(model)(q, k, v, beta=np.full_like(gates["beta"], 1.5))


def test_fixed_key_dimension_is_enforced():
    model = dm.DesignModel(prior=dm.Prior(dm.DiagonalCovariance((1.0, 2.0, 3.0))))
    q, k, v, gates = _inputs(model)
    with pytest.raises(filters.FilterInputError, match=r"key dimension K = 3, which the design model fixes"):
        filters.compile(model)(q, k, v, **gates)


def test_initial_state_is_checked():
    model = dm.bayesian()
    q, k, v, gates = _inputs(model)
    f = filters.compile(model)
    mean = np.zeros((2, 2, 4, 5))
    with pytest.raises(filters.FilterInputError, match=r"initial_state.mean: got shape \(2, 2, 5, 4\); expected S \[B, H, K, V\]"):
        f(q, k, v, initial_state=filters.FilterState(mean.swapaxes(-1, -2), None), **gates)
    bad = np.broadcast_to(np.diag([1.0, 1.0, 1.0, -0.5]), (2, 2, 4, 4))
    with pytest.raises(filters.FilterInputError, match="initial_state.covariance: not positive semi-definite"):
        f(q, k, v, initial_state=filters.FilterState(mean, bad), **gates)
    with pytest.raises(filters.FilterInputError, match="carries no covariance"):
        filters.compile(dm.deltanet())(q, k, v, initial_state=filters.FilterState(mean, bad),
                                       beta=np.full((2, 3, 2), 0.5))


def test_step_checks_its_shapes():
    f = filters.compile(dm.gated_deltanet())
    with pytest.raises(filters.FilterInputError, match=r"q: got rank 4, shape \(1, 1, 2, 4\); expected an array of rank 3 with layout \[B, H, K\]"):
        f.step(None, np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4)))


# ----------------------------------------------------------------------------------------------------
# Boundaries: a value exactly at a bound is accepted where the bound is closed and rejected where it is
# open, for every check of a declaration and of a run-time input (a check loosened or tightened by one
# ulp, or dropped, fails here).
# ----------------------------------------------------------------------------------------------------

TINY = 1e-30      # positive, and not zero in float32 or float64


@pytest.mark.parametrize("build,accepted", [
    (lambda: dm.ScalarDecay(1.0), True),                    # (0, 1]
    (lambda: dm.ScalarDecay(TINY), True),
    (lambda: dm.ScalarDecay(0.0), False),
    (lambda: dm.ScalarDecay(1.0 + 1e-12), False),
    (lambda: dm.DiagonalDecay((1.0, TINY)), True),          # every entry in (0, 1]
    (lambda: dm.DiagonalDecay((1.0, 0.0)), False),
    (lambda: dm.DiagonalDecay((1.0 + 1e-12, 0.5)), False),
    (lambda: dm.IsotropicCovariance(TINY), True),           # > 0
    (lambda: dm.IsotropicCovariance(0.0), False),
    (lambda: dm.DiagonalCovariance((1.0, TINY)), True),     # every variance > 0
    (lambda: dm.DiagonalCovariance((1.0, 0.0)), False),
    (lambda: dm.FullCovariance([[1.0, 0.0], [0.0, 1e-9]]), True),    # positive definite
    (lambda: dm.FullCovariance([[1.0, 1.0], [1.0, 1.0]]), False),    # semi-definite: eigenvalue 0
    (lambda: dm.RandomWalk(0.0), True),                     # >= 0
    (lambda: dm.RandomWalk(-TINY), False),
    (lambda: dm.Stationary(TINY), True),                    # > 0
    (lambda: dm.Stationary(0.0), False),
    (lambda: dm.KeyValueObservation(TINY), True),           # > 0
    (lambda: dm.KeyValueObservation(0.0), False),
    (lambda: dm.Reset(variance=TINY), True),                # > 0
    (lambda: dm.Reset(variance=0.0), False),
])
def test_declaration_bounds_are_exact(build, accepted):
    if accepted:
        build()
    else:
        with pytest.raises(dm.DesignModelError, match="accepted:"):
            build()


def _one_key(model, key_norm2=1.0, **gate_values):
    """Inputs whose keys are all ``sqrt(key_norm2) e_0`` (``|k|^2`` exactly ``key_norm2``), with every
    gate of ``model`` valid and those named in ``gate_values`` set to that value everywhere."""
    q, k, v, gates = _inputs(model)
    k = np.zeros_like(k)
    k[..., 0] = np.sqrt(key_norm2)
    for name, value in gate_values.items():
        gates[name] = np.full_like(gates[name], value)
    return q, k, v, gates


def _accepts(model, key_norm2=1.0, step=False, **gate_values):
    """Whether `filters.compile(model)` accepts the inputs (raises anything but FilterInputError)."""
    q, k, v, gates = _one_key(model, key_norm2, **gate_values)
    f = filters.compile(model, backend="sequential")
    try:
        if step:
            f.step(None, q[:, 0], k[:, 0], v[:, 0], **{n: g[:, 0] for n, g in gates.items()})
        else:
            f(q, k, v, **gates)
    except filters.FilterInputError as error:
        assert "accepted" in str(error)
        return False
    return True


@pytest.mark.parametrize("step", [False, True], ids=["call", "step"])
def test_write_strength_bound_is_on_beta_times_the_key_norm(step):
    """A reset write strength needs ``0 <= beta |k|^2 < 1``: exactly 1 is a step that is not a reset
    (sigma^2 = beta / (1 - beta |k|^2) would be infinite); 0 is no write."""
    model = dm.gated_deltanet()
    assert _accepts(model, 1.0, step, beta=0.0)
    assert _accepts(model, 1.0, step, beta=1.0 - 2 ** -40)
    assert not _accepts(model, 1.0, step, beta=1.0)
    assert not _accepts(model, 1.0, step, beta=-TINY)
    # the bound is on the product: beta below one with a key longer than one is still rejected
    assert not _accepts(model, 4.0, step, beta=0.25)
    assert not _accepts(model, 4.0, step, beta=0.5)
    assert _accepts(model, 4.0, step, beta=0.25 - 2 ** -40)


@pytest.mark.parametrize("model", [dm.gated_deltanet(), dm.gla()], ids=["scalar", "diagonal"])
def test_log_decay_zero_is_accepted_and_positive_rejected(model):
    assert _accepts(model, log_decay=0.0)
    assert _accepts(model, log_decay=0.0, step=True)
    assert not _accepts(model, log_decay=TINY)
    assert not _accepts(model, log_decay=TINY, step=True)
    assert not _accepts(model, log_decay=-np.inf)


def test_run_time_process_noise_must_not_be_negative():
    model = dm.DesignModel(transition=dm.ScalarDecay(None), noise=dm.RandomWalk(None),
                           observation=dm.KeyValueObservation(None))
    assert _accepts(model, process_noise=0.0)
    assert _accepts(model, process_noise=0.0, step=True)
    assert not _accepts(model, process_noise=-TINY)
    assert not _accepts(model, process_noise=-TINY, step=True)
    assert not _accepts(model, process_noise=np.inf)


@pytest.mark.parametrize("model", [dm.bayesian(), dm.longhorn()], ids=["exact", "reset_precision"])
def test_precision_must_be_positive(model):
    """An observation precision ``beta > 0`` (the exact family, and a reset with a precision)."""
    assert _accepts(model, beta=TINY)
    assert _accepts(model, beta=TINY, step=True)
    assert not _accepts(model, beta=0.0)
    assert not _accepts(model, beta=0.0, step=True)


def test_input_scale_and_transition_must_be_finite():
    assert _accepts(dm.mamba2(), input_scale=0.0)
    assert not _accepts(dm.mamba2(), input_scale=np.nan)
    dense = dm.DesignModel(transition=dm.DenseTransition(None), observation=dm.LatentInput())
    assert not _accepts(dense, transition=np.inf)


def test_initial_covariance_may_be_singular_but_not_indefinite():
    """``initial_state.covariance`` must be positive semi-definite: an eigenvalue 0 is accepted, a
    negative one (beyond round-off) is not."""
    model = dm.bayesian()
    q, k, v, gates = _inputs(model)
    f = filters.compile(model, backend="sequential")
    mean = np.zeros((2, 2, 4, 5))
    f(q, k, v, initial_state=filters.FilterState(mean, np.broadcast_to(np.diag([1.0, 1.0, 1.0, 0.0]), (2, 2, 4, 4))),
      **gates)
    # round-off is tolerated: an eigenvalue down to -1e-6 times the largest entry (at least 1)
    f(q, k, v, initial_state=filters.FilterState(mean, np.broadcast_to(np.diag([1.0, 1.0, 1.0, -1e-6]), (2, 2, 4, 4))),
      **gates)
    with pytest.raises(filters.FilterInputError, match="not positive semi-definite"):
        f(q, k, v, initial_state=filters.FilterState(mean, np.broadcast_to(np.diag([1.0, 1.0, 1.0, -1.01e-6]),
                                                                           (2, 2, 4, 4))), **gates)


def test_did_you_mean_offers_at_most_three_close_names():
    assert dm.did_you_mean("gated_delta", ["gated_deltanet"]) == " (did you mean 'gated_deltanet'?)"
    hint = dm.did_you_mean("abcd", ["abce", "abcf", "abcg", "abch", "zzzz"])
    assert hint.count("'abc") == 3 and "zzzz" not in hint
    assert dm.did_you_mean("xyz", ["gla", "bayesian"]) == ""
