"""Training and evaluation shared by the recall experiments.

* optax AdamW with linear warm-up and cosine decay, global-norm clipping; weight decay on matrices only;
* one jit-compiled step, data-parallel over every local device: a 1-D `jax.sharding.Mesh` ("data"),
  the batch split along its first axis, parameters and optimizer state replicated (XLA inserts the
  gradient all-reduce); the same code runs on one device;
* the batch of step ``s`` is a pure function of ``(seed, s)`` (an epoch permutation of a fixed training
  set), so a run restarted from an orbax checkpoint continues exactly as if never stopped; metric rows
  written after the last checkpoint are dropped on restart and written again, identically;
* metrics as CSV (``metrics.csv``: training; ``eval.csv``: evaluation), and TensorBoard when
  ``tensorboardX`` (or torch's) is installed; a progress bar (tqdm) on long runs;
* the throughput of the compiled training step, in tokens per second, after warm-up;
* faults: a run folder holds one run (``run.json`` records what its results depend on, and a run asked
  with other settings is refused, naming the fields); ``keep_checkpoints`` checkpoints are kept and an
  unreadable one is set aside for the one before it, with a warning; a damaged ``run.json``,
  ``metrics.csv`` or ``eval.csv`` is an error that names the file and what to do; a run whose loss or
  gradient norm is not finite stops and is recorded as ``diverged``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import common
from experiments.tasks import IGNORE

Batch = dict[str, np.ndarray]      # "tokens" [N, L] int, "labels" [N, L] int, optional "vectors" [N, L, F]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (with the model and the data)."""

    num_steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.0     # the cosine decays to learning_rate * this
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                # 0: evaluate at the end only
    checkpoint_every: int = 100
    keep_checkpoints: int = 2          # the newest ones; an unreadable checkpoint falls back to the one before
    eval_batch_size: int = 256
    throughput_steps: int = 5          # timed steps (after one warm-up step); 0 disables
    progress: bool = True

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "eval_batch_size",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name}={getattr(self, name)}: must be at least 1.")
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(f"TrainSettings.warmup_steps={self.warmup_steps}: must be in [0, num_steps].")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainSettings.learning_rate={self.learning_rate}: must be positive.")

    @classmethod
    def from_config(cls, config, **overrides) -> "TrainSettings":
        """The fields of `TrainSettings` that ``config`` has, then ``overrides``."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {n: config[n] for n in names if n in config}
        values.update(overrides)
        return cls(**values)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    learning_rate: jax.Array     # the peak learning rate: state, not a constant, so that one compiled
                                 # step serves every learning rate of a sweep


# ----------------------------------------------------------------------------------------------------
# optimizer, loss
# ----------------------------------------------------------------------------------------------------

def schedule(settings: TrainSettings) -> optax.Schedule:
    """The learning rate over the peak: linear warm-up from 0 to 1, then cosine decay to
    ``final_lr_fraction``."""
    if settings.warmup_steps >= settings.num_steps:
        return optax.linear_schedule(0.0, 1.0, settings.num_steps)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, settings.warmup_steps, settings.num_steps,
                                              end_value=settings.final_lr_fraction)


def optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW without its learning rate (`make_train_step` scales by ``peak * schedule(step)``):
    ``optax.adamw`` is exactly ``scale_by_adam -> add_decayed_weights -> scale(-lr)``."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-8),
        optax.add_decayed_weights(settings.weight_decay, mask=decay_mask))


def _compile_key(settings: TrainSettings) -> TrainSettings:
    """The settings with the fields that do not change the compiled step set to fixed values."""
    return dataclasses.replace(settings, learning_rate=1.0, seed=0, log_every=1, eval_every=0, checkpoint_every=1,
                               keep_checkpoints=1, eval_batch_size=1, throughput_steps=0, progress=False)


def loss_and_metrics(logits: jax.Array, labels: jax.Array):
    """Mean cross-entropy and accuracy over the supervised positions (``labels != IGNORE``); also their
    sums and the count, so that evaluation can add batches up exactly."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], -1)[..., 0]
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    nll_sum = jnp.sum(jnp.where(mask, nll, 0.0))
    correct = jnp.sum(mask & (jnp.argmax(logits, -1) == labels))
    loss = nll_sum / denom
    return loss, {"loss": loss, "accuracy": correct / denom, "nll_sum": nll_sum, "correct": correct,
                  "count": count}


