"""The unification proof, measured: every named design model, compiled on every backend, against an
independent implementation of its published recurrence (``tests/published_recurrences.py``, plain jnp,
sharing no code with ``filters``), in float64, over random shapes, gates and initial states.

The Bayesian Layer is new, so its oracle is the dense joint Gaussian of ``tests/joint_gaussian.py``.

    python -m experiments.unification --config=configs/unification.py --workdir=runs/unification

Writes ``results.json`` (one record per model and backend) and ``table.md``; prints the table.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

import designmodels as dm
import filters
from designmodels.packaging import require_sibling
from experiments import common
from experiments.oracles import joint_gaussian, published_recurrences as published
from experiments.oracles.support import random_inputs, relative_error

require_sibling(filters)   # a shadowing module of that name fails here, by name

def _published(name: str, model: dm.DesignModel, q, k, v, gates, mean0):
    """The published recurrence of ``name``, called with its own paper's parameterization."""
    if name == "linear_attention":
        return published.linear_attention(q, k, v, initial_state=mean0)
    if name == "retnet":
        return published.retnet(q, k, v, model.transition.decay, initial_state=mean0)
    if name == "gla":
        return published.gla(q, k, v, gates["log_decay"], initial_state=mean0)
    if name == "mamba2":  # q = C, k = B, v = x, log_decay = dt * A, input_scale = dt
        return published.mamba2(q, k, v, gates["log_decay"], gates["input_scale"], initial_state=mean0)
    if name == "deltanet":
        return published.deltanet(q, k, v, gates["beta"], initial_state=mean0)
    if name == "gated_deltanet":
        return published.gated_deltanet(q, k, v, gates["log_decay"], gates["beta"], initial_state=mean0)
    if name == "longhorn":
        return published.longhorn(q, k, v, gates["beta"], initial_state=mean0)
    raise KeyError(name)


REFERENCE = {name: "published recurrence" for name in dm.NAMED_MODELS}
REFERENCE["bayesian"] = "dense joint Gaussian"


def measure(name: str, backend: str, shape, seed: int) -> dict:
    """Max relative error of the readouts and of the final mean, for one case."""
    model = dm.NAMED_MODELS[name]()
    batch, length, heads, key_dim, value_dim = shape
    q, k, v, gates = random_inputs(model, batch=batch, time=length, heads=heads, key_dim=key_dim,
                                   value_dim=value_dim, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    mean0 = rng.normal(size=(batch, heads, key_dim, value_dim))
    y, state = filters.compile(model, backend=backend)(q, k, v, initial_state=filters.FilterState(mean0),
                                                       **gates)
    if name == "bayesian":
        y_ref, mean_ref, cov_ref = joint_gaussian.filtered_moments(model, q, k, v, gates, mean0)
        errors = [relative_error(y, y_ref), relative_error(state.mean, mean_ref),
                  relative_error(state.covariance, cov_ref)]
    else:
        y_ref, mean_ref = _published(name, model, q, k, v, gates, mean0)
        errors = [relative_error(y, y_ref), relative_error(state.mean, mean_ref)]
    return {"max_relative_error": max(errors)}


def check(config) -> None:
    """Fail before measuring on a config that names unknown models or backends."""
    common.check_choice("models", config.models, list(dm.NAMED_MODELS))
    common.check_choice("backends", config.backends, list(filters.LOWERINGS))


def run(config) -> list[dict]:
    check(config)
    records = []
    cases = [(m, b) for m in config.models for b in config.backends]
    for i, (name, backend) in enumerate(cases):
        start = time.time()
        shapes = [tuple(s) for s in config.shapes
                  if name != "bayesian" or s[1] * s[3] <= config.joint_gaussian_max_size]
        error = max(measure(name, backend, shape, seed)["max_relative_error"]
                    for shape in shapes for seed in config.seeds)
        records.append({
            "model": name, "backend": backend, "reference": REFERENCE[name],
            "max_relative_error": error, "exact": bool(error < config.tolerance),
            "shapes": [list(s) for s in shapes], "seeds": list(config.seeds), "dtype": "float64",
        })
        logging.info("[%d/%d] %s / %s: max relative error %.2e (%.1fs)", i + 1, len(cases), name, backend,
                     error, time.time() - start)
    return records


def table(records) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    by_key = {(r["model"], r["backend"]): r for r in records}
    rows = []
    for model in models:
        rows.append([f"`{model}`", by_key[(model, backends[0])]["reference"]] + [
            f"{by_key[(model, b)]['max_relative_error']:.1e} {'exact' if by_key[(model, b)]['exact'] else 'NOT EXACT'}"
            for b in backends])
    return common.markdown_table(["design model", "reference"] + [f"{b} (max rel. error)" for b in backends], rows)


def main(config, workdir: str) -> None:
    """Measure, write ``results.json`` and ``table.md``, print the table; exit non-zero if a row is inexact."""
    records = run(config)
    text = table(records)
    common.write_json(os.path.join(workdir, "results.json"), records)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(f"Unification, float64, tolerance {config.tolerance:g}, shapes {list(map(list, config.shapes))}, "
                f"seeds {list(config.seeds)}\n\n{text}\n")
    print(text)
    inexact = [f"{r['model']}/{r['backend']}" for r in records if not r["exact"]]
    if inexact:
        raise SystemExit(f"not exact to round-off: {', '.join(inexact)}")


if __name__ == "__main__":
    common.run_app(main, config="configs/unification.py", outputs="results.json and table.md", check=check, x64=True)
