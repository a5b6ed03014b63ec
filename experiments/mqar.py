"""MQAR and its variants, trained: accuracy against d_model per sequence layer, as in Zoology.

    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar
    python -m experiments.mqar --config=configs/mqar.py --config.smoke=True --workdir=/tmp/mqar

For every (variant, training shape, model, d_model, learning rate) of the config, a 2-layer model
(`experiments.models`) is trained on `experiments.tasks.mqar` data (`experiments.training`: AdamW,
warm-up + cosine, data-parallel over the local devices, orbax checkpoints) in its own folder under
``workdir/runs``, then evaluated at its training shape and beyond (longer sequences, more pairs); the
throughput of its training step is measured. Finished runs are skipped, so an interrupted sweep resumes;
a run folder that holds a run of other settings is an error before anything trains.
Then every finished run of the workdir is collected into ``results.csv`` (one row per run),
``table.md`` (best learning rate per variant, shape, model and d_model), ``accuracy_vs_d_model.png`` and,
where cells were trained at several shapes, ``accuracy_vs_seq_len.png``.
"""
from __future__ import annotations

import functools
import os

from absl import logging

from experiments import common, models, sweep, tasks, training

def set_name(seq_len: int, pairs: int) -> str:
    return f"L{seq_len}_P{pairs}"


def _task_kwargs(config) -> dict:
    kwargs = {"num_updates": config.num_updates or None, "block_gap": config.block_gap, "power_a": config.power_a,
              "random_filler": config.random_filler}
    if config.vocabulary != "split":        # recorded when it is not the vocabulary of every earlier run
        kwargs["vocabulary"] = config.vocabulary
    return kwargs


def eval_shapes(config, variant: str, seq_len: int, pairs: int) -> list[tuple[int, int]]:
    """The evaluation shapes of a training shape that the variant's layout fits."""
    shapes = []
    for length_x, pairs_x in config.eval_multipliers:
        shape = (seq_len * length_x, pairs * pairs_x)
        try:
            tasks.mqar_layout(*shape, variant, num_updates=_task_kwargs(config)["num_updates"],
                              block_gap=config.block_gap)
        except tasks.TaskError as e:
            logging.info("evaluation shape %s skipped for %s: %s", shape, variant, e)
            continue
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def check(config) -> None:
    """Fail before any training on a config that cannot run."""
    common.check_choice("variants", config.variants, tasks.MQAR_VARIANTS)
    common.check_choice("vocabulary", (config.vocabulary,), tasks.VOCABULARIES)
    models.check_models(config.models)
    if not config.d_models or min(config.d_models) < 1 or not config.learning_rates:
        raise ValueError("config.d_models and config.learning_rates must be non-empty, d_model positive.")
    for variant in config.variants:
        for seq_len, pairs in config.train_shapes:
            try:
                tasks.mqar_layout(seq_len, pairs, variant, num_updates=config.num_updates or None,
                                  block_gap=config.block_gap)
            except tasks.TaskError as e:
                raise ValueError(f"config.train_shapes: {(seq_len, pairs)} does not fit variant {variant!r}: {e}")
            if seq_len >= config.vocab_size:
                raise ValueError(f"config.vocab_size={config.vocab_size} must exceed seq_len={seq_len}.")
    if config.variants and "block" in config.variants and config.block_gap + 1 <= config.num_layers * (
            config.conv_size - 1):
        logging.warning("block_gap=%d: a value is %d positions after its key, which %d stacked short "
                        "convolutions of size %d can reach; Block-MQAR needs block_gap + 1 > %d.",
                        config.block_gap, config.block_gap + 1, config.num_layers, config.conv_size,
                        config.num_layers * (config.conv_size - 1))


def datasets(config, variant: str, seq_len: int, pairs: int):
    """The training set and the evaluation sets of one (variant, training shape)."""
    kwargs = _task_kwargs(config)
    x, y = tasks.mqar(config.vocab_size, seq_len, pairs, config.num_train_examples,
                      sweep.derive_seed(config.data_seed, variant, seq_len, pairs, "train"), variant, **kwargs)
    evals = {}
    for shape in eval_shapes(config, variant, seq_len, pairs):
        ex, ey = tasks.mqar(config.vocab_size, *shape, config.num_eval_examples,
                            sweep.derive_seed(config.data_seed, variant, *shape, "eval"), variant, **kwargs)
        evals[set_name(*shape)] = {"tokens": ex, "labels": ey}
    return {"tokens": x, "labels": y}, evals


def run_dir(workdir: str, variant: str, model: str, seq_len: int, pairs: int, d_model: int, lr: float) -> str:
    return os.path.join(workdir, "runs", variant, model, set_name(seq_len, pairs), f"d{d_model}_lr{lr:.2e}")


