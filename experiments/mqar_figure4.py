"""The paper's MQAR figure ("MQAR with shared key-value vocabulary"): three panels, (a) base MQAR, (b)
Update-MQAR, (c) Block-MQAR, each with the shared vocabulary; accuracy against d_model, one line per model
(a model without its convolution dashed, in its partner's colour), error bars over seeds.

    python -m experiments.mqar_figure4 --config=configs/mqar_figure4.py --workdir=runs/mqar_figure4
    python -m experiments.mqar_figure4 --config=configs/mqar_figure4.py --config.smoke=True --workdir=/tmp/figure4

Training: the runs of `experiments.mqar`'s grid, every seed of ``config.seeds`` in it (the training seed:
initialisation and data order; the data is the same for every seed), with mqar's folders
(``runs/<variant>/<model>/<shape>/d<d>_lr<lr>_seed<s>``), identities, resume and sweep engine (every folder
is checked before anything trains). The report collects every finished MQAR run of the workdir:

* ``figure4.csv``: one row per run (mqar's columns, and ``seed``);
* ``figure4.md``: per panel, training shape, model and d_model, the learning rate with the best mean
  accuracy over the seeds on the validation split (a diverged seed counts as accuracy 0; a learning rate
  with fewer finished seeds than another is still compared by its mean), and at that rate the test
  accuracy at the training shape: its mean, the spread (sample standard deviation), each seed's, and the
  mean beyond the training shape;
* ``figure4.png``: the panels side by side (a row per training shape), the mean at the chosen learning
  rate, error bars from the lowest to the highest seed.

The learning rate is chosen on MQAR's validation split (at the training shape, drawn apart from the test
sets), never on the test accuracy it reports.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from experiments import common, models, mqar, plotting, sweep, training

PANELS = {"base": "(a) MQAR", "update": "(b) Update-MQAR", "block": "(c) Block-MQAR"}
TITLE = "MQAR with shared key-value vocabulary"
FIGURE, TABLE, CSV = "figure4.png", "figure4.md", "figure4.csv"


def check(config) -> None:
    """Fail before any training on a config that cannot run (mqar's checks, seeds included, and the
    panels)."""
    mqar.check(config)
    unknown = [v for v in config.variants if v not in PANELS]
    if unknown:
        raise ValueError(f"config.variants: {unknown} are not panels of the figure; accepted: {', '.join(PANELS)}.")


def runs(config, workdir: str) -> list[sweep.Run]:
    """mqar's grid, every seed of ``config.seeds`` in it (one run folder per seed, as mqar lays them out)."""
    return mqar.runs(config, workdir)


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------

def collect(workdir: str) -> list[dict]:
    """Every finished (or diverged) MQAR run under ``workdir``, each with its ``seed``."""
    records = [r for r in sweep.collect(workdir) if r["description"].get("experiment") == "mqar"]
    for record in records:
        record["seed"] = record["settings"]["seed"]
    return records


def _accuracy(record: dict, shape: Optional[tuple] = None) -> float:
    """Accuracy at ``shape`` (default: the training shape); 0 for a diverged run."""
    if training.is_diverged(record):
        return 0.0
    d = record["description"]
    return record["eval"][mqar.set_name(*(shape or (d["seq_len"], d["num_kv_pairs"])))]["accuracy"]


_CELL = ("variant", "seq_len", "num_kv_pairs", "model", "d_model")


def cells(records: list[dict]) -> dict:
    """``{(variant, seq_len, pairs, model, d_model): (learning_rate, [records of its seeds])}`` at the learning
    rate with the best mean accuracy over its seeds on MQAR's validation split (a diverged seed counts 0;
    ties: the smaller rate; `experiments.sweep.seeds_at_best_learning_rate`), so that the test accuracy
    the figure reports did not choose it. Runs recorded before the validation split existed are chosen
    by their test accuracy at the training shape."""
    cell = lambda r: tuple(r["description"][k] for k in _CELL)
    best = sweep.seeds_at_best_learning_rate(records, cell, mqar.valid_score)
    return {key: (runs_[0]["description"]["learning_rate"], runs_) for key, runs_ in best.items()}


def _order(key):
    variant, seq_len, pairs, model, d_model = key
    return list(PANELS).index(variant), seq_len, pairs, list(models.MODELS).index(model), d_model


def rows(records: list[dict]) -> list[dict]:
    return [{**row, "seed": r["seed"]} for row, r in zip(mqar.rows(records), records)]


