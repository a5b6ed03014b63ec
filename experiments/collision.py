"""The collision study: why covariance matters when two addresses overlap.

Two unit keys ``k_A, k_B`` with overlap ``rho = k_A . k_B``. Boost ``B`` (write ``k_B -> v_B``, ``n_B``
times), then flood ``A`` (write ``k_A -> v_A``, ``n_A`` times), reading ``k_B`` after every write. Values
are one-hot, so the readout ``M_t k_B = b_t v_B + a_t v_A``; the retrieval is the pairwise softmax of the
target against the distractor, ``sigmoid((b_t - a_t) / T)``. Every model is a declared design model,
compiled with `filters.compile`; every measurement is put beside its closed form (docs/dynamics.md).

    python -m experiments.collision --config=configs/collision.py --workdir=runs/collision

Writes ``results.json`` (records ``{quantity, model, predicted, measured, ...}``), ``table.md`` and the
figures ``collision_retrieval.png``, ``collision_rho_sweep.png``, ``collision_write_gain.png``; prints
the table.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

import designmodels as dm
import filters
from designmodels.packaging import require_sibling
from experiments import common, dynamics, plotting

require_sibling(filters)   # a shadowing module of that name fails here, by name


def collision_inputs(rhos, n_boost: int, n_flood: int, key_dim: int, seed: int):
    """``q, k [B, T, 1, K]``, ``v [B, T, 1, 2]`` for a batch of overlaps: ``k_B`` then ``k_A`` in a random
    plane of ``R^K``; ``v_B = e_0`` (target), ``v_A = e_1`` (distractor); ``q = k_B`` throughout."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(key_dim, key_dim)))
    e1, e2 = basis[:, 0], basis[:, 1]
    rhos = np.asarray(rhos, np.float64)[:, None]
    k_b = np.broadcast_to(e1, (len(rhos), key_dim))
    k_a = rhos * e1 + np.sqrt(1 - rhos ** 2) * e2
    steps = n_boost + n_flood
    boost = np.arange(steps) < n_boost
    k = np.where(boost[None, :, None], k_b[:, None, :], k_a[:, None, :])[:, :, None, :]
    q = np.broadcast_to(k_b[:, None, None, :], k.shape).copy()
    v = np.zeros((len(rhos), steps, 1, 2))
    v[:, boost, 0, 0] = 1.0
    v[:, ~boost, 0, 1] = 1.0
    return q, k, v


def _measure_collision(config, memory, rhos):
    q, k, v = collision_inputs(rhos, config.n_boost, config.n_flood, config.key_dim, config.seed)
    f = memory.compile()
    y, _, diag = f(q, k, v, **memory.gate_arrays(q.shape[:3]))
    y = np.asarray(y, np.float64)[:, :, 0]
    return y[..., 0], y[..., 1], np.asarray(diag.write_gain, np.float64)[:, :, 0]


def collision(config):
    """Retrieval traces (main ``rho``) and end points (``rho`` sweep) for every model."""
    rhos = [config.rho] + list(config.rho_sweep)
    steps = config.n_boost + config.n_flood
    records, traces = [], {}
    for memory in dynamics.memories(config):
        start = time.time()
        b, a, gain = _measure_collision(config, memory, rhos)
        measured = dynamics.pairwise_retrieval(b, a, config.temperature)
        predicted = []
        for i, rho in enumerate(rhos):
            pb, pa = dynamics.two_key_readouts(memory.name, memory.params, rho, config.n_boost, config.n_flood)
            predicted.append(dynamics.pairwise_retrieval(pb, pa, config.temperature))
            readout_error = float(np.max(np.abs(np.stack([b[i] - pb, a[i] - pa]))))
            if i == 0:   # the main overlap: boost end, plateau, gains
                trace_error = float(np.max(np.abs(measured[0] - predicted[0])))
                common_fields = dict(rho=rho, tolerance=config.tolerance)
                records.append(dynamics.record(
                    "boost_end", memory.name, predicted[0][config.n_boost - 1],
                    measured[0, config.n_boost - 1], step=config.n_boost, **common_fields))
                records.append(dynamics.record(
                    "plateau", memory.name, predicted[0][-1], measured[0, -1], step=steps,
                    predicted_limit=dynamics.two_key_limit(memory.name, memory.params, rho, config.n_boost,
                                                           config.temperature),
                    trace_max_abs_error=trace_error, readout_max_abs_error=readout_error, **common_fields))
                if memory.name.startswith("bayesian"):
                    g = dynamics.two_key_gains(memory.params, rho, config.n_boost, config.n_flood)
                    for t in (config.n_boost, config.n_boost + 1, steps):
                        records.append(dynamics.record("write_gain", memory.name, g[t - 1], gain[0, t - 1],
                                                       step=t, **common_fields))
                    traces[memory.name + "/gain"] = (gain[0], g)
            else:
                records.append(dynamics.record(
                    "final_retrieval", memory.name, predicted[i][-1], measured[i, -1], rho=rho, step=steps,
                    readout_max_abs_error=readout_error, tolerance=config.tolerance))
        traces[memory.name] = (measured, np.stack(predicted))
        logging.info("collision / %s: %d overlaps x %d steps (%.1fs)", memory.name, len(rhos), steps,
                     time.time() - start)
    return records, traces, rhos


