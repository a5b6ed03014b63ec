"""Run (or time) every Pallas kernel once at one shape, alone, for a profiler to read.

    python benchmarks/profile_kernels.py --time                      # each kernel's median time, alone
    python benchmarks/profile_kernels.py --time --kernels covariance_pass,covariance_pass_ieee \\
        --variants '[{}, {"covariance_pass": {"num_warps": 4}, "covariance_pass_ieee": {"carry": "registers"}}]'
    ncu --clock-control none -k regex:"delta_rule|additive|gla|covariance" \\
        --metrics gpu__time_duration.sum,launch__registers_per_thread,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum \\
        python benchmarks/profile_kernels.py                          # registers, spills, time per kernel

Inputs as in benchmarks/gpu_kernels.py (bf16 q, k, v; float32 gates), shape ``--shape BxTxHxD``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from filters.pallas import common, covariance, delta_rule, gla  # noqa: E402

CHUNK = 64
ROUNDS = 15          # timed calls of each program (median reported, with the fastest and slowest)


def kernel_calls(shape, seed=0):
    """Every kernel with its arguments: ``{name: (function, args)}``, the inputs of each computed by the
    kernels before it."""
    batch, time_, heads, dim = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    normal = lambda i, s: jax.random.normal(keys[i], s, jnp.float32)
    q = normal(0, (batch, time_, heads, dim)).astype(jnp.bfloat16)
    k = normal(1, (batch, time_, heads, dim))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = normal(2, (batch, time_, heads, dim)).astype(jnp.bfloat16)
    log_decay = jax.nn.log_sigmoid(4.0 + normal(3, (batch, time_, heads)))
    log_decay_k = jax.nn.log_sigmoid(4.0 + normal(4, (batch, time_, heads, dim)))
    beta = 0.95 * jax.nn.sigmoid(normal(5, (batch, time_, heads)))
    dy = normal(6, (batch, time_, heads, dim)).astype(jnp.bfloat16)
    w = (beta[..., None] * k.astype(jnp.float32)).astype(jnp.bfloat16)
    b = common.chunk_log_decay(log_decay, batch, time_, heads, CHUNK)
    bk = common.chunk_log_decay(log_decay_k, batch, time_, heads, CHUNK)
    s0 = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    dots = common.Dots(jnp.bfloat16)
    interpret = jax.default_backend() == "cpu"        # a dry run on a CPU
    opts = dict(chunk=CHUNK, dots=dots, interpret=interpret)
    st = delta_rule._Stages(CHUNK, dots, interpret)
    wp, up, inv = st.prepare(k, w, v, b)
    h, u, _ = st.state(wp, up, w, b, s0)
    _, _, _, dh, du = st.output_backward(q, w, b, h, u, dy)
    g_next, ubar, _ = st.state_backward(wp, w, b, dh, du, s0)
    h_add, _, _ = st.state(None, v, k, b, s0)
    h_gla, _ = gla.state_kernel(k, v, bk, s0, **opts)
    attend_gla = gla.attention_kernel(q, k, bk, **opts)
    g_gla, _ = gla.state_backward_kernel(q, bk, dy, s0, **opts)
    noise = jnp.full(log_decay.shape, 0.01, jnp.float32)
    inv_beta = 1.0 / (0.5 + 3.5 * jax.nn.sigmoid(normal(7, (batch, time_, heads))))
    cov_args = (k, log_decay, noise, inv_beta, s0 + jnp.eye(dim, dtype=jnp.float32))
    d_gains = normal(6, (batch, time_, heads, dim))

    def covariance_backward(k, log_decay, noise, inv_beta, p0, d_gains, d_final):
        """The covariance pass's backward as the layer runs it: the forward kernel rerun for its
        checkpoints (under the variant's block size), then the backward kernel."""
        checkpoints = covariance.covariance_kernel(k, log_decay, noise, inv_beta, p0, checkpoints=True,
                                                   interpret=interpret)[2]
        return covariance.covariance_backward_kernel(k, log_decay, noise, inv_beta, checkpoints, d_gains, d_final,
                                                     interpret=interpret)
    part = functools.partial
    return {
        "delta_rule_prepare": (part(delta_rule.prepare_kernel, **opts), (k, w, v, b)),
        "delta_rule_state": (part(delta_rule.state_kernel, **opts), (wp, up, w, b, s0)),
        "delta_rule_output": (part(delta_rule.output_kernel, **opts), (q, w, b, h, u)),
        "delta_rule_output_backward": (part(delta_rule.output_backward_kernel, **opts), (q, w, b, h, u, dy)),
        "delta_rule_state_backward": (part(delta_rule.state_backward_kernel, **opts), (wp, w, b, dh, du, s0)),
        "delta_rule_chunk_backward": (part(delta_rule.chunk_backward_kernel, **opts),
                                      (k, w, v, b, inv, h, u, ubar, g_next)),
        "additive_state": (part(delta_rule.state_kernel, None, **opts), (v, k, b, s0)),
        "additive_output": (part(delta_rule.output_kernel, **opts), (q, k, b, h_add, v)),
        "gla_state": (part(gla.state_kernel, **opts), (k, v, bk, s0)),
        "gla_output": (part(gla.output_kernel, **opts), (q, k, bk, h_gla, v)),    # attention + readout
        "gla_attention": (part(gla.attention_kernel, **opts), (q, k, bk)),
        "gla_readout": (part(gla.readout_kernel, **opts), (q, bk, h_gla, attend_gla, v)),
        "gla_state_backward": (part(gla.state_backward_kernel, **opts), (q, bk, dy, s0)),
        # A as the layer's backward has it (kept from the forward; the one-kernel form recomputes its blocks)
        "gla_chunk_backward": (part(gla.chunk_backward_kernel, attend=attend_gla, **opts),
                               (q, k, v, bk, h_gla, g_gla, dy)),
        "covariance_pass": (part(covariance.covariance_kernel, products="tf32x3", interpret=interpret), cov_args),
        "covariance_pass_ieee": (part(covariance.covariance_kernel, products="ieee", interpret=interpret), cov_args),
        "covariance_pass_backward": (covariance_backward, (*cov_args, d_gains, s0)),   # with its checkpointing forward
    }


_EXACT = {}


def covariance_error(gains, final, k, log_decay, noise, inv_beta, p0, batch_entry=0):
    """Relative (max-norm) errors of the covariance kernel's gains and final P against the exact
    recursion step by step in float64 numpy (``P_bar = a^2 P + q I``, ``u = P_bar k``, ``Kg = u / (k^T u +
    1/beta)``, ``P = P_bar - u Kg^T``), on one batch entry."""
    import numpy as np
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)[batch_entry]
    if not _EXACT:       # the same inputs for every variant: the recursion runs once
        k, a, q, ib, cov = f64(k), np.exp(f64(log_decay)), f64(noise), f64(inv_beta), f64(p0)
        eye = np.eye(cov.shape[-1])
        want = np.empty_like(k)
        for t in range(k.shape[0]):
            cov = a[t][:, None, None] ** 2 * cov + q[t][:, None, None] * eye
            u = np.einsum("hij,hj->hi", cov, k[t])
            want[t] = u / (np.einsum("hi,hi->h", k[t], u) + ib[t])[:, None]
            cov = cov - u[:, :, None] * want[t][:, None, :]
        _EXACT.update(gains=want, final=cov)
    want, cov = _EXACT["gains"], _EXACT["final"]
    rel = lambda x, y: float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
    return rel(f64(gains), want), rel(f64(final), cov)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4x4096x16x128")
    parser.add_argument("--time", action="store_true",
                        help="print each kernel's median time alone (every program compiled first, then timed "
                             "in interleaved rounds)")
    parser.add_argument("--kernels", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--tune", default="{}", help='JSON {kernel: {setting: value}} for filters.pallas.common.TUNING')
    parser.add_argument("--variants", default="[{}]",
                        help="JSON list of --tune dicts, each timed in turn (one process, one set of inputs); "
                             "the covariance pass's rows also carry its error against float64")
    args = parser.parse_args()
    common.tuning_from_environment(args.tune)        # merged into each kernel's settings, as MBD_PALLAS_TUNING is
    variants = json.loads(args.variants)
    for variant in variants:                         # every variant checked before any is timed
        common.check_settings(variant, "--variants")
    calls = kernel_calls(tuple(int(x) for x in args.shape.split("x")))
    base = {name: dict(settings) for name, settings in common.TUNING.items()}
    compiled = []                                    # (kernel, variant, program, arguments, outputs)
    for variant in variants:
        for name, settings in variant.items():
            common.TUNING[name] = {**base.get(name, {}), **settings}
        for name, (fn, call_args) in calls.items():
            if args.kernels and name not in args.kernels.split(","):
                continue
            try:
                # a new function per variant: jit caches a trace by the function it traces
                program = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*call_args).compile()
                out = jax.block_until_ready(program(*call_args))
            except Exception as error:  # noqa: BLE001 (a variant the compiler refuses is reported, not fatal)
                print(json.dumps(dict(kernel=name, variant=variant, error=f"{type(error).__name__}: {error}"[:400])),
                      flush=True)
                continue
            compiled.append((name, variant, program, call_args, out))
        common.TUNING.clear()
        common.TUNING.update({n: dict(v) for n, v in base.items()})
    if not args.time:
        return
    # Timed in rounds, each program once per round, so that a drift of the GPU's clocks over the run (seen
    # on an H200, 2026-12-02: the same kernel 28.4 ms early in a run, 34.6 later) weighs on every variant
    # alike rather than on whichever ran last.
    times = [[] for _ in compiled]
    for _ in range(ROUNDS):
        for spent, (_, _, program, call_args, _) in zip(times, compiled):
            start = time.perf_counter()
            jax.block_until_ready(program(*call_args))
            spent.append(time.perf_counter() - start)
    for spent, (name, variant, _, call_args, out) in zip(times, compiled):
        record = dict(kernel=name, ms=round(1e3 * statistics.median(spent), 4),
                      min_ms=round(1e3 * min(spent), 4), max_ms=round(1e3 * max(spent), 4))
        if variant:
            record["variant"] = variant
        if name in covariance.KERNEL_NAMES.values():
            record["error_gains"], record["error_final"] = covariance_error(*out, *call_args)
        print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