def table(records: list[dict]) -> str:
    header = ["panel", "train (L, P)", "model", "d_model", "best lr", "accuracy (mean +- sd)", "seeds",
              "beyond training (mean)"]
    out = []
    for key, (lr, runs_) in sorted(cells(records).items(), key=lambda kv: _order(kv[0])):
        variant, seq_len, pairs, model, d_model = key
        accs = [_accuracy(r) for r in runs_]
        spread = f" +- {np.std(accs, ddof=1):.3f}" if len(accs) > 1 else ""
        seeds = ", ".join(f"{r['seed']}: " + ("diverged" if training.is_diverged(r) else f"{a:.3f}")
                          for r, a in zip(runs_, accs))
        finished = [r for r in runs_ if not training.is_diverged(r)]
        beyond = sorted({n for r in finished for n in r["eval"]} - {mqar.set_name(seq_len, pairs), mqar.VALID})
        beyond = ", ".join(f"{n.replace('_', ' ')}: {np.mean([r['eval'][n]['accuracy'] for r in finished]):.3f}"
                           for n in beyond) or "-"
        out.append([PANELS[variant], f"({seq_len}, {pairs})", model, d_model, f"{lr:.1e}",
                    f"{np.mean(accs):.3f}{spread}", seeds, beyond])
    return common.markdown_table(header, out)


def family(model: str) -> str:
    """The model a convolution-free form belongs to (its colour in the figure)."""
    return model[:-len(models.NO_CONV)] if model.endswith(models.NO_CONV) else model


def color(model: str) -> str:
    """The project's colour of the model's family (`experiments.plotting`): a convolution-free form is drawn
    in its partner's colour, dashed."""
    return plotting.color(family(model))


def plot(records: list[dict], path: str) -> None:
    """`draw` the figure of ``records`` into ``path`` (nothing without a record)."""
    fig = draw(records)
    if fig is not None:
        import matplotlib.pyplot as plt     # after draw, which chose the Agg backend

        fig.savefig(path, dpi=120)
        plt.close(fig)


def draw(records: list[dict]):
    """The paper's layout: the panels (a), (b), (c) side by side, a row per training shape; in each, for every
    model, the mean accuracy over the seeds at the chosen learning rate against d_model (log scale), error
    bars from the lowest to the highest seed. Returns the matplotlib Figure (None without a record)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = cells(records)
    if not best:
        return None
    shapes = sorted({(k[1], k[2]) for k in best})
    panels = [v for v in PANELS if any(k[0] == v for k in best)]
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(4.0 * len(panels), 3.3 * len(shapes) + 0.9),
                             squeeze=False, sharey=True)
    handles = {}
    for i, shape in enumerate(shapes):
        for j, variant in enumerate(panels):
            ax = axes[i][j]
            for model in models.MODELS:
                points = sorted((k[4], [_accuracy(r) for r in runs_]) for k, (_, runs_) in best.items()
                                if (k[0], (k[1], k[2]), k[3]) == (variant, shape, model))
                if not points:
                    continue
                x = np.array([p[0] for p in points], float)
                accs = [np.array(p[1]) for p in points]
                mean = np.array([a.mean() for a in accs])
                # lowest and highest seed; clipped at 0, as a mean of equal accuracies can round past them
                err = np.maximum(0.0, [[m - a.min() for m, a in zip(mean, accs)],
                                       [a.max() - m for m, a in zip(mean, accs)]])
                handles[model] = ax.errorbar(x, mean, yerr=err, marker="o", markersize=4, capsize=3,
                                             color=color(model), label=model,
                                             linestyle="--" if model.endswith(models.NO_CONV) else "-")
            ds = sorted({k[4] for k in best if (k[0], (k[1], k[2])) == (variant, shape)})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ds, [str(d) for d in ds])
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{PANELS[variant]}, L={shape[0]}, P={shape[1]}", fontsize=10)
            ax.set_xlabel("d_model")
            if j == 0:
                ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
    names = [m for m in models.MODELS if m in handles]
    seeds = sorted({r["seed"] for r in records})
    fig.suptitle(f"{TITLE} (best learning rate; mean and range over seeds {', '.join(map(str, seeds))})",
                 fontsize=10)
    fig.legend([handles[m] for m in names], names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.12 if len(names) > 4 else 0.07, 1, 0.95))
    return fig


def report(workdir: str) -> list[dict]:
    """Collect every finished run under ``workdir/seed*/`` into figure4.csv, figure4.md and figure4.png."""
    records = collect(workdir)
    if not records:
        return records
    sweep.write_csv(os.path.join(workdir, CSV), rows(records))
    text = table(records)
    with open(os.path.join(workdir, TABLE), "w") as f:
        f.write(f"{TITLE}: per panel, training shape, model and d_model, the learning rate with the best mean "
                "accuracy over the seeds at the training shape, that mean +- the sample standard deviation over the "
                f"seeds, each seed, and the mean beyond the training shape.\n\n{text}\n")
    plot(records, os.path.join(workdir, FIGURE))
    print(text)
    return records


def main(config, workdir: str) -> None:
    """Train every seed, report, and say which runs diverged (`sweep.train_and_report`)."""
    sweep.train_and_report(config, workdir, runs=runs, train=_train, report=report)


def _train(config, workdir: str) -> list[dict]:
    sweep.quiet_orbax()
    return sweep.run_all(runs(config, workdir))


if __name__ == "__main__":
    common.run_app(main, config="configs/mqar_figure4.py", outputs="the runs of every seed and the figure",
                   check=check)
