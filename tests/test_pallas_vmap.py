"""The Pallas kernels under ``jax.vmap`` over a leading axis of runs, as the sweep engine trains a block of
runs (`experiments.training.make_block_train_step`: ``jax.vmap`` of the one-run step over stacked
parameters and optimizer states).

``jax.vmap`` of a ``pallas_call`` runs the kernel on a grid with one more dimension (Pallas's batching
rule), and the kernels' ``jax.custom_vjp``s batch their forward and backward functions. Tested here for the
three kernel families: the kernels themselves (in Pallas's interpreter on a CPU), the vectorized loss and
gradient against each run's own (a Python loop over the runs); the vectorized gradient traced on this CPU
and lowered for CUDA holds the same Triton kernels as one run's, and no plain-JAX reference; and one step of
the sweep engine's block on the kernels against each run's own step. Then the sweeps that ask for
``backend="auto"`` (configs/mqar.py, configs/recall.py): the block training step of their models lowered for
CUDA holds the kernels, a run records the backend ``"auto"`` resolved to (`experiments.models.lowering_of`), and
on several devices each device's kernels take its own runs only (XLA cannot split a kernel).
"""
import functools
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
from configs import mqar as mqar_config, recall as recall_config
from experiments import models, mqar, recall, tasks, training
from filters.pallas import lowering as pallas_lowering
from tests.support import random_inputs, run_on_cpu_devices, smoke_config, two_run_block

RUNS = 3
# The kernels themselves: in Pallas's interpreter on a CPU, compiled by Triton on a GPU (as in
# tests/test_pallas.py: `pytest tests/test_pallas_vmap.py` on a GPU runs the vectorized kernels for real).
INTERPRET = jax.default_backend() != "gpu"
# one kernel family each: the delta rule (reset family), the channel-wise additive form (GLA), the covariance
# pass feeding the delta rule (the Bayesian Layer)
FAMILIES = {"gated_deltanet": dm.gated_deltanet(), "gla": dm.gla(), "bayesian": dm.bayesian(process_noise=0.05)}


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _runs_inputs(model):
    """``RUNS`` independent draws of ``(q, k, v, *gates)`` stacked on a leading run axis, float32; T = 21
    crosses a chunk boundary of 16 and pads the last chunk."""
    draws = [random_inputs(model, batch=1, time=21, heads=2, key_dim=16, value_dim=16, seed=s, dtype=np.float32)
             for s in range(RUNS)]
    names = sorted(draws[0][3])
    stacked = [jnp.stack([jnp.asarray(d[i], jnp.float32) for d in draws]) for i in range(3)]
    stacked += [jnp.stack([jnp.asarray(d[3][n], jnp.float32) for d in draws]) for n in names]
    return names, stacked


@pytest.mark.parametrize("name", FAMILIES)
def test_vmapped_kernels_equal_each_run(name):
    """``jax.vmap`` over runs of a loss on the kernels (in the interpreter), forward and ``jax.grad`` of every
    input, equals the loss and gradient of each run alone."""
    model = FAMILIES[name]
    f = filters.compile(model, backend="pallas", chunk_size=16, precision="highest", interpret=INTERPRET)
    names, args = _runs_inputs(model)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=args[2].shape[1:]), jnp.float32)

    def loss(q, k, v, *gates):
        y, state = f(q, k, v, validate=False, **dict(zip(names, gates)))
        loss = jnp.sum(y * weights) + jnp.sum(state.mean ** 2)
        return loss if state.covariance is None else loss + jnp.sum(state.covariance)

    value_and_grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
    together, together_grads = jax.jit(jax.vmap(value_and_grad))(*args)
    one_run = jax.jit(value_and_grad)
    for r in range(RUNS):
        want, want_grads = one_run(*(x[r] for x in args))
        assert _relative(together[r], want) < 1e-5
        for got, want in zip(together_grads, want_grads):
            assert _relative(got[r], want) < 1e-5
    # the runs differ (a test of a block of equal runs could not tell the axis from a broadcast)
    assert _relative(together[0], together[1]) > 1e-3


