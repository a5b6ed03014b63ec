"""The Pallas GPU kernels against the plain-XLA chunked lowering, flash-linear-attention and SDPA.

    python benchmarks/gpu_kernels.py                                   # every model, the three shapes
    python benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --models gated_deltanet --peers none

In one process, on the same bf16 inputs (gates float32): the median time of 20 calls after warm-up of the
forward and of the forward+backward (the gradient of ``sum(y * dy)`` w.r.t. every input and gate), for
ours (``--backends``: the Pallas kernels, ``pallas``, and the chunked XLA lowering, ``chunked``), for the
matching flash-linear-attention 0.6 op (``--peers fla``: its own kernels, timed with CUDA events; on
Triton 3.6 its gated backward needs ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``, which we set
for timing only) and for torch's scaled-dot-product attention (causal, same shape, ``--peers sdpa``).
Also: compile time, peak GPU memory of one forward+backward, and the accuracy of our outputs and of
fla's against a float64 oracle (our sequential filter on the same inputs, upcast) and against each
other. Writes a markdown table (``--out``) and JSON lines (``--json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)   # for the float64 oracle only; inputs are bf16 / f32

from filters.pallas import delta_rule as kernels  # noqa: E402

SHAPES = ("4x4096x16x128", "8x2048x32x64", "1x32768x8x128")
MODELS = ("gated_deltanet", "deltanet", "simple_gla", "gla", "bayesian")


def parse_shape(text):
    batch, time_, heads, dim = (int(x) for x in text.split("x"))
    return batch, time_, heads, dim


def make_inputs(model, shape, seed=0):
    """bf16 q, k (unit rows), v; float32 gates, in the peer's conventions and ours."""
    batch, time_, heads, dim = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (batch, time_, heads, dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, time_, heads, dim), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (batch, time_, heads, dim), jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    log_decay = jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], (batch, time_, heads)))
    beta = 0.95 * jax.nn.sigmoid(jax.random.normal(keys[4], (batch, time_, heads)))
    return dict(q=q, k=k, v=v, log_decay=log_decay, beta=beta)


def ours(model, backend):
    """``(y, final_state) = f(q, k, v, log_decay, beta)`` for one of our backends."""
    if model in ("gated_deltanet", "deltanet"):
        def f(q, k, v, log_decay, beta):
            ld = log_decay if model == "gated_deltanet" else None
            w = beta[..., None] * k.astype(jnp.float32)
            s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
            if backend == "pallas":
                return kernels.delta_rule(q, k, w, v, ld, s0)
            return kernels_reference_delta(q, k, w, v, ld, s0)
        return f
    if model == "simple_gla":
        def f(q, k, v, log_decay, beta):
            s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
            if backend == "pallas":
                return kernels.additive(q, k, v, log_decay, s0)
            return kernels_reference_additive(q, k, v, log_decay, s0)
        return f
    raise KeyError(model)


def _chunked_filter(model):
    import designmodels as dm
    import filters
    return filters.compile(getattr(dm, model)(), backend="chunked")


def kernels_reference_delta(q, k, w, v, ld, s0):
    import designmodels as dm
    import filters
    model = dm.gated_deltanet() if ld is not None else dm.deltanet()
    f = filters.compile(model, backend="chunked")
    beta = w[..., 0] / k[..., 0].astype(jnp.float32)
    gates = {"beta": jnp.sum(w * k.astype(jnp.float32), -1) / jnp.sum(k.astype(jnp.float32) ** 2, -1)}
    del beta
    if ld is not None:
        gates["log_decay"] = ld
    y, state = f(q, k, v, initial_state=jnp.swapaxes(s0, -1, -2), validate=False, **gates)
    return y, jnp.swapaxes(state.mean, -1, -2)


def kernels_reference_additive(q, k, v, ld, s0):
    import designmodels as dm
    import filters
    f = filters.compile(dm.DesignModel(transition=dm.ScalarDecay(None), observation=dm.LatentInput()),
                        backend="chunked")
    y, state = f(q, k, v, initial_state=jnp.swapaxes(s0, -1, -2), validate=False, log_decay=ld)
    return y, jnp.swapaxes(state.mean, -1, -2)


def time_jax(fn, args, repeats):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, compile_s, compiled


def forward_backward(fn):
    def loss(q, k, v, log_decay, beta, dy):
        y, state = fn(q, k, v, log_decay, beta)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(state)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