def supervised_count(labels) -> int:
    """The most supervised positions (``labels != IGNORE``) of any row: a static size for the steps."""
    return int(np.max(np.sum(np.asarray(labels) != IGNORE, axis=-1), initial=0))


def logits_and_labels(model: nn.Module, params, batch, supervised: Optional[int] = None):
    """The model's logits and their labels. With ``supervised`` (at least the number of supervised
    positions of every row), only the first ``supervised`` positions of each row that carry a label, in
    order, get logits (rows with fewer are padded with unsupervised positions): the same loss and
    accuracy as the full ``[B, T, vocab]`` logits without computing the others."""
    labels = batch["labels"]
    if supervised is None or supervised >= labels.shape[-1]:
        return model.apply(params, batch["tokens"], batch.get("vectors")), labels
    order = jnp.argsort(labels == IGNORE, axis=-1, stable=True)           # labelled positions first
    positions = order[..., :max(supervised, 1)]
    logits = model.apply(params, batch["tokens"], batch.get("vectors"), positions)
    return logits, jnp.take_along_axis(labels, positions, axis=-1)


# ----------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------

def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every local device) with the axis ``"data"``."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), ("data",))


def _shardings(mesh: Mesh):
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def put_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, split along the batch axis."""
    size = mesh.devices.size
    n = next(iter(batch.values())).shape[0]
    if n % size:
        raise ValueError(f"batch size {n} is not divisible by the {size} devices of the mesh; choose a "
                         f"batch size that is a multiple of {size}.")
    _, sharded = _shardings(mesh)
    return {name: jax.device_put(x, sharded) for name, x in batch.items()}


@functools.lru_cache(maxsize=64)
def _init_fn(model: nn.Module, shapes: tuple) -> Callable:
    tokens_shape, vectors_shape = shapes

    def init(key):
        tokens = jnp.zeros(tokens_shape, jnp.int32)
        vectors = None if vectors_shape is None else jnp.zeros(vectors_shape, jnp.float32)
        params = model.init(key, tokens, vectors)
        # float32 whatever the global default (a parameter created without a dtype follows jax_enable_x64)
        return jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    return jax.jit(init)


def init_state(model: nn.Module, settings: TrainSettings, example: Batch, mesh: Mesh) -> TrainState:
    """Float32 parameters from ``PRNGKey(seed)``, the optimizer state, step 0, replicated over the mesh."""
    shapes = ((1,) + example["tokens"].shape[1:],
              None if "vectors" not in example else (1,) + example["vectors"].shape[1:])
    params = _init_fn(model, shapes)(jax.random.PRNGKey(settings.seed))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(settings).init(params),
                       learning_rate=jnp.asarray(settings.learning_rate, jnp.float32))
    replicated, _ = _shardings(mesh)
    return jax.device_put(state, replicated)


def make_train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool = True,
                    supervised: Optional[int] = None) -> Callable:
    """``(state, batch) -> (state, metrics)``, compiled for the mesh; one compilation per model, mesh,
    optimizer settings and ``supervised`` in a process (the learning rate and the seed are not
    compiled in). ``supervised``: see `logits_and_labels` (`supervised_count` of the training set)."""
    return _train_step(model, _compile_key(settings), mesh, donate, supervised)


@functools.lru_cache(maxsize=64)
def _train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool,
                supervised: Optional[int]) -> Callable:
    tx, shape = optimizer(settings), schedule(settings)

    def step(state: TrainState, batch):
        def loss_fn(params):
            return loss_and_metrics(*logits_and_labels(model, params, batch, supervised))

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = (state.learning_rate * shape(state.step)).astype(jnp.float32)
        params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
        metrics = {"loss": metrics["loss"], "accuracy": metrics["accuracy"],
                   "grad_norm": optax.tree.norm(grads), "learning_rate": lr}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated, sharded = _shardings(mesh)
    return jax.jit(step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=64)
def make_eval_step(model: nn.Module, mesh: Mesh, supervised: Optional[int] = None) -> Callable:
    """``(params, batch) -> {"nll_sum", "correct", "count"}``, compiled for the mesh (``supervised``:
    see `logits_and_labels`)."""
    def step(params, batch):
        _, metrics = loss_and_metrics(*logits_and_labels(model, params, batch, supervised))
        return {k: metrics[k] for k in ("nll_sum", "correct", "count")}

    replicated, sharded = _shardings(mesh)
    return jax.jit(step, in_shardings=(replicated, sharded), out_shardings=replicated)


def evaluate(eval_step: Callable, params, data: Batch, batch_size: int, mesh: Mesh) -> dict[str, float]:
    """Accuracy and loss over every supervised position of ``data`` (the last batch padded with
    unsupervised rows, so that every batch has one shape)."""
    size = mesh.devices.size
    batch_size = max(size, batch_size // size * size)
    n = data["labels"].shape[0]
    totals = {"nll_sum": 0.0, "correct": 0, "count": 0}
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in data.items()}
        missing = batch_size - part["labels"].shape[0]
        if missing:
            part = {k: np.concatenate([v, np.full((missing,) + v.shape[1:], IGNORE if k == "labels" else 0,
                                                   v.dtype)]) for k, v in part.items()}
        out = jax.device_get(eval_step(params, put_batch(part, mesh)))
        for k in totals:
            totals[k] += out[k].item()
    count = max(totals["count"], 1)
    return {"accuracy": totals["correct"] / count, "loss": totals["nll_sum"] / count, "count": totals["count"]}


# ----------------------------------------------------------------------------------------------------
# data order
# ----------------------------------------------------------------------------------------------------

class BatchSchedule:
    """The batch of step ``s``: rows ``perm_e[i B : (i + 1) B]`` of the training set, with ``e, i =
    divmod(s, N // B)`` and ``perm_e`` a permutation drawn from ``(seed, e)`` (the last partial batch
    of an epoch is dropped). A pure function of ``(seed, s)``: resuming needs no data state."""

    def __init__(self, data: Batch, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_examples = data["labels"].shape[0]
        self.steps_per_epoch = self.num_examples // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {self.num_examples} examples, fewer than one batch of "
                             f"{batch_size}.")
        self._epoch, self._perm = None, None

    def __call__(self, step: int) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.num_examples)
        rows = np.sort(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
        return {k: v[rows] for k, v in self.data.items()}


# ----------------------------------------------------------------------------------------------------
# run records: what a run folder holds and whether it can be used
# ----------------------------------------------------------------------------------------------------

# Settings that change neither a run's trajectory nor its evaluations: a run is resumed and reported
# whatever their values (the throughput is measured again by whoever finishes the run).
UNRECORDED_SETTINGS = ("progress", "throughput_steps", "checkpoint_every", "keep_checkpoints", "eval_batch_size")


def run_identity(description: Optional[dict], settings: TrainSettings, train_shape, eval_shapes: dict) -> dict:
    """What a run's results are a function of, as its ``run.json`` records it: the caller's ``description``
    (model, data, task), the settings less `UNRECORDED_SETTINGS`, and the shapes ``[N, L]`` of the training
    set's labels and of each evaluation set's (``eval_shapes``: name -> shape). A run folder holds one
    identity: a run asked with another is refused (`check_run_folder`), never resumed or reported."""
    recorded = dataclasses.asdict(settings)
    for name in UNRECORDED_SETTINGS:
        recorded.pop(name)
    identity = {"description": description or {}, "settings": recorded, "train_examples": int(train_shape[0]),
                "train_shape": [int(n) for n in train_shape],
                "eval_sets": {name: [int(n) for n in shape] for name, shape in eval_shapes.items()}}
    return json.loads(json.dumps(identity))        # as it reads back from run.json (tuples become lists)


def identity_differences(recorded: dict, asked: dict, prefix: str = "") -> list[str]:
    """``"field: value here, value asked"`` for every (dotted) field in which two identities differ."""
    show = lambda value: (lambda t: t if len(t) <= 60 else t[:57] + "...")(json.dumps(value))
    out = []
    for key in dict.fromkeys([*recorded, *asked]):
        name = f"{prefix}{key}"
        if key not in recorded:
            out.append(f"{name}: not recorded here, {show(asked[key])} asked")
        elif key not in asked:
            out.append(f"{name}: {show(recorded[key])} here, not asked")
        elif isinstance(recorded[key], dict) and isinstance(asked[key], dict):
            out += identity_differences(recorded[key], asked[key], f"{name}.")
        elif recorded[key] != asked[key]:
            out.append(f"{name}: {show(recorded[key])} here, {show(asked[key])} asked")
    return out


def _has_checkpoints(run_dir: str) -> bool:
    directory = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_run_folder(run_dir: str, identity: dict) -> bool:
    """Whether ``run_dir`` holds a run (its ``run.json``); a `common.RunFileError` when that run was made with
    another identity (naming ``run.json`` and the differing fields) or its ``run.json`` is damaged or
    missing: its checkpoints and results then belong to settings other than the asked ones."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        if _has_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, "results.json")):
            raise common.RunFileError(f"{path}: missing, but {run_dir} holds a run (checkpoints or results.json) "
                                      f"whose settings therefore cannot be checked; delete {run_dir} to train it "
                                      "again.")
        return False
    recorded = common.read_json(path, f"it records the settings {run_dir} was trained with, so the run cannot be "
                                      f"checked; delete {run_dir} to train it again.")
    differences = identity_differences(recorded, identity)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise common.RunFileError(
            f"{path}: this run was made with different settings ({shown}); its results are not those of the "
            f"asked settings. Use another workdir for them, or delete {run_dir} to train it again with them.")
    return True


