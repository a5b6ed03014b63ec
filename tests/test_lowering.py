"""The lowering interface: a lowering registered from outside the package is compiled, explained, picked by
``auto`` and has its options checked exactly like the built-in ones (no special case names a backend)."""
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
from filters import lowering as lowering_module, sequential
from tests.support import random_inputs, relative_error


class Doubling(filters.Lowering):
    """The sequential scan, computed twice over and averaged: the smallest lowering that is not a
    built-in one. Applies to the reset family only; takes one option, ``repeats`` (1 or 2)."""

    name = "doubling"
    summary = "the sequential scan, averaged over `repeats` evaluations"

    def __init__(self):
        self.calls = []
        self.options = {"repeats": self._check_repeats}

    @staticmethod
    def _check_repeats(value):
        if value not in (1, 2):
            raise filters.BackendError(f"repeats={value!r}: accepted: 1 or 2.")

    def reason_not_applicable(self, structure):
        return None if structure.family == "reset" else "only the reset family, for this test"

    def run(self, structure, x, state, *, diagnostics, repeats=1):
        self.calls.append(repeats)
        outs = [sequential.run(structure, x, state, diagnostics=False) for _ in range(repeats)]
        return filters.FilterOutput(sum(o.y for o in outs) / repeats, outs[0].state)


@pytest.fixture
def doubling(monkeypatch):
    lowering = Doubling()
    monkeypatch.setitem(filters.LOWERINGS, lowering.name, lowering)   # removed again after the test
    monkeypatch.setitem(filters.AUTO_PREFERENCE, "cpu", ("doubling", "chunked", "sequential"))
    return lowering


def test_a_registered_lowering_is_compiled_explained_and_chosen_like_the_built_in_ones(doubling):
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, time=6, seed=2)
    reference = filters.compile(model, backend="sequential")(q, k, v, **gates)[0]
    f = filters.Filter(model, "doubling", options=(("repeats", 2),))   # not the compile cache
    assert relative_error(f(q, k, v, **gates)[0], reference) < 1e-12 and doubling.calls == [2]
    text = filters.explain(model)
    assert "doubling    applies: the sequential scan, averaged" in text
    assert "auto        -> doubling on cpu" in text
    assert filters.Filter(model, "auto").backend == "doubling"
    # not applicable: a reason, and auto moves on to the next preference
    exact = dm.bayesian()
    assert "doubling    does not apply: only the reset family, for this test" in filters.explain(exact)
    assert filters.Filter(exact, "auto").backend == "chunked"
    with pytest.raises(filters.BackendError, match=r"backend='doubling' does not apply to this design model: "
                                                   r"only the reset family.*accepted here: sequential, "
                                                   r"associative, chunked, pallas\."):
        filters.Filter(exact, "doubling")
    # its option is checked by its own validator, and refused for a lowering that does not take it
    with pytest.raises(filters.BackendError, match=r"repeats=3: accepted: 1 or 2\."):
        filters.Filter(model, "doubling", options=(("repeats", 3),))
    with pytest.raises(filters.BackendError, match=r"repeats=2: an option of the 'doubling' lowering, which "
                                                   r"backend='chunked' does not use"):
        filters.Filter(model, "chunked", options=(("repeats", 2),))
    with pytest.raises(filters.BackendError, match=r"backend='doublin': unknown \(did you mean 'doubling'\?\); "
                                                   r"accepted: 'auto', 'sequential', 'associative', 'chunked', "
                                                   r"'pallas', 'doubling'"):
        filters.Filter(model, "doublin")
    # diagnostics: it reports none, so auto passes it over
    assert filters.Filter(model, "auto", diagnostics=True).backend == "sequential"
    # a lowering that applies but asks auto to pass it over (measured slower, say) still runs by name
    doubling.reason_auto_passes_over = lambda structure: "slower than chunked, for this test"
    assert filters.Filter(model, "auto").backend == "chunked"
    assert filters.Filter(model, "doubling").backend == "doubling"


def test_auto_reads_the_preference_of_the_platform_and_skips_what_is_not_registered():
    chunkable, dense = filters.analyze(dm.gated_deltanet()), filters.analyze(
        dm.DesignModel(transition=dm.DenseTransition(None)))
    assert lowering_module.auto(chunkable, platform="gpu").name == "pallas"
    assert lowering_module.auto(chunkable, platform="tpu").name == "chunked"   # no TPU kernels yet
    assert lowering_module.auto(dense, platform="gpu").name == "associative"
    assert lowering_module.auto(dense, platform="cpu").name == "sequential"
    assert lowering_module.auto(dense, platform="tpu").name == "associative"
    assert lowering_module.auto(dense, platform="an unknown one").name == "sequential"   # registration order
    # diagnostics: the first preference that reports them
    exact, reset = filters.analyze(dm.bayesian()), filters.analyze(dm.deltanet())
    assert lowering_module.auto(exact, diagnostics=True, platform="gpu").name == "chunked"
    assert lowering_module.auto(reset, diagnostics=True, platform="gpu").name == "sequential"


def test_register_refuses_what_is_not_a_new_lowering():
    with pytest.raises(TypeError, match="expected a filters.Lowering instance, got function"):
        filters.register(sequential.run)
    with pytest.raises(filters.BackendError, match="a lowering named 'sequential' is registered already"):
        filters.register(sequential.Sequential())
    nameless = Doubling()
    nameless.name = "auto"
    with pytest.raises(filters.BackendError, match="other than 'auto'; got 'auto'"):
        filters.register(nameless)
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (filters.Lowering,), {"name": "incomplete", "summary": ""})()


@pytest.mark.parametrize("backend", ["sequential", "associative", "chunked"])
def test_every_built_in_lowering_implements_the_interface(backend):
    lowering = filters.LOWERINGS[backend]
    assert isinstance(lowering, filters.Lowering) and lowering.name == backend and lowering.summary
    model = dm.bayesian(process_noise=0.1)
    structure = filters.analyze(model)
    q, k, v, gates = random_inputs(model, time=5, seed=3)
    options = {"chunk_size": 4} if backend == "chunked" else {}   # 2 chunks; at 64 the program compiles for seconds
    f = filters.compile(model, backend=backend, **options)
    from filters.checks import prepare
    x = prepare(structure, q, k, v, gates)
    state = f.init_state(2, 3, 4, 5, jnp.float64)
    out = lowering.run(structure, x, state, diagnostics=lowering.supports_diagnostics(structure), **options)
    assert isinstance(out, filters.FilterOutput) and isinstance(out.state, filters.FilterState)
    assert out.y.shape == (2, 5, 3, 5) and out.state.mean.shape == (2, 3, 4, 5)
    assert (out.diagnostics is not None) == lowering.supports_diagnostics(structure)
    np.testing.assert_allclose(out.y, f(q, k, v, **gates)[0], rtol=1e-10)


def test_an_option_auto_does_not_use_here_is_kept_if_a_lowering_that_takes_it_accepts_it():
    """A dense transition: ``auto`` picks a lowering without ``chunk_size``. A size the chunked lowering
    takes (4, which the kernels cannot tile) is kept; one that no lowering takes is refused with each
    one's reason."""
    dense = dm.DesignModel(transition=dm.DenseTransition(None))
    assert filters.Filter(dense, "auto", options=(("chunk_size", 4),)).backend == "sequential"
    with pytest.raises(filters.BackendError, match=r"chunk_size=0: no lowering that takes it accepts it: .*"
                                                   r"a positive integer.*the pallas lowering takes 16, 32, 64"):
        filters.Filter(dense, "auto", options=(("chunk_size", 0),))
