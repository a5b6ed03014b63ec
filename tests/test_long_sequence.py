"""Long-sequence numerics of the exact chunked filter (the full T = 65,536 run is
`benchmarks/long_sequence.py`, recorded in docs/results/long_sequence.md): float32 stays finite, P stays
symmetric positive definite at every chunk boundary, and the readouts track the float64 oracle."""
import argparse
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "long_sequence.py")
_spec = importlib.util.spec_from_file_location("long_sequence", _PATH)
long_sequence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(long_sequence)


@pytest.mark.parametrize("name", ["bayesian, no noise, no decay", "bayesian, random walk q=0.01",
                                  "bayesian, stationary"])
def test_float32_chunked_tracks_float64_oracle(name):
    args = argparse.Namespace(time=2048, heads=1, dim=32, chunk_size=64, seed=0)
    result = long_sequence.check(long_sequence.MODELS[name], args)
    assert result["finite"]
    assert result["min_eigenvalue"] > 0
    assert result["max_asymmetry_relative"] < 1e-5
    assert result["output_relative_error"] < 1e-4
