"""The pieces of `benchmarks/mqar_no_conv.py` that its recorded results rest on (docs/results/mqar/no_conv.md):
the first layer's shares at the context's value positions, the direction and gain of its writes, and a model
added to the table for one run."""
import argparse
import importlib.util
import os

import jax
import numpy as np
import pytest

import layers
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


def _layer(name, key_dim=8, heads=2, time=6, batch=2, seed=0):
    mixer = models.sequence_layer(name, key_dim * heads, key_dim, "sequential", 0)
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, time, key_dim * heads))
    variables = mixer.init(jax.random.PRNGKey(seed + 1), x)
    features = mixer.apply(variables, x, method=lambda m, z: layers.core.features(m.spec, m._params(), z))
    angle = mixer.apply(variables, x, method=lambda m, z: mqar_no_conv.write_angle(m.spec, m._params(), z))
    return features, angle


def test_a_reset_memory_writes_along_its_key_with_the_delta_rule_gain():
    """Longhorn resets ``P_bar = I`` before every write: ``Kg = beta k / (1 + beta)`` (unit keys), cosine 1."""
    (_, k, _, gates, _), (cosine, gain) = _layer("longhorn_no_conv")
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
    beta = np.asarray(gates["beta"], np.float64)
    np.testing.assert_allclose(gain, beta / (1 + beta) * np.sum(np.asarray(k, np.float64) ** 2, -1), rtol=1e-4)


def test_the_exact_memory_writes_along_p_bar_k(monkeypatch):
    """The exact filter without decay or noise (ridge regression from ``P_0 = I``), against the Kalman
    recursion written out: ``Kg = P k / (k^T P k + 1 / beta)``, ``P <- P - Kg k^T P``. The first write goes
    along its key (cosine 1); later ones turn away from the keys already written (cosine < 1)."""
    monkeypatch.setattr(models, "MODELS", {**models.MODELS, "ridge": ("bayesian", {"decay": "none"})})
    (_, k, _, gates, _), (cosine, gain) = _layer("ridge")
    k, beta = np.asarray(k, np.float64), np.asarray(gates["beta"], np.float64)
    batch, time, heads, key_dim = k.shape
    for b in range(batch):
        for h in range(heads):
            p = np.eye(key_dim)
            for t in range(time):
                kt = k[b, t, h]
                kg = p @ kt / (kt @ p @ kt + 1 / beta[b, t, h])
                p = p - np.outer(kg, kt @ p)
                np.testing.assert_allclose(cosine[b, t, h], kt @ kg / np.linalg.norm(kt) / np.linalg.norm(kg),
                                           atol=1e-5)
                np.testing.assert_allclose(gain[b, t, h], kt @ kg, rtol=1e-4)
    np.testing.assert_allclose(cosine[:, 0], 1.0, atol=1e-5)
    assert np.all(cosine[:, 2:] < 0.999)


def test_a_run_is_identified_by_its_own_layers_only():
    """``--extra-model`` entries of other models in the same command are not part of a run's identity."""
    lh = 'lh=["longhorn", {"decay": "input", "conv_size": 0}]'
    qt = 'qt=["bayesian", {"process_noise": "input", "conv_size": 0}]'
    args = argparse.Namespace(models="lh+bayesian_no_conv,qt", task="mqar", seed=0, extra_model=[lh, qt],
                              out=None, workdir="/tmp", probe_examples=64)
    assert mqar_no_conv.run_description("lh+bayesian_no_conv", args)["extra_model"] == [lh]
    assert mqar_no_conv.run_description("qt", args)["extra_model"] == [qt]
    assert mqar_no_conv.run_description("bayesian_no_conv", args) == {
        "script": "mqar_no_conv", "model": "bayesian_no_conv", "task": "mqar", "seed": 0, "extra_model": []}


def test_key_alignment_is_one_for_one_direction_and_zero_for_orthogonal_keys():
    """Head 0 writes along one direction (signs flip: |cos| = 1), head 1 along orthogonal keys (0), head 2 along
    keys at 60 degrees to the first (the median of 1/2, 1/2 and 0 for three steps)."""
    eye = np.eye(3)
    k = np.zeros((2, 3, 3, 3))
    k[:, :, 0] = [1.0, 0.0, 0.0] * np.array([1.0, -2.0, 3.0])[:, None]
    k[:, :, 1] = eye
    k[:, :, 2] = [[1.0, 0.0, 0.0], [0.5, np.sqrt(0.75), 0.0], [0.5, -np.sqrt(0.75) / 3, np.sqrt(2 / 3)]]
    np.testing.assert_allclose(mqar_no_conv.key_alignment(k), [1.0, 0.0, 0.5], atol=1e-12)
