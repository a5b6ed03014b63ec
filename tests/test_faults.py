"""Fault injection for the training runs: each fault below is either recovered (the run ends exactly as an
uninterrupted one: the same metric rows, evaluations and parameters) or refused with an error that names
the file, folder or field and says what to do. Nothing finished is lost and nothing stale is reported.

The faults: a process SIGKILLed at a random step and resumed; each kind of run file damaged in turn
(checkpoints, results.json, run.json, metrics.csv, eval.csv); the config changed between runs (every field
of the trained experiments' configs); NaN batches and a learning rate that diverges. `FAULTS` counts them;
docs/experiments.md states the count (checked below)."""
import dataclasses
import functools
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import mqar as mqar_config, recall as recall_config
from experiments import common, models, mqar, recall, sweep, tasks, training
from tests.support import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = training.TrainSettings(num_steps=8, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=1,
                                  eval_every=4, checkpoint_every=2, keep_checkpoints=2, throughput_steps=0,
                                  progress=False)
DESCRIPTION = {"experiment": "faults", "model": "attention"}


@functools.lru_cache(maxsize=None)
def _problem():
    """A tiny model and recall data (with key vectors, so that a batch can hold NaN)."""
    vocab = tasks.recall_vocab_size(4)
    model = models.LanguageModel("attention", vocab, 16, head_dim=8, backend="sequential")
    return model, tasks.recall(64, 16, 2, 4, 4, seed=0), {"test": tasks.recall(16, 16, 2, 4, 4, seed=1)}


def _train(workdir, settings=SETTINGS, data=None, **kwargs) -> dict:
    model, train_data, evals = _problem()
    return training.train(model, settings, train_data if data is None else data, evals, str(workdir),
                          description=DESCRIPTION, **kwargs)


def _identity(settings=SETTINGS) -> dict:
    _, train_data, evals = _problem()
    return training.run_identity(DESCRIPTION, settings, train_data["labels"].shape,
                                 {n: d["labels"].shape for n, d in evals.items()})


