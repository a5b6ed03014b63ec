"""MQAR and its variants, trained: accuracy against d_model per sequence layer, as in Zoology.

    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar
    python -m experiments.mqar --config=configs/mqar.py --config.smoke=True --workdir=/tmp/mqar

For every (variant, training set, model, d_model, learning rate, seed) of the config, a 2-layer model
(`experiments.models`) is trained on `experiments.tasks.mqar` data (`experiments.training`: AdamW, warm-up +
cosine, orbax checkpoints, early stop at ``stop_accuracy`` on the validation split) in its own folder under
``workdir/runs``, then evaluated on the test split: at its training shape and beyond (longer sequences, more
pairs). A training set is one shape ``(L, P)`` of ``config.train_shapes``, or, with ``config.train_mixture``,
Zoology's mixed-length set ("original MQAR": several shapes padded to the longest, tested on
``config.test_shapes``); with ``config.pack`` its examples are packed end to end into rows (`tasks.pack`,
`packed_rows`; evaluation stays padded). With ``config.vectorize`` (default) the runs that differ only in
their learning rate and seed train as one program (`sweep.run_all`), on every local device. Finished runs are
skipped, so an interrupted sweep resumes; a run folder that holds a run of other settings is an error before
anything trains.

Then every finished run of the workdir is collected (`report`) into ``results.csv`` (one row per run),
``table.md`` (per variant, training set, model and d_model: the learning rate with the best mean validation
accuracy over seeds, and at that rate the test accuracies, mean ± spread over seeds), ``accuracy_vs_d_model.png``
and ``accuracy_vs_state_size.png`` (error bars: the spread over seeds) and, where cells were trained at several
shapes, ``accuracy_vs_seq_len.png``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np
from absl import logging

from experiments import common, models, plotting, sweep, tasks, training

VALID = "valid"          # the validation split (at the training shapes): early stop and the learning rate
MIXED = "mixed"          # the name of Zoology's mixed-length training set


def set_name(seq_len: int, pairs: int) -> str:
    return f"L{seq_len}_P{pairs}"


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """A training set of the grid: ``name`` (``L<L>_P<P>``, or `MIXED`) and its ``parts`` ``((L, P, examples),
    ...)``, padded to the longest ``L`` when there are several."""

    name: str
    parts: tuple

    @property
    def seq_len(self) -> int:
        return max(part[0] for part in self.parts)

    @property
    def pairs(self) -> int:
        return max(part[1] for part in self.parts)


def training_sets(config, variant: Optional[str] = None) -> list[TrainingSet]:
    """``config.train_mixture`` as one mixed set when given, else one set per shape of ``config.train_shapes``;
    with ``variant``, only the sets whose every part the variant's layout fits (`check` has made sure that each
    variant fits at least one, and logged the others: e.g. Block-MQAR cannot hold 64 pairs in 512 tokens)."""
    if config.train_mixture:
        sets = [TrainingSet(MIXED, tuple(tuple(int(x) for x in part) for part in config.train_mixture))]
    else:
        sets = [TrainingSet(set_name(L, P), ((int(L), int(P), config.num_train_examples),))
                for L, P in config.train_shapes]
    if variant is None:
        return sets
    return [t for t in sets if not any(_fits(config, variant, (L, P)) for L, P, _ in t.parts)]


def _task_kwargs(config) -> dict:
    kwargs = {"num_updates": config.num_updates or None, "block_gap": config.block_gap, "power_a": config.power_a,
              "random_filler": config.random_filler}
    if config.vocabulary != "split":        # recorded when it is not the vocabulary of every earlier run
        kwargs["vocabulary"] = config.vocabulary
    return kwargs


def _fits(config, variant: str, shape) -> Optional[str]:
    """None when the variant's layout fits ``shape``, else why not."""
    try:
        tasks.mqar_layout(*shape, variant, num_updates=_task_kwargs(config)["num_updates"], block_gap=config.block_gap)
    except tasks.TaskError as e:
        return str(e)
    return None


