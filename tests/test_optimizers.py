"""Training with any optax optimizer: named in the settings or the config (an alias with its arguments,
a schedule), or given as a GradientTransformation; the default is the AdamW recipe, update for update;
the newest N checkpoints are kept; run folders recorded before the optimizer was configurable still
resume."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mqar as mqar_config
from experiments import common, models, mqar, sweep, tasks, training
from tests.support import smoke_config

PARAMS = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 10, "b": jnp.ones((4,), jnp.float32)}


def _grads(step):
    key = jax.random.PRNGKey(step)
    return {"w": jax.random.normal(key, (3, 4)), "b": jax.random.normal(jax.random.fold_in(key, 1), (4,))}


def _run(tx, steps=4, params=PARAMS):
    """The parameters after ``steps`` updates of ``tx`` with the gradients `_grads`."""
    state = tx.init(params)
    for s in range(steps):
        updates, state = tx.update(_grads(s), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _settings(**kw):
    return training.TrainSettings(**{"num_steps": 10, "batch_size": 8, "learning_rate": 3e-2, "warmup_steps": 2,
                                     **kw})


def test_the_default_optimizer_is_the_adamw_recipe_update_for_update():
    """``adamw(b1=0.9, b2=0.98, eps=1e-8)``: clipping, scale_by_adam, decay on matrices, -lr_s, bit for bit."""
    settings = _settings(grad_clip=0.5)
    lr = lambda count: 3e-2 * training.schedule(settings)(count)
    recipe = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-8),
                         optax.add_decayed_weights(0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
                         optax.scale_by_learning_rate(lr))
    ours, theirs = _run(training.optimizer(settings)), _run(recipe)
    for key in PARAMS:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_an_alias_that_decays_itself_gets_the_weight_decay_and_the_mask():
    settings = _settings(optimizer="lion(b1=0.95, b2=0.98)", weight_decay=0.3, schedule="constant", warmup_steps=0)
    expected = optax.chain(optax.clip_by_global_norm(1.0), optax.lion(3e-2, b1=0.95, b2=0.98, weight_decay=0.3,
                                                                      mask=lambda p: {"w": True, "b": False}))
    ours, theirs = _run(training.optimizer(settings)), _run(expected)
    for key in PARAMS:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6)


def test_other_aliases_get_decoupled_weight_decay_after_them():
    """sgd has no weight decay: ``p <- p - lr g - lr wd p`` on matrices, ``p - lr g`` on vectors."""
    settings = _settings(optimizer="sgd", weight_decay=0.5, schedule="constant", warmup_steps=0, grad_clip=1e9)
    params = _run(training.optimizer(settings), steps=1)
    g = _grads(0)
    np.testing.assert_allclose(params["w"], PARAMS["w"] - 3e-2 * g["w"] - 3e-2 * 0.5 * PARAMS["w"], rtol=1e-6)
    np.testing.assert_allclose(params["b"], PARAMS["b"] - 3e-2 * g["b"], rtol=1e-6)


def test_schedules_after_the_warm_up():
    values = lambda schedule, **kw: [float(training.schedule(_settings(schedule=schedule, **kw))(s))
                                     for s in range(11)]
    np.testing.assert_allclose(values("constant"), [0, 0.5] + [1] * 9)
    np.testing.assert_allclose(values("linear", final_lr_fraction=0.2), [0, 0.5, 1, 0.9, 0.8, 0.7, 0.6, 0.5,
                                                                         0.4, 0.3, 0.2], atol=1e-7)
    cosine = values("cosine", final_lr_fraction=0.2)
    np.testing.assert_allclose(cosine[2:], [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(9)],
                               rtol=1e-6)
    halving = values("exponential_decay(init_value=1.0, transition_steps=4, decay_rate=0.5)")
    np.testing.assert_allclose(halving[2:], [0.5 ** (i / 4) for i in range(9)], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "adamx", r"optax has no optimizer 'adamx' \(did you mean 'adamax'"),
    ("optimizer", "lion(eps=1e-8)", r"optax.lion takes no eps; accepted: learning_rate, b1, b2"),
    ("optimizer", "adamw(weight_decay=0.01)", r"weight_decay is set by the settings.*config.weight_decay"),
    ("optimizer", "adamw(learning_rate=0.1)", "learning_rate is set by the settings"),
    ("optimizer", "lbfgs", r"optax.lbfgs cannot be used by this training loop .*line searches"),
    ("optimizer", "adamw(0.9)", "not a name with keyword arguments"),
    ("schedule", "cosin", r"optax has no schedule 'cosin' \(did you mean 'cosine'\?\)"),
    ("schedule", "exponential_decay(transition_steps=4)", r"cannot be built .* in units of the peak"),
])
def test_bad_optimizers_and_schedules_are_clear_errors(field, value, message):
    with pytest.raises(training.OptimizerError, match=message):
        _settings(**{field: value})


def test_a_gradient_transformation_is_the_whole_update():
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    settings = training.TrainSettings(num_steps=3, batch_size=8, optimizer=tx)
    assert training.optimizer(settings) is tx
    with pytest.raises(ValueError, match="carries its own learning rate"):
        training.TrainSettings(num_steps=3, batch_size=8, learning_rate=1e-3, optimizer=tx)
    assert float(training.current_learning_rate(tx.init(PARAMS))) == pytest.approx(0.1)
    assert math.isnan(float(training.current_learning_rate(optax.sgd(0.1).init(PARAMS))))
    identity = training.run_identity(None, settings, (16, 8), {})
    assert identity["settings"]["optimizer"] == "a GradientTransformation given in Python"


def _tiny_model():
    return models.LanguageModel("gated_deltanet", 16, 16, head_dim=8, backend="sequential")


def _data(n=32, seed=0):
    x, y = tasks.mqar(16, 16, 2, n, seed)
    return {"tokens": x, "labels": y}


def test_training_with_a_named_optimizer_and_with_a_transformation(tmp_path):
    """End to end: sgd with momentum and a constant schedule (the logged learning rates follow the warm-up),
    then an optax GradientTransformation; the newest ``keep_checkpoints`` checkpoints are kept."""
    settings = training.TrainSettings(num_steps=5, batch_size=8, learning_rate=0.05, warmup_steps=2,
                                      optimizer="sgd(momentum=0.9)", schedule="constant", log_every=1,
                                      checkpoint_every=1, keep_checkpoints=3, throughput_steps=0, progress=False)
    named = training.train(_tiny_model(), settings, _data(), {}, str(tmp_path / "named"))
    rows = training.read_csv(str(tmp_path / "named" / "metrics.csv"))
    # the rate applied at step s (1-based) is schedule(s - 1): 0, 0.5, then the peak
    np.testing.assert_allclose([float(r["learning_rate"]) for r in rows], [0, 0.025, 0.05, 0.05, 0.05], atol=1e-8)
    assert named["status"] == "finished" and all(math.isfinite(float(r["loss"])) for r in rows)
    assert sorted(os.listdir(tmp_path / "named" / "checkpoints"), key=int) == ["3", "4", "5"]
    with open(tmp_path / "named" / "run.json") as f:
        assert json.load(f)["settings"]["optimizer"] == "sgd(momentum=0.9)"

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=3e-3))
    given = training.TrainSettings(num_steps=3, batch_size=8, optimizer=tx, log_every=1, checkpoint_every=3,
                                   throughput_steps=0, progress=False)
    result = training.train(_tiny_model(), given, _data(), {}, str(tmp_path / "given"))
    rows = training.read_csv(str(tmp_path / "given" / "metrics.csv"))
    assert result["status"] == "finished" and len(rows) == 3
    assert all(math.isnan(float(r["learning_rate"])) for r in rows)       # a chain records no learning rate
    a = training.load_checkpoint(str(tmp_path / "given"))["params"]
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(training.init_state(_tiny_model(), given, _data(8),
                                                                training.data_mesh()).params)))


def _smoke(**overrides):
    return smoke_config(mqar_config, **overrides)


def test_the_config_names_the_optimizer_and_the_schedule(tmp_path):
    config = _smoke(optimizer="lion(b1=0.95, b2=0.98)", schedule="linear")
    settings = sweep.settings_from_config(config, 1e-3)
    assert settings.optimizer == "lion(b1=0.95, b2=0.98)" and settings.schedule == "linear"
    (run, *_) = mqar.runs(config, str(tmp_path))
    assert run.identity["settings"]["optimizer"] == "lion(b1=0.95, b2=0.98)"
    with pytest.raises(training.OptimizerError, match="optax has no optimizer 'lian'"):
        sweep.settings_from_config(_smoke(optimizer="lian"), 1e-3)


def test_a_run_recorded_before_the_optimizer_was_named_is_the_default_recipe(tmp_path):
    """A ``run.json`` without ``optimizer`` and ``schedule`` (written by earlier code) is the AdamW recipe:
    accepted when asked with it, refused, naming the field, when asked with another optimizer."""
    identity = training.run_identity({"model": "x"}, _settings(), (16, 8), {})
    old = json.loads(json.dumps(identity))
    for name in training.ADDED_SETTINGS:
        del old["settings"][name]
    common.write_json(str(tmp_path / "run.json"), old)
    assert training.check_run_folder(str(tmp_path), identity)
    other = training.run_identity({"model": "x"}, _settings(optimizer="sgd"), (16, 8), {})
    with pytest.raises(common.RunFileError, match=r'settings.optimizer: "adamw\(b1=0.9, b2=0.98, eps=1e-8\)" here, '
                                                  r'"sgd" asked'):
        training.check_run_folder(str(tmp_path), other)