def _run(workdir, settings=SETTINGS, identity=None) -> sweep.Run:
    model, train_data, evals = _problem()
    return sweep.Run(str(workdir), identity or _identity(settings), model, settings, lambda: (train_data, evals),
                     ("faults",), DESCRIPTION)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every recovered run must equal."""
    workdir = tmp_path_factory.mktemp("reference")
    return str(workdir), _train(workdir)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _assert_same_run(a: str, b: str) -> None:
    """Two run folders with the same metric rows, evaluations and final parameters, bit for bit."""
    for name in ("metrics.csv", "eval.csv"):
        assert _read(os.path.join(a, name)) == _read(os.path.join(b, name)), name
    ra, rb = (common.read_json(os.path.join(d, "results.json"), "") for d in (a, b))
    assert ra["eval"] == rb["eval"] and ra["final_train"] == rb["final_train"] and ra["status"] == "finished"
    for x, y in zip(jax.tree.leaves(training.load_checkpoint(a)), jax.tree.leaves(training.load_checkpoint(b))):
        np.testing.assert_array_equal(x, y)


def _interrupted(workdir, at: int = 7) -> str:
    """A run stopped after step ``at`` (checkpoints of steps 4 and 6 kept)."""
    with pytest.raises(training.Stopped):
        _train(workdir, stop_at_step=at)
    return str(workdir)


def _damage_checkpoint(run_dir: str, step: int, how: str) -> None:
    step_dir = os.path.join(run_dir, "checkpoints", str(step))
    assert os.path.isdir(step_dir), os.listdir(os.path.dirname(step_dir))
    if how == "missing":
        shutil.rmtree(os.path.join(step_dir, "default"))
        return
    for path in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True):
        if os.path.isfile(path) and "commit_success" not in path:
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                if how == "truncated" and os.sep + "default" + os.sep in path:
                    f.truncate(size // 2)
                elif how == "garbage" and path.endswith("_METADATA"):
                    f.write(b"\x00{garbage")


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ----------------------------------------------------------------------------------------------------
# the faults
# ----------------------------------------------------------------------------------------------------

KILL_SEEDS = [0, 1, 2]
CHECKPOINT_DAMAGE = ["truncated", "garbage", "missing"]
RESULTS_DAMAGE = ["empty", "truncated"]
RUN_JSON_DAMAGE = ["empty", "truncated", "missing"]
CSV_DAMAGE = [("metrics.csv", "last row cut by a kill"), ("eval.csv", "last row cut by a kill"),
              ("metrics.csv", "empty"), ("metrics.csv", "row damaged"), ("metrics.csv", "rows lost")]
CHANGED_SETTINGS = ["finished", "unfinished", "eval sets"]
NAN_FAULTS = ["at a logged step", "between logged steps", "learning rate 1e8"]


def _config_fields(module) -> list[str]:
    """The fields of a trained experiment's config that are not grid axes (each is a folder level) nor
    `UNRECORDED_FIELDS`: changing any of them between two runs must be refused."""
    config = module.get_config()
    return sorted(k for k in config if k not in GRID_AXES | UNRECORDED_FIELDS | {"smoke", "smoke_settings"})


GRID_AXES = {"variants", "models", "d_models", "learning_rates", "seeds", "train_shapes", "train_mixture"}
# fields that change neither a run's trajectory nor its evaluations (training.UNRECORDED_SETTINGS), or only
# what the process does around the runs (vectorize, block_runs: whether runs share a program; to float32
# round-off, tests/test_block.py)
UNRECORDED_FIELDS = set(training.UNRECORDED_SETTINGS) | {"report", "check_only", "kill_at_step", "vectorize",
                                                         "block_runs"}
# a field whose perturbation needs another field set (in both configs), or whose smoke value is empty
PERTURBATION_CONTEXT = {"stop_accuracy": {"eval_every": 2}}
PERTURBATION_OF_EMPTY = {"test_shapes": ((16, 1),)}
CONFIG_FIELDS = [("mqar", f) for f in _config_fields(mqar_config)] + [("recall", f) for f in
                                                                      _config_fields(recall_config)]

FAULTS = (KILL_SEEDS + CHECKPOINT_DAMAGE + ["every checkpoint"] + RESULTS_DAMAGE + ["results.json in a report"]
          + RUN_JSON_DAMAGE + CSV_DAMAGE + CHANGED_SETTINGS + CONFIG_FIELDS + NAN_FAULTS)


def _smoke(module, **overrides):
    return smoke_config(module, **overrides)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_a_run_killed_at_a_random_step_resumes_exactly(tmp_path, seed):
    """``python -m experiments.mqar`` SIGKILLed after a random step (a checkpoint may be half written), then
    resumed: every file equals that of an uninterrupted run."""
    steps = 10
    kill_at = int(np.random.default_rng(seed).integers(1, steps))
    overrides = dict(variants=("base",), models=("attention",), num_steps=steps, log_every=1, throughput_steps=0,
                     eval_multipliers=((1, 1),))
    flags = [f"--config.{k}={v!r}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "float32"}     # as in this session (conftest.py)
    killed = subprocess.run([sys.executable, "-m", "experiments.mqar", "--config=configs/mqar.py",
                             "--config.smoke=True", *flags, f"--config.kill_at_step={kill_at}",
                             f"--workdir={tmp_path / 'killed'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    config = _smoke(mqar_config, **overrides)
    with jax.enable_x64(False):          # as on the command line (this test session enables float64)
        resumed = mqar.run(config, str(tmp_path / "killed"))
        whole = mqar.run(config, str(tmp_path / "whole"))
    assert resumed[0]["eval"] == whole[0]["eval"]
    run = os.path.relpath(resumed[0]["run_dir"], str(tmp_path / "killed"))
    _assert_same_run(str(tmp_path / "killed" / run), str(tmp_path / "whole" / run))


@pytest.mark.parametrize("how", CHECKPOINT_DAMAGE)
def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tmp_path, reference, how, caplog):
    run_dir = _interrupted(tmp_path / "run")
    _damage_checkpoint(run_dir, 6, how)
    with caplog.at_level(logging.WARNING):
        _train(run_dir)
    warnings = [r.getMessage() for r in caplog.records if "unreadable checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoints/6" in warnings[0] and "using the one of step 4" in warnings[0]
    assert "\n" not in warnings[0] and os.path.isdir(os.path.join(run_dir, "checkpoints.unreadable", "6"))
    _assert_same_run(run_dir, reference[0])


def test_no_readable_checkpoint_is_a_one_line_error_naming_the_run(tmp_path):
    run_dir = _interrupted(tmp_path / "run")
    for step in (4, 6):
        _damage_checkpoint(run_dir, step, "truncated")
    with pytest.raises(common.RunFileError) as error:
        _train(run_dir)
    text = _one_line(error)
    assert text.startswith(f"{run_dir}: no readable checkpoint (step 6: ") and "step 4: " in text
    assert f"delete {run_dir} to train this run again" in text and len(text) < 1000
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["4", "6"]     # left as they were
    with pytest.raises(common.RunFileError, match="no readable checkpoint"):
        training.load_checkpoint(run_dir)


@pytest.mark.parametrize("how", RESULTS_DAMAGE)
def test_a_damaged_results_json_is_rebuilt_from_the_last_checkpoint(tmp_path, reference, how, caplog):
    run_dir = str(tmp_path / "run")
    sweep.run_once(_run(run_dir))
    path = os.path.join(run_dir, "results.json")
    text = _read(path)
    with open(path, "w") as f:
        f.write("" if how == "empty" else text[:len(text) // 2])
    with caplog.at_level(logging.WARNING):
        record = sweep.run_once(_run(run_dir))
    assert any(path in r.getMessage() and "rebuilding it from the run's last checkpoint" in r.getMessage()
               for r in caplog.records)
    assert record["eval"] == reference[1]["eval"]
    _assert_same_run(run_dir, reference[0])


def test_a_damaged_results_json_in_a_report_is_named(tmp_path):
    config = _smoke(mqar_config, variants=("base",), models=("attention",), num_steps=2, throughput_steps=0)
    mqar.run(config, str(tmp_path))
    (path,) = glob.glob(str(tmp_path / "runs" / "**" / "results.json"), recursive=True)
    with open(path, "w") as f:
        f.write('{"description": {"experiment": "mq')
    with pytest.raises(common.RunFileError) as error:
        mqar.report(str(tmp_path))
    text = _one_line(error)
    assert text.startswith(f"{path}: truncated or corrupt") and "rebuild it from its last checkpoint" in text


@pytest.mark.parametrize("how", RUN_JSON_DAMAGE)
def test_a_damaged_run_json_is_refused_naming_it(tmp_path, how):
    run_dir = _interrupted(tmp_path / "run", at=3)
    path = os.path.join(run_dir, "run.json")
    if how == "missing":
        os.remove(path)
    else:
        text = _read(path)
        with open(path, "w") as f:
            f.write("" if how == "empty" else text[:len(text) // 2])
    with pytest.raises(common.RunFileError) as error:
        _train(run_dir)
    text = _one_line(error)
    assert text.startswith(f"{path}: {'missing' if how == 'missing' else how}") and f"delete {run_dir}" in text


@pytest.mark.parametrize("name, how", CSV_DAMAGE)
def test_a_damaged_metric_log_is_recovered_or_named(tmp_path, reference, name, how):
    """A last row cut short (a kill while writing it) is dropped and written again; rows lost or damaged
    before the checkpoint are an error naming the file: the run's log would have a hole."""
    run_dir = _interrupted(tmp_path / "run")
    path = os.path.join(run_dir, name)
    lines = _read(path).splitlines(keepends=True)
    # a kill while writing the row of a later step (say 10) after its first character: a "1" that would
    # read as a row of step 1
    damaged = {"last row cut by a kill": "".join(lines) + "1", "empty": "",
               "row damaged": "".join(lines[:2] + ["3,0.5\r\n"] + lines[3:]),
               "rows lost": "".join(lines[:3])}[how]
    with open(path, "w", newline="") as f:
        f.write(damaged)
    if how == "last row cut by a kill":
        _train(run_dir)
        _assert_same_run(run_dir, reference[0])
        return
    with pytest.raises(common.RunFileError) as error:
        _train(run_dir)
    text = _one_line(error)
    assert text.startswith(f"{path}: ") and f"delete {run_dir} to train this run again" in text
    assert {"empty": "empty: the rows of steps 1, 2, 3, 4, 5, ... are missing", "row damaged": "line 3 is damaged",
            "rows lost": "the rows of steps 3, 4, 5, 6 are missing"}[how] in text


