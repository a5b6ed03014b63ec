"""What the trained recall experiments share: the model and settings from a config, the grid of runs
(each in its own folder, skipped when finished, resumed when interrupted, refused when the folder holds a
run of other settings), and the collection of every finished run of a workdir into one CSV, one table and
figures (a diverged run is reported as such, never as a result)."""
from __future__ import annotations

import csv
import dataclasses
import glob
import logging as pylogging
import os
import signal
import zlib
from typing import Callable, Iterable, Optional, Sequence

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
    return models.LanguageModel(name, vocab_size, d_model, num_layers=config.num_layers, head_dim=config.head_dim,
                                backend=config.backend, conv_size=config.conv_size, mlp_ratio=config.mlp_ratio)


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
    every folder of the grid is checked before anything trains) and ``train()``, which trains it (resuming)
    and writes its ``results.json``."""

    folder: str
    identity: dict
    train: Callable[[], object]


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


def run_once(run: Run) -> dict:
    """The ``results.json`` of ``run.folder`` if the run finished (or diverged) with the asked settings, else
    train it (resuming) and return its results. A ``results.json`` that cannot be read is rebuilt: the run
    resumes from its last checkpoint and is evaluated again (with a warning)."""
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
    run.train()
    return common.read_json(path, "run the experiment again to rebuild it from the run's last checkpoint.")


def run_all(runs: Sequence[Run]) -> list[dict]:
    """`check_runs`, then `run_once` each run in turn; the records of the runs, in order, each with its
    ``run_dir``."""
    check_runs(runs)
    return [{**run_once(run), "run_dir": run.folder} for run in runs]


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


def best_by(records: Iterable[dict], key: Callable[[dict], tuple], score: Callable[[dict], float]) -> dict:
    """For each ``key(record)``, the record with the highest ``score`` (e.g. the best learning rate) among the
    runs that did not diverge; a key whose runs all diverged keeps one of them (`training.is_diverged`), so
    that the table can say so."""
    best = {}
    for record in records:
        k = key(record)
        if k not in best:
            best[k] = record
        elif not training.is_diverged(record) and (training.is_diverged(best[k]) or score(record) > score(best[k])):
            best[k] = record
    return best


def fmt_rate(tokens_per_second: Optional[float]) -> str:
    if not tokens_per_second:
        return "-"
    return f"{tokens_per_second / 1e3:.1f}k" if tokens_per_second < 1e6 else f"{tokens_per_second / 1e6:.2f}M"


def settings_from_config(config, learning_rate: float) -> training.TrainSettings:
    return training.TrainSettings.from_config(config, learning_rate=learning_rate)
