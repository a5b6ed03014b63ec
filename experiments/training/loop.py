"""The training loop: `train` one run, or `train_block` several runs that differ only in their learning rate and
seed as one program, each in its own run folder, resuming from its latest readable checkpoint.

The batch of step ``s`` is a pure function of ``(seed, s)`` (`BatchSchedule`: an epoch permutation of a fixed
training set), so a run restarted from an orbax checkpoint continues exactly as if never stopped; metric rows
written after that checkpoint are dropped on restart and written again, identically. The loss and the
gradient norm are read at every logged step and before every checkpoint: when either is not finite, the run
stops there without saving that state and is recorded as ``diverged``. With ``stop_accuracy`` a run stops at
the first evaluation whose accuracy on ``stop_set`` reaches it (Zoology's early stop at 0.99), with a
checkpoint of that step: its evaluation there is its result.

A run alone and a run in a block go through the same loop (`_train_runs`): what differs is the engine that
steps their states. `_Alone` compiles one run's step; `_Block` vectorizes the same step over the runs
(``jax.vmap``; `experiments.training.step.make_block_train_step`) on a `block_mesh` that spreads the runs, or
their batches, over every local device. A run of a block that is done (stopped early, diverged, or resumed
from a later checkpoint than the others and not yet reached) is frozen by the block step's mask, and keeps its
own checkpoints, logs and records, so that each run's folder is the same as if it had trained alone (to
float32 round-off: `tests/test_block.py` measures it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import common
from experiments.training.logs import Progress, RunLogs
from experiments.training.records import check_run_folder, restore_checkpoint, run_identity
from experiments.training.step import (
    Batch, TrainSettings, TrainState, block_key, block_mesh, data_mesh, evaluate, evaluate_block, init_state,
    make_block_eval_step, make_block_train_step, make_eval_step, make_train_step, measure_throughput,
    put_batch, put_block_batch, stack_states, supervised_count, unstack_states,
)


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


class Stopped(Exception):
    """Raised by `train` at ``stop_at_step`` (tests: a run killed after its last checkpoint)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a block (`train_block`): its folder, its settings (a block's runs differ only in
    ``learning_rate`` and ``seed``) and the ``description`` its ``run.json`` records."""

    workdir: str
    settings: TrainSettings
    description: Optional[dict] = None


def train(model: nn.Module, settings: TrainSettings, train_data: Batch, eval_sets: dict[str, Batch],
          workdir: str, *, mesh: Optional[Mesh] = None, description: Optional[dict] = None,
          stop_at_step: Optional[int] = None, on_step: Optional[Callable[[int], None]] = None,
          desc: str = "train") -> dict:
    """Train ``model`` in ``workdir`` (resuming from its latest readable checkpoint), evaluate on ``eval_sets``,
    and return ``{"status", "eval": {name: metrics}, "final_train": ..., "throughput": ..., "num_params": ...,
    "stopped_at_step": ...}``.

    ``on_step(step)`` is called after every step (after its checkpoint is saved).
    ``workdir`` gets ``checkpoints/``, ``metrics.csv``, ``eval.csv``, ``run.json`` (`run_identity`: a restart
    with another one is an error naming the fields) and ``results.json`` when done. ``status`` is
    ``"finished"`` (trained to ``num_steps``, or stopped early: ``stopped_at_step`` says where, else it is
    None), or ``"diverged"`` when the loss or the gradient norm was not finite at a step where they are read
    (every ``log_every`` and ``checkpoint_every`` steps, and the last): the run stops there without saving
    that state, is not evaluated, and ``diverged_at_step`` says where. ``mesh``: a `data_mesh` (default: every
    local device splits the batch).
    """
    mesh = mesh or data_mesh()
    if settings.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={settings.batch_size} is not divisible by the {mesh.devices.size} local "
                         f"devices; choose a multiple of {mesh.devices.size}.")
    return _train_runs(model, [RunSpec(workdir, settings, description)], train_data, eval_sets,
                       lambda supervised, evals: _Alone(model, settings, mesh, supervised, evals),
                       stop_at_step=stop_at_step, on_step=on_step, desc=desc)[0]


def train_block(model: nn.Module, runs: Sequence[RunSpec], train_data: Batch, eval_sets: dict[str, Batch], *,
                devices=None, stop_at_step: Optional[int] = None, on_step: Optional[Callable[[int], None]] = None,
                desc: str = "block") -> list[dict]:
    """Train the ``runs`` of one model on one training set as one program (the step vectorized over the runs,
    see the module docstring) and return each run's results, in order, as `train` would (each run in its own
    folder, with its checkpoints, logs, ``run.json`` and ``results.json``; a run resumes from its own latest
    checkpoint). The runs must differ only in ``learning_rate`` and ``seed`` (a ``ValueError`` says which
    setting differs). ``devices``: default every local device (`block_mesh` spreads the runs over them where
    their number allows, else each run's batch)."""
    runs = list(runs)
    if not runs:
        return []
    shared = block_key(runs[0].settings)
    for run in runs[1:]:
        if block_key(run.settings) != shared:
            differ = [f.name for f in dataclasses.fields(shared)
                      if getattr(block_key(run.settings), f.name) != getattr(shared, f.name)]
            raise ValueError(f"train_block: the runs of a block may differ only in learning_rate and seed; "
                             f"{run.workdir} differs from {runs[0].workdir} in {', '.join(differ)}.")
    if len({os.path.abspath(r.workdir) for r in runs}) != len(runs):
        raise ValueError("train_block: two runs of the block have the same folder.")
    mesh = block_mesh(len(runs), devices)
    if shared.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size={shared.batch_size} is not divisible by the {mesh.shape['data']} devices that "
                         f"split each batch of this block of {len(runs)} runs; choose a multiple of "
                         f"{mesh.shape['data']}.")
    return _train_runs(model, runs, train_data, eval_sets,
                       lambda supervised, evals: _Block(model, shared, mesh, supervised, evals, len(runs)),
                       stop_at_step=stop_at_step, on_step=on_step, desc=desc)