def _restore_failure(error: BaseException, directory: str) -> str:
    """One line from a failed restore of a checkpoint under ``directory``: the innermost cause of the
    exception, without the tensorstore specification that orbax appends (hundreds of characters); for a
    tensorstore read error, its last clause and the file it names."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).split("[tensorstore_spec", 1)[0].split("See full TensorStore details", 1)[0]
    text = " ".join(text.split()) or type(error).__name__
    files = re.findall(r'local file "([^"]+)"', text)
    if files:
        text = f"{text.rsplit(': ', 1)[-1]} in {os.path.relpath(files[-1], directory)}"
    return text if len(text) <= 200 else "..." + text[-197:]


def _drop_closed_loop_callbacks() -> None:
    """When a restore fails, orbax's event loop closes while tensorstore still completes its other reads; each
    completion's callback then fails with ``RuntimeError('Event loop is closed')``, which Python prints as an
    unraisable exception: hundreds of lines of noise around the one real cause. Drop exactly those (process
    wide and once: they can arrive after the restore returned); every other unraisable exception is reported
    as before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def restore_checkpoint(run_dir: str, target=None, *, step: Optional[int] = None, set_aside: bool = False):
    """``(state, step)`` of the newest readable checkpoint of ``run_dir`` (or of ``step``), restored into the
    shapes and shardings of ``target`` (None: as saved); ``(target, None)`` when there is none.

    An unreadable checkpoint (truncated, corrupt, missing files) gives one warning line and the one before it
    is tried; with ``set_aside`` (training, which will save that step again) it is moved to
    ``run_dir/checkpoints.unreadable/``. When none is readable (or ``step`` is not): a `common.RunFileError`
    naming the run folder, each cause, and what to do."""
    directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not _has_checkpoints(run_dir):
        if step is not None:
            raise common.RunFileError(f"{run_dir}: no checkpoint to load (no {directory}/{step}).")
        return target, None
    _drop_closed_loop_callbacks()
    if step is None:
        manager = ocp.CheckpointManager(directory)
        steps = sorted(manager.all_steps(), reverse=True)
        manager.close()
    else:
        steps = [step]
    args = ocp.args.StandardRestore(None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    failures = []
    for candidate in steps:
        manager = ocp.CheckpointManager(directory)   # one per attempt: a failed restore leaves a manager unusable
        try:
            state = manager.restore(candidate, args=args)
        except Exception as error:  # noqa: BLE001 (any failure to read it: try the one before)
            failures.append((candidate, _restore_failure(error, directory)))
            continue
        finally:
            manager.close()
        break
    else:
        causes = "; ".join(f"step {s}: {cause}" for s, cause in failures)
        raise common.RunFileError(f"{run_dir}: no readable checkpoint ({causes}); delete {run_dir} to train this "
                                  "run again from scratch.")
    for bad, cause in failures:
        where = ""
        if set_aside:
            aside = os.path.join(run_dir, "checkpoints.unreadable", str(bad))
            while os.path.exists(aside):
                aside += "+"
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(directory, str(bad)), aside)
            where = f", moved to {aside}"
        logging.warning("%s/%d: unreadable checkpoint (%s)%s; using the one of step %d", directory, bad, cause,
                        where, candidate)
    return state, candidate


