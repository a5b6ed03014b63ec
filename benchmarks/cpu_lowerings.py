"""Time the lowerings of each family side by side, in one run, on the current platform.

    python benchmarks/cpu_lowerings.py                        # B=1, T=4096, H=2, K=V=64, f32
    python benchmarks/cpu_lowerings.py --time 1024 --out docs/results/cpu_lowerings.md

For each family (additive: Mamba-2 and GLA; reset: Gated DeltaNet; exact: the Bayesian Layer with
per-step decay and random-walk noise) and each backend: the median wall time of the jitted forward and
forward+backward (gradient of a scalar loss w.r.t. q, k, v and the gates) after warm-up, the ratio to
the sequential scan, and the accuracy of the f32 result against the float64 sequential oracle. Then the
compiled temporary memory of chunked forward+backward at several T, to show it grows linearly.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402  (first: sets the BLAS threading before jax loads LAPACK)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import designmodels as dm  # noqa: E402
from tests.support import random_inputs  # noqa: E402

MODELS = {
    "additive / mamba2": dm.mamba2(),
    "additive / gla": dm.gla(),
    "reset / gated_deltanet": dm.gated_deltanet(),
    "exact / bayesian": dm.bayesian(process_noise=0.01),
}


def _functions(model, backend, chunk_size):
    options = {"chunk_size": chunk_size} if backend == "chunked" else {}
    f = filters.compile(model, backend=backend, **options)

    def forward(q, k, v, gates):
        return f(q, k, v, validate=False, **gates)[0]

    def loss(q, k, v, gates):
        y, state = f(q, k, v, validate=False, **gates)
        return jnp.sum(y * y) + jnp.sum(state.mean ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _median_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(model, args, dtype):
    q, k, v, gates = random_inputs(model, batch=args.batch, time=args.time, heads=args.heads,
                                   key_dim=args.dim, value_dim=args.dim, seed=0, dtype=dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), {n: jnp.asarray(g) for n, g in gates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="sequential,associative,chunked")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--memory-times", default="1024,2048,4096,8192")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # for the float64 oracle; the timed inputs are float32
    backends = args.backends.split(",")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: {unknown} unknown; accepted: {', '.join(MODELS)}")

    header = (f"platform {jax.default_backend()} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), jax {jax.__version__}; B={args.batch} T={args.time} H={args.heads} "
              f"K=V={args.dim}, f32, chunk {args.chunk_size}, median of {args.repeats} after warm-up")
    print(header, flush=True)
    lines = ["| model | backend | forward ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | rel. error vs f64 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.models.split(","):
        model = MODELS[name]
        inputs32 = _inputs(model, args, np.float32)
        inputs64 = _inputs(model, args, np.float64)
        reference = np.asarray(filters.compile(model, backend="sequential")(
            inputs64[0], inputs64[1], inputs64[2], validate=False, **inputs64[3])[0])
        results = {}
        for backend in backends:
            if filters.LOWERINGS[backend].reason_not_applicable(filters.analyze(model)):
                continue
            forward, backward = _functions(model, backend, args.chunk_size)
            t_fwd = _median_time(forward, inputs32, args.repeats)
            t_bwd = _median_time(backward, inputs32, args.repeats)
            y = np.asarray(forward(*inputs32), np.float64)
            error = float(np.max(np.abs(y - reference)) / np.max(np.abs(reference)))
            results[backend] = (t_fwd, t_bwd)
            base = results.get("sequential", (t_fwd, t_bwd))
            line = (f"| {name} | {backend} | {1e3 * t_fwd:.2f} | {1e3 * t_bwd:.2f} | {base[0] / t_fwd:.1f}x | "
                    f"{base[1] / t_bwd:.1f}x | {error:.1e} |")
            lines.append(line)
            print(line, flush=True)

    memory = ["", "| model | T | chunked fwd+bwd temp memory (MiB) | per 1k steps |", "| --- | --- | --- | --- |"]
    for name in args.models.split(","):
        model = MODELS[name]
        for length in map(int, args.memory_times.split(",")):
            sub = argparse.Namespace(**{**vars(args), "time": length})
            _, backward = _functions(model, "chunked", args.chunk_size)
            compiled = backward.lower(*_inputs(model, sub, np.float32)).compile()
            stats = compiled.memory_analysis()
            mib = (stats.temp_size_in_bytes if stats is not None else float("nan")) / 2 ** 20
            line = f"| {name} | {length} | {mib:.1f} | {1024 * mib / length:.2f} |"
            memory.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/cpu_lowerings.py {' '.join(sys.argv[1:])}`\n\n{header}\n\n")
            f.write("\n".join(lines + memory) + "\n")


if __name__ == "__main__":
    main()
