"""What a run folder holds, and whether it can be used.

A run folder (``workdir`` of `experiments.training.train`) holds ``run.json`` (`run_identity`: what the run's
results depend on), ``checkpoints/`` (orbax), ``metrics.csv`` and ``eval.csv`` (`experiments.training.logs`)
and, when the run is done, ``results.json`` (the identity and the results, ``status`` ``finished`` or
``diverged``). A folder holds one run: a run asked with another identity is refused, naming ``run.json`` and
the differing fields (`check_run_folder`); an unreadable checkpoint is set aside for the one before it, with a
warning (`restore_checkpoint`); a damaged ``run.json`` is an error naming it (`common.RunFileError`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Optional

import jax
import optax
import orbax.checkpoint as ocp
from absl import logging

from experiments import common
from experiments.training.step import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULE, TrainSettings

# Settings that change neither a run's trajectory nor its evaluations: a run is resumed and reported
# whatever their values (the throughput is measured again by whoever finishes the run).
UNRECORDED_SETTINGS = ("progress", "throughput_steps", "checkpoint_every", "keep_checkpoints", "eval_batch_size")

# Settings added after runs were recorded without them, with the value those runs were made with: a ``run.json``
# that lacks one was made with this value (AdamW with these arguments, a warm-up then cosine decay: the only
# recipe before the optimizer could be named).
ADDED_SETTINGS = {"optimizer": DEFAULT_OPTIMIZER, "schedule": DEFAULT_SCHEDULE}
# How a ``GradientTransformation`` given in Python is recorded: its functions have no stable description, so
# two of them cannot be told apart (describe it in the run's ``description``).
GIVEN_TRANSFORMATION = "a GradientTransformation given in Python"


def run_identity(description: Optional[dict], settings: TrainSettings, train_shape, eval_shapes: dict) -> dict:
    """What a run's results are a function of, as its ``run.json`` records it: the caller's ``description``
    (model, data, task), the settings less `UNRECORDED_SETTINGS`, and the shapes ``[N, L]`` of the training
    set's labels and of each evaluation set's (``eval_shapes``: name -> shape). A run folder holds one
    identity: a run asked with another is refused (`check_run_folder`), never resumed or reported."""
    recorded = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                if f.name not in UNRECORDED_SETTINGS}
    if isinstance(recorded["optimizer"], optax.GradientTransformation):
        recorded["optimizer"] = GIVEN_TRANSFORMATION
    identity = {"description": description or {}, "settings": recorded, "train_examples": int(train_shape[0]),
                "train_shape": [int(n) for n in train_shape],
                "eval_sets": {name: [int(n) for n in shape] for name, shape in eval_shapes.items()}}
    return json.loads(json.dumps(identity))        # as it reads back from run.json (tuples become lists)


def identity_differences(recorded: dict, asked: dict, prefix: str = "") -> list[str]:
    """``"field: value here, value asked"`` for every (dotted) field in which two identities differ."""
    def show(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

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
    remedy = f"it records the settings {run_dir} was trained with, so the run cannot be checked; delete {run_dir} " \
             "to train it again."
    recorded = common.read_json(path, remedy)
    if not isinstance(recorded, dict):
        raise common.RunFileError(f"{path}: not a record of settings (a JSON {type(recorded).__name__}); {remedy}")
    if isinstance(recorded.get("settings"), dict):
        recorded = {**recorded, "settings": {**ADDED_SETTINGS, **recorded["settings"]}}
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



def load_checkpoint(workdir: str, step: Optional[int] = None) -> dict:
    """The saved `TrainState` of a run (``step``, ``params``, ``opt_state``) as a tree of arrays, from its
    newest readable checkpoint (an unreadable one is skipped with a warning) or from ``step``; e.g.
    ``load_checkpoint(run_dir)["params"]`` for the model. A `common.RunFileError` naming the run folder when
    there is no readable checkpoint."""
    state, found = restore_checkpoint(workdir, step=step)
    if found is None:
        raise common.RunFileError(f"{workdir}: no checkpoint to load (no {workdir}/checkpoints/<step>).")
    return state


def is_diverged(record: dict) -> bool:
    """Whether a run's record (``results.json``) is of a run stopped because its loss was not finite."""
    return record.get("status") == "diverged"
