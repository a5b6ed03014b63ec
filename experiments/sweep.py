"""What the trained recall experiments share: the model and settings from a config, the grid of runs
(each in its own folder, skipped when finished, resumed when interrupted), and the collection of every
finished run of a workdir into one CSV, one table and figures."""
from __future__ import annotations

import csv
import glob
import json
import logging as pylogging
import os
import signal
import zlib
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from absl import logging

from experiments import models, training


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


def run_once(run_dir: str, train: Callable[[], dict]) -> dict:
    """``results.json`` of ``run_dir`` if the run finished, else train (resuming) and return its results."""
    path = os.path.join(run_dir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            logging.info("%s: finished before, skipped", run_dir)
            return json.load(f)
    train()
    with open(path) as f:
        return json.load(f)


def collect(workdir: str) -> list[dict]:
    """Every finished run under ``workdir/runs`` (its ``results.json``), in a stable order."""
    records = []
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "**", "results.json"), recursive=True)):
        with open(path) as f:
            record = json.load(f)
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
    """For each ``key(record)``, the record with the highest ``score`` (e.g. the best learning rate)."""
    best = {}
    for record in records:
        k = key(record)
        if k not in best or score(record) > score(best[k]):
            best[k] = record
    return best


def fmt_rate(tokens_per_second: Optional[float]) -> str:
    if not tokens_per_second:
        return "-"
    return f"{tokens_per_second / 1e3:.1f}k" if tokens_per_second < 1e6 else f"{tokens_per_second / 1e6:.2f}M"


def settings_from_config(config, learning_rate: float) -> training.TrainSettings:
    return training.TrainSettings.from_config(config, learning_rate=learning_rate)
