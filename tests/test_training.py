"""Training: the loss counts only supervised positions; a run killed after a checkpoint and restarted
equals an uninterrupted run (parameters and every metric row); a data-parallel step over 4 (simulated
CPU) devices equals the single-device step; the experiments run end to end from their smoke configs."""
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mqar as mqar_config, recall as recall_config
from experiments import common, models, mqar, recall, tasks, training
from tests.support import run_on_cpu_devices, smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(name="bayesian", vocab=32, d_model=16):
    return models.LanguageModel(name, vocab, d_model, head_dim=8, backend="sequential")


def _data(n=64, seq_len=16, pairs=2, seed=0, vocab=32):
    x, y = tasks.mqar(vocab, seq_len, pairs, n, seed)
    return {"tokens": x, "labels": y}


def test_loss_and_accuracy_count_only_supervised_positions():
    logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]]], jnp.float32))
    labels = jnp.array([[0, tasks.IGNORE, 2]])
    loss, m = training.loss_and_metrics(logits, labels)
    np.testing.assert_allclose(loss, -(np.log(0.7) + np.log(0.3)) / 2, rtol=1e-6)
    assert float(m["accuracy"]) == 0.5 and int(m["count"]) == 2


def test_logits_at_supervised_positions_only_give_the_same_loss_and_gradients():
    """The head at the labelled positions only (rows with different label counts, one with none) gives
    the loss, accuracy, count and gradients of the full [B, T, vocab] logits."""
    model = _tiny("gated_deltanet")
    batch = _data(6, seq_len=16, pairs=3)
    labels = np.array(batch["labels"])
    labels[1, :] = tasks.IGNORE                                  # a row without supervision
    labels[2, np.flatnonzero(labels[2] != tasks.IGNORE)[:1]] = tasks.IGNORE   # fewer labels
    labels[3, 0] = 5                                             # a label at the first position
    batch = {"tokens": jnp.asarray(batch["tokens"]), "labels": jnp.asarray(labels)}
    params = model.init(jax.random.PRNGKey(0), batch["tokens"])
    count = training.supervised_count(labels)
    assert count == max(np.sum(labels != tasks.IGNORE, axis=1)) < labels.shape[1]

    def loss(p, supervised):
        return training.loss_and_metrics(*training.logits_and_labels(model, p, batch, supervised))

    (full, full_m), full_g = jax.value_and_grad(loss, has_aux=True)(params, None)
    (part, part_m), part_g = jax.value_and_grad(loss, has_aux=True)(params, count)
    logits, _ = training.logits_and_labels(model, params, batch, count)
    assert logits.shape == (6, count, 32)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    for key in ("accuracy", "count", "correct", "nll_sum"):
        np.testing.assert_allclose(part_m[key], full_m[key], rtol=1e-6)
    # float32 sums in another order: equal to rounding. A small leaf (a 2-element bias) is a sum of
    # terms as large as the other gradients, with cancellation: its rounding is relative to the gradients'
    # scale, not to its own value.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(full_g))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), part_g, full_g)


@pytest.mark.parametrize("supervised", [False, True], ids=["full_logits", "supervised_positions"])
def test_evaluation_of_a_ragged_set_counts_every_supervised_position_once(supervised):
    """11 rows in batches of 4: the last batch is padded with a row that must count for nothing. Count,
    accuracy and loss equal those of one pass over the whole set (one row has no supervision at all)."""
    model, mesh = _tiny("gated_deltanet"), training.data_mesh()
    data = _data(11, seq_len=16, pairs=3, seed=4)
    data["labels"][5] = tasks.IGNORE
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(data["tokens"][:1]))
    step = training.make_eval_step(model, mesh, training.supervised_count(data["labels"]) if supervised else None)
    got = training.evaluate(step, params, data, batch_size=4, mesh=mesh)
    loss, want = training.loss_and_metrics(model.apply(params, jnp.asarray(data["tokens"])), jnp.asarray(data["labels"]))
    assert got["count"] == int(want["count"]) == int(np.sum(data["labels"] != tasks.IGNORE)) == 10 * 3
    np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)


def test_weight_decay_applies_to_matrices_only():
    """AdamW's decoupled weight decay reaches kernels and embeddings (ndim >= 2), never biases or scales."""
    settings = training.TrainSettings(num_steps=1, batch_size=1, learning_rate=1.0, weight_decay=0.1)
    tx = training.optimizer(settings)
    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0), "scale": jnp.full((), 2.0)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -1.0 * 0.1 * 2.0)  # u = -lr * weight_decay * p
    np.testing.assert_allclose(updates["bias"], 0.0)
    np.testing.assert_allclose(updates["scale"], 0.0)