@pytest.mark.parametrize("case", CHANGED_SETTINGS)
def test_a_run_asked_with_other_settings_is_refused_before_anything_trains(tmp_path, case):
    first = str(tmp_path / "runs" / "first")
    if case == "unfinished":
        _interrupted(first, at=3)
    else:
        _train(first)
    changed = {"finished": dict(num_steps=12), "unfinished": dict(warmup_steps=3), "eval sets": {}}[case]
    settings = dataclasses.replace(SETTINGS, **changed)
    identity = _identity(settings)
    if case == "eval sets":
        identity["eval_sets"]["longer"] = [16, 32]
    second = str(tmp_path / "runs" / "second")
    runs = [_run(second, settings, identity), _run(first, settings, identity)]
    with pytest.raises(common.RunFileError) as error:
        sweep.run_all(runs)
    text = _one_line(error)
    field = {"finished": "settings.num_steps: 8 here, 12 asked", "unfinished": "settings.warmup_steps: 2 here, 3 asked",
             "eval sets": 'eval_sets.longer: not recorded here, [16, 32] asked'}[case]
    assert text.startswith(os.path.join(first, "run.json") + ": this run was made with different settings (" + field)
    assert f"delete {first} to train it again" in text
    assert not os.path.exists(second)                       # refused before anything trained
    if case == "finished":                                    # the finished run's record is untouched
        assert common.read_json(os.path.join(first, "results.json"), "")["steps"] == 8


