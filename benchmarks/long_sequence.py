"""Long-sequence numerics of the exact chunked filter in float32 against the float64 sequential oracle.

    python benchmarks/long_sequence.py                      # T = 65,536, K = V = 64, chunk 64
    python benchmarks/long_sequence.py --time 4096 --out docs/results/long_sequence.md

For several Bayesian Layers (no noise, random-walk noise, stationary noise; per-step decays) it checks,
at every chunk boundary, that the covariance ``P`` carried in float32 is finite, symmetric (asymmetry
relative to its largest entry) and positive definite (its smallest eigenvalue), and that the readouts
stay within a relative tolerance of the float64 oracle (max abs error over max abs readout).
Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402  (first: sets the BLAS threading before jax loads LAPACK)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import designmodels as dm  # noqa: E402
from filters import chunked  # noqa: E402
from filters.checks import prepare  # noqa: E402
from filters.inputs import prior_state  # noqa: E402
from tests.support import random_inputs  # noqa: E402

MODELS = {
    "bayesian, no noise, per-step decay": dm.bayesian(),
    "bayesian, no noise, no decay": dm.bayesian(decay="none"),
    "bayesian, random walk q=0.01": dm.bayesian(process_noise=0.01),
    "bayesian, stationary": dm.bayesian(noise="stationary"),
}


def check(model, args):
    """Returns a dict of the measured quantities for one model."""
    q, k, v, gates = random_inputs(model, batch=1, time=args.time, heads=args.heads, key_dim=args.dim,
                                   value_dim=args.dim, seed=args.seed, dtype=np.float64)
    if "log_decay" in gates:  # long memories: decays in (0.99, 1], as a trained layer would use
        gates["log_decay"] = gates["log_decay"] / 70.0
    structure = filters.analyze(model)
    start = time.perf_counter()
    reference, reference_state = filters.compile(model, backend="sequential")(q, k, v, validate=False, **gates)
    reference = np.asarray(reference)
    t_reference = time.perf_counter() - start

    f32 = lambda x: np.asarray(x, np.float32)
    gates32 = {n: f32(g) for n, g in gates.items()}
    x = prepare(structure, f32(q), f32(k), f32(v), gates32, validate=False)
    state = prior_state(structure, batch=1, heads=args.heads, key_dim=args.dim, value_dim=args.dim,
                        dtype=np.float32)
    noise = chunked.noise_variance(structure, x)
    boundaries = jax.jit(lambda x, noise, p: chunked._covariance_scan(   # P at every chunk start
        x.q, x.k, x.transition, noise, x.precision, p, chunk_size=args.chunk_size, variance=False,
        boundaries=True, key_noise=structure.noise == "key")[3])(x, noise, state.covariance)
    start = time.perf_counter()
    y = filters.compile(model, backend="chunked", chunk_size=args.chunk_size)(
        f32(q), f32(k), f32(v), validate=False, **gates32)[0]
    y = np.asarray(y, np.float64)
    t_chunked = time.perf_counter() - start

    p = np.asarray(boundaries, np.float64)                                    # [N, B*H, K, K]
    scale = np.maximum(np.abs(p).max(axis=(-2, -1)), np.finfo(np.float64).tiny)
    asymmetry = float((np.abs(p - np.swapaxes(p, -1, -2)).max(axis=(-2, -1)) / scale).max())
    smallest = np.linalg.eigvalsh(0.5 * (p + np.swapaxes(p, -1, -2)))[..., 0]
    oracle_scale = float(np.abs(np.asarray(reference_state.covariance)).max())
    return {
        "finite": bool(np.all(np.isfinite(y)) and np.all(np.isfinite(p))),
        "min_eigenvalue": float(smallest.min()),
        "min_eigenvalue_relative": float((smallest / scale).min()),
        "max_asymmetry_relative": asymmetry,
        "output_relative_error": float(np.abs(y - reference).max() / np.abs(reference).max()),
        # Decay without process noise contracts the exact P to zero (A P A^T, nothing added back): then
        # the float64 oracle's P is below float32's range too, and P >= 0 is all that can hold.
        "oracle_final_covariance_max": oracle_scale,
        "covariance_vanishes": oracle_scale < np.finfo(np.float32).tiny,
        "seconds_f64_sequential": t_reference, "seconds_f32_chunked": t_chunked,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    header = (f"T={args.time}, H={args.heads}, K=V={args.dim}, chunk {args.chunk_size}, float32 chunked vs "
              f"float64 sequential, jax {jax.__version__} on {jax.default_backend()}")
    print(header, flush=True)
    lines = ["| model | finite | min eigenvalue of P (relative) | max asymmetry (relative) | f64 oracle: max of "
             "final P | output rel. error | pass |", "| --- | --- | --- | --- | --- | --- | --- |"]
    failed = False
    for name, model in MODELS.items():
        r = check(model, args)
        definite = r["min_eigenvalue"] > 0 or (r["covariance_vanishes"] and r["min_eigenvalue"] >= 0)
        ok = (r["finite"] and definite and r["max_asymmetry_relative"] < 1e-5
              and r["output_relative_error"] < args.tolerance)
        failed |= not ok
        line = (f"| {name} | {r['finite']} | {r['min_eigenvalue']:.2e} ({r['min_eigenvalue_relative']:.1e}) | "
                f"{r['max_asymmetry_relative']:.1e} | {r['oracle_final_covariance_max']:.1e} | "
                f"{r['output_relative_error']:.1e} | {'yes' if ok else 'NO'} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/long_sequence.py {' '.join(sys.argv[1:])}`\n\n{header}\n\n")
            f.write("\n".join(lines) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