def test_one_compiled_step_serves_every_learning_rate_and_seed():
    model, mesh = _tiny(), training.data_mesh()
    a = training.TrainSettings(num_steps=10, batch_size=8, learning_rate=1e-3, seed=0)
    b = training.TrainSettings(num_steps=10, batch_size=8, learning_rate=1e-2, seed=3, log_every=5)
    assert training.make_train_step(model, a, mesh) is training.make_train_step(model, b, mesh)
    c = training.TrainSettings(num_steps=10, batch_size=8, learning_rate=1e-3, warmup_steps=2)
    assert training.make_train_step(model, a, mesh) is not training.make_train_step(model, c, mesh)


def test_batches_are_a_function_of_the_step():
    data = {"tokens": np.arange(10)[:, None], "labels": np.arange(10)[:, None]}
    a, b = training.BatchSchedule(data, 3, seed=1), training.BatchSchedule(data, 3, seed=1)
    epoch = np.concatenate([a(s)["tokens"][:, 0] for s in range(3)])
    assert len(set(epoch)) == 9                                   # no repeat within an epoch
    np.testing.assert_array_equal(a(7)["tokens"], b(7)["tokens"])  # random access = sequential access
    assert not np.array_equal(a(0)["tokens"], a(3)["tokens"])       # epochs are reshuffled


def test_a_training_set_of_one_batch_is_the_smallest_accepted():
    data = {"tokens": np.arange(4)[:, None], "labels": np.arange(4)[:, None]}
    one = training.BatchSchedule(data, 4, seed=0)
    assert one.steps_per_epoch == 1
    np.testing.assert_array_equal(one(0)["tokens"][:, 0], np.arange(4))
    with pytest.raises(ValueError, match="the training set has 4 examples, fewer than one batch of 5"):
        training.BatchSchedule(data, 5, seed=0)


def test_throughput_is_tokens_over_the_measured_seconds_per_step():
    calls = []

    def step(state, batch):
        calls.append(1)
        return jax.tree.map(lambda x: x + 1, state), {"loss": jnp.zeros(())}

    state = {"w": jnp.zeros(3)}
    start = time.perf_counter()
    out = training.measure_throughput(step, state, {"tokens": np.zeros((2, 8), np.int32)}, steps=3)
    elapsed = time.perf_counter() - start
    assert len(calls) == 1 + 3 and np.all(state["w"] == 0)          # a warm-up step, then 3 timed on a copy
    assert out["tokens_per_step"] == 16 and out["timed_steps"] == 3
    assert 0 < out["seconds_per_step"] * 3 <= elapsed
    np.testing.assert_allclose(out["tokens_per_second"], 16 / out["seconds_per_step"])
    assert training.measure_throughput(step, state, {"tokens": np.zeros((2, 8), np.int32)}, steps=0) == {}


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, name="bayesian"):
    model, train_data, evals = _tiny(name), _data(), {"test": _data(16, seed=9)}
    settings = training.TrainSettings(num_steps=8, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=1,
                                      eval_every=4, checkpoint_every=3, throughput_steps=1, progress=False)
    whole = training.train(model, settings, train_data, evals, str(tmp_path / "whole"))
    killed = str(tmp_path / "killed")
    with pytest.raises(training.Stopped):     # dies at step 5: rows 4 and 5 were written, the checkpoint is 3
        training.train(model, settings, train_data, evals, killed, stop_at_step=5)
    assert [int(r["step"]) for r in training.read_csv(os.path.join(killed, "metrics.csv"))] == [1, 2, 3, 4, 5]
    resumed = training.train(model, settings, train_data, evals, killed)

    for file in ("metrics.csv", "eval.csv"):
        with open(tmp_path / "whole" / file) as f, open(os.path.join(killed, file)) as g:
            assert f.read() == g.read(), file
    a, b = training.load_checkpoint(str(tmp_path / "whole")), training.load_checkpoint(killed)
    assert int(a["step"]) == int(b["step"]) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert whole["eval"] == resumed["eval"] and whole["final_train"] == resumed["final_train"]
    assert resumed["throughput"]["tokens_per_second"] > 0