# string fields whose other values must still be valid ones (the type-based choice below would not be)
PERTURBED = {"optimizer": "sgd(momentum=0.9)", "schedule": "linear"}


def _perturbed(value, field=None):
    if field in PERTURBED:
        return PERTURBED[field]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value >= 0.5 else value + 0.25
    if isinstance(value, str):
        return "chunked" if value != "chunked" else "sequential"
    if isinstance(value, tuple):
        return value[:-1]
    raise TypeError(value)


@pytest.mark.parametrize("app, field", CONFIG_FIELDS)
def test_changing_any_config_field_between_runs_is_refused(tmp_path, app, field):
    """Every field of the trained experiments' configs that is not a grid axis is recorded in a run's
    identity: a new field that changes results but is not recorded fails here (or belongs to
    `UNRECORDED_FIELDS`)."""
    module, runs = {"mqar": (mqar_config, mqar.runs), "recall": (recall_config, recall.runs)}[app]
    context = PERTURBATION_CONTEXT.get(field, {})
    config = _smoke(module, **context)
    (first, *_) = runs(config, str(tmp_path))
    os.makedirs(first.folder)
    common.write_json(os.path.join(first.folder, "run.json"), first.identity)
    value = PERTURBATION_OF_EMPTY[field] if config[field] == () else _perturbed(config[field], field)
    changed = _smoke(module, **context, **{field: value})
    (again, *_) = runs(changed, str(tmp_path))
    assert again.folder == first.folder
    with pytest.raises(common.RunFileError, match="this run was made with different settings"):
        training.check_run_folder(again.folder, again.identity)


def _nan_rows(data, settings, step: int) -> dict:
    """``data`` with NaN key vectors in the rows of the batch of ``step`` (0-based)."""
    index = {"labels": data["labels"], "row": np.arange(data["labels"].shape[0])}
    rows = training.BatchSchedule(index, settings.batch_size, settings.seed)(step)["row"]
    vectors = np.array(data["vectors"])
    vectors[rows] = np.nan
    return {**data, "vectors": vectors}


@pytest.mark.parametrize("case", NAN_FAULTS[:2])
def test_a_nan_batch_stops_the_run_as_diverged(tmp_path, case):
    """Step 5 (1-based) sees NaN inputs: the loss is not finite from there on. Read at every logged step and
    at every checkpoint, it stops the run before a non-finite state is saved."""
    settings = SETTINGS if case == "at a logged step" else dataclasses.replace(SETTINGS, log_every=8)
    _, data, _ = _problem()
    results = _train(tmp_path, settings, data=_nan_rows(data, settings, 4))
    expected = 5 if case == "at a logged step" else 6          # the first step whose metrics are read
    assert results["status"] == "diverged" and results["diverged_at_step"] == expected
    assert results["eval"] == {} and not np.isfinite(results["final_train"]["loss"])
    record = common.read_json(str(tmp_path / "results.json"), "")
    assert training.is_diverged(record) and record["diverged_at_step"] == expected
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]              # nothing after the NaN saved
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(training.load_checkpoint(str(tmp_path))["params"]))
    assert int(training.read_csv(str(tmp_path / "metrics.csv"))[-1]["step"]) == expected


