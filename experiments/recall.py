"""Learned associative recall: trained on one regime, evaluated beyond it.

    python -m experiments.recall --config=configs/recall.py --workdir=runs/recall
    python -m experiments.recall --config=configs/recall.py --config.smoke=True --workdir=/tmp/recall

Each (model, d_model, learning rate) is trained on `experiments.tasks.recall` data (random unit key
vectors, value tokens; ``train_pairs`` pairs in ``train_seq_len`` tokens), then evaluated on every
condition of ``config.eval_conditions``: the training regime, more pairs (the memory crowds as the pair
count passes the key dimension), a longer wait before recall, and colliding keys of overlap rho.
Writes ``results.csv``, ``table.md`` (best learning rate per model and d_model; chance is
``1 / num_values``) and ``accuracy_by_condition.png``.
"""
from __future__ import annotations

import functools
import os

from absl import logging

from experiments import common, models, sweep, tasks, training

def check(config) -> None:
    models.check_models(config.models)
    names = [c[0] for c in config.eval_conditions]
    if len(set(names)) != len(names) or "train" not in names:
        raise ValueError(f"config.eval_conditions: names must be distinct and include 'train'; got {names}.")
    for name, pairs, seq_len, fraction, overlap in config.eval_conditions:
        if seq_len < 3 * pairs:
            raise ValueError(f"config.eval_conditions[{name!r}]: seq_len={seq_len} < 3 * pairs = {3 * pairs}.")
        if not 0 <= fraction <= 1 or not -1 < overlap < 1:
            raise ValueError(f"config.eval_conditions[{name!r}]: collision fraction in [0, 1], overlap in (-1, 1).")


def datasets(config):
    vocab = tasks.recall_vocab_size(config.num_values)
    train = tasks.recall(config.num_train_examples, config.train_seq_len, config.train_pairs, config.key_dim,
                         config.num_values, sweep.derive_seed(config.data_seed, "recall", "train"),
                         collision_fraction=config.train_collision_fraction,
                         collision_overlap=config.train_collision_overlap)
    evals = {name: tasks.recall(config.num_eval_examples, seq_len, pairs, config.key_dim, config.num_values,
                                sweep.derive_seed(config.data_seed, "recall", name, "eval"),
                                collision_fraction=fraction, collision_overlap=overlap)
             for name, pairs, seq_len, fraction, overlap in config.eval_conditions}
    return vocab, train, evals


def runs(config, workdir: str, mesh=None) -> list[sweep.Run]:
    """The runs of the config's grid, each with its identity (from the config alone: the folder of every run
    is checked before anything trains); the data is made when the first run trains."""
    grid = [(m, d, lr) for m in config.models for d in config.d_models for lr in config.learning_rates]
    data = {}
    eval_shapes = {name: (config.num_eval_examples, seq_len) for name, _, seq_len, _, _ in config.eval_conditions}

    def train_run(i, name, d_model, lr, folder, description):
        if not data:
            data["sets"] = datasets(config)
        vocab, train_data, evals = data["sets"]
        logging.info("[%d/%d] %s", i + 1, len(grid), os.path.relpath(folder, workdir))
        training.train(sweep.model_from_config(config, name, vocab, d_model),
                       sweep.settings_from_config(config, lr), train_data, evals, folder,
                       mesh=mesh or training.data_mesh(), description=description, on_step=sweep.kill_hook(config),
                       desc=f"recall {name} d{d_model} lr{lr:.0e}")

    out = []
    for i, (name, d_model, lr) in enumerate(grid):
        folder = os.path.join(workdir, "runs", name, f"d{d_model}_lr{lr:.2e}")
        description = {"experiment": "recall", "model": name, "d_model": d_model, "learning_rate": lr,
                       "key_dim": config.key_dim, "num_values": config.num_values,
                       "train_pairs": config.train_pairs, "train_seq_len": config.train_seq_len,
                       "train_collision_fraction": config.train_collision_fraction,
                       "train_collision_overlap": config.train_collision_overlap,
                       "backend": config.backend, "conv_size": config.conv_size, "mlp_ratio": config.mlp_ratio,
                       "num_layers": config.num_layers, "head_dim": config.head_dim, "data_seed": config.data_seed,
                       "eval_conditions": [list(c) for c in config.eval_conditions], **models.recorded_options(name)}
        identity = training.run_identity(description, sweep.settings_from_config(config, lr),
                                         (config.num_train_examples, config.train_seq_len), eval_shapes)
        out.append(sweep.Run(folder, identity, functools.partial(train_run, i, name, d_model, lr, folder,
                                                                  description)))
    return out