def test_shapes(config, variant: str, train_set: TrainingSet) -> list[tuple[int, int]]:
    """The test shapes of a training set that the variant's layout fits: ``config.test_shapes`` when given,
    else the training shape times each of ``config.eval_multipliers``."""
    if config.test_shapes:
        candidates = [tuple(shape) for shape in config.test_shapes]
    else:
        (seq_len, pairs, _), = train_set.parts
        candidates = [(seq_len * lx, pairs * px) for lx, px in config.eval_multipliers]
    shapes = []
    for shape in candidates:
        why = _fits(config, variant, shape)
        if why:
            logging.info("test shape %s skipped for %s: %s", shape, variant, why)
        elif shape not in shapes:
            shapes.append(shape)
    return shapes


def _valid_parts(config, train_set: TrainingSet) -> list[tuple[int, int, int]]:
    """The validation split: ``num_valid_examples`` at the training shapes, in the proportions of the training set."""
    total = sum(n for _, _, n in train_set.parts)
    return [(L, P, max(1, round(config.num_valid_examples * n / total))) for L, P, n in train_set.parts]


def check(config) -> None:
    """Fail before any training on a config that cannot run."""
    common.check_choice("variants", config.variants, tasks.MQAR_VARIANTS)
    common.check_choice("vocabulary", (config.vocabulary,), tasks.VOCABULARIES)
    models.check_models(config.models)
    if not config.d_models or min(config.d_models) < 1 or not config.learning_rates or not config.seeds:
        raise ValueError("config.d_models, config.learning_rates and config.seeds must be non-empty, d_model "
                         "positive.")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"config.seeds={config.seeds}: a seed given twice; accepted: distinct integers >= 0.")
    if config.train_mixture and not config.test_shapes:
        raise ValueError("config.train_mixture needs config.test_shapes (the shapes to test the mixed-length "
                         "training on).")
    if not config.train_mixture and not config.train_shapes:
        raise ValueError("config.train_shapes is empty (and no config.train_mixture): nothing to train on.")
    for lr in config.learning_rates:
        sweep.settings_from_config(config, lr, config.seeds[0], stop_set=VALID)   # its own errors, e.g. early stop
    field = f"config.train_{'mixture' if config.train_mixture else 'shapes'}"
    for variant in config.variants:
        unfit = {(L, P): _fits(config, variant, (L, P)) for t in training_sets(config) for L, P, _ in t.parts}
        unfit = {shape: why for shape, why in unfit.items() if why}
        if not training_sets(config, variant):       # nothing of this variant could train: the config is wrong
            shape, why = next(iter(unfit.items()))
            raise ValueError(f"{field}: {shape} does not fit variant {variant!r}: {why}; accepted: at least one "
                             f"training shape that each variant fits.")
        for shape, why in unfit.items():              # the others of the grid train; this cell cannot exist
            logging.info("%s: %s skipped for variant %r: %s", field, shape, variant, why)
        for train_set in training_sets(config):
            if train_set.seq_len >= config.vocab_size:
                raise ValueError(f"config.vocab_size={config.vocab_size} must exceed the training length "
                                 f"{train_set.seq_len}.")
    if config.variants and "block" in config.variants and config.block_gap + 1 <= config.num_layers * (
            config.conv_size - 1):
        logging.warning("block_gap=%d: a value is %d positions after its key, which %d stacked short "
                        "convolutions of size %d can reach; Block-MQAR needs block_gap + 1 > %d.",
                        config.block_gap, config.block_gap + 1, config.num_layers, config.conv_size,
                        config.num_layers * (config.conv_size - 1))


def _lengths(train_set: TrainingSet) -> np.ndarray:
    """Each training example's length, in the order `_generate` lays them out (every example of a part fills
    its ``L`` tokens)."""
    return np.concatenate([np.full(n, L, np.int64) for L, _, n in train_set.parts])


@functools.lru_cache(maxsize=8)
def _pack_rows(train_set: TrainingSet, seed: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(row) for row in tasks.pack_rows(_lengths(train_set), train_set.seq_len, seed))


def packed_rows(config, train_set: TrainingSet) -> list[list[int]]:
    """With ``config.pack``: the training examples laid end to end into rows of the set's longest length
    (`tasks.pack_rows`: best fit, in an order drawn from ``data_seed``), from the shapes alone (the same rows
    for every variant, which all draw the same lengths)."""
    return [list(row) for row in _pack_rows(train_set, sweep.derive_seed(config.data_seed, "pack"))]


PACKED_ROWS_MULTIPLE = 8     # 1, 2, 4 or 8 devices split a packed step; the rows do not depend on the machine


