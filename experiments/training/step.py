"""The compiled training and evaluation steps, and what they are made of.

* `TrainSettings`: everything that determines a training run (with the model and the data);
* the optimizer: any optax alias named with its arguments (``"adamw(b1=0.9, b2=0.98, eps=1e-8)"``, the
  default; ``"lion(b1=0.95)"``, ``"sgd(momentum=0.9)"``, ...) or a ``GradientTransformation``; global-norm
  clipping before it, decoupled weight decay on matrices only, a linear warm-up then a schedule (cosine,
  linear, constant, or any optax schedule); the peak learning rate is a hyperparameter in the optimizer
  state (``optax.inject_hyperparams``), so that one compiled step serves every learning rate of a sweep;
* the loss: cross-entropy and accuracy at the supervised positions only;
* devices: a 1-D `jax.sharding.Mesh` ("data") over the local devices, the batch split along its first axis,
  parameters and optimizer state replicated (XLA inserts the gradient all-reduce); the same code runs on
  one device;
* a block of runs: runs that differ only in their learning rate and seed train as one program, the step
  vectorized (``jax.vmap``) over a leading run axis of the state and of the batch, on a 2-D mesh
  ``("runs", "data")`` (`block_mesh`: the runs split over the devices where their number allows, the batch
  over the rest; each device steps its own runs, `_per_device_runs`); a run that is done (stopped early,
  diverged, finished) stays frozen (`make_block_train_step`);
* `evaluate` over a whole set (`evaluate_block`: every run of a block at once), and `measure_throughput` of
  a compiled training step.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import time
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from designmodels import did_you_mean
from experiments.tasks import IGNORE

# "tokens" [N, L] int, "labels" [N, L] int, optional "vectors" [N, L, F], optional "cu_seqlens" [N, S + 1] int
# (each row packs sequences end to end: experiments.tasks.pack; the model takes it as a keyword)
Batch = dict[str, np.ndarray]


DEFAULT_OPTIMIZER = "adamw(b1=0.9, b2=0.98, eps=1e-8)"
DEFAULT_SCHEDULE = "cosine"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (with the model and the data).

    The update of step ``s`` is ``optimizer`` at the learning rate ``lr_s = learning_rate * schedule(s)``
    after global-norm clipping at ``grad_clip``, plus decoupled weight decay ``-lr_s * weight_decay * p`` on
    matrices (``p.ndim >= 2``) for every optimizer (see `optimizer`):

    * ``optimizer``: an optax alias, by name with its keyword arguments in Python syntax
      (``"adamw(b1=0.9, b2=0.98, eps=1e-8)"``, ``"lion(b1=0.95, b2=0.98)"``, ``"sgd(momentum=0.9)"``,
      ``"contrib.muon"``); the learning rate and the weight decay are not among them (they are the
      fields here). Or, from Python, a ``GradientTransformation`` used as it is: the whole update, with
      its own learning rate and schedule; ``learning_rate`` must then be None, and ``schedule``,
      ``warmup_steps``, ``final_lr_fraction``, ``weight_decay`` and ``grad_clip`` do not apply.
    * ``schedule``: ``schedule(s)`` rises linearly from 0 to 1 over ``warmup_steps``, then follows
      ``"cosine"`` (to ``final_lr_fraction`` at ``num_steps``), ``"linear"`` (likewise), ``"constant"``, or
      any optax schedule by name with its arguments, counted from the end of the warm-up, in units of the
      peak (``"exponential_decay(init_value=1.0, transition_steps=500, decay_rate=0.5)"``).
    """

    num_steps: int
    batch_size: int
    learning_rate: Optional[float] = None
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.0     # cosine and linear decay to learning_rate * this
    optimizer: Union[str, optax.GradientTransformation] = DEFAULT_OPTIMIZER
    schedule: str = DEFAULT_SCHEDULE
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                # 0: evaluate at the end only
    # Early stop (Zoology's): the run stops at the first evaluation (every eval_every steps) where the accuracy
    # on the evaluation set ``stop_set`` reaches ``stop_accuracy``; 0 never stops.
    stop_accuracy: float = 0.0
    stop_set: str = ""
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
        if not 0 <= self.stop_accuracy <= 1:
            raise ValueError(f"TrainSettings.stop_accuracy={self.stop_accuracy}: must be in [0, 1] (0: never stop "
                             "early).")
        if self.stop_accuracy and not (self.eval_every and self.stop_set):
            raise ValueError(f"TrainSettings.stop_accuracy={self.stop_accuracy} needs an evaluation set to watch and "
                             f"a period: stop_set={self.stop_set!r} (a name of the evaluation sets) and eval_every="
                             f"{self.eval_every} (at least 1).")
        if isinstance(self.optimizer, optax.GradientTransformation):
            if self.learning_rate is not None:
                raise ValueError(f"TrainSettings.learning_rate={self.learning_rate}: the optimizer is a "
                                 "GradientTransformation, which carries its own learning rate (and schedule); "
                                 "accepted: learning_rate=None, or the optimizer by name (e.g. 'adamw').")
            return
        if self.learning_rate is None or not self.learning_rate > 0:
            raise ValueError(f"TrainSettings.learning_rate={self.learning_rate}: must be positive.")
        _named_optimizer(self.optimizer)
        _named_schedule(self.schedule)

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