def write_gain_study(config):
    """Repeated writes to one unit key: ``g_t`` against the closed form, the envelope and the floor."""
    records, traces = [], []
    l2 = config.bayes_prior_variance
    steps = config.gain_steps
    key = np.zeros(config.key_dim)
    key[0] = 1.0
    k = np.broadcast_to(key, (1, steps, 1, config.key_dim)).copy()
    v = np.ones((1, steps, 1, 1))
    for beta, q in config.gain_settings:
        model = dm.bayesian(prior_variance=l2, process_noise=q or None, noise="random_walk", decay="none")
        f = filters.compile(model, backend="sequential", diagnostics=True)
        _, _, diag = f(k, k, v, beta=np.full((1, steps, 1), beta))
        measured = np.asarray(diag.write_gain, np.float64)[0, :, 0]
        predicted = dynamics.write_gains(beta, q, l2, steps)
        trace_error = float(np.max(np.abs(measured - predicted) / predicted))
        fields = dict(beta=beta, q=q, step=steps, trace_max_rel_error=trace_error, tolerance=config.tolerance)
        if q > 0:
            records.append(dynamics.record("riccati_floor", "bayesian", dynamics.riccati_floor(beta, q),
                                           measured[-1], **fields))
        else:
            records.append(dynamics.record("gain_envelope", "bayesian",
                                           dynamics.gain_envelope(beta, l2, steps)[-1], measured[-1], **fields))
        traces.append((beta, q, measured, predicted))
    return records, traces


# ----------------------------------------------------------------------------------------------------
# Figures.


def plot_retrieval(config, traces, workdir):
    fig, (ax,) = plotting.figure(width=6.4, height=4.0)
    t = np.arange(1, config.n_boost + config.n_flood + 1)
    marks = plotting.log_marks(len(t), 60)
    for name in config.models:
        measured, predicted = traces[name]
        c = plotting.color(name)
        ax.plot(t[marks], measured[0][marks], color=c, label=dynamics.LABELS[name], **plotting.MEASURED)
        ax.plot(t, predicted[0], color=c, **plotting.PREDICTED)
    ax.axvline(config.n_boost + 0.5, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step t (boost B, then flood A)")
    ax.set_ylabel("retrieval of v_B at k_B")
    ax.set_title(f"collision at rho = {config.rho}: markers measured, dashed closed form", fontsize=10)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="lower left")
    return plotting.save(fig, workdir, "collision_retrieval.png")