# ----------------------------------------------------------------------------------------------------
# engines: what steps, evaluates and saves the states of the runs
# ----------------------------------------------------------------------------------------------------

class _Alone:
    """One run: the compiled step of `make_train_step` on a `data_mesh`."""

    def __init__(self, model, settings, mesh, supervised, eval_supervised):
        self.mesh, self.runs = mesh, 1
        self.train_step = make_train_step(model, settings, mesh, supervised=supervised)
        self.eval_steps = {name: make_eval_step(model, mesh, s) for name, s in eval_supervised.items()}

    def place(self, states: list[TrainState]) -> TrainState:
        return states[0]

    def step(self, state, batches: list[Batch], active: list[bool]):
        return self.train_step(state, put_batch(batches[0], self.mesh))

    def read(self, metrics) -> list[dict]:
        return [{k: float(v) for k, v in jax.device_get(metrics).items()}]

    def evaluate(self, state, name: str, data: Batch, batch_size: int) -> list[dict]:
        return [evaluate(self.eval_steps[name], state.params, data, batch_size, self.mesh)]

    def states(self, state) -> list:
        return [state]

    def throughput(self, state, batches: list[Batch], steps: int) -> dict:
        return measure_throughput(self.train_step, state, put_batch(batches[0], self.mesh), steps)


class _Block:
    """``R`` runs: the vectorized step of `make_block_train_step` on a `block_mesh`."""

    def __init__(self, model, settings, mesh, supervised, eval_supervised, runs: int):
        self.mesh, self.runs = mesh, runs
        self.train_step = make_block_train_step(model, settings, mesh, supervised=supervised)
        self.eval_steps = {name: make_block_eval_step(model, mesh, s) for name, s in eval_supervised.items()}
        self._runs_sharding = NamedSharding(mesh, PartitionSpec("runs"))

    def place(self, states: list[TrainState]) -> TrainState:
        return stack_states(states, self.mesh)

    def _active(self, active: list[bool]):
        return jax.device_put(np.asarray(active, bool), self._runs_sharding)

    def step(self, state, batches: list[Batch], active: list[bool]):
        return self.train_step(state, put_block_batch(batches, self.mesh), self._active(active))

    def read(self, metrics) -> list[dict]:
        host = jax.device_get(metrics)
        return [{k: float(v[r]) for k, v in host.items()} for r in range(self.runs)]

    def evaluate(self, state, name: str, data: Batch, batch_size: int) -> list[dict]:
        return evaluate_block(self.eval_steps[name], state.params, data, batch_size, self.mesh)

    def states(self, state) -> list:
        return unstack_states(state)

    def throughput(self, state, batches: list[Batch], steps: int) -> dict:
        return measure_throughput(self.train_step, state, put_block_batch(batches, self.mesh), steps,
                                  self._active([True] * self.runs), runs=self.runs)


# ----------------------------------------------------------------------------------------------------
# one run's bookkeeping
# ----------------------------------------------------------------------------------------------------