class OptimizerError(ValueError):
    """An optimizer or schedule named in the settings that optax does not have or that cannot be built."""


def parse_call(text: str, field: str) -> tuple[str, dict]:
    """``"name(a=1, b=(2, 3))" -> ("name", {"a": 1, "b": (2, 3)})``: a dotted name, optionally called with
    keyword arguments whose values are Python literals."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call is not None else node
    parts = []
    while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.insert(0, target.id)
    if not isinstance(target, ast.Name) or (call is not None and call.args):
        raise OptimizerError(f"TrainSettings.{field}={text!r}: not a name with keyword arguments; accepted: e.g. "
                             "'adamw', 'lion(b1=0.95, b2=0.98)', 'contrib.muon(ns_steps=5)'.")
    kwargs = {}
    for keyword in (call.keywords if call is not None else ()):
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise OptimizerError(f"TrainSettings.{field}={text!r}: the value of {keyword.arg} is not a Python "
                                 "literal (a number, string, tuple, list, dict, True/False/None).") from None
    return ".".join(parts), kwargs


def _optax_function(name: str, field: str, text: str, kind: str) -> Callable:
    function = optax
    for part in name.split("."):
        function = getattr(function, part, None)
    if not callable(function) or isinstance(function, type):
        known = sorted(n for n in dir(optax) if not n.startswith("_") and callable(getattr(optax, n)))
        if kind == "schedule":
            known = ["cosine", "linear", "constant"] + [n for n in known if "schedule" in n or "decay" in n]
        examples = ("adamw, lion, sgd, adafactor, contrib.muon" if kind == "optimizer" else
                    "'cosine', 'linear', 'constant', exponential_decay, cosine_decay_schedule")
        raise OptimizerError(f"TrainSettings.{field}={text!r}: optax has no {kind} {name!r}"
                             f"{did_you_mean(name, known)}; accepted: any optax {kind} by name, e.g. {examples}.")
    return function


def _check_keywords(function: Callable, kwargs: dict, field: str, text: str, name: str) -> None:
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise OptimizerError(f"TrainSettings.{field}={text!r}: optax.{name} takes no {', '.join(unknown)}"
                             f"{''.join(did_you_mean(u, parameters) for u in unknown)}; accepted: "
                             f"{', '.join(parameters)}.")


_DECAY_WORDS = ("weight_decay",)


@functools.lru_cache(maxsize=64)
def _named_optimizer(text: str) -> tuple[Callable, tuple, bool]:
    """``(optax alias, its keyword arguments, whether it applies the weight decay itself)`` for the
    optimizer named in ``text``, checked once: the alias takes a learning rate, the keywords exist, and it
    updates a small tree from ``(grads, state, params)`` alone (line searches, which need the loss, do not)."""
    if not isinstance(text, str):
        raise OptimizerError(f"TrainSettings.optimizer: got {type(text).__name__}; accepted: an optax alias by name "
                             "with its keyword arguments (e.g. 'adamw(b2=0.95)'), or an optax.GradientTransformation.")
    name, kwargs = parse_call(text, "optimizer")
    alias = _optax_function(name, "optimizer", text, "optimizer")
    parameters = inspect.signature(alias).parameters
    if "learning_rate" not in parameters:
        raise OptimizerError(f"TrainSettings.optimizer={text!r}: optax.{name} takes no learning_rate, which the "
                             "sweeps set (learning_rate times the schedule); accepted: an optax alias with one.")
    fixed = sorted(k for k in kwargs if k == "learning_rate" or any(w in k for w in _DECAY_WORDS))
    if fixed:
        raise OptimizerError(f"TrainSettings.optimizer={text!r}: {', '.join(fixed)} is set by the settings, not the "
                             "optimizer's arguments: learning_rate (the peak, times the schedule) and weight_decay "
                             "(config.weight_decay: decoupled, on matrices only, for every optimizer); accepted: "
                             "the alias's other arguments.")
    _check_keywords(alias, kwargs, "optimizer", text, name)
    own_decay = "weight_decay" in parameters and "mask" in parameters
    try:
        tx = alias(learning_rate=1e-3, **kwargs)
        tree = {"w": jnp.ones((2, 2), jnp.float32)}
        tx.update(tree, tx.init(tree), tree)
    except Exception as error:  # noqa: BLE001 (any failure of the alias itself, reported with its cause)
        raise OptimizerError(f"TrainSettings.optimizer={text!r}: optax.{name} cannot be used by this training "
                             f"loop ({type(error).__name__}: {str(error)[:300]}); it must update from "
                             "(grads, state, params) alone (line searches such as lbfgs need the loss too).") from None
    return alias, tuple(sorted(kwargs.items())), own_decay


@functools.lru_cache(maxsize=64)
def _named_schedule(text: str):
    """``"cosine"``, ``"linear"``, ``"constant"``, or ``(optax schedule, its keyword arguments)``."""
    if text in ("cosine", "linear", "constant"):
        return text
    if not isinstance(text, str):
        raise OptimizerError(f"TrainSettings.schedule: got {type(text).__name__}; accepted: 'cosine', 'linear', "
                             "'constant' or an optax schedule by name with its keyword arguments.")
    name, kwargs = parse_call(text, "schedule")
    function = _optax_function(name, "schedule", text, "schedule")
    _check_keywords(function, kwargs, "schedule", text, name)
    try:
        value = float(function(**kwargs)(0))
    except Exception as error:  # noqa: BLE001
        raise OptimizerError(f"TrainSettings.schedule={text!r}: optax.{name} cannot be built "
                             f"({type(error).__name__}: {str(error)[:200]}); its values multiply the peak "
                             "learning rate, so give them in units of the peak (e.g. init_value=1.0).") from None
    if not math.isfinite(value):
        raise OptimizerError(f"TrainSettings.schedule={text!r}: its value at step 0 is {value}; accepted: finite.")
    return function, tuple(sorted(kwargs.items()))


def schedule(settings: TrainSettings) -> optax.Schedule:
    """The learning rate over the peak, ``schedule(s)``: linear warm-up from 0 to 1 over ``warmup_steps``,
    then ``settings.schedule`` (see `TrainSettings`) from the end of the warm-up."""
    named = _named_schedule(settings.schedule)
    warmup, steps, end = settings.warmup_steps, settings.num_steps, settings.final_lr_fraction
    if named == "cosine":
        if warmup >= steps:
            return optax.linear_schedule(0.0, 1.0, steps)
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=end)
    if named == "linear":
        after = optax.linear_schedule(1.0, end, max(steps - warmup, 1))
    elif named == "constant":
        after = optax.constant_schedule(1.0)
    else:
        function, kwargs = named
        after = function(**dict(kwargs))
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), after], [warmup])


def scheduled_learning_rate(learning_rate, lr_schedule) -> jax.Array:
    """The learning rate of step ``s``, ``lr_s = learning_rate * schedule(s)``, from `optimizer`'s two
    hyperparameters: the peak ``learning_rate`` and the schedule's value at that step, ``lr_schedule``."""
    return learning_rate * lr_schedule


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """The update rule of the settings.

    A named optax alias ``opt``: ``u_s = opt_s(clip(g); lr_s) - lr_s * weight_decay * mask(p)``, with
    ``clip`` the global-norm clipping at ``grad_clip``, ``lr_s`` the `scheduled_learning_rate` and ``mask``
    the matrices (``p.ndim >= 2``): decoupled weight decay (Loshchilov & Hutter). An alias that applies it
    itself (its ``weight_decay`` and ``mask`` arguments: adamw, lion, lamb, nadamw, adan, ...) is given
    them; to any other the decay is added after it. The default, ``adamw(b1=0.9, b2=0.98, eps=1e-8)``, is
    ``scale_by_adam -> add_decayed_weights -> scale(-lr_s)``. Its learning rate is injected
    (``optax.inject_hyperparams``): the peak is a float32 number in the optimizer state, not a constant of
    the compiled step, and the schedule's value at each step is recorded beside it.

    A ``GradientTransformation`` in ``settings.optimizer`` is returned as it is.
    """
    if isinstance(settings.optimizer, optax.GradientTransformation):
        return settings.optimizer
    alias, kwargs, own_decay = _named_optimizer(settings.optimizer)
    kwargs = dict(kwargs)

    def build(learning_rate, lr_schedule):
        lr = scheduled_learning_rate(learning_rate, lr_schedule)
        parts = [optax.clip_by_global_norm(settings.grad_clip)]
        if own_decay:
            parts.append(alias(learning_rate=lr, weight_decay=settings.weight_decay, mask=_matrices, **kwargs))
        else:
            parts.append(alias(learning_rate=lr, **kwargs))
            if settings.weight_decay:
                parts.append(optax.add_decayed_weights(-lr * settings.weight_decay, mask=_matrices))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(
        learning_rate=settings.learning_rate, lr_schedule=schedule(settings))


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate of the step just taken, ``lr_s``, from the optimizer state of a named optimizer
    (NaN for a ``GradientTransformation`` that records none: an ``inject_hyperparams`` one with a
    ``learning_rate`` gives that)."""
    hyperparams = getattr(opt_state, "hyperparams", None) or {}
    if "lr_schedule" in hyperparams:
        return scheduled_learning_rate(**hyperparams)
    if "learning_rate" in hyperparams:
        return jnp.asarray(hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def _compile_key(settings: TrainSettings) -> TrainSettings:
    """The settings with the fields that do not change the compiled step set to fixed values."""
    return dataclasses.replace(block_key(settings), log_every=1, eval_every=0, checkpoint_every=1,
                               keep_checkpoints=1, eval_batch_size=1, throughput_steps=0, progress=False,
                               stop_accuracy=0.0, stop_set="")


def block_key(settings: TrainSettings) -> TrainSettings:
    """What the runs of one block share: their settings less the learning rate and the seed (a
    ``GradientTransformation`` carries its own learning rate: its runs differ in the seed only)."""
    named = not isinstance(settings.optimizer, optax.GradientTransformation)
    return dataclasses.replace(settings, learning_rate=1.0 if named else None, seed=0)


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
    # a packed batch (rows of sequences end to end, experiments.tasks.pack) carries its boundaries
    packing = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
    if supervised is None or supervised >= labels.shape[-1]:
        return model.apply(params, batch["tokens"], batch.get("vectors"), **packing), labels
    order = jnp.argsort(labels == IGNORE, axis=-1, stable=True)           # labelled positions first
    positions = order[..., :max(supervised, 1)]
    logits = model.apply(params, batch["tokens"], batch.get("vectors"), positions, **packing)
    return logits, jnp.take_along_axis(labels, positions, axis=-1)


# ----------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------

def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every local device) with the axis ``"data"``."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), ("data",))


def block_mesh(num_runs: int, devices=None) -> Mesh:
    """A 2-D mesh ``("runs", "data")`` over ``devices`` (default: every local device) for a block of
    ``num_runs`` runs: the runs are split over the largest number of devices that divides both counts (each
    device then trains its own runs, with no communication), the batch of each run over the remaining
    factor (data parallel, as `data_mesh`). E.g. 12 runs on 2 devices: 6 runs per device; 3 runs on 2
    devices: each run's batch split in 2."""
    devices = list(jax.local_devices() if devices is None else devices)
    runs = max(d for d in range(1, len(devices) + 1) if len(devices) % d == 0 and num_runs % d == 0)
    return Mesh(np.array(devices).reshape(runs, len(devices) // runs), ("runs", "data"))


def _data_parallel(mesh: Mesh) -> int:
    """How many devices split a batch: the size of the mesh's ``"data"`` axis."""
    return mesh.shape["data"]


def _shardings(mesh: Mesh):
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def _check_divisible(n: int, mesh: Mesh) -> None:
    size = _data_parallel(mesh)
    if n % size:
        raise ValueError(f"batch size {n} is not divisible by the {size} devices of the mesh; choose a "
                         f"batch size that is a multiple of {size}.")


def put_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, split along the batch axis (over the mesh's ``"data"`` axis; replicated
    over its ``"runs"`` axis, if any)."""
    _check_divisible(next(iter(batch.values())).shape[0], mesh)
    _, sharded = _shardings(mesh)
    return {name: jax.device_put(x, sharded) for name, x in batch.items()}


def put_block_batch(batches: list[Batch], mesh: Mesh) -> dict[str, jax.Array]:
    """Stack the host batches of a block's runs (one each, in order) along a new leading run axis and place
    them on a `block_mesh`: ``[R, B, ...]``, the runs split over ``"runs"`` and each batch over ``"data"``."""
    _check_divisible(next(iter(batches[0].values())).shape[0], mesh)
    sharding = NamedSharding(mesh, PartitionSpec("runs", "data"))
    return {name: jax.device_put(np.stack([b[name] for b in batches]), sharding) for name in batches[0]}


def stack_states(states: list["TrainState"], mesh: Mesh) -> "TrainState":
    """The states of a block's runs stacked along a leading run axis, split over the mesh's ``"runs"``."""
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *jax.device_get(states))
    return jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("runs")))


def unstack_states(stacked: "TrainState") -> list["TrainState"]:
    """The state of each run of a stacked block state, on the host (numpy arrays; one transfer)."""
    host = jax.device_get(stacked)
    return [jax.tree.map(lambda x: np.asarray(x[r]), host) for r in range(int(host.step.shape[0]))]


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


def make_block_train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool = True,
                          supervised: Optional[int] = None) -> Callable:
    """``(states, batches, active) -> (states, metrics)`` for a block of ``R`` runs on a `block_mesh`:
    ``states`` stacked along a leading run axis (`stack_states`), ``batches`` ``[R, B, ...]``
    (`put_block_batch`: each run its own data order), ``active`` bool ``[R]``. Each run takes the step of
    `make_train_step` (``jax.vmap`` of the same function: its own parameters, optimizer state, learning rate
    and schedule position); a run that is not ``active`` keeps its state unchanged (its step is computed and
    discarded: the program stays the same while runs stop). ``metrics`` are ``[R]`` arrays."""
    return _block_train_step(model, _compile_key(settings), mesh, donate, supervised)


def _step_function(model: nn.Module, settings: TrainSettings, supervised: Optional[int]) -> Callable:
    """One run's training step, ``(state, batch) -> (state, metrics)``, uncompiled: the function that
    `make_train_step` compiles and `make_block_train_step` vectorizes."""
    tx = optimizer(settings)            # its update reads the learning rate from the state, not from settings

    def step(state: TrainState, batch):
        def loss_fn(params):
            return loss_and_metrics(*logits_and_labels(model, params, batch, supervised))

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": metrics["loss"], "accuracy": metrics["accuracy"],
                   "grad_norm": optax.tree.norm(grads), "learning_rate": current_learning_rate(opt_state)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return step


@functools.lru_cache(maxsize=64)
def _train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool,
                supervised: Optional[int]) -> Callable:
    replicated, sharded = _shardings(mesh)
    return jax.jit(_step_function(model, settings, supervised), in_shardings=(replicated, sharded),
                   out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())


def _per_device_runs(fn: Callable, mesh: Mesh, in_specs) -> Callable:
    """``fn`` (vectorized over a leading run axis) with each device of a `block_mesh` taking its own runs
    (``jax.shard_map``, manual over ``"runs"``; the batch stays split over ``"data"`` by XLA). The runs are
    independent, so this is what XLA's partitioning would do, except where it cannot partition an
    operation: the Pallas kernels are custom calls without a partitioning rule, whose inputs XLA would
    gather from every device, each device then running the kernels on every run. No value crosses devices
    along ``"runs"`` (``check_vma=False``: the filters' initial states, constants, need not be marked as
    varying over the runs)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec("runs"),
                         axis_names=frozenset({"runs"}), check_vma=False)


@functools.lru_cache(maxsize=64)
def _block_train_step(model: nn.Module, settings: TrainSettings, mesh: Mesh, donate: bool,
                      supervised: Optional[int]) -> Callable:
    one = _per_device_runs(jax.vmap(_step_function(model, settings, supervised)), mesh,
                           (PartitionSpec("runs"), PartitionSpec("runs")))

    def step(states: TrainState, batches, active):
        new, metrics = one(states, batches)
        keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
        return jax.tree.map(keep, new, states), metrics

    runs = NamedSharding(mesh, PartitionSpec("runs"))
    batches = NamedSharding(mesh, PartitionSpec("runs", "data"))
    return jax.jit(step, in_shardings=(runs, batches, runs), out_shardings=(runs, runs),
                   donate_argnums=(0,) if donate else ())


def _eval_function(model: nn.Module, supervised: Optional[int]) -> Callable:
    def step(params, batch):
        _, metrics = loss_and_metrics(*logits_and_labels(model, params, batch, supervised))
        return {k: metrics[k] for k in ("nll_sum", "correct", "count")}
    return step


@functools.lru_cache(maxsize=64)
def make_eval_step(model: nn.Module, mesh: Mesh, supervised: Optional[int] = None) -> Callable:
    """``(params, batch) -> {"nll_sum", "correct", "count"}``, compiled for the mesh (``supervised``:
    see `logits_and_labels`)."""
    replicated, sharded = _shardings(mesh)
    return jax.jit(_eval_function(model, supervised), in_shardings=(replicated, sharded), out_shardings=replicated)


@functools.lru_cache(maxsize=64)
def make_block_eval_step(model: nn.Module, mesh: Mesh, supervised: Optional[int] = None) -> Callable:
    """`make_eval_step` for a block: ``(params [R, ...], batch) -> {name: [R]}``, every run's parameters on
    the same batch (``jax.vmap`` over the parameters only), on a `block_mesh`."""
    replicated, sharded = _shardings(mesh)
    every_run = _per_device_runs(jax.vmap(_eval_function(model, supervised), in_axes=(0, None)), mesh,
                                 (PartitionSpec("runs"), PartitionSpec()))
    return jax.jit(every_run, in_shardings=(NamedSharding(mesh, PartitionSpec("runs")), sharded),
                   out_shardings=replicated)


def _eval_totals(eval_step: Callable, params, data: Batch, batch_size: int, mesh: Mesh, runs: int) -> list[dict]:
    """Sums of ``nll_sum``, ``correct`` and ``count`` over ``data`` for each of ``runs`` runs (1: an unstacked
    ``params``), added batch by batch in Python numbers (so that a run alone and in a block add the same
    numbers in the same order)."""
    size = _data_parallel(mesh)
    batch_size = max(size, batch_size // size * size)
    n = data["labels"].shape[0]
    totals = [{"nll_sum": 0.0, "correct": 0, "count": 0} for _ in range(runs)]
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in data.items()}
        missing = batch_size - part["labels"].shape[0]
        if missing:
            part = {k: np.concatenate([v, np.full((missing,) + v.shape[1:], IGNORE if k == "labels" else 0,
                                                   v.dtype)]) for k, v in part.items()}
        out = jax.device_get(eval_step(params, put_batch(part, mesh)))
        for r, total in enumerate(totals):
            for k in total:
                total[k] += np.reshape(out[k], (runs,))[r].item()
    return totals


def _metrics(totals: dict) -> dict[str, float]:
    count = max(totals["count"], 1)
    return {"accuracy": totals["correct"] / count, "loss": totals["nll_sum"] / count, "count": totals["count"]}


def evaluate(eval_step: Callable, params, data: Batch, batch_size: int, mesh: Mesh) -> dict[str, float]:
    """Accuracy and loss over every supervised position of ``data`` (the last batch padded with
    unsupervised rows, so that every batch has one shape)."""
    return _metrics(_eval_totals(eval_step, params, data, batch_size, mesh, 1)[0])


def evaluate_block(eval_step: Callable, params, data: Batch, batch_size: int, mesh: Mesh) -> list[dict[str, float]]:
    """`evaluate` for every run of a block at once (``eval_step`` of `make_block_eval_step`, ``params``
    stacked): one result per run, in order."""
    runs = int(jax.tree.leaves(params)[0].shape[0])
    return [_metrics(t) for t in _eval_totals(eval_step, params, data, batch_size, mesh, runs)]


def measure_throughput(train_step: Callable, state, batch, steps: int, *extra, runs: int = 1) -> dict:
    """Tokens per second of the compiled training step on ``batch`` (all its positions; for a block step,
    ``batch`` is the block's ``[R, B, L]`` batch and ``extra`` its ``active`` mask: the tokens of every
    run count), after one warm-up step, timed over ``steps`` steps on a copy of ``state`` (the run's state
    is untouched). ``runs``: how many runs the step trains at once (recorded as ``runs_per_step``)."""
    if steps < 1:
        return {}
    tokens = int(np.prod(batch["tokens"].shape))
    work = jax.tree.map(jnp.copy, state)
    work, _ = train_step(work, batch, *extra)
    jax.block_until_ready(work)
    start = time.perf_counter()
    for _ in range(steps):
        work, metrics = train_step(work, batch, *extra)
    jax.block_until_ready((work, metrics))
    seconds = (time.perf_counter() - start) / steps
    return {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds, "tokens_per_step": tokens,
            "timed_steps": steps, "runs_per_step": runs}