KERNEL_CONFIGS = {
    "delta_rule_prepare": [dict(num_warps=w) for w in (1, 2, 4, 8)],
    "delta_rule_state": [dict(num_warps=w, num_stages=st, block_v=bv) for w in (2, 4, 8) for st in (1, 2, 3)
                         for bv in (32, 64)],
    "delta_rule_output": [dict(num_warps=w, num_stages=st, block_v=bv) for w in (4, 8) for st in (1, 2)
                          for bv in (64, 128)],
    "delta_rule_output_backward": [dict(num_warps=w) for w in (4, 8)],
    "delta_rule_state_backward": [dict(num_warps=w, num_stages=st, block_v=bv) for w in (2, 4, 8)
                                  for st in (1, 2) for bv in (32, 64)],
    "delta_rule_chunk_backward": [dict(num_warps=w) for w in (4, 8)],
}


def sweep(shape, repeats):
    """Time every delta-rule kernel alone under each launch setting of `KERNEL_CONFIGS`."""
    import functools
    from filters.pallas import common
    inputs = make_inputs("gated_deltanet", shape)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    w = inputs["beta"][..., None] * k.astype(jnp.float32)
    batch, time_, heads, dim = shape
    b = common.chunk_log_decay(inputs["log_decay"], batch, time_, heads, 64)
    s0 = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    dots = common.Dots(jnp.bfloat16)
    interpret = jax.default_backend() == "cpu"   # a dry run of this script on a CPU
    st = kernels._Stages(True, 64, dots, interpret)
    wp, up, inv = st.prepare(k, w, v, b)
    h, u, _ = st.state(wp, up, w, b, s0)
    dy = jax.random.normal(jax.random.PRNGKey(3), v.shape, jnp.float32)
    _, _, _, dh, du = st.output_backward(q, w, b, h, u, dy)
    g_next, ubar, _ = st.state_backward(wp, w, b, dh, du, s0)
    calls = {
        "delta_rule_prepare": (kernels.prepare_kernel, (k, w, v, b)),
        "delta_rule_state": (kernels.state_kernel, (wp, up, w, b, s0)),
        "delta_rule_output": (kernels.output_kernel, (q, w, b, h, u)),
        "delta_rule_output_backward": (kernels.output_backward_kernel, (q, w, b, h, u, dy)),
        "delta_rule_state_backward": (kernels.state_backward_kernel, (wp, w, b, dh, du, s0)),
        "delta_rule_chunk_backward": (kernels.chunk_backward_kernel, (k, w, v, b, inv, h, u, ubar, g_next)),
    }
    best = {}
    for name, (fn, args) in calls.items():
        results = []
        for config in KERNEL_CONFIGS[name]:
            common.TUNING[name] = config
            try:
                ms, _, _ = time_jax(functools.partial(fn, chunk=64, dots=dots, interpret=interpret), args, repeats)
            except Exception as error:  # a setting the compiler refuses (e.g. out of registers)
                print(json.dumps(dict(kernel=name, config=config, error=str(error)[:200])), flush=True)
                continue
            results.append((ms, config))
            print(json.dumps(dict(kernel=name, config=config, ms=ms)), flush=True)
        common.TUNING.pop(name, None)
        if results:
            best[name] = min(results, key=lambda r: r[0])
    print("best:", json.dumps({n: dict(ms=round(m, 4), **c) for n, (m, c) in best.items()}), flush=True)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--models", default="gated_deltanet,deltanet,simple_gla")
    parser.add_argument("--backends", default="pallas,chunked")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", action="store_true", help="time each kernel alone under several launch "
                        "settings (the first shape) and stop")
    args = parser.parse_args()
    if args.sweep:
        sweep(parse_shape(args.shapes.split(",")[0]), args.repeats)
        return
    records = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for shape_text in args.shapes.split(","):
        shape = parse_shape(shape_text)
        for model in args.models.split(","):
            inputs = make_inputs(model, shape)
            dy = jax.random.normal(jax.random.PRNGKey(9), shape[:3] + (shape[3],), jnp.float32)
            outputs = {}
            for backend in args.backends.split(","):
                fn = ours(model, backend)
                xs = tuple(inputs[n] for n in ("q", "k", "v", "log_decay", "beta"))
                fwd_ms, fwd_compile, compiled = time_jax(fn, xs, args.repeats)
                bwd_ms, bwd_compile, compiled_grad = time_jax(forward_backward(fn), xs + (dy,), args.repeats)
                outputs[backend] = compiled(*xs) + tuple(compiled_grad(*xs, dy))
                rec = dict(shape=shape_text, model=model, backend=backend, fwd_ms=fwd_ms, fwdbwd_ms=bwd_ms,
                           compile_fwd_s=fwd_compile, compile_fwdbwd_s=bwd_compile)
                records.append(rec)
                print(json.dumps(rec), flush=True)
            if "pallas" in outputs and "chunked" in outputs:
                names = ("y", "state", "dq", "dk", "dv", "dlog_decay", "dbeta")
                print(json.dumps(dict(shape=shape_text, model=model, pallas_vs_chunked={
                    n: relative(a, b) for n, a, b in zip(names, outputs["pallas"], outputs["chunked"])})),
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