def runs(config, workdir: str, mesh=None) -> list[sweep.Run]:
    """The runs of the config's grid, each with its identity (from the config alone: the folder of every run
    is checked before anything trains); the data of a (variant, training shape) is made when its first run
    trains."""
    grid = [(v, s, m, d, lr) for v in config.variants for s in config.train_shapes for m in config.models
            for d in config.d_models for lr in config.learning_rates]
    cache, shapes = {}, {}

    def train_run(i, variant, seq_len, pairs, name, d_model, lr, folder, description):
        key = (variant, seq_len, pairs)
        if key not in cache:
            cache.clear()
            cache[key] = datasets(config, variant, seq_len, pairs)
        train_data, evals = cache[key]
        logging.info("[%d/%d] %s", i + 1, len(grid), os.path.relpath(folder, workdir))
        model = sweep.model_from_config(config, name, config.vocab_size, d_model)
        training.train(model, sweep.settings_from_config(config, lr), train_data, evals, folder,
                       mesh=mesh or training.data_mesh(), description=description, on_step=sweep.kill_hook(config),
                       desc=f"{variant} {name} d{d_model} lr{lr:.0e}")

    out = []
    for i, (variant, (seq_len, pairs), name, d_model, lr) in enumerate(grid):
        folder = run_dir(workdir, variant, name, seq_len, pairs, d_model, lr)
        description = {"experiment": "mqar", "variant": variant, "model": name, "d_model": d_model,
                       "learning_rate": lr, "seq_len": seq_len, "num_kv_pairs": pairs,
                       "vocab_size": config.vocab_size, "backend": config.backend, "conv_size": config.conv_size,
                       "mlp_ratio": config.mlp_ratio, "num_layers": config.num_layers, "head_dim": config.head_dim,
                       "data_seed": config.data_seed, "task": _task_kwargs(config), **models.recorded_options(name)}
        if (variant, seq_len, pairs) not in shapes:
            shapes[variant, seq_len, pairs] = eval_shapes(config, variant, seq_len, pairs)
        identity = training.run_identity(
            description, sweep.settings_from_config(config, lr), (config.num_train_examples, seq_len),
            {set_name(*shape): (config.num_eval_examples, shape[0]) for shape in shapes[variant, seq_len, pairs]})
        out.append(sweep.Run(folder, identity, functools.partial(train_run, i, variant, seq_len, pairs, name, d_model,
                                                                  lr, folder, description)))
    return out


def run(config, workdir: str) -> list[dict]:
    """Train every run of the grid that has not finished; return the records of the grid. A run folder that
    holds a run of other settings is an error before anything trains (`sweep.check_runs`)."""
    check(config)
    sweep.quiet_orbax()
    return sweep.run_all(runs(config, workdir, training.data_mesh()))


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------

def rows(records: list[dict]) -> list[dict]:
    """One flat row per run; ``status`` is ``finished`` or ``diverged`` (then without accuracies)."""
    out = []
    for r in records:
        d = r["description"]
        row = {k: d[k] for k in ("variant", "model", "d_model", "learning_rate", "seq_len", "num_kv_pairs")}
        row["status"] = r.get("status", "finished")
        for name, metrics in r["eval"].items():
            row[f"accuracy_{name}"] = metrics["accuracy"]
        row.update({"train_loss": r["final_train"].get("loss"), "train_accuracy": r["final_train"].get("accuracy"),
                    "tokens_per_second": r["throughput"].get("tokens_per_second"),
                    "seconds_per_step": r["throughput"].get("seconds_per_step"),
                    "tokens_per_step": r["throughput"].get("tokens_per_step"), "num_params": r["num_params"],
                    "steps": r["steps"], "platform": r.get("platform"), "devices": r.get("devices"),
                    "backend": d.get("backend"), "run_dir": r["run_dir"]})
        out.append(row)
    return out


def _in_distribution(record: dict) -> float:
    d = record["description"]
    return record["eval"][set_name(d["seq_len"], d["num_kv_pairs"])]["accuracy"]


def best_records(records: list[dict], *, trained_only: bool = False) -> dict:
    """The best learning rate's record of each (variant, seq_len, pairs, model, d_model) by the accuracy at
    the training shape; diverged runs are never chosen, and a cell whose runs all diverged is kept (as one of
    them) unless ``trained_only``."""
    key = lambda r: tuple(r["description"][k] for k in ("variant", "seq_len", "num_kv_pairs", "model", "d_model"))
    best = sweep.best_by(records, key, _in_distribution)
    return {k: r for k, r in best.items() if not (trained_only and training.is_diverged(r))}


def table(records: list[dict]) -> str:
    best = best_records(records)
    header = ["variant", "train (L, P)", "model", "d_model", "best lr", "accuracy", "beyond training",
              "tokens/s", "params"]
    out = []
    for (variant, seq_len, pairs, model, d_model), r in sorted(best.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], list(models.MODELS).index(kv[0][3]), kv[0][4])):
        if training.is_diverged(r):
            out.append([variant, f"({seq_len}, {pairs})", model, d_model, "-", "diverged", "-", "-", r["num_params"]])
            continue
        own = set_name(seq_len, pairs)
        beyond = ", ".join(f"{n.replace('_', ' ')}: {m['accuracy']:.3f}" for n, m in r["eval"].items() if n != own)
        out.append([variant, f"({seq_len}, {pairs})", model, d_model, f"{r['description']['learning_rate']:.1e}",
                    f"{r['eval'][own]['accuracy']:.3f}", beyond or "-",
                    sweep.fmt_rate(r["throughput"].get("tokens_per_second")), r["num_params"]])
    return common.markdown_table(header, out)