def rows_per_step(config, train_set: TrainingSet, num_rows: int) -> int:
    """The packed rows of a step: ``batch_size`` examples on average, ``batch_size R / N`` of the ``R`` rows
    that hold the ``N`` examples, rounded to the nearest multiple of `PACKED_ROWS_MULTIPLE` (at least one
    multiple), so that the step splits over the devices of any machine with up to 8 of them."""
    rows = config.batch_size * num_rows / sum(n for _, _, n in train_set.parts)
    return PACKED_ROWS_MULTIPLE * max(1, round(rows / PACKED_ROWS_MULTIPLE))


def _generate(config, variant: str, parts, split: str) -> dict:
    """MQAR data of the ``parts`` ``[(L, P, examples), ...]`` (concatenated and padded to the longest when several),
    from seeds of (``data_seed``, variant, shape, ``split``)."""
    kwargs = _task_kwargs(config)
    sets = []
    for L, P, n in parts:
        x, y = tasks.mqar(config.vocab_size, L, P, n, sweep.derive_seed(config.data_seed, variant, L, P, split),
                          variant, **kwargs)
        sets.append({"tokens": x, "labels": y})
    return sets[0] if len(sets) == 1 else tasks.concatenate(sets)


def datasets(config, variant: str, train_set: TrainingSet):
    """The training set and the evaluation sets (`VALID`, then one test set per test shape) of one (variant,
    training set)."""
    train = _generate(config, variant, train_set.parts, "train")
    if config.pack:
        train = tasks.pack(train, _lengths(train_set), packed_rows(config, train_set), train_set.seq_len)
    evals = {VALID: _generate(config, variant, _valid_parts(config, train_set), "valid")}
    for shape in test_shapes(config, variant, train_set):
        evals[set_name(*shape)] = _generate(config, variant, [(*shape, config.num_eval_examples)], "eval")
    return train, evals


def run_dir(workdir: str, variant: str, model: str, train_set: str, d_model: int, lr: float, seed: int) -> str:
    return os.path.join(workdir, "runs", variant, model, train_set, f"d{d_model}_lr{lr:.2e}_seed{seed}")


def runs(config, workdir: str) -> list[sweep.Run]:
    """The runs of the config's grid, each with its identity (from the config alone: the folder of every run
    is checked before anything trains); the data of a (variant, training set) is made when its first run
    trains, and kept while the next runs use it."""
    grid = [(v, t, m, d, lr, s) for v in config.variants for t in training_sets(config, v) for m in config.models
            for d in config.d_models for lr in config.learning_rates for s in config.seeds]
    cache = {}

    def data(variant, train_set):
        key = (variant, train_set)
        if key not in cache:
            cache.clear()
            cache[key] = datasets(config, variant, train_set)
        return cache[key]

    out, shapes = [], {}
    for variant, train_set, name, d_model, lr, seed in grid:
        folder = run_dir(workdir, variant, name, train_set.name, d_model, lr, seed)
        description = {"experiment": "mqar", "variant": variant, "model": name, "d_model": d_model,
                       "learning_rate": lr, "seed": seed, "train_set": train_set.name,
                       "train_parts": [list(part) for part in train_set.parts], "seq_len": train_set.seq_len,
                       "num_kv_pairs": train_set.pairs, "vocab_size": config.vocab_size,
                       "backend": models.lowering_of(name, config.backend), "conv_size": config.conv_size,
                       "mlp_ratio": config.mlp_ratio, "num_layers": config.num_layers,
                       "head_dim": config.head_dim, "data_seed": config.data_seed, "task": _task_kwargs(config),
                       **models.recorded_options(name)}
        if (variant, train_set) not in shapes:
            shapes[variant, train_set] = test_shapes(config, variant, train_set)
        settings = sweep.settings_from_config(config, lr, seed, stop_set=VALID)
        train_shape = (sum(n for _, _, n in train_set.parts), train_set.seq_len)
        if config.pack:     # recorded only when packing, so that every padded run keeps its identity
            rows = packed_rows(config, train_set)
            step_rows = rows_per_step(config, train_set, len(rows))
            description["pack"] = {"rows": len(rows), "rows_per_step": step_rows,
                                   "examples_per_step": config.batch_size,
                                   "max_examples_per_row": max(len(r) for r in rows)}
            settings = dataclasses.replace(settings, batch_size=step_rows)
            train_shape = (len(rows), train_set.seq_len)
        eval_shapes = {VALID: (sum(n for _, _, n in _valid_parts(config, train_set)), train_set.seq_len)}
        eval_shapes.update({set_name(*shape): (config.num_eval_examples, shape[0])
                            for shape in shapes[variant, train_set]})
        identity = training.run_identity(description, settings, train_shape, eval_shapes)
        out.append(sweep.Run(folder, identity, sweep.model_from_config(config, name, config.vocab_size, d_model),
                             settings, functools.partial(data, variant, train_set), (variant, train_set),
                             description, desc=f"{variant} {train_set.name} {name} d{d_model}",
                             on_step=sweep.kill_hook(config)))
    return out