def _lowered_for_cuda(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name, kernels", [("gated_deltanet", 6), ("gla", 8), ("bayesian", 8)])
def test_vmapped_gradient_lowered_for_cuda_holds_the_kernels(name, kernels):
    """The gradient vectorized over runs, traced on this CPU and lowered for CUDA: as many Triton kernels as
    one run's gradient (each launched on the grid that the run axis extends), the covariance pass's backward
    kernel for the Bayesian Layer, and no plain-JAX reference (no cuSOLVER Cholesky, no triangular solve)."""
    model = FAMILIES[name]
    f = filters.compile(model, backend="pallas")
    names = [spec.name for spec in model.structure.inputs]
    sd = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    gate = lambda n: sd(2, 128, 2, 64, dtype=jnp.float32) if (name == "gla" and n == "log_decay") \
        else sd(2, 128, 2, dtype=jnp.float32)
    one_run = [sd(2, 128, 2, 64)] * 3 + [gate(n) for n in names]
    block = [sd(RUNS, *a.shape, dtype=a.dtype) for a in one_run]

    def loss(q, k, v, *gates):
        return jnp.sum(f(q, k, v, validate=False, **dict(zip(names, gates)))[0].astype(jnp.float32))

    grad = jax.grad(loss, argnums=tuple(range(len(one_run))))
    alone, together = _lowered_for_cuda(grad, *one_run), _lowered_for_cuda(jax.vmap(grad), *block)
    assert alone.count("xla.gpu.triton") == together.count("xla.gpu.triton") == kernels
    for text in (alone, together):
        assert "potrf" not in text and "stablehlo.triangular_solve" not in text
    if name == "bayesian":
        assert 'name = "covariance_pass_backward"' in together


@pytest.fixture
def kernels_as_tested(monkeypatch):
    """The ``"pallas"`` lowering with ``interpret=INTERPRET`` wherever it runs (the kernels, not their
    references, on a CPU too), for a model whose layers ask for ``backend="pallas"`` alone (a layer takes no
    lowering options). Compiled filters and traces are dropped before and after, so that no program traced
    with the other setting is reused."""
    run = pallas_lowering.LOWERING.run
    monkeypatch.setattr(pallas_lowering.LOWERING, "run", functools.partial(run, interpret=INTERPRET))
    filters.compiler._compile_cached.cache_clear()
    jax.clear_caches()
    yield
    filters.compiler._compile_cached.cache_clear()
    jax.clear_caches()


def test_a_block_step_on_the_kernels_is_each_runs_step(kernels_as_tested):
    """The sweep engine's block of two runs (learning rate and seed differ) on the kernels (in the interpreter
    on a CPU):
    one training step equals each run's own step: the loss and accuracy to 1e-6 (measured on CPU: one float32
    ulp of one run's loss; tests/test_block.py has the chunked block's forward pass bit for bit), the gradient
    and the updated parameters to the float32 round-off tolerances of tests/test_block.py."""
    model = models.LanguageModel("gated_deltanet", 32, 16, num_layers=1, head_dim=16, backend="pallas")
    b = two_run_block(model, batch_size=4)
    one, block, states, batches, step, block_step = b.one, b.block, b.states, b.batches, b.step, b.block_step
    stacked, block_batch, active = training.stack_states(states, block), training.put_block_batch(batches, block), \
        jnp.array([True, True])
    # the kernels run: in the interpreter no platform switch is left to pick their references
    program = str(jax.make_jaxpr(block_step)(stacked, block_batch, active))
    assert "pallas_call" in program and ("platform_index" not in program) == INTERPRET
    alone = [step(state, training.put_batch(batch, one)) for state, batch in zip(states, batches)]
    both, metrics = block_step(stacked, block_batch, active)
    host = jax.device_get(metrics)
    for r, (state, m) in enumerate(alone):
        for key in ("loss", "accuracy", "learning_rate"):
            np.testing.assert_allclose(host[key][r], m[key], rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(host["grad_norm"][r], m["grad_norm"], rtol=2e-5)
        for a, b in zip(jax.tree.leaves(training.unstack_states(both)[r].params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.max(np.abs(b))) + 1e-12)


# ----------------------------------------------------------------------------------------------------
# The sweeps on the kernels: configs/mqar.py and configs/recall.py ask for backend="auto"


_DELTA_RULE = {"delta_rule_prepare", "delta_rule_state", "delta_rule_output", "delta_rule_output_backward",
               "delta_rule_state_backward", "delta_rule_chunk_backward"}
BLOCK_STEP_KERNELS = {
    "mamba2": {"additive_state", "delta_rule_output", "additive_state_backward", "delta_rule_output_backward",
               "additive_chunk_backward"},
    "gated_deltanet": _DELTA_RULE,
    "bayesian": _DELTA_RULE | {"covariance_pass", "covariance_pass_backward"},
}


@pytest.mark.parametrize("name", BLOCK_STEP_KERNELS)
def test_the_block_training_step_lowered_for_cuda_holds_the_kernels(name):
    """The sweep engine's step of a block of two runs of an MQAR model (2 layers, d_model 64, heads of 64, as
    configs/mqar.py at its smallest width), traced on this CPU on the backend that ``"auto"`` picks on a GPU
    and lowered for CUDA: the Triton kernels forward and backward (the additive form, the delta rule, the
    covariance pass feeding it), and no plain-JAX reference."""
    backend = models.lowering_of(name, "auto", platform="gpu")
    assert backend == "pallas"
    model = models.LanguageModel(name, 64, 64, num_layers=2, head_dim=64, backend=backend)
    x, y = tasks.mqar(64, 64, 4, 16, seed=0)
    data = {"tokens": x, "labels": y}
    runs = [training.TrainSettings(num_steps=4, batch_size=8, learning_rate=lr, warmup_steps=1, seed=seed)
            for lr, seed in ((1e-3, 0), (1e-2, 1))]
    one, block = training.data_mesh(jax.devices()[:1]), training.block_mesh(2, jax.devices()[:1])
    states = [training.init_state(model, s, data, one) for s in runs]
    batches = [training.BatchSchedule(data, 8, s.seed)(0) for s in runs]
    block_step = training.make_block_train_step(model, runs[0], block, donate=False)
    text = _lowered_for_cuda(block_step, training.stack_states(states, block),
                             training.put_block_batch(batches, block), jnp.array([True, True]))
    assert BLOCK_STEP_KERNELS[name] <= set(re.findall(r'name = "(\w+)"', text))
    assert "potrf" not in text and "stablehlo.triangular_solve" not in text


def test_auto_is_resolved_per_model_on_the_platform():
    """`models.lowering_of`: ``"auto"`` as `filters.compile` resolves it for the model's design layers on the
    platform; any other backend as asked; attention (no filter) as asked. Every design model of the MQAR and
    recall sweeps, whose configs ask for ``"auto"``, runs the kernels on a GPU."""
    assert models.lowering_of("gated_deltanet", "auto", platform="gpu") == "pallas"
    assert models.lowering_of("gated_deltanet", "auto", platform="cpu") == "chunked"
    assert models.lowering_of("bayesian_no_conv", "chunked", platform="gpu") == "chunked"
    assert models.lowering_of("attention", "auto", platform="gpu") == "auto"
    assert models.lowering_of("gla", "auto") == filters.compile(dm.gla(), backend="auto").backend
    for module in (mqar_config, recall_config):
        config = module.get_config()
        assert config.backend == "auto"
        assert {models.lowering_of(n, config.backend, platform="gpu") for n in config.models if n != "attention"} \
            == {"pallas"}


@pytest.mark.parametrize("app", ["mqar", "recall"])
def test_a_run_records_the_backend_its_layers_run(tmp_path, app):
    """With ``backend = "auto"`` a design model's run records, and its model is built on, the resolved backend
    (``"pallas"`` on a GPU, ``"chunked"`` on a CPU), never ``"auto"``: on a CPU its identity is that of the
    same run asked on ``"chunked"``, so a run folder made on ``chunked`` resumes (on a GPU it is refused, as
    any changed backend is: tests/test_faults.py)."""
    module, runs = {"mqar": (mqar_config, mqar.runs), "recall": (recall_config, recall.runs)}[app]
    chunked = runs(smoke_config(module, backend="chunked"), str(tmp_path))
    auto = runs(smoke_config(module, backend="auto"), str(tmp_path))
    resolved = "pallas" if jax.default_backend() == "gpu" else "chunked"
    design = 0
    for asked_chunked, asked_auto in zip(chunked, auto):
        assert asked_auto.folder == asked_chunked.folder
        if asked_auto.description["model"] == "attention":      # no filter: the backend as asked
            assert asked_auto.description["backend"] == asked_auto.model.backend == "auto"
            continue
        design += 1
        assert asked_auto.description["backend"] == asked_auto.model.backend == resolved
        if resolved == "chunked":
            assert asked_auto.identity == asked_chunked.identity
    assert design     # the smoke grids hold design models


_SPLIT_RUNS = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp
    from experiments import models, tasks, training

    assert jax.device_count() == 2, jax.devices()
    model = models.LanguageModel("gated_deltanet", 64, 64, num_layers=1, head_dim=64, backend="pallas")
    x, y = tasks.mqar(64, 64, 4, 16, seed=0)
    data = {"tokens": x, "labels": y}
    runs = [training.TrainSettings(num_steps=4, batch_size=8, learning_rate=lr, warmup_steps=1, seed=seed)
            for lr, seed in ((1e-3, 0), (1e-2, 1), (1e-3, 2), (1e-2, 3))]
    block, one = training.block_mesh(len(runs)), training.data_mesh(jax.devices()[:1])
    states = [training.init_state(model, s, data, one) for s in runs]
    batches = [training.BatchSchedule(data, 8, s.seed)(0) for s in runs]
    step = training.make_block_train_step(model, runs[0], block, donate=False)
    text = step.trace(training.stack_states(states, block), training.put_block_batch(batches, block),
                      jnp.ones(len(runs), bool)).lower(lowering_platforms=("cuda",)).as_text()
    operands = re.findall(r"custom_call @__gpu\\$xla\\.gpu\\.triton\\([^)]*\\).*?: \\(([^)]*)\\)", text)
    print("RESULT" + json.dumps({"mesh": dict(block.shape), "operands": operands}))
""")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason=(
    "a CPU machine's check: its subprocess sees only simulated CPU devices, and on a GPU machine jax 0.11's "
    "Triton lowering asks the default device for its GPU model (jax._src.pallas.triton.gpu_info); the HLO it "
    "checks does not depend on the machine"))
def test_each_device_runs_the_kernels_on_its_own_runs():
    """On 2 (simulated CPU) devices, a block of 4 runs split 2 per device: lowered for CUDA, every kernel takes
    one device's 2 runs (``[2, B, T, ...]``): the block step maps the runs over the devices itself
    (`training.step._per_device_runs`), as XLA cannot split a kernel (a custom call), whose inputs it would
    otherwise gather from both devices (``[4, B, T, ...]``) for each device to run all four runs."""
    out = run_on_cpu_devices(_SPLIT_RUNS, 2)
    assert out["mesh"] == {"runs": 2, "data": 1}
    assert len(out["operands"]) == len(_DELTA_RULE)
    for types in out["operands"]:    # [runs, B=8, ...] where batched (the prior state is not: [B, ...])
        leading = [t.split("x")[0] for t in re.findall(r"tensor<([^>]*)>", types)]
        assert "2" in leading and "4" not in leading, types