def test_a_diverged_learning_rate_is_reported_as_such_and_never_chosen(tmp_path):
    """``--config.learning_rates='(1e8,)'``: the run stops, results.csv and table.md say diverged (not an
    accuracy of 0), the app raises `common.Diverged` (exit status 3); a later learning rate that trains is the
    best one, the diverged run stays in results.csv."""
    base = dict(variants=("base",), models=("attention",), throughput_steps=0, eval_multipliers=((1, 1),))
    with pytest.raises(common.Diverged) as error:
        mqar.main(_smoke(mqar_config, learning_rates=(1e8,), **base), str(tmp_path))
    text = _one_line(error)
    assert text.startswith("1 of 1 runs diverged (loss not finite): ") and "d16_lr1.00e+08_seed0 (step " in text
    assert error.value.exit_status == 3
    table = _read(tmp_path / "table.md")
    assert "| base | (32, 2) | attention | 16 | - | 0 (+1 diverged) | diverged | - | - |" in table
    (row,) = training.read_csv(str(tmp_path / "results.csv"))
    assert row["status"] == "diverged" and not row.get("accuracy_L32_P2")
    mqar.main(_smoke(mqar_config, learning_rates=(3e-3,), **base), str(tmp_path))
    assert "| base | (32, 2) | attention | 16 | 3.0e-03 |" in _read(tmp_path / "table.md")
    rows = training.read_csv(str(tmp_path / "results.csv"))
    assert sorted(r["status"] for r in rows) == ["diverged", "finished"]


_APP = textwrap.dedent("""
    import sys
    from experiments import common

    mode = sys.argv.pop(1)
    if mode == "unfiltered":
        common.quiet_tpu_probe = lambda: None

    def experiment(config, workdir):
        import jax
        jax.devices()
        if mode == "diverged":
            raise common.Diverged("1 of 2 runs diverged (loss not finite): runs/x (step 4)")
        if mode == "damaged":
            raise common.RunFileError("runs/x/run.json: empty; delete runs/x to train it again.")

    common.run_app(experiment, config="configs/unification.py", outputs="nothing")
""")


def test_the_apps_exit_with_one_line_and_no_tpu_probe_line(tmp_path):
    """A `common.RunError` ends an app with its one line and its exit status (3: diverged, 1: a run file),
    without a traceback; and JAX's INFO line about an absent TPU is not printed (when JAX probes for one:
    ``JAX_PLATFORMS`` unset; the unfiltered app shows it is)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT

    def app(mode):
        return subprocess.run([sys.executable, "-c", _APP, mode, f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    diverged, damaged, unfiltered = app("diverged"), app("damaged"), app("unfiltered")
    assert diverged.returncode == 3 and damaged.returncode == 1, (diverged.stderr, damaged.stderr)
    for proc, line in ((diverged, "ERROR 1 of 2 runs diverged"), (damaged, "ERROR runs/x/run.json: empty")):
        assert proc.stderr.strip().splitlines()[-1].startswith(line) and "Traceback" not in proc.stderr
    probe = "Unable to initialize backend 'tpu'"
    if probe not in unfiltered.stderr:
        pytest.skip("JAX did not probe for a TPU here: nothing to filter")
    assert probe not in diverged.stderr and probe not in damaged.stderr


def test_the_docs_count_the_faults():
    text = " ".join(_read(os.path.join(ROOT, "docs", "experiments.md")).split())     # lines wrap anywhere
    assert f"{len(FAULTS)} faults tried, {len(FAULTS)} recovered or refused with a named cause" in text, len(FAULTS)


def test_identity_from_the_config_is_what_training_records(tmp_path):
    """The identity a sweep checks before training (from the config alone) is what `training.train` writes
    to run.json from the data: else every resumed run would be refused."""
    for module, app, overrides in ((mqar_config, mqar, dict(variants=("block",), models=("attention",))),
                                   (recall_config, recall, dict(models=("attention",)))):
        config = _smoke(module, num_steps=1, throughput_steps=0, **overrides)
        (run, *_) = app.runs(config, str(tmp_path / app.__name__))
        run.train()
        assert common.read_json(os.path.join(run.folder, "run.json"), "") == run.identity


def test_check_only_trains_nothing_and_refuses_other_settings(tmp_path):
    """``--config.check_only=True`` (experiments/concurrent_sweep.sh, before it queues the unfinished runs):
    every folder of the grid is checked, nothing trains."""
    config = _smoke(mqar_config, check_only=True)
    mqar.main(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "runs")
    run = mqar.runs(config, str(tmp_path))[-1]
    os.makedirs(run.folder)
    common.write_json(os.path.join(run.folder, "run.json"), {**run.identity, "train_examples": 1})
    with pytest.raises(common.RunFileError, match=r"run\.json: this run was made with different settings "
                                                  r"\(train_examples: 1 here, 64 asked\)"):
        mqar.main(config, str(tmp_path))
    assert os.listdir(run.folder) == ["run.json"]