class _Run:
    """One run's folder while it trains: identity, checkpoints, logs, and how it ended."""

    def __init__(self, spec: RunSpec, train_data: Batch, eval_sets: dict[str, Batch]):
        self.workdir, self.settings = spec.workdir, spec.settings
        settings = spec.settings
        if settings.stop_accuracy and settings.stop_set not in eval_sets:
            raise ValueError(f"TrainSettings.stop_set={settings.stop_set!r}: not an evaluation set of this run "
                             f"(its sets: {', '.join(eval_sets) or 'none'}).")
        os.makedirs(self.workdir, exist_ok=True)
        self.identity = run_identity(spec.description, settings, train_data["labels"].shape,
                                     {name: data["labels"].shape for name, data in eval_sets.items()})
        if not check_run_folder(self.workdir, self.identity):
            common.write_json(os.path.join(self.workdir, "run.json"), self.identity)
        self.batches = BatchSchedule(train_data, settings.batch_size, settings.seed)
        self.start, self.logs, self.manager = 0, None, None
        self.done = False                  # no more training steps
        self.last: dict = {}               # the last metrics read
        self.diverged_at: Optional[int] = None
        self.stopped_at: Optional[int] = None
        self.final_eval: Optional[dict] = None
        self.ended_at: Optional[float] = None

    def restore(self, state: TrainState) -> TrainState:
        """The run's latest readable checkpoint (or ``state``); opens its logs and checkpoint manager there."""
        state, restored = restore_checkpoint(self.workdir, state, set_aside=True)
        self.start = restored or 0
        if restored is not None:
            logging.info("%s: resumed from the checkpoint at step %d", self.workdir, self.start)
        self.logs = RunLogs(self.workdir, self.settings, self.start)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(self.workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.settings.keep_checkpoints, create=True))
        if self.start >= self.settings.num_steps:         # finished before (its results.json lost): evaluate again
            self.done = True
        elif self.start and self._is_eval_step(self.start) and self.settings.stop_accuracy:
            results = self.logs.eval_results(self.start)   # it stopped early here before its results were written
            if self._reached(results):
                self.done, self.stopped_at, self.final_eval = True, self.start, results
        return state

    def _is_eval_step(self, step: int) -> bool:
        return bool(self.settings.eval_every) and step % self.settings.eval_every == 0 and \
            step != self.settings.num_steps

    def _reached(self, results: dict) -> bool:
        s = self.settings
        return bool(s.stop_accuracy) and s.stop_set in results and results[s.stop_set]["accuracy"] >= s.stop_accuracy

    def active(self, step: int) -> bool:
        return not self.done and self.start <= step

    def logged(self, done: int) -> bool:
        return done % self.settings.log_every == 0 or done == self.settings.num_steps

    def saved(self, done: int) -> bool:
        return done % self.settings.checkpoint_every == 0 or done == self.settings.num_steps

    def check_metrics(self, done: int, values: Optional[dict]) -> None:
        """At a logged or checkpoint step (``values`` read): stop a run whose loss or gradient norm is not
        finite; log the row of a logged step."""
        if values is not None and not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.diverged_at, self.last, self.done = done, values, True
            self.logs.train_row(done, values)
            logging.error("%s: diverged at step %d (loss=%s, grad_norm=%s): stopped, not saved, recorded as diverged "
                          "in results.json; a smaller learning rate may train", self.workdir, done, values["loss"],
                          values["grad_norm"])
            return
        if self.logged(done):
            self.last = values
            self.logs.train_row(done, values)

    def after_eval(self, done: int, results: dict) -> None:
        """The evaluation of step ``done`` (periodic, or the last step's): its rows; the run ends at the last
        step, or earlier when it reached ``stop_accuracy``."""
        self.logs.eval_rows(done, results)
        if done == self.settings.num_steps or self._reached(results):
            self.done, self.final_eval = True, results
            if done != self.settings.num_steps:
                self.stopped_at = done
                logging.info("%s: %s accuracy %.4f >= %s at step %d: stopped early", self.workdir,
                             self.settings.stop_set, results[self.settings.stop_set]["accuracy"],
                             self.settings.stop_accuracy, done)

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def end_step(self) -> int:
        return self.stopped_at or self.settings.num_steps

    def finish(self, state, base: dict, throughput: dict) -> dict:
        """Make sure the last state is saved, write ``results.json``, return the results."""
        self.manager.wait_until_finished()
        if self.diverged_at is None and self.manager.latest_step() != self.end_step():   # e.g. resumed from a
            self.manager.save(self.end_step(), args=ocp.args.StandardSave(state), force=True)   # finished run's
            self.manager.wait_until_finished()                                                  # checkpoint
        if self.diverged_at is not None:
            results = {"status": "diverged", "diverged_at_step": self.diverged_at, "eval": {}, "final_train": self.last,
                       "throughput": {}, **base}
        else:
            results = {"status": "finished", "stopped_at_step": self.stopped_at, "eval": self.final_eval,
                       "final_train": self.last or self.logs.last_train_row(),   # none this session: resumed
                       "throughput": throughput, **base}
        common.write_json(os.path.join(self.workdir, "results.json"), {**self.identity, **results})
        return results

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.logs is not None:
            self.logs.close()


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------

