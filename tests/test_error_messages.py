"""Mistakes a new user makes, as a table: each must raise the named exception with a message that says
what was wrong (the field, the value or shape received) and what is accepted or what to write instead.
Messages are matched on key phrases (every pattern must occur), not as whole strings.

The last part is the command line of the experiments: smoke settings first, then the user's explicit
``--config.x=...`` overrides; a misspelled field is a usage error with the closest fields, no traceback."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import designmodels as dm
import filters
import layers
from configs import mqar as mqar_config
from configs import recall as recall_config
from configs import unification as unification_config
from experiments import common, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, H, K, V = 2, 3, 2, 4, 3


def _qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


Q, KEY, VAL = _qkv()
LOG_DECAY = np.full((B, T, H), -0.1, np.float32)
BETA = np.full((B, T, H), 0.5, np.float32)


def gdn(**gates):
    """Gated DeltaNet (sequential) on valid inputs, with ``gates`` replacing or adding keyword inputs."""
    q, k, v = gates.pop("q", Q), gates.pop("k", KEY), gates.pop("v", VAL)
    return filters.compile(dm.gated_deltanet(), backend="sequential")(
        q, k, v, **{"log_decay": LOG_DECAY, "beta": BETA, **gates})


def bayes(backend="sequential", **gates):
    return filters.compile(dm.bayesian(), backend=backend)(Q, KEY, VAL, **{"beta": BETA * 4, **gates})


def layer_init(x=None, **attributes):
    layer = layers.DesignLayer(**{"model": dm.gla(), "d_model": 8, "num_heads": 2, "key_dim": 4,
                                  "backend": "sequential", **attributes})
    return layer.init(jax.random.PRNGKey(0), jnp.ones((2, 5, 8)) if x is None else x)


def layer_apply(x, method=None):
    layer = layers.DesignLayer(dm.gla(), d_model=8, num_heads=2, key_dim=4, backend="sequential")
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 5, 8)))
    return layer.apply(params, x, method=method)


DME, FIE, BE, LE = dm.DesignModelError, filters.FilterInputError, filters.BackendError, layers.LayerError

# (mistake, what the user wrote, exception, patterns that must all occur in the message)
MISTAKES = [
    # ---- declarations
    ("decay above one", lambda: dm.ScalarDecay(1.5), DME,
     [r"ScalarDecay\.decay: got 1\.5", r"accepted: a number in \(0, 1\]", "None for an input-dependent decay"]),
    ("decay zero", lambda: dm.ScalarDecay(0.0), DME, [r"ScalarDecay\.decay: got 0\.0", r"\(0, 1\]"]),
    ("decay as a string", lambda: dm.ScalarDecay("0.9"), DME, [r"ScalarDecay\.decay: got '0\.9'"]),
    ("decay as a bool", lambda: dm.ScalarDecay(True), DME, [r"ScalarDecay\.decay: got True", r"\(0, 1\]"]),
    ("log decays given as fixed decays", lambda: dm.DiagonalDecay((0.5, -0.1)), DME,
     [r"DiagonalDecay\.decays: got \(0\.5, -0\.1\)", "entry index 1", r"decays, not log decays"]),
    ("negative prior variance", lambda: dm.IsotropicCovariance(-1), DME,
     [r"IsotropicCovariance\.variance: got -1", "finite number > 0"]),
    ("NaN prior variance", lambda: dm.IsotropicCovariance(float("nan")), DME,
     [r"IsotropicCovariance\.variance: got nan"]),
    ("negative diagonal variance", lambda: dm.DiagonalCovariance([1.0, -1.0]), DME,
     [r"DiagonalCovariance\.variances: got \(1\.0, -1\.0\)", "first at index 1", "every variance > 0"]),
    ("diagonal variances as a scalar", lambda: dm.DiagonalCovariance(5.0), DME,
     [r"DiagonalCovariance\.variances: got an array of shape \(\)", "vector of length K"]),
    ("diagonal variances not numbers", lambda: dm.DiagonalCovariance(("a",)), DME,
     [r"DiagonalCovariance\.variances: got \('a',\)", "real numbers"]),
    ("covariance not positive definite", lambda: dm.FullCovariance([[1.0, 2.0], [2.0, 1.0]]), DME,
     [r"FullCovariance\.matrix", "smallest eigenvalue -1", "positive-definite", r"L @ L\.T \+ eps \* I"]),
    ("covariance not symmetric", lambda: dm.FullCovariance([[1.0, 0.3], [0.0, 1.0]]), DME,
     [r"FullCovariance\.matrix: got a non-symmetric matrix", r"largest difference 0\.3 at index \(0, 1\)",
      r"\(P \+ P\.T\) / 2"]),
    ("covariance not square", lambda: dm.FullCovariance(np.ones((2, 3))), DME,
     [r"FullCovariance\.matrix: got an array of shape \(2, 3\)", "square K x K"]),
    ("negative process noise", lambda: dm.RandomWalk(-0.1), DME, [r"RandomWalk\.variance: got -0\.1", ">= 0"]),
    ("zero precision", lambda: dm.KeyValueObservation(0), DME,
     [r"KeyValueObservation\.precision: got 0;", "finite number > 0"]),
    ("flag that is not a bool", lambda: dm.Reset(write_strength="yes"), DME,
     [r"Reset\.write_strength: got 'yes'", "True or False"]),
    ("fixed decay made optional", lambda: dm.ScalarDecay(0.9, required=False), DME,
     [r"ScalarDecay\.required: got False", "only run-time decays are optional"]),
    ("covariance without its Prior", lambda: dm.DesignModel(prior=dm.IsotropicCovariance(1.0)), DME,
     [r"DesignModel\.prior: got IsotropicCovariance", r"wrap the covariance: prior=Prior\("]),
    ("a component class, not an instance", lambda: dm.DesignModel(transition=dm.ScalarDecay), DME,
     [r"DesignModel\.transition: got <class", r"make an instance, ScalarDecay\(\.\.\.\)"]),
    ("a string for a component", lambda: dm.DesignModel(covariance="exact"), DME,
     [r"DesignModel\.covariance: got 'exact'", "an instance of Exact, Reset"]),
    ("components of two key dimensions",
     lambda: dm.DesignModel(prior=dm.Prior(dm.DiagonalCovariance((1.0, 1.0, 1.0))),
                            transition=dm.DiagonalDecay((0.5, 0.5))), DME,
     [r"prior\.covariance fixes K = 3 but transition fixes K = 2", "one key dimension K"]),
    ("a named model with a bad argument", lambda: dm.retnet(gamma=1.2), DME,
     [r"retnet\(gamma=1\.2\): ScalarDecay\.decay: got 1\.2", r"\(0, 1\]"]),
    ("a misspelled option of a named model", lambda: dm.bayesian(decay="nones"), DME,
     [r"bayesian\(decay=\.\.\.\): got 'nones' \(did you mean 'none'\?\)", "accepted: 'input', 'none'"]),
    ("a misspelled named model", lambda: dm.NAMED_MODELS["gated_delta_net"], dm.UnknownModelError,
     [r"'gated_delta_net': not a named design model \(did you mean 'gated_deltanet'", "accepted: linear_attention"]),
    # ---- compile: backends and options
    ("an unknown backend", lambda: filters.compile(dm.gla(), backend="triton"), BE,
     [r"backend='triton': unknown", "accepted: 'auto', 'sequential', 'associative', 'chunked', 'pallas'"]),
    ("a capitalized backend", lambda: filters.compile(dm.gla(), backend="Chunked"), BE,
     [r"backend='Chunked': unknown \(did you mean 'chunked'\?\)"]),
    ("chunked for a dense transition",
     lambda: filters.compile(dm.DesignModel(transition=dm.DenseTransition(None)), backend="chunked"), BE,
     [r"backend='chunked' does not apply to this design model: a dense transition",
      "accepted here: sequential, associative"]),
    ("chunked for the exact family with a channel-wise decay",
     lambda: filters.compile(dm.DesignModel(transition=dm.DiagonalDecay(None)), backend="chunked"), BE,
     ["needs a scalar or no decay", "accepted here: sequential, associative"]),
    ("a misspelled compile option", lambda: filters.compile(dm.gla(), backend="chunked", chunksize=64), BE,
     [r"chunksize=64: not a compile option \(did you mean 'chunk_size'\?\)"]),
    ("an option the backend does not use",
     lambda: filters.compile(dm.gla(), backend="sequential", chunk_size=16), BE,
     [r"chunk_size=16: an option of the 'chunked' and 'pallas' lowerings, which", r"backend='sequential' does not use",
      r"backend='chunked' or 'pallas' \(or 'auto'\), or drop chunk_size"]),
    ("a chunk size the kernels cannot tile",
     lambda: filters.compile(dm.gla(), backend="pallas", chunk_size=48), BE,
     [r"chunk_size=48: the pallas lowering takes 16, 32, 64 or 128", "backend='chunked'"]),
    ("a chunk size that is not a positive integer",
     lambda: filters.compile(dm.gla(), backend="chunked", chunk_size=64.0), BE,
     [r"chunk_size=64\.0", "a positive integer"]),
    ("diagnostics from a backend that has none",
     lambda: filters.compile(dm.bayesian(), backend="associative", diagnostics=True), BE,
     [r"diagnostics=True: the 'associative' backend", "accepted: backend='sequential' or 'chunked'"]),
    ("the name of a model instead of the model", lambda: filters.compile("gated_deltanet"), TypeError,
     ["expected a designmodels.DesignModel, got str", r"dm\.NAMED_MODELS\['gated_deltanet'\]\(\)"]),
    ("the model constructor, not called", lambda: filters.compile(dm.gated_deltanet), TypeError,
     ["got function", r"call it: dm\.gated_deltanet\(\)"]),
    # ---- run-time inputs
    ("a missing gate", lambda: gdn(beta=None), FIE,
     [r"beta: missing; this design model \(gated_deltanet\)", r"\[B, T, H\]", "pass it by keyword, beta="]),
    ("a gate the model does not take", lambda: gdn(process_noise=BETA), FIE,
     ["process_noise: not an input of this design model", "accepted keyword inputs: log_decay, beta"]),
    ("a misspelled gate", lambda: gdn(log_decays=LOG_DECAY), FIE,
     [r"log_decays: not an input .*\(did you mean 'log_decay'\?\)"]),
    ("a misspelled call option", lambda: gdn(initial_sate=None), FIE,
     [r"initial_sate: .*\(did you mean 'initial_state'\?\)", "the options initial_state, diagnostics, validate, cu_seqlens, max_seqlen"]),
    ("q without the batch axis", lambda: gdn(q=Q[0]), FIE,
     [r"q: got rank 3, shape \(3, 2, 4\)", r"rank 4 with layout \[B, T, H, K\]"]),
    ("q as a nested list", lambda: gdn(q=Q.tolist()), FIE, ["q: got list", "convert it with jnp.asarray"]),
    ("keys of another key dimension", lambda: gdn(k=KEY[..., :3]), FIE,
     [r"k: got shape \(2, 3, 2, 3\); expected the shape of q \(2, 3, 2, 4\)"]),
    ("values of another length", lambda: gdn(v=VAL[:, :2]), FIE,
     [r"v: got shape \(2, 2, 2, 3\)", r"B, T, H = \(2, 3, 2\) as in q"]),
    ("inputs in [B, H, T, K]", lambda: gdn(q=Q.swapaxes(1, 2), k=KEY.swapaxes(1, 2), v=VAL.swapaxes(1, 2)), FIE,
     [r"log_decay: got shape \(2, 3, 2\); expected \[B, T, H\] = \(2, 2, 3\)",
      r"B, T, H are read from q of shape \(2, 2, 3, 4\)"]),
    ("a per-channel decay for a scalar decay", lambda: gdn(log_decay=np.zeros((B, T, H, K), np.float32)), FIE,
     [r"log_decay: got shape \(2, 3, 2, 4\); expected \[B, T, H\] = \(2, 3, 2\)"]),
    ("a decay instead of its log", lambda: gdn(log_decay=np.full((B, T, H), 0.9, np.float32)), FIE,
     [r"log_decay: 12 invalid entries, first at index \(0, 0, 0\): log_decay = 0\.9",
      r"finite log decays <= 0", r"pass log a_t"]),
    ("a write strength above one", lambda: gdn(beta=BETA * 3), FIE,
     [r"beta: 12 invalid entries", r"beta_t \|k_t\|\^2 = 1\.5, beta_t = 1\.5, \|k_t\|\^2 = 1",
      "not representable as a design model"]),
    ("a negative precision", lambda: bayes(beta=-BETA), FIE,
     [r"beta: 12 invalid entries, first at index \(0, 0, 0\): beta = -0\.5", "finite precisions beta > 0"]),
    ("NaN queries", lambda: gdn(q=Q * np.nan), FIE, [r"q: 48 invalid entries.*q = nan", "accepted: finite values"]),
    ("integer queries", lambda: gdn(q=Q.astype(np.int32)), FIE,
     ["q: got dtype int32", "a floating dtype", r"astype\(jnp\.float32\)"]),
    ("integer gates", lambda: gdn(beta=np.zeros((B, T, H), np.int32)), FIE, ["beta: got dtype int32", "floating"]),
    ("a string gate", lambda: gdn(beta="0.5"), FIE, ["beta: got str", "a floating array"]),
    ("an initial state of the wrong layout", lambda: bayes(initial_state=np.zeros((B, H, V, K))), FIE,
     [r"initial_state\.mean: got shape \(2, 2, 3, 4\); expected S \[B, H, K, V\] = \(2, 2, 4, 3\)",
      r"the transposed layout \[B, H, V, K\]", r"swapaxes\(-1, -2\)"]),
    ("an initial state as a dict", lambda: bayes(initial_state={"mean": np.zeros((B, H, K, V))}), FIE,
     ["initial_state: got dict", r"FilterState\(mean, covariance\)"]),
    ("an initial covariance that is not PSD",
     lambda: bayes(initial_state=(np.zeros((B, H, K, V)), -np.broadcast_to(np.eye(K), (B, H, K, K)))), FIE,
     [r"initial_state\.covariance: not positive semi-definite \(smallest eigenvalue -1\)"]),
    ("a decoding step given whole sequences",
     lambda: filters.compile(dm.gated_deltanet()).step(None, Q, KEY, VAL, log_decay=LOG_DECAY, beta=BETA), FIE,
     [r"q: got rank 4", r"\[B, H, K\]", "a decoding step has no time axis"]),
    ("a bad gate under jit (checked when the computation runs)",
     lambda: jax.block_until_ready(jax.jit(lambda b: bayes(beta=b))(-BETA)), Exception,
     [r"beta: 12 invalid entries, first at index \(0, 0, 0\): beta = -0\.5", "finite precisions beta > 0"]),
    ("precisions beyond float32 in the chunked lowering (no silent NaN)",
     lambda: filters.compile(dm.bayesian(), backend="chunked", chunk_size=4)(
         *_long_qkv(), beta=np.full((B, 8, H), 1e8, np.float32)), FIE,
     [r"output y: \d+ invalid entries", "the 'chunked' lowering produced non-finite values",
      "use float64 inputs, a smaller range of beta, or backend='sequential'"]),
    # ---- layers
    ("a layer with zero key dimension", lambda: layer_init(key_dim=0), LE,
     [r"DesignLayer\.key_dim: got 0; accepted: an integer >= 1"]),
    ("a layer with no heads", lambda: layer_init(num_heads=0), LE, [r"DesignLayer\.num_heads: got 0"]),
    ("a layer with value_dim=0", lambda: layer_init(value_dim=0), LE, [r"DesignLayer\.value_dim: got 0"]),
    ("a layer with a negative convolution", lambda: layer_init(conv_size=-1), LE,
     [r"DesignLayer\.conv_size: got -1; accepted: an integer >= 0"]),
    ("a layer key_dim the model contradicts",
     lambda: layer_init(model=dm.DesignModel(prior=dm.Prior(dm.DiagonalCovariance((1.0, 2.0, 3.0))))), LE,
     [r"DesignLayer\.key_dim: got 4, but the design model fixes K = 3", "accepted: key_dim=3"]),
    ("a layer given a model name", lambda: layer_init(model="gla"), LE,
     ["DesignLayer.model: got str 'gla'", r"dm\.NAMED_MODELS\['gla'\]\(\)"]),
    ("a layer with an unknown backend", lambda: layer_init(backend="fast"), BE, [r"backend='fast': unknown"]),
    ("a layer input of another width", lambda: layer_apply(jnp.ones((2, 5, 6))), LE,
     [r"x: got shape \(2, 5, 6\); expected \[B, T, D\] with D = d_model = 8"]),
    ("a layer input without the batch axis", lambda: layer_apply(jnp.ones((5, 8))), LE,
     [r"x: got shape \(5, 8\); expected \[B, T, D\]"]),
    ("token ids into a layer", lambda: layer_apply(jnp.ones((2, 5, 8), jnp.int32)), LE,
     ["x: got dtype int32", "embed token ids first"]),
    ("a decoding step given a sequence", lambda: layer_apply(jnp.ones((2, 1, 8)), layers.DesignLayer.step), LE,
     [r"x: got shape \(2, 1, 8\); expected \[B, D\]", "one decoding step"]),
    ("a named layer with a misspelled option", lambda: layers.named_layer("gla", 8, num_head=2), TypeError,
     [r"unknown keyword num_head \(did you mean 'num_heads'\?\)", "layer options", "model options"]),
    ("a misspelled named layer", lambda: layers.named_layer("mamba3", 8), LE,
     ["unknown layer 'mamba3'; accepted: linear_attention", r"did you mean 'mamba2'\?"]),
    # ---- configs, in Python
    ("an unknown model in config.models", lambda: models.check_models(("bayesain",)), ValueError,
     [r"config\.models: \['bayesain'\] not known \(did you mean 'bayesian'", "accepted: attention"]),
    ("an unknown choice", lambda: common.check_choice("backends", ["chunk"], ["sequential", "chunked"]), ValueError,
     [r"config\.backends: \['chunk'\] not known \(did you mean 'chunked'\?\)"]),
    ("an override of a field that does not exist",
     lambda: common.resolve(mqar_config.get_config(), {"learning_rate": 1e-3}), common.ConfigFieldError,
     [r"config\.learning_rate: config has no field 'learning_rate' \(did you mean 'learning_rates'\?\)",
      "its fields: "]),
]


def _long_qkv():
    """Eight steps of four-dimensional unit keys: more observations than directions, so at beta = 1e8 the
    float32 chunk factorization breaks down (a numerics limit of the lowering; the readout is checked)."""
    rng = np.random.default_rng(0)
    k = rng.normal(size=(B, 8, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return (rng.normal(size=(B, 8, H, K)).astype(np.float32), k.astype(np.float32),
            rng.normal(size=(B, 8, H, V)).astype(np.float32))


@pytest.mark.parametrize("mistake,make,error,patterns", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_says_what_was_wrong_and_what_is_accepted(mistake, make, error, patterns):
    with pytest.raises(error) as info:
        make()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{mistake}: {pattern!r} not in:\n{message}"


def test_numbers_of_any_real_type_are_accepted():
    """numpy scalars are numbers: ``ScalarDecay(np.float32(0.9))`` is not a mistake."""
    assert dm.ScalarDecay(np.float32(0.5)).decay == 0.5
    assert dm.IsotropicCovariance(np.int64(2)).variance == 2.0
    assert dm.bayesian(decay=np.float64(0.9)).transition.decay == 0.9
    assert dm.DesignModel(observation=dm.KeyValueObservation(np.float32(2.0))) == \
        dm.DesignModel(observation=dm.KeyValueObservation(2.0))


def test_valid_inputs_under_jit_and_grad_still_run():
    """The device-side value checks leave valid traced calls alone."""
    y = jax.jit(lambda b: bayes(beta=b)[0])(BETA * 4)
    np.testing.assert_allclose(y, bayes()[0], rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda q: jnp.sum(gdn(q=q)[0]))(jnp.asarray(Q))
    assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------------------------------
# the command line


def _parse(argv, config_file="configs/mqar.py"):
    """The config an app runs with for ``argv``, parsed as `common.run_app` parses it (cwd: the repo)."""
    values = flags.FlagValues()
    argv = ["prog", f"--config={os.path.join(ROOT, config_file)}", *argv]
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    return common.resolve_flags(values)


def test_command_line_overrides_win_over_smoke_settings():
    config = _parse(["--config.smoke=True", "--config.models=('linear_attention',)", "--config.num_steps=9",
                     "--config.smoke_settings.batch_size=4"])
    assert config.models == ("linear_attention",)             # smoke_settings also sets models: the user wins
    assert config.num_steps == 9                              # and num_steps
    assert config.batch_size == 4                             # an override of the smoke settings is applied
    assert config.d_models == (16,) and config.vocab_size == 64   # the rest of the smoke settings
    again = common.resolve(config)                            # resolving twice changes nothing
    assert again.to_dict() == config.to_dict()
    assert _parse(["--config.models=('gla',)"]).num_steps == 3000   # no smoke: the full settings


def test_resolve_in_python_applies_smoke_then_overrides():
    config = recall_config.get_config()
    config.smoke = True
    resolved = common.resolve(config, {"models": ("gla",), "smoke": True})
    assert resolved.models == ("gla",) and resolved.num_steps == 4
    with pytest.raises(AttributeError):
        resolved.num_step = 3                                 # locked: a typo cannot add a field


def test_smoke_settings_of_every_config_name_real_fields():
    for module in (mqar_config, recall_config, unification_config):
        config = module.get_config()
        config.smoke = True
        common.resolve(config)
    bad = ml_collections.ConfigDict({"smoke": True, "steps": 1, "smoke_settings": {"step": 2}})
    with pytest.raises(common.ConfigFieldError, match=r"smoke_settings\.step: not a field .*did you mean 'steps'"):
        common.resolve(bad)


@pytest.mark.parametrize("arg,patterns", [
    ("--config.modles=('gla',)", [r"--config\.modles: config has no field 'modles' \(did you mean 'models'\?\)",
                                  "its fields: backends, "]),
    ("--config.smoke_settings.shapess=1", [r"config\.smoke_settings has no field 'shapess'",
                                           r"did you mean 'shapes'\?"]),
    ("--noconfig.smok", [r"no field 'smok' \(did you mean 'smoke'\?\)"]),
])
def test_a_misspelled_field_on_the_command_line_names_the_closest(arg, patterns):
    with pytest.raises(common.ConfigFieldError) as info:
        common.check_command_line(["prog", "--config=configs/unification.py", arg], "configs/unification.py")
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), str(info.value)
    common.check_command_line(["prog", "--config.models=('gla',)"], os.path.join(ROOT, "configs/unification.py"))


def test_a_field_given_twice_on_the_command_line_takes_its_last_value():
    """As absl does for any flag; ml_collections alone would concatenate a tuple field's two values."""
    argv = ["prog", "--config=configs/mqar.py", "--config.d_models=(64,)", "--config.smoke", "--workdir=w",
            "--config.d_models", "(128,)", "--noconfig.smoke", "--config.models=('gla',)"]
    assert common.last_override_wins(argv) == ["prog", "--config=configs/mqar.py", "--workdir=w",
                                               "--config.d_models", "(128,)", "--noconfig.smoke",
                                               "--config.models=('gla',)"]
    assert common.last_override_wins(["prog", "--config.x=1", "--", "--config.x=2"]) == [
        "prog", "--config.x=1", "--", "--config.x=2"]                  # after "--": not flags
    # through absl and ml_collections, as the apps parse it (without the function: (64, 128))
    script = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
              "from experiments import common\nconfig_flags.DEFINE_config_file('config')\n"
              "flags.FLAGS(common.last_override_wins(sys.argv))\nprint(flags.FLAGS.config.d_models)")
    proc = subprocess.run([sys.executable, "-c", script, "--config=configs/mqar.py", "--config.d_models=(64,)",
                           "--config.d_models=(128,)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "(128,)", proc.stderr[-2000:]


@pytest.mark.parametrize("args,patterns", [
    (["--config.modles=('gla',)", "--workdir=/tmp/unused"],
     [r"FATAL Flags parsing error: --config\.modles: config has no field 'modles' \(did you mean 'models'\?\)"]),
    (["configs/unification.py", "--workdir=/tmp/unused"],
     [r"unexpected arguments \['configs/unification\.py'\]", "--config=PATH"]),
    ([], ["--workdir is required"]),
    (["--config.backends=('chunk',)", "--workdir=/tmp/unused"],
     [r"config\.backends: \['chunk'\] not known \(did you mean 'chunked'\?\)"]),
])
def test_the_app_reports_usage_errors_without_a_traceback(args, patterns):
    """A typo, a stray argument, no workdir, a config its own ``check`` refuses: exit 1, a message, no
    traceback, nothing run or written."""
    proc = subprocess.run([sys.executable, "-m", "experiments.unification", "--config=configs/unification.py",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for pattern in patterns:
        assert re.search(pattern, proc.stderr), proc.stderr[-2000:]


def test_deterministic_gpu_reductions_keeps_an_explicit_choice(monkeypatch):
    from experiments.common import deterministic_gpu_reductions

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    deterministic_gpu_reductions()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    deterministic_gpu_reductions()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_language_model_takes_a_declared_model_and_checks_its_key_dimension():
    import jax
    import jax.numpy as jnp

    import designmodels as dm
    from experiments.models import LanguageModel

    model = dm.DesignModel(prior=dm.Prior(dm.DiagonalCovariance((1.0, 0.5, 0.5, 2.0))),
                           transition=dm.ScalarDecay(None), noise=dm.NoProcessNoise(),
                           observation=dm.KeyValueObservation(None))
    tokens = jnp.zeros((2, 5), jnp.int32)
    params = LanguageModel(model, 16, 8, backend="sequential").init(jax.random.PRNGKey(0), tokens)
    mixer = params["params"]["block_0"]["mixer"]
    assert mixer["q_proj"]["kernel"].shape == (8, 8)            # two heads of width K = 4
    with pytest.raises(ValueError, match="multiple of the key dimension K=4"):
        LanguageModel(model, 16, 6).init(jax.random.PRNGKey(0), tokens)
