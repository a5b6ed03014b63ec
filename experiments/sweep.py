"""What the trained recall experiments share: the model and settings from a config, the grid of runs
(each in its own folder, skipped when finished, resumed when interrupted, refused when the folder holds a
run of other settings), the sweep engine that trains the runs sharing a compiled step as one program
(`run_all` with ``vectorize``: a learning-rate x seed block per model, data and d_model,
`experiments.training.train_block`), and the collection of every finished run of a workdir into one CSV,
one table and figures (a diverged run is reported as such, never as a result; several seeds as their mean
and spread)."""
from __future__ import annotations

import csv
import dataclasses
import glob
import logging as pylogging
import math
import os
import signal
import zlib
from typing import Callable, Iterable, Optional, Sequence

import flax.linen as nn
import numpy as np
from absl import logging

from experiments import common, models, training


class _QuietOrbax(pylogging.Filter):
    """Drop orbax's INFO lines (several per checkpoint) from the absl log; keep its warnings."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
    logger = pylogging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())


def model_from_config(config, name: str, vocab_size: int, d_model: int) -> models.LanguageModel:
    """Model ``name`` of the config, its design layers on ``config.backend`` resolved on this platform
    (`models.lowering_of`: the backend its run records)."""
    return models.LanguageModel(name, vocab_size, d_model, num_layers=config.num_layers, head_dim=config.head_dim,
                                backend=models.lowering_of(name, config.backend), conv_size=config.conv_size,
                                mlp_ratio=config.mlp_ratio)


def kill_hook(config) -> Optional[Callable[[int], None]]:
    """``config.kill_at_step``: SIGKILL this process right after that step (to check resuming by hand)."""
    if not config.get("kill_at_step"):
        return None

    def hook(step: int) -> None:
        if step == config.kill_at_step:
            logging.warning("kill_at_step=%d: killing the process", step)
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def derive_seed(*parts) -> int:
    """A data seed from the config seed and what the data is (variant, shape, split)."""
    words = [int(p) if isinstance(p, (int, np.integer)) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its folder, its `training.run_identity` (computed from the config alone, so that
    every folder of the grid is checked before anything trains), and what trains it: the ``model``, the
    ``settings``, ``data()`` (the training set and the evaluation sets, ``(train, {name: set})``; the caller
    caches them, runs with the same ``data_key`` get the same sets) and the ``description`` that its
    ``run.json`` records. Runs with the same `block` (model, data, settings but the learning rate and the
    seed) can train as one program (`run_all`)."""

    folder: str
    identity: dict
    model: nn.Module
    settings: training.TrainSettings
    data: Callable[[], tuple]
    data_key: tuple
    description: dict
    desc: str = "train"
    on_step: Optional[Callable[[int], None]] = None

    @property
    def block(self) -> tuple:
        return (self.model, training.block_key(self.settings), self.data_key)

    def train(self, mesh=None) -> dict:
        """Train this run alone (resuming) and write its ``results.json``."""
        train_data, evals = self.data()
        return training.train(self.model, self.settings, train_data, evals, self.folder, mesh=mesh,
                              description=self.description, on_step=self.on_step, desc=self.desc)


def check_runs(runs: Sequence[Run]) -> None:
    """Before any training: every folder of the grid that holds a run holds one of the asked settings (else a
    `common.RunFileError` naming its ``run.json``, the differing fields and what to do, and how many other
    folders differ), so that a changed config never skips to, resumes or reports an old result."""
    errors = []
    for run in runs:
        try:
            training.check_run_folder(run.folder, run.identity)
        except common.RunFileError as error:
            errors.append(error)
    if errors:
        more = f" ({len(errors) - 1} more run folders of this sweep differ too.)" if len(errors) > 1 else ""
        raise common.RunFileError(f"{errors[0]}{more}")


