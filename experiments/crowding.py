"""Key crowding: how recall degrades as more keys share a key space.

Write ``n`` random unit keys ``k_i`` in dimension ``D`` with random values ``v_i``, then query every
stored key (query steps write nothing: zero key, no decay). The loss is ``(1/n) sum_i |M k_i - v_i|^2``
with unit-norm values (1 = no memory). Values are the rows of a Haar-random orthogonal matrix: every
filter here is linear in the values, so this loss is exactly its expectation over i.i.d. Gaussian values
given the keys, and only the keys are random. Every model is a declared design model compiled with
`filters.compile`; the closed-form cross-direction predictions of docs/dynamics.md sit beside the
measurements (linear attention and Mamba-2 exactly, the Bayesian Layer asymptotically in ``D``).

    python -m experiments.crowding --config=configs/crowding.py --workdir=runs/crowding

Writes ``results.json``, ``table.md`` and ``crowding.png``; prints the table.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
from absl import logging

from experiments import common, dynamics, plotting


def trials_for(n: int, config) -> int:
    """Enough independent trials that ``trials * n (n - 1) / 2 >= config.pairs``."""
    return max(config.min_trials, math.ceil(config.pairs / max(1, n * (n - 1) // 2)))


def crowding_inputs(n: int, key_dim: int, trials: int, seed: int):
    """``q, k [B, 2n, 1, D]``, ``v [B, 2n, 1, n]`` and the ``idle`` mask of the query steps: ``n`` writes
    ``k_i -> v_i`` (random unit keys, orthonormal random values), then ``n`` queries ``q = k_i``."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(trials, n, key_dim))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    z, r = np.linalg.qr(rng.normal(size=(trials, n, n)))
    values = z * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]   # Haar orthogonal rows
    zeros_k = np.zeros_like(keys)
    k = np.concatenate([keys, zeros_k], axis=1)[:, :, None]
    q = np.concatenate([zeros_k, keys], axis=1)[:, :, None]
    v = np.concatenate([values, np.zeros_like(values)], axis=1)[:, :, None]
    idle = np.arange(2 * n) >= n
    return q, k, v, idle, values


def measure(memory, n: int, config, seed: int):
    """Per-trial losses ``[trials]`` of one memory at ``n`` keys."""
    trials = trials_for(n, config)
    q, k, v, idle, values = crowding_inputs(n, config.key_dim, trials, seed)
    f = memory.compile()
    y, _, _ = f(q, k, v, **memory.gate_arrays(q.shape[:3], idle=idle))
    readout = np.asarray(y, np.float64)[:, n:, 0]                # [trials, n, n]
    return np.mean(np.sum((readout - values) ** 2, axis=-1), axis=-1)


def check(config) -> None:
    """Fail before measuring on a config that names unknown models."""
    common.check_choice("models", config.models, dynamics.MODEL_NAMES)


def run(config, workdir=None) -> list[dict]:
    """All records; with a ``workdir``, also ``results.json``, ``table.md`` and ``crowding.png`` there."""
    config = common.resolve(config)
    check(config)
    records = []
    sizes = [max(2, int(round(r * config.key_dim))) for r in config.ratios]
    for memory in dynamics.memories(config):
        for i, n in enumerate(sizes):
            start = time.time()
            # The same keys and values for every model (one seed per n).
            losses = measure(memory, n, config, config.seed + i)
            predicted = dynamics.crowding_prediction(memory.name, memory.params, n, config.key_dim)
            extra = {}
            if memory.name == "bayesian":
                extra["noiseless_limit"] = dynamics.noiseless_ridge_limit(n, config.key_dim)
            records.append(dynamics.record(
                "loss", memory.name, predicted, float(np.mean(losses)), n=n, D=config.key_dim,
                n_over_D=n / config.key_dim, trials=len(losses),
                stderr=float(np.std(losses) / math.sqrt(len(losses))), tolerance=config.tolerance, **extra))
            logging.info("crowding / %s: n = %d, %d trials, loss %.4g (%.1fs)", memory.name, n, len(losses),
                         np.mean(losses), time.time() - start)
    if workdir:
        common.prepare_workdir(workdir)
        plot(config, records, workdir)
        common.write_json(os.path.join(workdir, "results.json"), records)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(f"Crowding, float64, D = {config.key_dim}, tolerance {config.tolerance:g}\n\n"
                    f"{dynamics.records_table(records)}\n")
    return records


def plot(config, records, workdir):
    fig, (ax,) = plotting.figure(width=6.4, height=4.4)
    grid = np.geomspace(min(config.ratios) / 1.5, max(config.ratios) * 1.5, 120)
    memories = dynamics.memories(config)
    for memory in memories:
        c = plotting.color(memory.name)
        rows = [r for r in records if r["model"] == memory.name]
        x = [r["n_over_D"] for r in rows]
        ax.errorbar(x, [r["measured"] for r in rows], yerr=[2 * r["stderr"] for r in rows], color=c,
                    label=memory.label, capsize=2, **plotting.MEASURED)
        curve = [dynamics.crowding_prediction(memory.name, memory.params, max(2, int(round(g * config.key_dim))),
                                              config.key_dim) for g in grid]
        if curve[0] is not None:
            ax.plot(grid, curve, color=c, **plotting.PREDICTED)
        else:
            ax.plot(x, [r["measured"] for r in rows], color=c, linewidth=0.6, alpha=0.6)
    if any(m.name == "bayesian" for m in memories):
        ax.plot(grid, [max(0.0, 1 - 1 / g) for g in grid], color="black", linestyle=":", linewidth=1.0,
                label="least squares limit 1 - D/n")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(config.ratios), [f"{r:g}" for r in config.ratios])
    ax.xaxis.set_minor_formatter(plotting.matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"n / D  (D = {config.key_dim})")
    ax.set_ylabel("loss (1/n) sum |M k_i - v_i|^2   (1 = no memory)")
    ax.set_title("crowding: markers measured (+-2 s.e.), dashed closed form", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return plotting.save(fig, workdir, "crowding.png")


def main(config, workdir: str) -> None:
    """Run, write the files, print the table; exit non-zero if a closed form and its measurement disagree."""
    dynamics.print_and_check(run(config, workdir), lambda r: f"{r['quantity']}/{r['model']}/n={r['n']}")


if __name__ == "__main__":
    common.run_app(main, config="configs/crowding.py", outputs="results.json, table.md and crowding.png", check=check,
                   x64=True)