def run(config, workdir: str) -> list[dict]:
    """Train every run of the grid that has not finished; return the records of the grid (`sweep.train_grid`)."""
    return sweep.train_grid(config, workdir, check, runs)


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------

def _train_set(description: dict) -> str:
    return description.get("train_set") or set_name(description["seq_len"], description["num_kv_pairs"])


def _own_test(description: dict) -> Optional[str]:
    """The test set at the training shape (None for a mixed training set)."""
    name = _train_set(description)
    return None if name == MIXED else name


def valid_score(record: dict) -> float:
    """The accuracy that chooses the learning rate: the validation split's (runs recorded before it existed: the
    test accuracy at the training shape)."""
    return record["eval"][VALID if VALID in record["eval"] else _own_test(record["description"])]["accuracy"]


def _reported(record: dict) -> float:
    """The test accuracy that the tables and figures report: at the training shape, or, for a mixed training set,
    the mean over its test sets."""
    own = _own_test(record["description"])
    if own is not None:
        return record["eval"][own]["accuracy"]
    tests = [m["accuracy"] for n, m in record["eval"].items() if n != VALID]
    return sum(tests) / len(tests)


def rows(records: list[dict]) -> list[dict]:
    """One flat row per run; ``status`` is ``finished`` or ``diverged`` (then without accuracies)."""
    out = []
    for r in records:
        d = r["description"]
        row = {k: d.get(k) for k in ("variant", "model", "d_model", "learning_rate")}
        row.update({"seed": sweep.seed_of(r), "train_set": _train_set(d), "seq_len": d["seq_len"],
                    "num_kv_pairs": d["num_kv_pairs"], "status": r.get("status", "finished"),
                    "stopped_at_step": r.get("stopped_at_step")})
        for name, metrics in r["eval"].items():
            row[f"accuracy_{name}"] = metrics["accuracy"]
        row.update({"train_loss": r["final_train"].get("loss"), "train_accuracy": r["final_train"].get("accuracy"),
                    "state_size": _state_size(d), "tokens_per_second": r["throughput"].get("tokens_per_second"),
                    "seconds_per_step": r["throughput"].get("seconds_per_step"),
                    "tokens_per_step": r["throughput"].get("tokens_per_step"),
                    "runs_per_step": r["throughput"].get("runs_per_step", 1), "num_params": r["num_params"],
                    "steps": r["steps"], "platform": r.get("platform"), "devices": r.get("devices"),
                    "backend": d.get("backend"), "run_dir": r["run_dir"]})
        out.append(row)
    return out


def _state_size(description: dict) -> int:
    d = description
    return models.state_size(d["model"], d["d_model"], head_dim=d.get("head_dim", 64),
                             num_layers=d.get("num_layers", 2), seq_len=d["seq_len"])


def _cell(record: dict) -> tuple:
    d = record["description"]
    return d["variant"], _train_set(d), d["model"], d["d_model"]


def best_cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """For each (variant, training set, model, d_model): the records of every seed at the learning rate with the
    best mean validation accuracy (`sweep.seeds_at_best_learning_rate`)."""
    return sweep.seeds_at_best_learning_rate(records, _cell, valid_score)


def _finished(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not training.is_diverged(r)]


def _order(key: tuple) -> tuple:
    variant, train_set, model, d_model = key
    return (tasks.MQAR_VARIANTS.index(variant), _set_order(train_set), list(models.MODELS).index(model), d_model)


def _set_order(name: str) -> tuple:
    if name == MIXED:
        return (1, 0, 0)
    seq_len, pairs = (int(part[1:]) for part in name.split("_"))
    return (0, seq_len, pairs)


