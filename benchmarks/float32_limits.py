"""How far float32 carries the exact family: relative error of each lowering against the float64 oracle
as the observation precision grows.

    python benchmarks/float32_limits.py
    python benchmarks/float32_limits.py --time 1024 --out docs/results/float32_limits.md

The exact (Kalman) filter keeps a covariance ``P_t``. Without forgetting, ``P_t`` shrinks like
``(P_0^{-1} + sum_s beta_s k_s k_s^T)^{-1}``, about ``K / (beta t)``: the information gathered grows with
``beta * t / K`` and the covariance update ``P - u Kg^T`` cancels more digits. With a decay or process
noise, ``P_t`` stays away from zero and float32 holds at much larger precisions. Unit keys, prior
``P_0 = I``, a constant precision ``beta`` per row of the table; B=1, H=1, K=V=16.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402  (first: sets the BLAS threading before jax loads LAPACK)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import designmodels as dm  # noqa: E402
from tests.support import random_inputs  # noqa: E402

MODELS = {
    "no decay, no noise": dm.bayesian(decay="none"),
    "input decay, no noise": dm.bayesian(),
    "input decay, random walk 0.01": dm.bayesian(process_noise=0.01),
    "input decay, stationary": dm.bayesian(noise="stationary"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16, help="K = V")
    parser.add_argument("--precisions", default="1,1e2,1e3,1e4,1e5,1e6")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    backends = ["sequential", "associative", "chunked"]
    lines = ["| model | beta | " + " | ".join(backends) + " |", "| --- | --- |" + " --- |" * len(backends)]
    for name, model in MODELS.items():
        q, k, v, gates = random_inputs(model, batch=1, time=args.time, heads=1, key_dim=args.dim,
                                       value_dim=args.dim, seed=0, dtype=np.float64)
        for beta in map(float, args.precisions.split(",")):
            gates = {**gates, "beta": np.full_like(gates["beta"], beta)}
            reference = np.asarray(filters.compile(model, backend="sequential")(q, k, v, validate=False, **gates)[0])
            cells = []
            for backend in backends:
                f = filters.compile(model, backend=backend)
                y = f(*(jnp.asarray(z, jnp.float32) for z in (q, k, v)), validate=False,
                      **{n: jnp.asarray(g, jnp.float32) for n, g in gates.items()})[0]
                y = np.asarray(y, np.float64)
                error = np.max(np.abs(y - reference)) / np.max(np.abs(reference))
                cells.append("NaN" if not np.isfinite(error) else f"{error:.1e}")
            lines.append(f"| {name} | {beta:g} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/float32_limits.py {' '.join(sys.argv[1:])}` (jax {jax.__version__}, "
                    f"{jax.default_backend()}); T={args.time}, K=V={args.dim}; max relative error of the float32 "
                    "readout against the float64 sequential oracle.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
