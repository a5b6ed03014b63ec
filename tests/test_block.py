"""The sweep engine: runs that differ only in their learning rate and seed train as one program
(`training.train_block`: ``jax.vmap`` of the one-run step over their stacked states), each run as it trains
alone: its own data order, schedule, early stop, divergence, checkpoints, resume and records.

"As alone" is measured here, on CPU, to be: bit for bit in every forward computation (the loss and accuracy of
a step, every evaluation, given the same parameters), and to float32 round-off in the gradient: XLA adds the
terms of the vectorized products and reductions of the backward pass in another order than the one-run
program's (measured: 1e-6 to 1.5e-5 of each leaf's largest entry at the first step, against 1e-7 to 6e-7 for the
one-run program given its batch rows in another order). Training carries that round-off on as it carries any
(a run's trajectory is a chaotic function of its start), so whole runs are compared with a tolerance, and the
block's own runs (resumed, frozen) bit for bit."""
import dataclasses
import json
import logging
import os
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mqar as mqar_config, mqar_original as mqar_original_config, recall as recall_config
from experiments import common, models, mqar, plotting, recall, sweep, tasks, training
from tests.support import run_on_cpu_devices, smoke_config, two_run_block
from tests import test_faults



# ----------------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------------

def test_a_block_step_is_each_runs_step_and_a_frozen_run_keeps_its_state():
    model = models.LanguageModel("gated_deltanet", 32, 8, num_layers=1, head_dim=8, backend="sequential")
    b = two_run_block(model, batch_size=8)
    data, y, one, block, states, batches, block_step = b.data, b.labels, b.one, b.block, b.states, b.batches, \
        b.block_step
    alone = [b.step(state, training.put_batch(batch, one)) for state, batch in zip(states, batches)]
    stacked = training.stack_states(states, block)
    both, metrics = block_step(stacked, training.put_block_batch(batches, block), jnp.array([True, True]))
    host = jax.device_get(metrics)
    for r, (state, m) in enumerate(alone):
        for key in ("loss", "accuracy", "learning_rate"):             # the forward pass: bit for bit
            assert float(host[key][r]) == float(m[key]), key
        np.testing.assert_allclose(host["grad_norm"][r], m["grad_norm"], rtol=2e-5)   # the gradient: round-off
        for a, b in zip(jax.tree.leaves(training.unstack_states(both)[r].params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.max(np.abs(b))) + 1e-12)
    # run 1 frozen: its state is untouched, run 0 gets the same step as with both active
    frozen, _ = block_step(stacked, training.put_block_batch(batches, block), jnp.array([True, False]))
    first, second = training.unstack_states(frozen)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(jax.device_get(states[1]))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(training.unstack_states(both)[0])):
        np.testing.assert_array_equal(a, b)
    # evaluation of every run at once: each run's own, the accuracy exactly and the mean loss to round-off (the
    # vectorized program may sum in another order: seen 1 ulp apart with jax 0.10.2 on this CPU)
    eval_block = training.make_block_eval_step(model, block, training.supervised_count(y))
    together = training.evaluate_block(eval_block, both.params, data, 16, block)
    eval_one = training.make_eval_step(model, one, training.supervised_count(y))
    for r in range(2):
        params = jax.device_put(training.unstack_states(both)[r].params)
        alone = training.evaluate(eval_one, params, data, 16, one)
        assert together[r].keys() == alone.keys() and together[r]["accuracy"] == alone["accuracy"]
        for key in alone:
            np.testing.assert_allclose(together[r][key], alone[key], rtol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------------------------------
# whole runs: early stop, divergence, resume
# ----------------------------------------------------------------------------------------------------

def _constant_task(n: int, seed: int) -> dict:
    """Random tokens whose last four positions are all labelled 5: a model learns it in a few steps at a high
    learning rate (so that a run stops early) and not at a tiny one."""
    rng = np.random.default_rng(seed)
    labels = np.full((n, 8), tasks.IGNORE, np.int32)
    labels[:, 4:] = 5
    return {"tokens": rng.integers(1, 32, size=(n, 8)).astype(np.int32), "labels": labels}


MODEL = models.LanguageModel("attention", 32, 16, head_dim=8, backend="sequential")
DATA, EVALS = _constant_task(32, 0), {"valid": _constant_task(16, 1), "test": _constant_task(16, 2)}
BASE = training.TrainSettings(num_steps=8, batch_size=8, learning_rate=1.0, log_every=1, eval_every=2,
                              checkpoint_every=2, keep_checkpoints=3, throughput_steps=0, progress=False,
                              stop_accuracy=0.99, stop_set="valid")
# stops early at step 2; trains every step; diverges at step 2; trains every step
RUNS = [(3e-1, 0), (1e-6, 1), (1e8, 2), (1e-5, 3)]


def _spec(folder, lr, seed):
    return training.RunSpec(str(folder), dataclasses.replace(BASE, learning_rate=lr, seed=seed), {"lr": lr})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each run of `RUNS` alone, and all of them as one block."""
    root = tmp_path_factory.mktemp("block")
    alone = [training.train(MODEL, dataclasses.replace(BASE, learning_rate=lr, seed=seed), DATA, EVALS,
                            str(root / f"alone{i}"), description={"lr": lr}) for i, (lr, seed) in enumerate(RUNS)]
    block = training.train_block(MODEL, [_spec(root / f"block{i}", *run) for i, run in enumerate(RUNS)], DATA, EVALS)
    return root, alone, block


def _rows(path):
    return training.read_csv(path)


def _assert_close_rows(a_path, b_path, rtol):
    a, b = _rows(a_path), _rows(b_path)
    assert [(r["step"], r.get("set")) for r in a] == [(r["step"], r.get("set")) for r in b], a_path
    for ra, rb in zip(a, b):
        for key in ra:
            if key not in ("step", "set", "count"):
                np.testing.assert_allclose(float(ra[key]), float(rb[key]), rtol=rtol, atol=1e-7, err_msg=key)


def test_each_run_of_a_block_ends_as_it_does_alone(trained):
    root, alone, block = trained
    assert [r["status"] for r in block] == ["finished", "finished", "diverged", "finished"]
    assert [r.get("stopped_at_step") for r in block] == [2, None, None, None]
    for i, (a, b) in enumerate(zip(alone, block)):
        for key in ("status", "stopped_at_step", "diverged_at_step", "steps", "num_params"):
            assert a.get(key) == b.get(key), (i, key)
        assert b["runs_per_step"] == 4 and a["runs_per_step"] == 1
        folder_a, folder_b = root / f"alone{i}", root / f"block{i}"
        assert json.loads((folder_a / "run.json").read_text()) == json.loads((folder_b / "run.json").read_text())
        for name in ("metrics.csv", "eval.csv"):
            _assert_close_rows(folder_a / name, folder_b / name, rtol=1e-4)
        checkpoints = lambda f: sorted(os.listdir(f / "checkpoints")) if (f / "checkpoints").exists() else []
        assert checkpoints(folder_a) == checkpoints(folder_b), i
        for name, metrics in a["eval"].items():
            np.testing.assert_allclose(metrics["accuracy"], b["eval"][name]["accuracy"], atol=1e-9)
    # the early-stopped run: evaluated where it stopped, its last checkpoint there, no row after it
    assert block[0]["eval"]["valid"]["accuracy"] >= 0.99
    assert int(_rows(root / "block0" / "metrics.csv")[-1]["step"]) == 2
    assert sorted(os.listdir(root / "block0" / "checkpoints")) == ["2"]
    assert int(training.load_checkpoint(str(root / "block0"))["step"]) == 2
    # the diverged run: nothing saved; the runs that went on: to the end
    assert block[2]["diverged_at_step"] == 2 and not os.listdir(root / "block2" / "checkpoints")
    assert int(training.load_checkpoint(str(root / "block3"))["step"]) == 8


def test_a_killed_block_resumes_to_the_same_files(trained, tmp_path):
    root, _, block = trained
    specs = [_spec(tmp_path / f"run{i}", *run) for i, run in enumerate(RUNS)]
    with pytest.raises(training.Stopped):
        training.train_block(MODEL, specs, DATA, EVALS, stop_at_step=5)
    assert int(_rows(tmp_path / "run1" / "metrics.csv")[-1]["step"]) == 5
    resumed = training.train_block(MODEL, specs, DATA, EVALS)
    for i in range(len(RUNS)):
        for name in ("metrics.csv", "eval.csv"):
            assert (tmp_path / f"run{i}" / name).read_text() == (root / f"block{i}" / name).read_text(), (i, name)
        assert resumed[i]["eval"] == block[i]["eval"] and resumed[i]["status"] == block[i]["status"]
        if block[i]["status"] == "finished":
            for a, b in zip(jax.tree.leaves(training.load_checkpoint(str(tmp_path / f"run{i}"))),
                            jax.tree.leaves(training.load_checkpoint(str(root / f"block{i}")))):
                np.testing.assert_array_equal(a, b)


def test_a_run_stopped_early_and_killed_before_its_record_resumes_as_stopped(trained, tmp_path):
    """Killed after the checkpoint of its early stop, before results.json: it does not train on."""
    root, alone, _ = trained
    folder = tmp_path / "run"
    shutil.copytree(root / "alone0", folder)
    os.remove(folder / "results.json")
    again = training.train(MODEL, dataclasses.replace(BASE, learning_rate=RUNS[0][0], seed=RUNS[0][1]), DATA, EVALS,
                           str(folder), description={"lr": RUNS[0][0]})
    assert again["stopped_at_step"] == 2 and again["eval"] == alone[0]["eval"]
    for name in ("metrics.csv", "eval.csv"):
        assert (folder / name).read_text() == (root / "alone0" / name).read_text(), name


def test_a_damaged_checkpoint_of_one_run_of_a_block_falls_back_for_that_run_only(trained, tmp_path, caplog):
    """test_faults' guarantees inside a block: run 1's newest checkpoint (step 4) is unreadable after a kill at
    step 5; the block resumes run 1 from step 2 (the others wait, frozen, at 4), names the damaged checkpoint
    in one warning, sets it aside, and ends with every run's files equal to the uninterrupted block's."""
    root, _, block = trained
    specs = [_spec(tmp_path / f"run{i}", *run) for i, run in enumerate(RUNS)]
    with pytest.raises(training.Stopped):
        training.train_block(MODEL, specs, DATA, EVALS, stop_at_step=5)
    test_faults._damage_checkpoint(str(tmp_path / "run1"), 4, "truncated")
    with caplog.at_level(logging.WARNING):
        resumed = training.train_block(MODEL, specs, DATA, EVALS)
    warnings = [r.getMessage() for r in caplog.records if "unreadable checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and os.path.join("run1", "checkpoints", "4") in warnings[0]
    assert os.path.isdir(tmp_path / "run1" / "checkpoints.unreadable" / "4")
    for i in range(len(RUNS)):
        for name in ("metrics.csv", "eval.csv"):
            assert (tmp_path / f"run{i}" / name).read_text() == (root / f"block{i}" / name).read_text(), (i, name)
        assert resumed[i]["eval"] == block[i]["eval"] and resumed[i]["status"] == block[i]["status"]


def test_a_run_of_a_block_with_no_readable_checkpoint_is_refused_naming_it_before_anything_trains(tmp_path):
    specs = [_spec(tmp_path / f"run{i}", *run) for i, run in enumerate(RUNS)]
    with pytest.raises(training.Stopped):
        training.train_block(MODEL, specs, DATA, EVALS, stop_at_step=5)
    for step in (2, 4):
        test_faults._damage_checkpoint(str(tmp_path / "run3"), step, "truncated")
    with pytest.raises(common.RunFileError) as error:
        training.train_block(MODEL, specs, DATA, EVALS)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'run3'}: no readable checkpoint")
    assert int(_rows(tmp_path / "run1" / "metrics.csv")[-1]["step"]) <= 5     # the other runs did not train on
    assert not os.path.exists(tmp_path / "run1" / "results.json")


def test_a_block_refuses_runs_that_cannot_share_a_program(tmp_path):
    specs = [_spec(tmp_path / "a", 1e-3, 0),
             training.RunSpec(str(tmp_path / "b"), dataclasses.replace(BASE, learning_rate=1e-3, batch_size=16))]
    with pytest.raises(ValueError, match=r"differ only in learning_rate and seed; .*b differs from .*a in batch_size"):
        training.train_block(MODEL, specs, DATA, EVALS)
    with pytest.raises(ValueError, match="stop_set='valid' .* eval_every=0"):
        dataclasses.replace(BASE, eval_every=0)
    with pytest.raises(ValueError, match=r"stop_set='valid': not an evaluation set of this run \(its sets: test\)"):
        training.train(MODEL, BASE, DATA, {"test": EVALS["test"]}, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


_DEVICES = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    from tests import test_block as t
    from experiments import training

    assert jax.device_count() == 4, jax.devices()
    mesh = training.block_mesh(2)
    batch = {k: v[:8] for k, v in t.DATA.items()}                       # one batch of each run
    batch = training.put_block_batch([batch, batch], mesh)
    shards = sorted({tuple(s.data.shape) for s in batch["tokens"].addressable_shards})
    results = training.train_block(t.MODEL, [t._spec(sys.argv[1] + f"/run{i}", *t.RUNS[i]) for i in (0, 1)],
                                   t.DATA, t.EVALS)
    print("RESULT" + json.dumps({"mesh": dict(mesh.shape), "shards": shards, "devices": results[0]["devices"],
                                 "block3": dict(training.block_mesh(3).shape)}))
""")