def finished_record(run: Run) -> Optional[dict]:
    """The ``results.json`` of ``run.folder`` if the run finished (or diverged) with the asked settings, else
    None (also when it cannot be read: the run then resumes from its last checkpoint and is evaluated again,
    with a warning)."""
    training.check_run_folder(run.folder, run.identity)
    path = os.path.join(run.folder, "results.json")
    if os.path.exists(path):
        try:
            record = common.read_json(path, "rebuilding it from the run's last checkpoint")
        except common.RunFileError as error:
            logging.warning("%s", error)
        else:
            logging.info("%s: finished before, skipped", run.folder)
            return record
    return None


def _read_results(run: Run) -> dict:
    return common.read_json(os.path.join(run.folder, "results.json"),
                            "run the experiment again to rebuild it from the run's last checkpoint.")


def run_once(run: Run) -> dict:
    """The ``results.json`` of ``run.folder`` if the run finished (`finished_record`), else train it alone
    (resuming) and return its results."""
    record = finished_record(run)
    if record is not None:
        return record
    run.train()
    return _read_results(run)


def blocks(runs: Sequence[Run], block_runs: int = 0) -> list[list[Run]]:
    """The runs grouped by `Run.block` (in the order of their first run), each group cut into blocks of at
    most ``block_runs`` runs (0: no limit)."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run.block, []).append(run)
    size = block_runs or max((len(g) for g in groups.values()), default=1)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def train_grid(config, workdir: str, check, runs) -> list[dict]:
    """A sweep's ``run``: ``check(config)`` (every error before anything trains), then train every run of
    ``runs(config, workdir)`` that has not finished (a run folder holding a run of other settings is an
    error, `check_runs`) and return the records of the grid."""
    check(config)
    quiet_orbax()
    return run_all(runs(config, workdir), vectorize=config.vectorize, block_runs=config.block_runs)


def run_all(runs: Sequence[Run], *, vectorize: bool = True, block_runs: int = 0, devices=None) -> list[dict]:
    """`check_runs`, then train every run that has not finished, and return the records of ``runs``, in order,
    each with its ``run_dir``. ``vectorize``: the unfinished runs that share a model, its data and every
    setting but the learning rate and the seed train as one program (`training.train_block`, at most
    ``block_runs`` runs per program, 0: all of them; a block of one run trains alone), else each run alone
    in turn. ``devices``: default every local device."""
    check_runs(runs)
    records = {run.folder: finished_record(run) for run in runs}
    todo = [run for run in runs if records[run.folder] is None]
    if vectorize:
        for block in blocks(todo, block_runs):
            if len(block) == 1:
                block[0].train(training.data_mesh(devices))
                continue
            first = block[0]
            train_data, evals = first.data()
            logging.info("training %d runs as one program: %s", len(block),
                         ", ".join(os.path.basename(run.folder) for run in block))
            training.train_block(first.model, [training.RunSpec(run.folder, run.settings, run.description)
                                               for run in block], train_data, evals, devices=devices,
                                 on_step=first.on_step, desc=f"{first.desc} ({len(block)} runs)")
    else:
        for run in todo:
            run.train(training.data_mesh(devices))
    return [{**(records[run.folder] or _read_results(run)), "run_dir": run.folder} for run in runs]


def diverged_error(records: Sequence[dict]) -> Optional[common.Diverged]:
    """A `common.Diverged` naming the runs among ``records`` (with their ``run_dir``) whose loss was not
    finite, or None."""
    bad = [r for r in records if training.is_diverged(r)]
    if not bad:
        return None
    names = ", ".join(f"{r['run_dir']} (step {r.get('diverged_at_step')})" for r in bad[:5]) + (
        ", ..." if len(bad) > 5 else "")
    return common.Diverged(f"{len(bad)} of {len(records)} runs diverged (loss not finite): {names}; they are "
                           "marked diverged in results.csv (and table.md, where no learning rate trained) and never "
                           "chosen as the best learning rate; a smaller learning rate may train.")


def collect(workdir: str) -> list[dict]:
    """Every finished (or diverged) run under ``workdir/runs`` (its ``results.json``), in a stable order."""
    records = []
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "**", "results.json"), recursive=True)):
        record = common.read_json(path, "run the experiment again with this run's config to rebuild it from its "
                                        f"last checkpoint, or delete {os.path.dirname(path)}.")
        record["run_dir"] = os.path.relpath(os.path.dirname(path), workdir)
        records.append(record)
    return records


def write_report(workdir: str, rows: Sequence[dict], title: str, text: str, plot: Callable[[str], None],
                 figure: str) -> None:
    """``results.csv`` (``rows``), ``table.md`` (``title``, then the table ``text``) and the figure
    (``plot(path)``) into ``workdir``; print the table."""
    write_csv(os.path.join(workdir, "results.csv"), rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(f"{title}\n\n{text}\n")
    plot(os.path.join(workdir, figure))
    print(text)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def seeds_at_best_learning_rate(records: Iterable[dict], cell: Callable[[dict], tuple],
                                score: Callable[[dict], float]) -> dict[tuple, list[dict]]:
    """For each cell (``cell(record)``: a grid point less its learning rate and seed), the records of every seed
    at the learning rate whose mean ``score`` over its seeds is the highest (on the validation split); a
    diverged seed counts 0, so that a rate that diverges for some seeds loses to one that trains them all as
    well. Ties go to the smaller rate. A cell whose every run diverged keeps its records (the table says
    so)."""
    by_rate: dict = {}
    for record in records:
        by_rate.setdefault(cell(record), {}).setdefault(record["description"]["learning_rate"], []).append(record)
    best = {}
    for key, rates in by_rate.items():
        def mean_score(rate):
            runs = rates[rate]
            return sum(0.0 if training.is_diverged(r) else score(r) for r in runs) / len(runs)
        trained = [rate for rate in sorted(rates) if any(not training.is_diverged(r) for r in rates[rate])]
        chosen = max(trained, key=mean_score) if trained else min(rates)
        best[key] = sorted(rates[chosen], key=seed_of)
    return best


def seed_of(record: dict) -> int:
    """The seed of a run (its settings'; records written before seeds were a grid axis have seed 0)."""
    return int(record.get("settings", {}).get("seed", 0))


def mean_spread(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, spread, n)`` of values over seeds: the spread is the sample standard deviation (``ddof=1``; 0 for
    one seed)."""
    values = np.asarray(list(values), float)
    if values.size == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0, int(values.size)


def fmt_mean_spread(values: Sequence[float], digits: int = 3) -> str:
    """``"0.987 ± 0.004"`` (mean ± sample standard deviation over seeds); one value alone; ``-`` for none."""
    mean, spread, n = mean_spread(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def fmt_rate(tokens_per_second: Optional[float]) -> str:
    if not tokens_per_second:
        return "-"
    return f"{tokens_per_second / 1e3:.1f}k" if tokens_per_second < 1e6 else f"{tokens_per_second / 1e6:.2f}M"


def settings_from_config(config, learning_rate: float, seed: int = 0, **overrides) -> training.TrainSettings:
    """The `training.TrainSettings` of one run of the grid (``learning_rate``, ``seed``; the rest from the
    config, then ``overrides``)."""
    return training.TrainSettings.from_config(config, learning_rate=learning_rate, seed=seed, **overrides)


def train_and_report(config, workdir: str, *, runs: Callable, train: Callable, report: Callable,
                     check: Optional[Callable] = None) -> None:
    """An app's ``main``: train what has not finished (``train(config, workdir)`` -> records), then
    (``config.report``) report every finished run of the workdir (``report(workdir)``); a `common.Diverged`
    (exit status 3) afterwards if some run of the config diverged. ``config.check_only``: only check the
    config (``check``) and every run folder of its grid (``runs(config, workdir)``) against it."""
    if config.check_only:
        if check is not None:
            check(config)
        check_runs(runs(config, workdir))
        return
    records = train(config, workdir)
    if config.report:
        report(workdir)
    error = diverged_error(records)
    if error is not None:
        raise error

