"""What packing costs: one lowering on a packed row (``cu_seqlens``) beside the same steps as one sequence.

    python benchmarks/packed.py                          # chunked, Gated DeltaNet, T=2048, H=4, K=V=32, f32
    python benchmarks/packed.py --backend sequential --time 1024

A packed row is filtered as a padded batch ``[N, T_max]`` (`filters.packed`), so the cost follows
``N T_max / T``: 1 for sequences of equal length with ``max_seqlen`` their length, more when one long
sequence sets ``T_max`` for short ones, ``N`` with ``max_seqlen = T``. Prints the best wall time of the
jitted forward and forward+backward (gradient of a scalar loss w.r.t. q, k, v) after warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402  (first: sets the BLAS threading before jax loads LAPACK)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import designmodels as dm  # noqa: E402


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="chunked")
    parser.add_argument("--time", type=int, default=2048, help="T, the packed row's length (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    T, H, K, V = args.time, 4, 32, 32
    r = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k = jax.random.normal(r[0], (1, T, H, K)), jax.random.normal(r[1], (1, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(r[2], (1, T, H, V))
    gates = dict(log_decay=jax.nn.log_sigmoid(3 + jax.random.normal(r[3], (1, T, H))),
                 beta=jax.nn.sigmoid(jax.random.normal(r[4], (1, T, H))))
    f = filters.compile(dm.gated_deltanet(), backend=args.backend)
    equal, long = T // 8, T // 2
    cases = {
        "one sequence (no cu_seqlens)": {},
        f"8 x {equal}, max_seqlen={equal}": dict(cu_seqlens=np.arange(9) * equal, max_seqlen=equal),
        f"{long} + 8 x {long // 8}, max_seqlen={long}": dict(
            cu_seqlens=np.concatenate([[0], long + np.arange(9) * (long // 8)]), max_seqlen=long),
        f"8 x {equal}, max_seqlen={T} (= T)": dict(cu_seqlens=np.arange(9) * equal, max_seqlen=T),
    }
    print(f"{args.backend}, Gated DeltaNet, T={T}, H={H}, K=V={K}, float32, {jax.default_backend()}")
    for name, packing in cases.items():
        packing = {n: jnp.asarray(x) if n == "cu_seqlens" else x for n, x in packing.items()}
        run = lambda q, k, v, packing=packing: f(q, k, v, validate=False, **packing, **gates)[0]  # noqa: E731
        forward = jax.jit(run)
        backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v) ** 2), argnums=(0, 1, 2)))
        steps = T if not packing else (len(packing["cu_seqlens"]) - 1) * packing["max_seqlen"]
        print(f"  {name:34s} {steps:6d} steps   forward {best_time(forward, q, k, v, repeats=args.repeats) * 1e3:8.1f} ms"
              f"   forward+backward {best_time(backward, q, k, v, repeats=args.repeats) * 1e3:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
