"""The training loop: `train` a model in a run folder, resuming from its latest readable checkpoint.

The batch of step ``s`` is a pure function of ``(seed, s)`` (`BatchSchedule`: an epoch permutation of a fixed
training set), so a run restarted from an orbax checkpoint continues exactly as if never stopped; metric rows
written after that checkpoint are dropped on restart and written again, identically. The loss and the
gradient norm are read at every logged step and before every checkpoint: when either is not finite, the run
stops there without saving that state and is recorded as ``diverged``.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from experiments import common
from experiments.training.logs import RunLogs
from experiments.training.records import check_run_folder, restore_checkpoint, run_identity
from experiments.training.step import (
    Batch, TrainSettings, data_mesh, evaluate, init_state, make_eval_step, make_train_step, measure_throughput,
    put_batch, supervised_count,
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
    logs = RunLogs(workdir, settings, start, desc)
    train_step = make_train_step(model, settings, mesh, supervised=supervised_count(train_data["labels"]))
    eval_steps = {name: make_eval_step(model, mesh, supervised_count(data["labels"]))
                  for name, data in eval_sets.items()}
    batches = BatchSchedule(train_data, settings.batch_size, settings.seed)

    def run_evals(step: int) -> dict:
        results = {name: evaluate(eval_steps[name], state.params, data, settings.eval_batch_size, mesh)
                   for name, data in eval_sets.items()}
        logs.eval_rows(step, results)
        return results

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints, create=True))
    last, diverged_at = {}, None
    train_start = time.time()
    try:
        for step in range(start, settings.num_steps):
            state, metrics = train_step(state, put_batch(batches(step), mesh))
            done = step + 1
            logged = done % settings.log_every == 0 or done == settings.num_steps
            saved = done % settings.checkpoint_every == 0 or done == settings.num_steps
            if logged or saved:              # read the metrics where they are logged or the state is saved
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                    diverged_at, last = done, values
                    logs.train_row(done, values)
                    logging.error("%s: diverged at step %d (loss=%s, grad_norm=%s): stopped, not saved, recorded "
                                  "as diverged in results.json; a smaller learning rate may train", workdir, done,
                                  values["loss"], values["grad_norm"])
                    break
            if logged:
                last = values
                logs.train_row(done, last)
            logs.progress.update(done, {"loss": last["loss"], "acc": last["accuracy"]} if logged else None)
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
        logs.progress.close()
        manager.close()
    results = {"num_params": num_params, "steps": settings.num_steps, "train_seconds_this_session": train_seconds,
               "devices": mesh.devices.size, "platform": jax.default_backend()}
    if diverged_at is not None:
        results = {"status": "diverged", "diverged_at_step": diverged_at, "eval": {}, "final_train": last,
                   "throughput": {}, **results}
    else:
        results = {"status": "finished", "eval": run_evals(settings.num_steps),
                   "final_train": last or logs.last_train_row(),      # none this session: a finished run resumed
                   "throughput": measure_throughput(train_step, state, put_batch(batches(0), mesh),
                                                    settings.throughput_steps), **results}
    logs.close()
    common.write_json(os.path.join(workdir, "results.json"), {**identity, **results})
    return results
