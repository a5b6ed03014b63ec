"""The logs of a run: ``metrics.csv`` (training, every ``log_every`` steps) and ``eval.csv`` (evaluation), both
resumed at the run's checkpoint (`CsvLog.resume`: a row cut short by a kill is dropped, rows missing before
the checkpoint are an error naming the file); TensorBoard when ``tensorboardX`` (or torch's) is installed;
a progress bar (tqdm) or a log line per logged step."""
from __future__ import annotations

import csv
import io
import os
import sys
from typing import Iterable, Optional

from absl import logging

from experiments import common
from experiments.training.step import TrainSettings

TRAIN_FIELDS = ["loss", "accuracy", "grad_norm", "learning_rate"]
EVAL_FIELDS = ["set", "accuracy", "loss", "count"]


class CsvLog:
    """Append-only CSV with a ``step`` column; `resume` keeps the rows up to a step (on resume)."""

    def __init__(self, path: str, fields: list[str]):
        self.path, self.fields = path, ["step"] + [f for f in fields if f != "step"]
        if not os.path.exists(path):
            self._rewrite([])

    def _rewrite(self, rows: list[list[str]]) -> None:
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([self.fields] + rows)

    def resume(self, step: int, expected: Iterable[int] = ()) -> None:
        """Keep the rows up to ``step``, the checkpoint a run resumes from (later ones are written again,
        identically), and drop a last row cut short by a kill. A `common.RunFileError` naming the file when
        it is damaged elsewhere or lacks the row of a step of ``expected`` (rows that the run wrote before
        that checkpoint): the run's log would have a hole, or rows that are not its own."""
        with open(self.path, newline="") as f:
            text = f.read()
        remedy = f"delete {os.path.dirname(self.path) or '.'} to train this run again from scratch"
        lines = list(csv.reader(io.StringIO(text)))
        if not text.endswith("\n"):            # the last line was being written when the process died
            lines = lines[:-1]
        if lines and lines[0] != self.fields:
            raise common.RunFileError(f"{self.path}: its header is {lines[0]}, not {self.fields}; {remedy}.")
        rows = lines[1:]
        for i, row in enumerate(rows):
            if len(row) != len(self.fields) or not row[0].isdigit():
                raise common.RunFileError(f"{self.path}: line {i + 2} is damaged ({','.join(row)[:60]!r}); "
                                          f"{remedy}.")
        kept = [row for row in rows if int(row[0]) <= step]
        missing = sorted(set(expected) - {int(row[0]) for row in kept})
        if missing:
            what = "empty" if not text else "truncated or damaged"
            steps = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise common.RunFileError(f"{self.path}: {what}: the rows of steps {steps} are missing, though this "
                                      f"run resumes from its checkpoint at step {step}; {remedy}.")
        self._rewrite(kept)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_format(row.get(k, "")) for k in self.fields])


def _format(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tensorboard(logdir: str):
    """A SummaryWriter when tensorboardX or torch's is installed, else None."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
        except Exception:  # noqa: BLE001 (any import failure: no TensorBoard)
            continue
        return writer_cls(logdir)
    return None


class Progress:
    """tqdm when installed and wanted, else a log line at every step given metrics (the logged ones)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass
        self.desc, self.total = desc, total

    def update(self, step: int, metrics: Optional[dict] = None):
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
        elif metrics:
            logging.info("%s step %d/%d %s", self.desc, step, self.total,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()




class RunLogs:
    """Every log of a run folder, resumed at the checkpoint of step ``start``: the rows written before it must
    be there (a hole is an error); the final evaluation's rows come after the last checkpoint, so a finished
    run resumed (its results.json lost) writes them again."""

    def __init__(self, workdir: str, settings: TrainSettings, start: int):
        self.train = CsvLog(os.path.join(workdir, "metrics.csv"), TRAIN_FIELDS)
        self.eval = CsvLog(os.path.join(workdir, "eval.csv"), EVAL_FIELDS)
        self.train.resume(start, [s for s in range(1, start + 1)
                                  if s % settings.log_every == 0 or s == settings.num_steps])
        self.eval.resume(min(start, settings.num_steps - 1),
                         [s for s in range(1, min(start + 1, settings.num_steps))
                          if settings.eval_every and s % settings.eval_every == 0])
        self.writer = _tensorboard(os.path.join(workdir, "tensorboard"))

    def train_row(self, step: int, values: dict) -> None:
        self.train.write({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def eval_rows(self, step: int, results: dict) -> None:
        for name, metrics in results.items():
            self.eval.write({"step": step, "set": name, **metrics})
            if self.writer is not None:
                self.writer.add_scalar(f"eval/{name}/accuracy", metrics["accuracy"], step)

    def eval_results(self, step: int) -> dict:
        """``{set: {"accuracy", "loss", "count"}}`` of the rows of ``step`` in ``eval.csv``, as written (a float
        is written as its ``repr``, so it reads back to the same number)."""
        return {row["set"]: {"accuracy": float(row["accuracy"]), "loss": float(row["loss"]),
                             "count": int(row["count"])}
                for row in read_csv(self.eval.path) if int(row["step"]) == step}

    def last_train_row(self) -> dict:
        rows = read_csv(self.train.path)
        return {k: float(rows[-1][k]) for k in TRAIN_FIELDS} if rows else {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
