"""The unification proof: every named design model, on every backend, equals an independent
implementation of its published recurrence (the Bayesian Layer: the dense joint Gaussian) in float64,
to round-off, over random shapes (T = 1, odd lengths, several heads, K != V), gates and initial states."""
import json

import pytest

import designmodels as dm
import filters
from experiments import common, unification
from configs import unification as unification_config

SHAPES = [(1, 1, 1, 4, 4), (2, 9, 3, 4, 6), (1, 70, 2, 8, 5)]


@pytest.mark.parametrize("backend", list(filters.LOWERINGS))
@pytest.mark.parametrize("name", list(dm.NAMED_MODELS))
def test_named_model_equals_published_recurrence(name, backend):
    for shape in SHAPES:
        if name == "bayesian" and shape[1] * shape[3] > 160:
            continue  # the dense joint Gaussian is O(T^3 K^3)
        error = unification.measure(name, backend, shape, seed=shape[1])["max_relative_error"]
        assert error < 1e-10, (name, backend, shape, error)


def test_experiment_writes_the_table(tmp_path):
    config = unification_config.get_config()
    config.smoke = True
    config = common.resolve(config)
    records = unification.run(config)
    assert {(r["model"], r["backend"]) for r in records} == {
        (m, b) for m in config.models for b in config.backends}
    assert all(r["exact"] for r in records)
    table = unification.table(records)
    assert table.count("exact") == len(records) and "NOT EXACT" not in table
    json.dumps(records)
