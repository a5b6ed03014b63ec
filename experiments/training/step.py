"""The compiled training and evaluation steps, and what they are made of.

* `TrainSettings`: everything that determines a training run (with the model and the data);
* the optimizer: optax AdamW with linear warm-up and cosine decay, global-norm clipping, weight decay on
  matrices only; the peak learning rate is a hyperparameter in the optimizer state
  (``optax.inject_hyperparams``), so that one compiled step serves every learning rate of a sweep;
* the loss: cross-entropy and accuracy at the supervised positions only;
* devices: a 1-D `jax.sharding.Mesh` ("data") over the local devices, the batch split along its first axis,
  parameters and optimizer state replicated (XLA inserts the gradient all-reduce); the same code runs on
  one device;
* `evaluate` over a whole set, and `measure_throughput` of the compiled training step.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    opt_state: Any               # `optimizer`'s: its hyperparameters hold the peak learning rate


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


def scheduled_learning_rate(learning_rate, lr_schedule) -> jax.Array:
    """The learning rate of step ``s``, ``lr_s = learning_rate * schedule(s)``, from `optimizer`'s two
    hyperparameters: the peak ``learning_rate`` and the schedule's value at that step, ``lr_schedule``."""
    return learning_rate * lr_schedule


def optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW, ``u_s = -lr_s (adam_s(clip(g)) + weight_decay * p)`` with ``lr_s`` the
    `scheduled_learning_rate`: ``optax.adamw``'s chain (``scale_by_adam -> add_decayed_weights -> scale(-lr)``)
    after global-norm clipping, its learning rate injected (``optax.inject_hyperparams``): the peak is a float32
    number in the optimizer state, not a constant of the compiled step, and the schedule's value at each step
    is recorded beside it."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)

    def adamw(learning_rate, lr_schedule):
        return optax.chain(
            optax.clip_by_global_norm(settings.grad_clip),
            optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-8),
            optax.add_decayed_weights(settings.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(scheduled_learning_rate(learning_rate, lr_schedule)))

    return optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=settings.learning_rate, lr_schedule=schedule(settings))


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
    """Float32 parameters from ``PRNGKey(seed)``, the optimizer state (with the peak learning rate), step 0,
    replicated over the mesh."""
    shapes = ((1,) + example["tokens"].shape[1:],
              None if "vectors" not in example else (1,) + example["vectors"].shape[1:])
    params = _init_fn(model, shapes)(jax.random.PRNGKey(settings.seed))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(settings).init(params))
    replicated, _ = _shardings(mesh)
    return jax.device_put(state, replicated)


# ----------------------------------------------------------------------------------------------------
# the compiled steps
# ----------------------------------------------------------------------------------------------------

def make_train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool = True,
                    supervised: Optional[int] = None) -> Callable:
    """``(state, batch) -> (state, metrics)``, compiled for the mesh; one compilation per model, mesh,
    optimizer settings and ``supervised`` in a process (the learning rate and the seed are not
    compiled in). ``supervised``: see `logits_and_labels` (`supervised_count` of the training set)."""
    return _train_step(model, _compile_key(settings), mesh, donate, supervised)


@functools.lru_cache(maxsize=64)
def _train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool,
                supervised: Optional[int]) -> Callable:
    tx = optimizer(settings)            # its update reads the learning rate from the state, not from settings

    def step(state: TrainState, batch):
        def loss_fn(params):
            return loss_and_metrics(*logits_and_labels(model, params, batch, supervised))

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": metrics["loss"], "accuracy": metrics["accuracy"],
                   "grad_norm": optax.tree.norm(grads), "learning_rate": scheduled_learning_rate(**opt_state.hyperparams)}
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