# ----------------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------------

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


class _Progress:
    """tqdm when installed and wanted, else a log line every ``log_every`` steps."""

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


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------

class Stopped(Exception):
    """Raised by `train` at ``stop_at_step`` (tests: a run killed after its last checkpoint)."""


TRAIN_FIELDS = ["loss", "accuracy", "grad_norm", "learning_rate"]
EVAL_FIELDS = ["set", "accuracy", "loss", "count"]


def is_diverged(record: dict) -> bool:
    """Whether a run's record (``results.json``) is of a run stopped because its loss was not finite."""
    return record.get("status") == "diverged"


def train(model: nn.Module, settings: TrainSettings, train_data: Batch, eval_sets: dict[str, Batch],
          workdir: str, *, mesh: Optional[Mesh] = None, description: Optional[dict] = None,
          stop_at_step: Optional[int] = None, on_step: Optional[Callable[[int], None]] = None,
          desc: str = "train") -> dict:
    """Train ``model`` in ``workdir`` (resuming from its latest readable checkpoint), evaluate on ``eval_sets``,
    and return ``{"status", "eval": {name: metrics}, "final_train": ..., "throughput": ..., "num_params": ...}``.

    ``on_step(step)`` is called after every step (after its checkpoint is saved).
    ``workdir`` gets ``checkpoints/``, ``metrics.csv``, ``eval.csv``, ``run.json`` (`run_identity`: a restart
    with another one is an error naming the fields) and ``results.json`` when done. ``status`` is
    ``"finished"``, or ``"diverged"`` when the loss or the gradient norm was not finite at a step where they
    are read (every ``log_every`` and ``checkpoint_every`` steps, and the last): the run stops there without
    saving that state, is not evaluated, and ``diverged_at_step`` says where.
    """
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or data_mesh()
    if settings.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={settings.batch_size} is not divisible by the {mesh.devices.size} local "
                         f"devices; choose a multiple of {mesh.devices.size}.")
    identity = run_identity(description, settings, train_data["labels"].shape,
                            {name: data["labels"].shape for name, data in eval_sets.items()})
    if not check_run_folder(workdir, identity):
        common.write_json(os.path.join(workdir, "run.json"), identity)

    state = init_state(model, settings, train_data, mesh)
    num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
    state, restored = restore_checkpoint(workdir, state, set_aside=True)
    start = restored or 0
    if restored is not None:
        logging.info("%s: resumed from the checkpoint at step %d", workdir, start)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints, create=True))
    train_log = CsvLog(os.path.join(workdir, "metrics.csv"), TRAIN_FIELDS)
    eval_log = CsvLog(os.path.join(workdir, "eval.csv"), EVAL_FIELDS)
    # the rows written before the checkpoint must be there; the final evaluation's rows come after the last
    # checkpoint, so a finished run resumed (its results.json lost) writes them again
    train_log.resume(start, [s for s in range(1, start + 1)
                             if s % settings.log_every == 0 or s == settings.num_steps])
    eval_log.resume(min(start, settings.num_steps - 1),
                    [s for s in range(1, min(start + 1, settings.num_steps))
                     if settings.eval_every and s % settings.eval_every == 0])
    writer = _tensorboard(os.path.join(workdir, "tensorboard"))

    train_step = make_train_step(model, settings, mesh, supervised=supervised_count(train_data["labels"]))
    eval_steps = {name: make_eval_step(model, mesh, supervised_count(data["labels"]))
                  for name, data in eval_sets.items()}
    batches = BatchSchedule(train_data, settings.batch_size, settings.seed)

    def run_evals(step: int) -> dict:
        results = {}
        for name, data in eval_sets.items():
            results[name] = evaluate(eval_steps[name], state.params, data, settings.eval_batch_size, mesh)
            eval_log.write({"step": step, "set": name, **results[name]})
            if writer is not None:
                writer.add_scalar(f"eval/{name}/accuracy", results[name]["accuracy"], step)
        return results

    progress = _Progress(settings.num_steps, start, settings.progress, desc)
    last, diverged_at = {}, None
    train_start = time.time()
    try:
        for step in range(start, settings.num_steps):
            state, metrics = train_step(state, put_batch(batches(step), mesh))
            done = step + 1
            logged = done % settings.log_every == 0 or done == settings.num_steps
            saved = done % settings.checkpoint_every == 0 or done == settings.num_steps
            shown = None
            if logged or saved:              # read the metrics where they are logged or the state is saved
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                    diverged_at, last = done, values
                    train_log.write({"step": done, **values})
                    logging.error("%s: diverged at step %d (loss=%s, grad_norm=%s): stopped, not saved, recorded "
                                  "as diverged in results.json; a smaller learning rate may train", workdir, done,
                                  values["loss"], values["grad_norm"])
                    break
            if logged:
                last = values
                train_log.write({"step": done, **last})
                if writer is not None:
                    for k, v in last.items():
                        writer.add_scalar(f"train/{k}", v, done)
                shown = {"loss": last["loss"], "acc": last["accuracy"]}
            progress.update(done, shown)
            if settings.eval_every and done % settings.eval_every == 0 and done != settings.num_steps:
                run_evals(done)
            if saved:
                manager.save(done, args=ocp.args.StandardSave(state))
            if stop_at_step is not None and done == stop_at_step:
                manager.wait_until_finished()
                raise Stopped(f"stopped at step {done}")
            if on_step is not None:
                on_step(done)
        train_seconds = time.time() - train_start
        manager.wait_until_finished()
        if diverged_at is None and manager.latest_step() != settings.num_steps:   # e.g. resumed from a finished
            manager.save(settings.num_steps, args=ocp.args.StandardSave(state), force=True)   # run's checkpoint
            manager.wait_until_finished()
    finally:
        progress.close()
        manager.close()
    common_results = {"num_params": num_params, "steps": settings.num_steps,
                      "train_seconds_this_session": train_seconds, "devices": mesh.devices.size,
                      "platform": jax.default_backend()}
    if diverged_at is not None:
        if writer is not None:
            writer.close()
        results = {"status": "diverged", "diverged_at_step": diverged_at, "eval": {}, "final_train": last,
                   "throughput": {}, **common_results}
        common.write_json(os.path.join(workdir, "results.json"), {**identity, **results})
        return results
    if not last and os.path.exists(train_log.path):        # a resumed, already finished run
        rows = read_csv(train_log.path)
        last = {k: float(rows[-1][k]) for k in TRAIN_FIELDS} if rows else {}
    evals = run_evals(settings.num_steps)
    throughput = measure_throughput(train_step, state, put_batch(batches(0), mesh), settings.throughput_steps)
    if writer is not None:
        writer.close()
    results = {"status": "finished", "eval": evals, "final_train": last, "throughput": throughput, **common_results}
    common.write_json(os.path.join(workdir, "results.json"), {**identity, **results})
    return results