def run(config, workdir: str) -> list[dict]:
    """Train every run of the grid that has not finished; return the records of the grid. A run folder that
    holds a run of other settings is an error before anything trains (`sweep.check_runs`)."""
    check(config)
    sweep.quiet_orbax()
    return sweep.run_all(runs(config, workdir, training.data_mesh()))


def _best(records):
    key = lambda r: (r["description"]["model"], r["description"]["d_model"])
    return sweep.best_by(records, key, lambda r: r["eval"]["train"]["accuracy"])


def _conditions(records) -> list[str]:
    return list(dict.fromkeys(n for r in records for n in r["eval"]))


def table(records) -> str:
    best = _best(records)
    conditions = _conditions(records)
    rows = []
    for (model, d_model), r in sorted(best.items(), key=lambda kv: (list(models.MODELS).index(kv[0][0]), kv[0][1])):
        if training.is_diverged(r):          # every learning rate of this cell diverged
            rows.append([model, d_model, "-"] + ["diverged"] * len(conditions) + ["-", r["num_params"]])
            continue
        rows.append([model, d_model, f"{r['description']['learning_rate']:.1e}"]
                    + [f"{r['eval'][c]['accuracy']:.3f}" if c in r["eval"] else "-" for c in conditions]
                    + [sweep.fmt_rate(r["throughput"].get("tokens_per_second")), r["num_params"]])
    return common.markdown_table(["model", "d_model", "best lr"] + conditions + ["tokens/s", "params"], rows)


def plot(records, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    best = {k: r for k, r in _best(records).items() if not training.is_diverged(r)}
    if not best:                             # every run diverged: no figure
        return
    conditions = _conditions(records)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(conditions) + 2), 4.2))
    width = 0.8 / max(len(best), 1)
    for i, ((model, d_model), r) in enumerate(sorted(best.items(), key=lambda kv: (
            list(models.MODELS).index(kv[0][0]), kv[0][1]))):
        acc = [r["eval"].get(c, {}).get("accuracy", np.nan) for c in conditions]
        ax.bar(np.arange(len(conditions)) + i * width - 0.4 + width / 2, acc, width, label=f"{model} (d={d_model})")
    chance = 1.0 / records[0]["description"]["num_values"]
    ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(np.arange(len(conditions)), conditions, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (best lr)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir: str) -> list[dict]:
    records = [r for r in sweep.collect(workdir) if r["description"].get("experiment") == "recall"]
    if not records:
        return records
    out = []
    for r in records:
        row = {k: r["description"][k] for k in ("model", "d_model", "learning_rate")}
        row["status"] = r.get("status", "finished")
        row.update({f"accuracy_{n}": m["accuracy"] for n, m in r["eval"].items()})
        row.update({"tokens_per_second": r["throughput"].get("tokens_per_second"), "num_params": r["num_params"],
                    "steps": r["steps"], "platform": r.get("platform"), "backend": r["description"]["backend"],
                    "run_dir": r["run_dir"]})
        out.append(row)
    chance = 1.0 / records[0]["description"]["num_values"]
    sweep.write_report(workdir, out, f"Learned associative recall: accuracy per evaluation condition (best learning "
                       f"rate by the training condition); chance {chance:.3f}.", table(records),
                       lambda path: plot(records, path), "accuracy_by_condition.png")
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
    common.run_app(main, config="configs/recall.py", outputs="the runs, results.csv, table.md and the figures",
                   check=check)
