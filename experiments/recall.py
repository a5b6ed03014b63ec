"""Learned associative recall: trained on one regime, evaluated beyond it.

    python -m experiments.recall --config=configs/recall.py --workdir=runs/recall
    python -m experiments.recall --config=configs/recall.py --config.smoke=True --workdir=/tmp/recall

Each (model, d_model, learning rate, seed) is trained on `experiments.tasks.recall` data (random unit key
vectors, value tokens; ``train_pairs`` pairs in ``train_seq_len`` tokens), stopped early at ``stop_accuracy`` on
a validation split of the training regime, then evaluated on every condition of ``config.eval_conditions``
(the test split): the training regime, more pairs (the memory crowds as the pair count passes the key
dimension), a longer wait before recall, and colliding keys of overlap rho. The runs that differ only in
learning rate and seed train as one program (``config.vectorize``, `sweep.run_all`). Writes ``results.csv``,
``table.md`` (per model and d_model, the learning rate with the best mean validation accuracy over seeds, and at
that rate every condition's accuracy, mean ± spread over seeds; chance is ``1 / num_values``) and
``accuracy_by_condition.png`` (error bars: the spread over seeds).
"""
from __future__ import annotations

import os

from absl import logging

from experiments import common, models, plotting, sweep, tasks, training

VALID = "valid"          # the validation split (the training regime): early stop and the learning rate


