"""The pieces of `benchmarks/mqar_no_conv.py` that its recorded results rest on (docs/results/mqar/no_conv.md):
the first layer's shares at the context's value positions, and a model added to the table for one run."""
import importlib.util
import os

import numpy as np
import pytest

from experiments import models, tasks

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "mqar_no_conv.py")
_spec = importlib.util.spec_from_file_location("mqar_no_conv", _PATH)
mqar_no_conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mqar_no_conv)


@pytest.mark.parametrize("variant", ["base", "block"])
def test_context_binding_reads_the_shares_at_the_value_positions(variant):
    """A running mean (``W[t, s] = 1 / (t + 1)``) gives the key ``1 / (t + 1)`` at each value position; a
    memory that reads only the step ``bind_offset`` back gives the key 1 and the value 0; the query region
    (where `layers.memory_span` looks) does not enter."""
    layout = tasks.mqar_layout(64, 4, variant)
    time = 64
    t = np.arange(layout.bind_offset, layout.context, layout.bind_offset + 1)
    mean = np.tril(np.ones((time, time))) / np.arange(1, time + 1)[:, None]
    shares = mqar_no_conv.context_binding(mean[None, None], layout)
    np.testing.assert_allclose(shares["key_at_values"], [np.mean(1 / (t + 1))])
    np.testing.assert_allclose(shares["value_at_values"], [np.mean(1 / (t + 1))])
    back = np.eye(time, k=-layout.bind_offset)
    back[:layout.bind_offset, :layout.bind_offset] = np.eye(layout.bind_offset)
    back[layout.context:] = np.tril(np.ones((time - layout.context, time)))   # anything in the query region
    shares = mqar_no_conv.context_binding(np.stack([back, mean])[None], layout)
    np.testing.assert_allclose(shares["key_at_values"], [1.0, np.mean(1 / (t + 1))])
    np.testing.assert_allclose(shares["value_at_values"], [0.0, np.mean(1 / (t + 1))])


def test_an_extra_model_joins_the_table_for_the_run_and_bad_ones_are_refused(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))
    mqar_no_conv.add_model('qt=["bayesian", {"process_noise": "input", "conv_size": 0}]')
    assert models.MODELS["qt"] == ("bayesian", {"process_noise": "input", "conv_size": 0})
    with pytest.raises(SystemExit, match=r"got 'qt=\{\}'; accepted: NAME=\[named layer"):
        mqar_no_conv.add_model("qt={}")
    with pytest.raises(SystemExit, match="'gla' is already in the model table"):
        mqar_no_conv.add_model('gla=["gla", {}]')