def test_cli_run_resumes_after_a_real_kill(tmp_path):
    """``python -m experiments.mqar`` SIGKILLed mid-run (``--config.kill_at_step``), then resumed: its
    files equal those of an uninterrupted run of the same config."""
    flags = ["--config=configs/mqar.py", "--config.smoke=True", "--config.variants=('update',)",
             "--config.models=('bayesian',)", "--config.num_steps=8", "--config.checkpoint_every=3",
             "--config.log_every=1", "--config.kill_at_step=7", f"--workdir={tmp_path / 'cli'}"]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "float32"}     # as in this session (conftest.py)
    if jax.default_backend() == "cpu":
        env["JAX_PLATFORMS"] = "cpu"     # the same platform as the resumed half below
    killed = subprocess.run([sys.executable, "-m", "experiments.mqar", *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]

    config = _smoke(mqar_config, variants=("update",), models=("bayesian",), num_steps=8, checkpoint_every=3,
                    log_every=1)
    with jax.enable_x64(False):        # as on the command line (this test session enables float64)
        mqar.run(config, str(tmp_path / "cli"))          # resumes the killed run
        mqar.run(config, str(tmp_path / "whole"))        # uninterrupted
    run = os.path.join("runs", "update", "bayesian", "L32_P2", "d16_lr3.00e-03_seed0")
    for file in ("metrics.csv", "eval.csv"):
        with open(tmp_path / "cli" / run / file) as f, open(tmp_path / "whole" / run / file) as g:
            assert f.read() == g.read(), file


def test_a_restart_with_other_settings_is_refused(tmp_path):
    model, data = _tiny(), _data()
    settings = training.TrainSettings(num_steps=2, batch_size=8, learning_rate=1e-2, throughput_steps=0,
                                      progress=False)
    training.train(model, settings, data, {}, str(tmp_path))
    with pytest.raises(ValueError, match="different settings"):
        training.train(model, training.TrainSettings(num_steps=2, batch_size=8, learning_rate=2e-2,
                                                     throughput_steps=0, progress=False), data, {}, str(tmp_path))


_SHARDED = textwrap.dedent("""
    import json, tempfile
    import jax, numpy as np
    from experiments import models, tasks, training

    assert jax.device_count() == 4, jax.devices()
    x, y = tasks.mqar(32, 16, 2, 64, seed=0)
    data = {"tokens": x, "labels": y}
    model = models.LanguageModel("bayesian", 32, 16, head_dim=8, backend="sequential")
    settings = training.TrainSettings(num_steps=4, batch_size=8, learning_rate=1e-2, warmup_steps=1,
                                      log_every=1, checkpoint_every=2, throughput_steps=1, progress=False)
    schedule = training.BatchSchedule(data, 8, 0)
    out = {}
    for n in (1, 4):
        mesh = training.data_mesh(jax.devices()[:n])
        state = training.init_state(model, settings, data, mesh)
        step = training.make_train_step(model, settings, mesh)
        metrics = []
        for s in range(3):
            batch = training.put_batch(schedule(s), mesh)
            shards = {tuple(sh.data.shape) for sh in batch["tokens"].addressable_shards}
            state, m = step(state, batch)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        with tempfile.TemporaryDirectory() as tmp:
            results = training.train(model, settings, data, {"test": data}, tmp, mesh=mesh)
            rows = training.read_csv(tmp + "/metrics.csv")
        out[n] = {"params": [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)], "metrics": metrics,
                  "shards": sorted(shards), "eval": results["eval"]["test"], "devices": results["devices"],
                  "rows": [[float(r[k]) for k in ("loss", "accuracy", "grad_norm")] for r in rows]}
    try:                                   # a batch of 6 on 4 devices
        training.put_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)
        out["indivisible"] = "no error"
    except ValueError as error:
        out["indivisible"] = str(error)
    print("RESULT" + json.dumps(out))
""")


def test_sharded_step_equals_single_device_step():
    out = run_on_cpu_devices(_SHARDED, 4)
    one, four = out["1"], out["4"]
    assert one["shards"] == [[8, 16]] and four["shards"] == [[2, 16]]    # the batch really is split in 4
    assert four["devices"] == 4
    # Adam divides each update by sqrt(v): where a gradient element is near zero, the round-off of a
    # reduction in another order (4 partial sums, not 1) moves that element's update by up to ~lr * eps/|g|
    # (3e-6 seen on CI's CPU). A step that missed the gradients of the other devices would be off by ~lr
    # (1e-2), so an absolute 3e-5 (0.3% of one step) still fails it.
    for a, b in zip(one["params"], four["params"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=3e-5)
    for a, b in zip(one["metrics"], four["metrics"]):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(one["rows"], four["rows"], rtol=2e-4, atol=1e-6)   # 4 steps: round-off grows
    assert one["eval"]["count"] == four["eval"]["count"]
    np.testing.assert_allclose(one["eval"]["loss"], four["eval"]["loss"], rtol=2e-5)
    # a batch that the devices cannot split is a clear error, which says what to choose
    assert "batch size 6 is not divisible by the 4 devices" in out["indivisible"], out["indivisible"]
    assert "multiple of 4" in out["indivisible"]


def _smoke(module, **overrides):
    return smoke_config(module, **overrides)


def test_mqar_smoke_end_to_end(tmp_path):
    config = _smoke(mqar_config, variants=("update",), models=("bayesian_no_conv",))
    records = mqar.run(config, str(tmp_path))
    assert len(records) == 1
    assert set(records[0]["eval"]) == {"valid", "L32_P2", "L64_P4"}
    assert records[0]["throughput"]["tokens_per_second"] > 0
    mqar.report(str(tmp_path))
    for name in ("results.csv", "table.md", "accuracy_vs_d_model.png"):
        assert os.path.getsize(tmp_path / name) > 0
    rows = training.read_csv(str(tmp_path / "results.csv"))
    assert rows[0]["model"] == "bayesian_no_conv" and float(rows[0]["tokens_per_second"]) > 0
    assert "bayesian_no_conv" in (tmp_path / "table.md").read_text()
    assert mqar.run(config, str(tmp_path))[0]["eval"] == records[0]["eval"]   # finished runs are skipped
    assert not os.path.exists(tmp_path / "accuracy_vs_seq_len.png")           # one shape: no length figure
    # a second training shape: the report adds accuracy against the training length
    config.unlock()
    config.train_shapes = ((16, 1),)
    config.lock()
    mqar.run(config, str(tmp_path))
    mqar.report(str(tmp_path))
    assert os.path.getsize(tmp_path / "accuracy_vs_seq_len.png") > 0
    assert "| update | (16, 1) | bayesian_no_conv |" in (tmp_path / "table.md").read_text()


def test_report_false_trains_without_writing_the_report(tmp_path):
    # concurrent_sweep.sh's block processes: no concurrent rewrites of the shared report files
    config = _smoke(mqar_config, variants=("base",), models=("attention",), report=False)
    mqar.main(config, str(tmp_path))
    assert len(list(tmp_path.glob("runs/base/attention/*/*/results.json"))) == 1
    assert not any(os.path.exists(tmp_path / n) for n in ("results.csv", "table.md", "accuracy_vs_d_model.png"))


def test_recall_smoke_end_to_end(tmp_path):
    config = _smoke(recall_config, models=("gated_deltanet",))
    records = recall.run(config, str(tmp_path))
    assert set(records[0]["eval"]) == {"valid", "train", "pairs_4", "collide_0.9"}
    recall.report(str(tmp_path))
    for name in ("results.csv", "table.md", "accuracy_by_condition.png"):
        assert os.path.getsize(tmp_path / name) > 0


def test_run_records_are_written_whole_or_not_at_all(tmp_path):
    """A write that fails half-way (as a process killed by a sweep's time limit) leaves the previous
    record intact and no partial file: a truncated results.json would mark an unfinished run finished."""
    path = str(tmp_path / "results.json")
    common.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        common.write_json(path, {"b": [1, 2], "c": object()})   # json.dump fails after writing a prefix
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_config_typos_and_bad_choices_are_clear_errors():
    config = common.resolve(mqar_config.get_config())
    with pytest.raises(AttributeError):
        config.learning_rate = 1e-3          # the field is learning_rates
    bad = _smoke(mqar_config, models=("mamba3",))
    with pytest.raises(ValueError, match="'mamba3'.*accepted: attention"):
        mqar.run(bad, "/nonexistent")
    bad = _smoke(mqar_config, variants=("block",), train_shapes=((32, 4),))
    with pytest.raises(ValueError, match=r"does not fit variant 'block'"):
        mqar.run(bad, "/nonexistent")


def test_smoke_settings_name_real_keys():
    for module in (mqar_config, recall_config):
        config = module.get_config()
        assert set(config.smoke_settings) <= set(config)


def test_models_are_float32_under_x64():
    settings = training.TrainSettings(num_steps=1, batch_size=2, learning_rate=1e-3)
    for name in ("attention", "gated_deltanet", "bayesian_no_conv"):
        model = _tiny(name)
        x = jnp.zeros((2, 8), jnp.int32)
        params = training.init_state(model, settings, {"tokens": x}, training.data_mesh()).params
        if name == "attention":
            logits = jax.jit(model.apply)(params, x)
            assert logits.shape == (2, 8, 32) and logits.dtype == jnp.float32
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_attention_is_causal():
    model = _tiny("attention")
    x = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, 32)
    params = model.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply)
    y, y2 = apply(params, x), apply(params, x.at[0, 8:].set(3))
    np.testing.assert_allclose(y[:, :8], y2[:, :8], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y[:, 8:], y2[:, 8:])