def plot_rho_sweep(config, traces, rhos, workdir):
    fig, (ax,) = plotting.figure(width=6.4, height=4.0)
    grid = np.linspace(0.0, 0.995, 200)
    for memory in dynamics.memories(config):
        measured, _ = traces[memory.name]
        c = plotting.color(memory.name)
        curve = [dynamics.pairwise_retrieval(*[x[-1] for x in dynamics.two_key_readouts(
            memory.name, memory.params, r, config.n_boost, config.n_flood)], config.temperature) for r in grid]
        ax.plot(grid, curve, color=c, **plotting.PREDICTED)
        ax.plot(rhos[1:], measured[1:, -1], color=c, label=memory.label, **plotting.MEASURED)
    ax.set_xlabel("overlap rho = k_A . k_B")
    ax.set_ylabel(f"retrieval after {config.n_boost} boosts + {config.n_flood} floods")
    ax.set_title("end point against overlap: markers measured, dashed closed form", fontsize=10)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="lower left")
    return plotting.save(fig, workdir, "collision_rho_sweep.png")


def plot_write_gain(config, gain_traces, traces, workdir):
    fig, (ax, bx) = plotting.figure(ncols=2, width=5.4, height=4.0)
    l2 = config.bayes_prior_variance
    cmap = plotting.plt.get_cmap("viridis")
    for i, (beta, q, measured, predicted) in enumerate(gain_traces):
        c = cmap(i / max(1, len(gain_traces) - 1))
        t = np.arange(1, len(measured) + 1)
        marks = plotting.log_marks(len(t), 30)
        ax.plot(t[marks], measured[marks], color=c, label=f"beta={beta:g}, q={q:g}", **plotting.MEASURED)
        ax.plot(t, predicted, color=c, linewidth=1.0)
        ax.plot(t, dynamics.gain_envelope(beta, l2, len(t)), color=c, linestyle="--", linewidth=0.8)
        if q > 0:
            ax.axhline(dynamics.riccati_floor(beta, q), color=c, linestyle=":", linewidth=1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("write n to one unit key")
    ax.set_ylabel("write gain g_n")
    ax.set_title("markers measured, solid closed form,\ndashed envelope beta l^2/(1+n beta l^2), dotted floor",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    t = np.arange(1, config.n_boost + config.n_flood + 1)
    for name in config.models:
        if name + "/gain" not in traces:
            continue
        measured, predicted = traces[name + "/gain"]
        c = plotting.color(name)
        marks = plotting.log_marks(len(t), 60)
        bx.plot(t[marks], measured[marks], color=c, label=dynamics.LABELS[name], **plotting.MEASURED)
        bx.plot(t, predicted, color=c, **plotting.PREDICTED)
    bx.axvline(config.n_boost + 0.5, color="black", linewidth=0.8)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("step t (boost at k_B, then flood at k_A)")
    bx.set_ylabel("write gain g_t")
    bx.set_title(f"the collision at rho = {config.rho}: the flood starts at\n"
                 "g = beta p0/(1 + beta p0), p0 = rho^2 pi + (1 - rho^2) sigma", fontsize=9)
    bx.legend(fontsize=7, loc="lower left")
    return plotting.save(fig, workdir, "collision_write_gain.png")


# ----------------------------------------------------------------------------------------------------


def check(config) -> None:
    """Fail before measuring on a config that names unknown models."""
    common.check_choice("models", config.models, dynamics.MODEL_NAMES)


def run(config, workdir=None) -> list[dict]:
    """All records; with a ``workdir``, also ``results.json``, ``table.md`` and the figures there."""
    config = common.resolve(config)
    check(config)
    records, traces, rhos = collision(config)
    gain_records, gain_traces = write_gain_study(config)
    records += gain_records
    if workdir:
        common.prepare_workdir(workdir)
        plot_retrieval(config, traces, workdir)
        plot_rho_sweep(config, traces, rhos, workdir)
        plot_write_gain(config, gain_traces, traces, workdir)
        common.write_json(os.path.join(workdir, "results.json"), records)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(f"Collision, float64, n_B = {config.n_boost}, n_A = {config.n_flood}, temperature "
                    f"{config.temperature}, tolerance {config.tolerance:g}\n\n{dynamics.records_table(records)}\n")
    return records


def main(config, workdir: str) -> None:
    """Run, write the files, print the table; exit non-zero if a closed form and its measurement disagree."""
    dynamics.print_and_check(run(config, workdir))


if __name__ == "__main__":
    common.run_app(main, config="configs/collision.py", outputs="results.json, table.md and the figures", check=check,
                   x64=True)