def model_color(name: str) -> str:
    """One colour per model in every panel and figure (the colour cycle would shift where a model is missing)."""
    return f"C{list(models.MODELS).index(name) % 10}"


def _plot_panels(path: str, rows: list, variants: list[str], points, title, xlabel: str, ticks) -> None:
    """A grid of accuracy panels, one row per entry of ``rows`` and one column per variant, one line per model
    (``points(row, variant, model)`` -> [(x, accuracy), ...]); a panel without data is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(variants), figsize=(3.6 * len(variants), 3.0 * len(rows)),
                             squeeze=False, sharey=True)
    handles = {}
    for i, row in enumerate(rows):
        for j, variant in enumerate(variants):
            ax = axes[i][j]
            lines = {m: points(row, variant, m) for m in models.MODELS}
            if not any(lines.values()):
                ax.set_visible(False)
                continue
            for model, xy in lines.items():
                if xy:
                    handles[model], = ax.plot(*zip(*xy), marker="o", label=model, color=model_color(model))
            ax.set_xscale("log", base=2)
            ax.set_xticks(*ticks(row, variant))
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(title(row, variant), fontsize=9)
            ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel("accuracy (best lr)")
            ax.grid(alpha=0.3)
    names = [m for m in models.MODELS if m in handles]
    fig.legend([handles[m] for m in names], names, loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variants(keys, index: int) -> list[str]:
    return [v for v in tasks.MQAR_VARIANTS if any(k[index] == v for k in keys)]


def plot(records: list[dict], path: str) -> None:
    """Accuracy against d_model: one row of panels per training shape, one panel per variant (no figure when
    every run diverged)."""
    best = best_records(records, trained_only=True)
    if not best:
        return
    shapes = sorted(dict.fromkeys((k[1], k[2]) for k in best))
    ds = sorted({k[4] for k in best})

    def points(shape, variant, model):
        return sorted((k[4], _in_distribution(r)) for k, r in best.items()
                      if (k[0], (k[1], k[2]), k[3]) == (variant, shape, model))

    _plot_panels(path, shapes, _variants(best, 0), points, lambda s, v: f"{v}, L={s[0]}, P={s[1]}", "d_model",
                 lambda s, v: (ds, [str(d) for d in ds]))


def _shape_series(best: dict) -> dict:
    """{(d_model, variant, model): [(seq_len, pairs, accuracy), ...]} for the cells trained at several shapes."""
    series = {}
    for (variant, seq_len, pairs, model, d_model), r in best.items():
        series.setdefault((d_model, variant, model), []).append((seq_len, pairs, _in_distribution(r)))
    return {k: sorted(v) for k, v in series.items() if len(v) > 1}


def plot_shapes(records: list[dict], path: str) -> None:
    """Accuracy against the training sequence length (and its number of pairs): one row of panels per d_model
    that was trained at several shapes, one panel per variant, one line per model."""
    series = _shape_series(best_records(records, trained_only=True))

    def ticks(d_model, variant):
        shapes = sorted({(L, P) for k, v in series.items() if k[:2] == (d_model, variant) for L, P, _ in v})
        return [L for L, _ in shapes], [f"{L}\n(P={P})" for L, P in shapes]

    _plot_panels(path, sorted({k[0] for k in series}), _variants(series, 1),
                 lambda d, v, m: [(L, a) for L, _, a in series.get((d, v, m), [])],
                 lambda d, v: f"{v}, d_model={d}", "training sequence length", ticks)


def report(workdir: str) -> list[dict]:
    """Collect every finished MQAR run of ``workdir`` into results.csv, table.md and the figure."""
    records = [r for r in sweep.collect(workdir) if r["description"].get("experiment") == "mqar"]
    if not records:
        return records
    sweep.write_report(workdir, rows(records), "MQAR: accuracy at the training shape (best learning rate), beyond "
                       "it (longer sequences, more pairs), and the training step's throughput.", table(records),
                       lambda path: plot(records, path), "accuracy_vs_d_model.png")
    if _shape_series(best_records(records, trained_only=True)):
        plot_shapes(records, os.path.join(workdir, "accuracy_vs_seq_len.png"))
    return records


def main(config, workdir: str) -> None:
    """Train what has not finished, then (``config.report``) report every finished run of the workdir; a
    `common.Diverged` (exit status 3) afterwards if some run of the config diverged. ``config.check_only``:
    only check every run folder of the grid against the config (`sweep.check_runs`)."""
    if config.check_only:
        check(config)
        sweep.check_runs(runs(config, workdir))
        return
    records = run(config, workdir)
    if config.report:
        report(workdir)
    error = sweep.diverged_error(records)
    if error is not None:
        raise error


if __name__ == "__main__":
    common.run_app(main, config="configs/mqar.py", outputs="the runs, results.csv, table.md and the figures",
                   check=check)
