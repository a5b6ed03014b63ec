"""What the tests share: the tables of models and backends, random valid inputs and states for any
design model (from its declared run-time interface), and the error measure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np

import designmodels as dm
import filters
from experiments import common, tasks, training
from experiments.oracles.support import random_inputs, relative_error  # noqa: F401  (shipped in the wheel)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["sequential", "associative", "chunked"]
PARALLEL = ["associative", "chunked"]


def compile_for_tests(model, backend, **kw):
    """Chunked with small chunks, so that short tests cross several chunk boundaries and padding."""
    options = {"chunk_size": 4} if backend == "chunked" else {}
    return filters.compile(model, backend=backend, **options, **kw)


def applies(model, backend):
    return not filters.LOWERINGS[backend].reason_not_applicable(filters.analyze(model))


def spd(key_dim, seed):
    a = np.random.default_rng(seed).normal(size=(key_dim, key_dim))
    return a @ a.T / key_dim + 0.3 * np.eye(key_dim)


# Exact-family models nobody ships: the compiler must handle them from their declaration alone.
USER_EXACT_MODELS = {
    "diagonal_decay_full_covariance": dm.DesignModel(
        prior=dm.Prior(dm.FullCovariance(spd(4, 1))), transition=dm.DiagonalDecay(None),
        noise=dm.RandomWalk(0.05), observation=dm.KeyValueObservation(None)),
    "stationary_diagonal_prior": dm.DesignModel(
        prior=dm.Prior(dm.DiagonalCovariance((0.5, 1.0, 2.0, 1.5))), transition=dm.ScalarDecay(None),
        noise=dm.Stationary(), observation=dm.KeyValueObservation(2.0)),
    "dense_transition_input_noise": dm.DesignModel(
        prior=dm.Prior(dm.IsotropicCovariance(0.5)), transition=dm.DenseTransition(None),
        noise=dm.RandomWalk(None), observation=dm.KeyValueObservation(None)),
    "fixed_dense_full_prior": dm.DesignModel(
        prior=dm.Prior(dm.FullCovariance(spd(4, 2))),
        transition=dm.DenseTransition(0.3 * np.random.default_rng(3).normal(size=(4, 4)) + 0.6 * np.eye(4)),
        observation=dm.KeyValueObservation(None)),
    "fixed_channel_decay_stationary": dm.DesignModel(
        transition=dm.DiagonalDecay((0.9, 0.5, 0.99, 0.7)), noise=dm.Stationary(0.7),
        observation=dm.KeyValueObservation(None)),
    "bayesian_random_walk": dm.bayesian(prior_variance=0.8, process_noise=0.05),
    "bayesian_stationary": dm.bayesian(prior_variance=2.0, noise="stationary"),
    "bayesian_no_decay": dm.bayesian(decay="none"),
}
# Additive and reset models nobody ships.
USER_OTHER_MODELS = {
    "kda_style_channel_reset": dm.DesignModel(
        transition=dm.DiagonalDecay(None), observation=dm.KeyValueObservation(None),
        covariance=dm.Reset(write_strength=True)),
    "dense_additive": dm.DesignModel(transition=dm.DenseTransition(None), observation=dm.LatentInput()),
    "fixed_variance_reset_with_decay": dm.DesignModel(
        transition=dm.ScalarDecay(0.9), observation=dm.KeyValueObservation(3.0), covariance=dm.Reset(0.5)),
}
NAMED = {name: factory() for name, factory in dm.NAMED_MODELS.items()}
ALL_MODELS = {**NAMED, **USER_EXACT_MODELS, **USER_OTHER_MODELS}
# The layers: every named model, and a dense transition and a channel-wise reset declared by hand.
LAYER_MODELS = {**NAMED, **{name: ALL_MODELS[name] for name in ("dense_transition_input_noise",
                                                                "kda_style_channel_reset")}}


def random_state(model, batch, heads, key_dim, value_dim, seed):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(batch, heads, key_dim, value_dim))
    if model.family != "exact":
        return filters.FilterState(mean, None)
    cov = np.stack([np.stack([spd(key_dim, seed + 10 * b + h) for h in range(heads)]) for b in range(batch)])
    return filters.FilterState(mean, cov)


def smoke_config(module, **overrides):
    """``module``'s config (a ``configs/*.py`` module) with ``smoke = True`` resolved, then ``overrides``."""
    config = module.get_config()
    config.smoke = True
    config = common.resolve(config)
    config.unlock()
    config.update(overrides)
    config.lock()
    return config



def run_on_cpu_devices(script: str, devices: int, *args: str, **env) -> dict:
    """Run ``script`` (python source) in a fresh process whose jax sees ``devices`` simulated CPU devices
    (a process's device count is fixed when jax starts), with ``env`` added to its environment; returns
    the JSON the script printed after ``RESULT``."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]), **env}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def two_run_block(model, batch_size: int):
    """The sweep engine's smallest block on one device: two runs of ``model`` on one MQAR set that differ in
    learning rate and seed, each run's state and first batch, the single-run step and the block step."""
    x, y = tasks.mqar(32, 16, 2, 32, seed=0)
    data = {"tokens": x, "labels": y}
    runs = [training.TrainSettings(num_steps=4, batch_size=batch_size, learning_rate=1e-2, warmup_steps=1, seed=0),
            training.TrainSettings(num_steps=4, batch_size=batch_size, learning_rate=3e-3, warmup_steps=1, seed=1)]
    one, block = training.data_mesh(jax.devices()[:1]), training.block_mesh(2, jax.devices()[:1])
    return types.SimpleNamespace(
        data=data, labels=y, runs=runs, one=one, block=block,
        states=[training.init_state(model, s, data, one) for s in runs],
        batches=[training.BatchSchedule(data, batch_size, s.seed)(0) for s in runs],
        step=training.make_train_step(model, runs[0], one, donate=False),
        block_step=training.make_block_train_step(model, runs[0], block, donate=False))