def _seeds_cell(runs: list[dict]) -> str:
    finished = _finished(runs)
    diverged = len(runs) - len(finished)
    return f"{len(finished)}" + (f" (+{diverged} diverged)" if diverged else "")


def table(records: list[dict]) -> str:
    best = best_cells(records)
    header = ["variant", "train", "model", "d_model", "best lr", "seeds", "test accuracy", "beyond training",
              "stopped at step", "state size", "tokens/s", "params"]
    out = []
    for key in sorted(best, key=_order):
        variant, train_set, model, d_model = key
        runs = best[key]
        finished = _finished(runs)
        first = runs[0]
        label = train_set if train_set == MIXED else f"({train_set[1:].replace('_P', ', ')})"
        if not finished:
            out.append([variant, label, model, d_model, "-", _seeds_cell(runs), "diverged", "-", "-",
                        _state_size(first["description"]), "-", first["num_params"]])
            continue
        own = _own_test(first["description"])
        tests = [n for n in finished[0]["eval"] if n not in (VALID, own)]
        beyond = ", ".join(f"{n.replace('_', ' ')}: {sweep.fmt_mean_spread([r['eval'][n]['accuracy'] for r in finished])}"
                           for n in tests)
        stops = [r.get("stopped_at_step") for r in finished]
        stopped = ", ".join("-" if s is None else str(s) for s in stops)
        out.append([variant, label, model, d_model, f"{first['description']['learning_rate']:.1e}", _seeds_cell(runs),
                    sweep.fmt_mean_spread([_reported(r) for r in finished]), beyond or "-", stopped,
                    _state_size(first["description"]),
                    sweep.fmt_rate(finished[0]["throughput"].get("tokens_per_second")), first["num_params"]])
    return common.markdown_table(header, out)