def _train_runs(model: nn.Module, specs: list[RunSpec], train_data: Batch, eval_sets: dict[str, Batch],
                make_engine: Callable, *, stop_at_step: Optional[int], on_step: Optional[Callable[[int], None]],
                desc: str) -> list[dict]:
    runs = [_Run(spec, train_data, eval_sets) for spec in specs]
    engine = make_engine(supervised_count(train_data["labels"]),
                         {name: supervised_count(data["labels"]) for name, data in eval_sets.items()})
    settings = specs[0].settings                     # what every run shares (all but learning rate and seed)
    example_mesh = data_mesh(engine.mesh.devices.flatten())
    states = []
    try:
        for spec, run in zip(specs, runs):
            states.append(run.restore(init_state(model, spec.settings, train_data, example_mesh)))
        num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(states[0].params)))
        state = engine.place(states)
        del states
        base = {"num_params": num_params, "steps": settings.num_steps, "devices": engine.mesh.devices.size,
                "platform": jax.default_backend(), "runs_per_step": engine.runs}
        training = [r for r in runs if not r.done]
        first = min((r.start for r in training), default=settings.num_steps)
        throughput = {}
        if training:       # timed on a copy of the state before training (the warm-up step compiles the step)
            throughput = engine.throughput(state, [r.batches(0) for r in runs], settings.throughput_steps)
        progress = Progress(settings.num_steps, first, settings.progress, desc)
        results: list[Optional[dict]] = [None] * len(runs)
        train_start = time.time()

        def end(i: int, host_state) -> None:
            run = runs[i]
            results[i] = run.finish(host_state, {**base, "train_seconds_this_session": time.time() - train_start},
                                    throughput)

        # runs with nothing to train (finished before, or stopped early before their records were written)
        ends = [i for i, r in enumerate(runs) if r.done]
        if ends:
            _evaluate_and_end(engine, state, runs, ends, eval_sets, settings.num_steps, end, train=False)
        try:
            for step in range(first, settings.num_steps):
                active = [r.active(step) for r in runs]
                if not any(active):
                    if all(r.done for r in runs):
                        break
                    continue                 # the others resume from a later checkpoint
                batches = [r.batches(step) if a else None for r, a in zip(runs, active)]
                filler = next(b for b in batches if b is not None)       # a frozen run's step is discarded
                state, metrics = engine.step(state, [b if b is not None else filler for b in batches], active)
                done = step + 1
                stepping = [i for i, a in enumerate(active) if a]
                if any(runs[i].logged(done) or runs[i].saved(done) for i in stepping):
                    values = engine.read(metrics)
                    for i in stepping:
                        if runs[i].logged(done) or runs[i].saved(done):
                            runs[i].check_metrics(done, values[i])
                first_active = runs[stepping[0]]
                progress.update(done, {"loss": first_active.last["loss"], "acc": first_active.last["accuracy"]}
                                if first_active.logged(done) and first_active.last else None)
                evaluating = [i for i in stepping if not runs[i].done and
                              (runs[i]._is_eval_step(done) or done == settings.num_steps)]
                saving = [i for i in stepping if not runs[i].done and runs[i].saved(done)]
                _evaluate_and_end(engine, state, runs, evaluating, eval_sets, done, None, train=True)
                saving += [i for i in evaluating if runs[i].done and i not in saving]     # stopped early here
                if saving:
                    host = engine.states(state)
                    for i in saving:
                        runs[i].save(done, host[i])
                for i in stepping:
                    if runs[i].done and results[i] is None:
                        end(i, engine.states(state)[i] if runs[i].diverged_at is None else None)
                if stop_at_step is not None and done == stop_at_step:
                    for run in runs:
                        run.manager.wait_until_finished()
                    raise Stopped(f"stopped at step {done}")
                if on_step is not None:
                    on_step(done)
        finally:
            progress.close()
        return results
    finally:
        for run in runs:
            run.close()


def _evaluate_and_end(engine, state, runs: list[_Run], which: list[int], eval_sets: dict[str, Batch], step: int,
                      end: Optional[Callable], *, train: bool) -> None:
    """Evaluate the runs ``which`` at ``step`` (every evaluation set; one pass of the engine for all of them).
    ``train``: an evaluation during training (`_Run.after_eval` decides whether the run ends there); else the
    runs ended before this session: those without their final evaluation get it (at their last step), and
    ``end`` writes their records."""
    need = [i for i in which if runs[i].final_eval is None]
    if need:
        per_set = {name: engine.evaluate(state, name, data, runs[need[0]].settings.eval_batch_size)
                   for name, data in eval_sets.items()}
        for i in need:
            results = {name: per_set[name][i] for name in eval_sets}
            if train:
                runs[i].after_eval(step, results)
            else:
                runs[i].logs.eval_rows(runs[i].end_step(), results)
                runs[i].final_eval = results
    if not train:
        host = engine.states(state)
        for i in which:
            end(i, host[i])