def test_a_block_spreads_its_runs_and_their_batches_over_every_device(trained, tmp_path):
    """On 4 (simulated CPU) devices: 2 runs, each split over 2 devices (runs x data = 2 x 2), as each alone."""
    root, _, _ = trained
    out = run_on_cpu_devices(_DEVICES, 4, str(tmp_path), JAX_DEFAULT_MATMUL_PRECISION="float32")
    assert out["mesh"] == {"runs": 2, "data": 2} and out["devices"] == 4
    assert out["shards"] == [[1, 4, 8]]               # [run, batch, length]: one run, half its batch per device
    assert out["block3"] == {"runs": 1, "data": 4}    # 3 runs on 4 devices: each run's batch over all 4
    for i in (0, 1):
        for name in ("metrics.csv", "eval.csv"):
            _assert_close_rows(root / f"alone{i}" / name, tmp_path / f"run{i}" / name, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# the sweep: blocks of the grid, the learning-rate rule, the report
# ----------------------------------------------------------------------------------------------------

def _record(lr, seed, valid, test=None, diverged=False):
    record = {"description": {"model": "m", "learning_rate": lr}, "settings": {"seed": seed}}
    if diverged:
        return {**record, "status": "diverged", "eval": {}}
    return {**record, "status": "finished", "eval": {"valid": {"accuracy": valid}, "test": {"accuracy": test}}}


def test_the_learning_rate_is_chosen_by_the_mean_validation_accuracy_over_seeds():
    records = [_record(1e-3, 0, 0.8, 0.1), _record(1e-3, 1, 1.0, 0.2),          # mean 0.9: chosen
               _record(1e-2, 0, 0.85), _record(1e-2, 1, 0.85),                  # 0.85
               _record(1e-1, 0, 1.0), _record(1e-1, 1, None, diverged=True)]    # a diverged seed counts 0: 0.5
    cell = lambda r: (r["description"]["model"],)
    score = lambda r: r["eval"]["valid"]["accuracy"]
    best = sweep.seeds_at_best_learning_rate(records, cell, score)
    assert [r["settings"]["seed"] for r in best[("m",)]] == [0, 1]
    assert {r["description"]["learning_rate"] for r in best[("m",)]} == {1e-3}
    tie = sweep.seeds_at_best_learning_rate([_record(1e-2, 0, 0.5), _record(1e-3, 0, 0.5)], cell, score)
    assert tie[("m",)][0]["description"]["learning_rate"] == 1e-3                # a tie: the smaller rate
    dead = sweep.seeds_at_best_learning_rate([_record(1e-2, 0, None, diverged=True)], cell, score)
    assert training.is_diverged(dead[("m",)][0])                                  # kept, to be reported as such
    assert sweep.fmt_mean_spread([0.8, 1.0]) == "0.900 ± 0.141" and sweep.fmt_mean_spread([0.5]) == "0.500"
    assert sweep.fmt_mean_spread([]) == "-"


def test_the_sweep_trains_each_learning_rate_by_seed_block_as_one_program(tmp_path, monkeypatch):
    """``config.vectorize``: the 4 runs of one model (2 rates x 2 seeds) are one `train_block` call; the report
    has one row per run and, per cell, the mean ± spread over seeds at the best rate."""
    calls = []
    real = training.train_block
    monkeypatch.setattr(training, "train_block", lambda model, specs, *a, **k: calls.append(len(specs)) or
                        real(model, specs, *a, **k))
    config = mqar_config.get_config()
    config.smoke = True
    config = common.resolve(config)
    config.unlock()
    config.update(variants=("base",), models=("attention",), seeds=(0, 1), learning_rates=(3e-3, 1e-2),
                  throughput_steps=0)
    config.lock()
    records = mqar.run(config, str(tmp_path))
    assert calls == [4] and len(records) == 4 and all(r["runs_per_step"] == 4 for r in records)
    assert sorted(os.listdir(tmp_path / "runs" / "base" / "attention" / "L32_P2")) == [
        "d16_lr1.00e-02_seed0", "d16_lr1.00e-02_seed1", "d16_lr3.00e-03_seed0", "d16_lr3.00e-03_seed1"]
    mqar.report(str(tmp_path))
    rows = training.read_csv(str(tmp_path / "results.csv"))
    assert sorted((r["learning_rate"], r["seed"]) for r in rows) == [("0.003", "0"), ("0.003", "1"), ("0.01", "0"),
                                                                     ("0.01", "1")]
    line = next(l for l in (tmp_path / "table.md").read_text().splitlines() if l.startswith("| base |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[5] == "2" and " ± " in cells[6] and cells[9] == str(models.state_size("attention", 16, seq_len=32))
    for name in ("accuracy_vs_d_model.png", "accuracy_vs_state_size.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert mqar.run(config, str(tmp_path)) == records and calls == [4]           # finished: nothing trains


def test_a_training_shape_that_a_variant_cannot_hold_is_left_out_of_that_variant_only(tmp_path):
    """The protocol's grid: Block-MQAR cannot hold 64 pairs in 512 tokens (a key, its gap and its value take 8
    positions each), so (512, 64) is left out of block alone (logged) and the default config is valid; a
    variant that fits none of the training shapes is still an error (tests/test_training.py)."""
    config = common.resolve(mqar_config.get_config())
    mqar.check(config)
    cells = {(r.description["variant"], r.description["train_set"]) for r in mqar.runs(config, str(tmp_path))}
    assert {("base", "L512_P64"), ("update", "L512_P64"), ("forget", "L512_P64"), ("block", "L256_P16")} <= cells
    assert ("block", "L512_P64") not in cells
    assert len(cells) == 5 * 4 - 1          # 5 variants x 4 shapes, less block's (512, 64)


def test_every_model_has_its_own_colour():
    """One colour per model in every figure; a convolution-free form without a colour of its own takes its
    partner's (drawn dashed where both appear)."""
    own = [name for name in models.MODELS if not name.endswith(models.NO_CONV) or name in plotting.COLORS]
    colours = [plotting.color(name, default=None) for name in own]
    assert None not in colours and len(set(colours)) == len(colours)
    for name in set(models.MODELS) - set(own):
        assert plotting.color(name) == plotting.color(name[:-len(models.NO_CONV)])


def _smoke(module, **overrides):
    return smoke_config(module, throughput_steps=0, **overrides)


def test_the_original_mqar_sweep_trains_one_mixed_length_set_and_reports_the_mean_of_its_test_slices(tmp_path):
    """Zoology's "original MQAR" (configs/mqar_original.py): one training set of several (L, P) parts padded to
    the longest, tested on its out-of-distribution slices; 2 seeds as one block; the table's test accuracy is
    each run's mean over the slices, then mean ± spread over seeds."""
    config = _smoke(mqar_original_config, models=("attention",), seeds=(0, 1))
    records = mqar.run(config, str(tmp_path))
    assert len(records) == 2 and all(r["runs_per_step"] == 2 for r in records)
    (parts_a, parts_b) = config.train_mixture
    assert all(r["train_shape"] == [parts_a[2] + parts_b[2], max(parts_a[0], parts_b[0])] for r in records)
    slices = {mqar.set_name(*shape) for shape in config.test_shapes}
    assert all(set(r["eval"]) == {mqar.VALID} | slices for r in records)
    mqar.report(str(tmp_path))
    line = next(l for l in (tmp_path / "table.md").read_text().splitlines() if l.startswith("| base | mixed |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    means = [np.mean([r["eval"][s]["accuracy"] for s in slices]) for r in records]
    assert cells[5] == "2" and cells[6] == sweep.fmt_mean_spread(means)
    assert all(s.replace("_", " ") in cells[7] for s in slices)           # and each slice, beyond the mean


def test_recall_trains_its_seeds_as_one_block_and_reports_mean_and_spread(tmp_path, monkeypatch):
    calls = []
    real = training.train_block
    monkeypatch.setattr(training, "train_block", lambda model, specs, *a, **k: calls.append(len(specs)) or
                        real(model, specs, *a, **k))
    config = _smoke(recall_config, models=("attention",), seeds=(0, 1, 2), learning_rates=(3e-3,))
    records = recall.run(config, str(tmp_path))
    assert calls == [3] and sorted(r["settings"]["seed"] for r in records) == [0, 1, 2]
    recall.report(str(tmp_path))
    lines = (tmp_path / "table.md").read_text().splitlines()
    split = lambda prefix: [c.strip() for c in next(l for l in lines if l.startswith(prefix)).split("|")[1:-1]]
    header, cells = split("| model |"), split("| attention |")
    assert cells[header.index("seeds")] == "3"
    train = [r["eval"]["train"]["accuracy"] for r in records]
    assert cells[header.index("train")] == sweep.fmt_mean_spread(train)
    assert os.path.getsize(tmp_path / "accuracy_by_condition.png") > 0


def test_a_gpu_slice_restores_earlier_runs_and_returns_the_new_ones_without_checkpoints(tmp_path):
    """experiments/gpu_slice.sh (a sweep slice on a machine that keeps nothing between calls): the earlier
    slices' run folders are unpacked before the command (so the sweep skips them), and every run folder, old
    and new, comes back in OUT/runs.tgz without checkpoints or compilation cache; the command's status is
    the script's."""
    import subprocess
    import tarfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path / "tree"
    (work / "runs/mqar/old/checkpoints").mkdir(parents=True)
    (work / "runs/mqar/old/results.json").write_text("{}")
    (work / "runs/mqar/old/checkpoints/0").write_text("params")
    subprocess.run(["tar", "-czf", str(tmp_path / "earlier.tgz"), "runs"], cwd=work, check=True)
    shutil.rmtree(work / "runs")
    command = ("test -f runs/mqar/old/results.json && mkdir -p runs/mqar/new/checkpoints runs/mqar/jax_cache && "
               "echo '{}' > runs/mqar/new/results.json && touch runs/mqar/new/checkpoints/1 runs/mqar/jax_cache/x; "
               "exit 3")
    proc = subprocess.run(["bash", os.path.join(root, "experiments/gpu_slice.sh"), str(tmp_path / "out"),
                           str(tmp_path / "earlier.tgz"), "bash", "-c", command], cwd=work, capture_output=True,
                          text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "out/runs.tgz") as archive:
        assert sorted(archive.getnames()) == ["runs/mqar/new/results.json", "runs/mqar/old/results.json"]