def check(config) -> None:
    models.check_models(config.models)
    names = [c[0] for c in config.eval_conditions]
    if len(set(names)) != len(names) or "train" not in names or VALID in names:
        raise ValueError(f"config.eval_conditions: names must be distinct, include 'train' and not be {VALID!r} "
                         f"(the validation split's); got {names}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"config.seeds={config.seeds}: must be non-empty and distinct.")
    for lr in config.learning_rates:
        sweep.settings_from_config(config, lr, config.seeds[0], stop_set=VALID)   # its own errors
    for name, pairs, seq_len, fraction, overlap in config.eval_conditions:
        if seq_len < 3 * pairs:
            raise ValueError(f"config.eval_conditions[{name!r}]: seq_len={seq_len} < 3 * pairs = {3 * pairs}.")
        if not 0 <= fraction <= 1 or not -1 < overlap < 1:
            raise ValueError(f"config.eval_conditions[{name!r}]: collision fraction in [0, 1], overlap in (-1, 1).")


def datasets(config):
    """The vocabulary size, the training set and the evaluation sets (`VALID`, then every condition)."""
    vocab = tasks.recall_vocab_size(config.num_values)
    regime = dict(collision_fraction=config.train_collision_fraction, collision_overlap=config.train_collision_overlap)
    train = tasks.recall(config.num_train_examples, config.train_seq_len, config.train_pairs, config.key_dim,
                         config.num_values, sweep.derive_seed(config.data_seed, "recall", "train"), **regime)
    evals = {VALID: tasks.recall(config.num_valid_examples, config.train_seq_len, config.train_pairs, config.key_dim,
                                 config.num_values, sweep.derive_seed(config.data_seed, "recall", "valid"), **regime)}
    evals.update({name: tasks.recall(config.num_eval_examples, seq_len, pairs, config.key_dim, config.num_values,
                                     sweep.derive_seed(config.data_seed, "recall", name, "eval"),
                                     collision_fraction=fraction, collision_overlap=overlap)
                  for name, pairs, seq_len, fraction, overlap in config.eval_conditions})
    return vocab, train, evals


def runs(config, workdir: str) -> list[sweep.Run]:
    """The runs of the config's grid, each with its identity (from the config alone: the folder of every run
    is checked before anything trains); the data is made when the first run trains."""
    grid = [(m, d, lr, s) for m in config.models for d in config.d_models for lr in config.learning_rates
            for s in config.seeds]
    cache = {}

    def data():
        if not cache:
            cache["sets"] = datasets(config)[1:]
        return cache["sets"]

    eval_shapes = {VALID: (config.num_valid_examples, config.train_seq_len)}
    eval_shapes.update({name: (config.num_eval_examples, seq_len) for name, _, seq_len, _, _ in config.eval_conditions})
    vocab = tasks.recall_vocab_size(config.num_values)
    out = []
    for name, d_model, lr, seed in grid:
        folder = os.path.join(workdir, "runs", name, f"d{d_model}_lr{lr:.2e}_seed{seed}")
        description = {"experiment": "recall", "model": name, "d_model": d_model, "learning_rate": lr, "seed": seed,
                       "key_dim": config.key_dim, "num_values": config.num_values,
                       "train_pairs": config.train_pairs, "train_seq_len": config.train_seq_len,
                       "train_collision_fraction": config.train_collision_fraction,
                       "train_collision_overlap": config.train_collision_overlap,
                       "backend": models.lowering_of(name, config.backend), "conv_size": config.conv_size,
                       "mlp_ratio": config.mlp_ratio, "num_layers": config.num_layers, "head_dim": config.head_dim,
                       "data_seed": config.data_seed,
                       "eval_conditions": [list(c) for c in config.eval_conditions], **models.recorded_options(name)}
        settings = sweep.settings_from_config(config, lr, seed, stop_set=VALID)
        identity = training.run_identity(description, settings, (config.num_train_examples, config.train_seq_len),
                                         eval_shapes)
        out.append(sweep.Run(folder, identity, sweep.model_from_config(config, name, vocab, d_model), settings, data,
                             ("recall",), description, desc=f"recall {name} d{d_model}",
                             on_step=sweep.kill_hook(config)))
    return out


def run(config, workdir: str) -> list[dict]:
    """Train every run of the grid that has not finished; return the records of the grid (`sweep.train_grid`)."""
    return sweep.train_grid(config, workdir, check, runs)


def _score(record: dict) -> float:
    """The accuracy that chooses the learning rate: the validation split's (runs recorded before it existed: the
    training condition's)."""
    return record["eval"][VALID if VALID in record["eval"] else "train"]["accuracy"]


def best_cells(records) -> dict[tuple, list[dict]]:
    """For each (model, d_model): every seed's record at the learning rate with the best mean validation
    accuracy (`sweep.seeds_at_best_learning_rate`)."""
    return sweep.seeds_at_best_learning_rate(
        records, lambda r: (r["description"]["model"], r["description"]["d_model"]), _score)


def _conditions(records) -> list[str]:
    return list(dict.fromkeys(n for r in records for n in r["eval"] if n != VALID))


def _sorted(best: dict) -> list:
    return sorted(best.items(), key=lambda kv: (list(models.MODELS).index(kv[0][0]), kv[0][1]))


def table(records) -> str:
    best = best_cells(records)
    conditions = _conditions(records)
    rows = []
    for (model, d_model), runs in _sorted(best):
        finished = [r for r in runs if not training.is_diverged(r)]
        diverged = len(runs) - len(finished)
        seeds = f"{len(finished)}" + (f" (+{diverged} diverged)" if diverged else "")
        if not finished:                     # every learning rate of this cell diverged
            rows.append([model, d_model, "-", seeds] + ["diverged"] * len(conditions) + ["-", runs[0]["num_params"]])
            continue
        rows.append([model, d_model, f"{runs[0]['description']['learning_rate']:.1e}", seeds]
                    + [sweep.fmt_mean_spread([r["eval"][c]["accuracy"] for r in finished if c in r["eval"]])
                       for c in conditions]
                    + [sweep.fmt_rate(finished[0]["throughput"].get("tokens_per_second")), runs[0]["num_params"]])
    return common.markdown_table(["model", "d_model", "best lr", "seeds"] + conditions + ["tokens/s", "params"], rows)


def plot(records, path: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    best = {k: [r for r in runs if not training.is_diverged(r)] for k, runs in _sorted(best_cells(records))}
    best = {k: runs for k, runs in best.items() if runs}
    if not best:                             # every run diverged: no figure
        return
    conditions = _conditions(records)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(conditions) + 2), 4.2))
    width = 0.8 / max(len(best), 1)
    d_models = sorted({d for _, d in best})
    for i, ((model, d_model), runs) in enumerate(best.items()):
        stats = [sweep.mean_spread([r["eval"][c]["accuracy"] for r in runs if c in r["eval"]]) for c in conditions]
        ax.bar(np.arange(len(conditions)) + i * width - 0.4 + width / 2, [m for m, _, _ in stats], width,
               yerr=[s for _, s, _ in stats], capsize=1.5, label=f"{model} (d={d_model})",
               color=plotting.color(model), alpha=1.0 - 0.5 * d_models.index(d_model) / max(len(d_models), 1))
    chance = 1.0 / records[0]["description"]["num_values"]
    ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(np.arange(len(conditions)), conditions, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (best lr)\nmean ± sd over seeds")
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
        row.update({"seed": sweep.seed_of(r), "status": r.get("status", "finished"),
                    "stopped_at_step": r.get("stopped_at_step")})
        row.update({f"accuracy_{n}": m["accuracy"] for n, m in r["eval"].items()})
        row.update({"tokens_per_second": r["throughput"].get("tokens_per_second"),
                    "runs_per_step": r["throughput"].get("runs_per_step", 1), "num_params": r["num_params"],
                    "steps": r["steps"], "platform": r.get("platform"), "backend": r["description"]["backend"],
                    "run_dir": r["run_dir"]})
        out.append(row)
    chance = 1.0 / records[0]["description"]["num_values"]
    sweep.write_report(workdir, out, f"Learned associative recall: per model and d_model, the learning rate with the "
                       f"best mean validation accuracy over seeds; at that rate the test accuracy of every condition, "
                       f"mean ± sample standard deviation over the seeds that did not diverge; chance {chance:.3f}.",
                       table(records), lambda path: plot(records, path), "accuracy_by_condition.png")
    return records


def main(config, workdir: str) -> None:
    """Train, report, and say which runs diverged (`sweep.train_and_report`)."""
    sweep.train_and_report(config, workdir, runs=runs, train=run, report=report, check=check)


if __name__ == "__main__":
    common.run_app(main, config="configs/recall.py", outputs="the runs, results.csv, table.md and the figures",
                   check=check)