def _plot_panels(path: str, panels: list, points, title, xlabel: str, ticks, *, xscale_base: int = 2) -> None:
    """A grid of accuracy panels (one row per entry of ``panels``, each a list of ``(row, variant)``), one line per
    model with error bars (``points(row, variant, model)`` -> [(x, mean, spread), ...]); a panel without data is
    left out."""
    import matplotlib.pyplot as plt

    rows_, cols = len(panels), max(len(p) for p in panels)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.8 * cols, 3.1 * rows_), squeeze=False, sharey=True)
    handles = {}
    for i, panel_row in enumerate(panels):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(panel_row):
                ax.set_visible(False)
                continue
            row, variant = panel_row[j]
            lines = {m: points(row, variant, m) for m in models.MODELS}
            if not any(lines.values()):
                ax.set_visible(False)
                continue
            for model, xyz in lines.items():
                if xyz:
                    x, y, e = zip(*xyz)
                    handles[model] = ax.errorbar(x, y, yerr=e, marker="o", markersize=3.5, capsize=2.5, label=model,
                                                 color=plotting.color(model))
            ax.set_xscale("log", base=xscale_base)
            if ticks is not None:
                ax.set_xticks(*ticks(row, variant))
                ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(title(row, variant), fontsize=9)
            ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel("test accuracy (best lr)\nmean ± sd over seeds")
            ax.grid(alpha=0.3)
    names = [m for m in models.MODELS if m in handles]
    fig.legend([handles[m] for m in names], names, loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summaries(records: list[dict]) -> dict[tuple, tuple]:
    """{(variant, training set, model, d_model): (mean, spread, state size)} over the finished seeds of the best
    learning rate."""
    out = {}
    for key, runs in best_cells(records).items():
        finished = _finished(runs)
        if finished:
            mean, spread, _ = sweep.mean_spread([_reported(r) for r in finished])
            out[key] = (mean, spread, _state_size(finished[0]["description"]))
    return out


def _panels_by_set(summaries: dict) -> list[list[tuple]]:
    sets = sorted({k[1] for k in summaries}, key=_set_order)
    variants = [v for v in tasks.MQAR_VARIANTS if any(k[0] == v for k in summaries)]
    return [[(s, v) for v in variants if any(k[:2] == (v, s) for k in summaries)] for s in sets]


def _set_title(train_set: str, variant: str) -> str:
    if train_set == MIXED:
        return f"{variant}, mixed lengths (test mean)"
    seq_len, pairs = (int(part[1:]) for part in train_set.split("_"))
    return f"{variant}, L={seq_len}, P={pairs}"


def plot(records: list[dict], path: str) -> None:
    """Accuracy against d_model: one row of panels per training set, one panel per variant, error bars over seeds
    (no figure when every run diverged)."""
    summaries = _summaries(records)
    if not summaries:
        return
    ds = sorted({k[3] for k in summaries})

    def points(train_set, variant, model):
        return sorted((k[3], m, s) for k, (m, s, _) in summaries.items() if k[:3] == (variant, train_set, model))

    _plot_panels(path, _panels_by_set(summaries), points, lambda s, v: _set_title(s, v), "d_model",
                 lambda s, v: (ds, [str(d) for d in ds]))


def plot_state_size(records: list[dict], path: str) -> None:
    """Accuracy against the state size (`experiments.models.state_size`: the numbers a model carries per
    sequence), as Zoology's recall-memory trade-off: one point per model and d_model, error bars over seeds."""
    summaries = _summaries(records)
    if not summaries:
        return

    def points(train_set, variant, model):
        return sorted((size, m, s) for k, (m, s, size) in summaries.items() if k[:3] == (variant, train_set, model))

    _plot_panels(path, _panels_by_set(summaries), points, lambda s, v: _set_title(s, v),
                 "state size (numbers per sequence)", None)


def _shape_series(summaries: dict) -> dict:
    """{(d_model, variant, model): [(seq_len, pairs, mean, spread), ...]} for the cells trained at several shapes."""
    series = {}
    for (variant, train_set, model, d_model), (mean, spread, _) in summaries.items():
        if train_set != MIXED:
            seq_len, pairs = (int(part[1:]) for part in train_set.split("_"))
            series.setdefault((d_model, variant, model), []).append((seq_len, pairs, mean, spread))
    return {k: sorted(v) for k, v in series.items() if len(v) > 1}


def plot_shapes(records: list[dict], path: str) -> None:
    """Accuracy against the training sequence length (and its number of pairs): one row of panels per d_model
    that was trained at several shapes, one panel per variant, one line per model, error bars over seeds."""
    series = _shape_series(_summaries(records))
    d_models = sorted({k[0] for k in series})
    panels = [[(d, v) for v in tasks.MQAR_VARIANTS if (d, v) in {k[:2] for k in series}] for d in d_models]

    def ticks(d_model, variant):
        shapes = sorted({(L, P) for k, v in series.items() if k[:2] == (d_model, variant) for L, P, _, _ in v})
        return [L for L, _ in shapes], [f"{L}\n(P={P})" for L, P in shapes]

    _plot_panels(path, panels, lambda d, v, m: [(L, a, e) for L, _, a, e in series.get((d, v, m), [])],
                 lambda d, v: f"{v}, d_model={d}", "training sequence length", ticks)


def report(workdir: str) -> list[dict]:
    """Collect every finished MQAR run of ``workdir`` into results.csv, table.md and the figures."""
    records = [r for r in sweep.collect(workdir) if r["description"].get("experiment") == "mqar"]
    if not records:
        return records
    sweep.write_report(workdir, rows(records), "MQAR: per variant, training set, model and d_model, the learning "
                       "rate with the best mean validation accuracy over seeds; at that rate the test accuracy at "
                       "the training shape (for the mixed-length set: the mean over its test shapes) and beyond it, "
                       "mean ± sample standard deviation over the seeds that did not diverge; the steps where each "
                       "seed stopped early ('-': it trained every step); the state size (numbers per sequence); "
                       "the training step's throughput (every run of its program counted).", table(records),
                       lambda path: plot(records, path), "accuracy_vs_d_model.png")
    plot_state_size(records, os.path.join(workdir, "accuracy_vs_state_size.png"))
    if _shape_series(_summaries(records)):
        plot_shapes(records, os.path.join(workdir, "accuracy_vs_seq_len.png"))
    return records


def main(config, workdir: str) -> None:
    """Train, report, and say which runs diverged (`sweep.train_and_report`)."""
    sweep.train_and_report(config, workdir, runs=runs, train=run, report=report, check=check)


if __name__ == "__main__":
    common.run_app(main, config="configs/mqar.py", outputs="the runs, results.csv, table.md and the figures",
                   check=check)