def measure_throughput(train_step: Callable, state: TrainState, batch, steps: int) -> dict:
    """Tokens per second of the compiled training step on ``batch`` (all its positions), after one
    warm-up step, timed over ``steps`` steps on a copy of ``state`` (the run's state is untouched)."""
    if steps < 1:
        return {}
    tokens = int(np.prod(batch["tokens"].shape))
    work = jax.tree.map(jnp.copy, state)
    work, _ = train_step(work, batch)
    jax.block_until_ready(work)
    start = time.perf_counter()
    for _ in range(steps):
        work, metrics = train_step(work, batch)
    jax.block_until_ready((work, metrics))
    seconds = (time.perf_counter() - start) / steps
    return {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds, "tokens_per_step": tokens,
            "timed_steps": steps}


def load_checkpoint(workdir: str, step: Optional[int] = None) -> dict:
    """The saved `TrainState` of a run (``step``, ``params``, ``opt_state``) as a tree of arrays, from its
    newest readable checkpoint (an unreadable one is skipped with a warning) or from ``step``; e.g.
    ``load_checkpoint(run_dir)["params"]`` for the model. A `common.RunFileError` naming the run folder when
    there is no readable checkpoint."""
    state, found = restore_checkpoint(workdir, step=step)
    if found is None:
        raise common.RunFileError(f"{workdir}: no checkpoint to load (no {workdir}/checkpoints/<step>).")
    return state
