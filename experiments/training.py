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
* the throughput of the compiled training step, in tokens per second, after warm-up.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Optional

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
    keep_checkpoints: int = 1
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
# logging
# ----------------------------------------------------------------------------------------------------

class CsvLog:
    """Append-only CSV with a ``step`` column; `truncate` drops the rows after a step (on resume)."""

    def __init__(self, path: str, fields: list[str]):
        self.path, self.fields = path, ["step"] + [f for f in fields if f != "step"]
        if not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def truncate(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

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


def train(model: nn.Module, settings: TrainSettings, train_data: Batch, eval_sets: dict[str, Batch],
          workdir: str, *, mesh: Optional[Mesh] = None, description: Optional[dict] = None,
          stop_at_step: Optional[int] = None, on_step: Optional[Callable[[int], None]] = None,
          desc: str = "train") -> dict:
    """Train ``model`` in ``workdir`` (resuming from its latest checkpoint), evaluate on ``eval_sets``,
    and return ``{"eval": {name: metrics}, "final_train": ..., "throughput": ..., "num_params": ...}``.

    ``on_step(step)`` is called after every step (after its checkpoint is saved).
    ``workdir`` gets ``checkpoints/``, ``metrics.csv``, ``eval.csv``, ``run.json`` (``description``
    and the settings; a restart with different ones is an error) and ``results.json`` when done.
    """
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or data_mesh()
    if settings.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={settings.batch_size} is not divisible by the {mesh.devices.size} local "
                         f"devices; choose a multiple of {mesh.devices.size}.")
    identity = {"description": description or {}, "settings": dataclasses.asdict(settings),
                "train_examples": int(train_data["labels"].shape[0]),
                "train_shape": list(train_data["labels"].shape)}
    for name in ("progress", "throughput_steps", "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
        identity["settings"].pop(name)     # they do not change the trajectory
    run_path = os.path.join(workdir, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(identity)):
            raise ValueError(f"{workdir} holds a run with different settings ({run_path}); use a new workdir "
                             "or delete it.")
    else:
        common.write_json(run_path, identity)

    state = init_state(model, settings, train_data, mesh)
    num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints, create=True))
    train_log = CsvLog(os.path.join(workdir, "metrics.csv"), TRAIN_FIELDS)
    eval_log = CsvLog(os.path.join(workdir, "eval.csv"), EVAL_FIELDS)
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        logging.info("%s: resumed from the checkpoint at step %d", workdir, start)
    train_log.truncate(start)
    eval_log.truncate(start)
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
    last = {}
    train_start = time.time()
    try:
        for step in range(start, settings.num_steps):
            state, metrics = train_step(state, put_batch(batches(step), mesh))
            done = step + 1
            shown = None
            if done % settings.log_every == 0 or done == settings.num_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                train_log.write({"step": done, **last})
                if writer is not None:
                    for k, v in last.items():
                        writer.add_scalar(f"train/{k}", v, done)
                shown = {"loss": last["loss"], "acc": last["accuracy"]}
            progress.update(done, shown)
            if settings.eval_every and done % settings.eval_every == 0 and done != settings.num_steps:
                run_evals(done)
            if done % settings.checkpoint_every == 0 or done == settings.num_steps:
                manager.save(done, args=ocp.args.StandardSave(state))
            if stop_at_step is not None and done == stop_at_step:
                manager.wait_until_finished()
                raise Stopped(f"stopped at step {done}")
            if on_step is not None:
                on_step(done)
        train_seconds = time.time() - train_start
        manager.wait_until_finished()
        if manager.latest_step() != settings.num_steps:      # e.g. resumed from a finished run's checkpoint
            manager.save(settings.num_steps, args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()
    finally:
        progress.close()
        manager.close()
    if not last and os.path.exists(train_log.path):        # a resumed, already finished run
        rows = read_csv(train_log.path)
        last = {k: float(rows[-1][k]) for k in TRAIN_FIELDS} if rows else {}
    evals = run_evals(settings.num_steps)
    throughput = measure_throughput(train_step, state, put_batch(batches(0), mesh), settings.throughput_steps)
    if writer is not None:
        writer.close()
    results = {"eval": evals, "final_train": last, "throughput": throughput, "num_params": num_params,
               "steps": settings.num_steps, "train_seconds_this_session": train_seconds,
               "devices": mesh.devices.size, "platform": jax.default_backend()}
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
    latest checkpoint or from ``step``; e.g. ``load_checkpoint(run_dir)["params"]`` for the model."""
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        return manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()
