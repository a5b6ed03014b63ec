"""`filters.fla`: fla 0.6's functional ops, proven against an independent float64 implementation of fla's
documented recurrences, against numbers made by fla itself (when tests/data/fla_reference.npz exists),
and refusing what no design model represents with a message that says so."""
import inspect
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import filters
from benchmarks import fla_reference
from filters import fla
from tests.support import relative_error

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "fla_reference.npz")
B, T, H, K, V = 2, 40, 2, 8, 6


# ----------------------------------------------------------------------------------------------------
# an independent implementation of fla's recurrences (its fused_recurrent kernels, as documented), float64
# ----------------------------------------------------------------------------------------------------

def fla_recurrence(q, k, v, *, g=None, gk=None, beta=None, scale=None, initial_state=None, l2norm=False,
                   delta=False, reverse=False):
    """Per batch row ``b`` and value head ``j`` (query/key head ``j // (HV / H)``), for ``t = 0 .. T-1``
    (``T-1 .. 0`` with ``reverse``): ``q, k <- x / sqrt(|x|^2 + 1e-6)`` (``l2norm``), ``q <- scale q``;
    ``h <- exp(g_t) h``; ``h <- diag(exp(gk_t)) h``; delta rule: ``u = beta_t (v_t - h^T k_t)``, else
    ``u = v_t``; ``h <- h + k_t u^T``; ``o_t = h^T q_t``. Returns ``(o, h_T)``, ``h [B, HV, K, V]``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, time, heads, kd = q.shape
    value_heads, vd = v.shape[2], v.shape[3]
    group = value_heads // heads
    if l2norm:
        q, k = (x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6) for x in (q, k))
    q = q * (kd ** -0.5 if scale is None else scale)
    o = np.zeros((batch, time, value_heads, vd))
    final = np.zeros((batch, value_heads, kd, vd))
    steps = range(time - 1, -1, -1) if reverse else range(time)
    for b in range(batch):
        for j in range(value_heads):
            i = j // group
            h = np.zeros((kd, vd)) if initial_state is None else np.array(initial_state[b, j], np.float64)
            for t in steps:
                if g is not None:
                    h = h * np.exp(g[b, t, j])
                if gk is not None:
                    h = h * np.exp(gk[b, t, j])[:, None]
                u = beta[b, t, j] * (v[b, t, j] - h.T @ k[b, t, i]) if delta else v[b, t, j]
                h = h + np.outer(k[b, t, i], u)
                o[b, t, j] = h.T @ q[b, t, i]
            final[b, j] = h
    return o, final


def _inputs(seed=0, value_heads=H):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
    return dict(
        q=rng.normal(size=(B, T, H, K)), k=unit(rng.normal(size=(B, T, H, K))),
        k_raw=0.6 * rng.normal(size=(B, T, H, K)), v=rng.normal(size=(B, T, value_heads, V)),
        g=log_sigmoid(2.0 + rng.normal(size=(B, T, value_heads))),
        gk=log_sigmoid(2.0 + rng.normal(size=(B, T, value_heads, K))) / 2,
        g_gamma=np.log(np.linspace(0.8, 0.95, value_heads)),
        beta=rng.uniform(0.05, 0.95, size=(B, T, value_heads)),
        h0=0.3 * rng.normal(size=(B, value_heads, K, V)))


def _check(got, want, tol=1e-10):
    (o, final), (o_ref, final_ref) = got, want
    assert o.shape == o_ref.shape and final.shape == final_ref.shape
    assert relative_error(o, o_ref) < tol, relative_error(o, o_ref)
    assert relative_error(final, final_ref) < tol, relative_error(final, final_ref)


# chunk_size=16 makes the chunked lowerings cross chunks at T = 40 (and checks that it reaches them)
@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_gated_delta_rule(op):
    x = _inputs(1)
    run = getattr(fla, op)
    extra = {"chunk_size": 16} if op.startswith("chunk") else {}
    want = fla_recurrence(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], scale=0.7, initial_state=x["h0"],
                          delta=True)
    _check(run(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], scale=0.7, initial_state=x["h0"],
               output_final_state=True, **extra), want)
    # unnormalized keys, normalized inside (use_qk_l2norm_in_kernel), the default scale K^-1/2
    want = fla_recurrence(x["q"], x["k_raw"], x["v"], g=x["g"], beta=x["beta"], l2norm=True, delta=True)
    _check(run(x["q"], x["k_raw"], x["v"], g=x["g"], beta=x["beta"], use_qk_l2norm_in_kernel=True,
               output_final_state=True, **extra), want)


def test_gated_delta_rule_grouped_values_and_v_first_state():
    """``v`` with twice the heads of ``q, k`` (grouped value attention); the state in [B, H, V, K]."""
    x = _inputs(2, value_heads=2 * H)
    want = fla_recurrence(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=x["h0"], delta=True)
    _check(fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                      output_final_state=True, chunk_size=16), want)
    o, final = fla.fused_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=np.swapaxes(x["h0"], -1, -2),
        output_final_state=True, state_v_first=True)
    _check((o, np.swapaxes(final, -1, -2)), want)


def test_gated_delta_rule_gates_in_kernel():
    """``use_gate_in_kernel``: ``g = -exp(A_log) softplus(g_raw + dt_bias)``; ``use_beta_sigmoid_in_kernel``:
    ``beta = sigmoid(logits)``."""
    x = _inputs(3)
    rng = np.random.default_rng(3)
    g_raw, logits = rng.normal(size=(B, T, H)), rng.normal(size=(B, T, H))
    a_log, dt_bias = np.log(rng.uniform(1, 16, H)), rng.normal(size=H) - 2
    g = -np.exp(a_log) * np.log1p(np.exp(g_raw + dt_bias))
    beta = 1 / (1 + np.exp(-logits))
    want = fla_recurrence(x["q"], x["k"], x["v"], g=g, beta=beta, delta=True)
    _check(fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], g_raw, logits, use_gate_in_kernel=True, A_log=a_log,
                                      dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, output_final_state=True), want)


def test_gated_delta_rule_channelwise_decay():
    """fused_recurrent_gated_delta_rule with ``g`` and ``gk``: a delta rule with a channel-wise decay."""
    x = _inputs(4)
    want = fla_recurrence(x["q"], x["k"], x["v"], g=x["g"], gk=x["gk"], beta=x["beta"], delta=True)
    _check(fla.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], gk=x["gk"], beta=x["beta"],
                                                output_final_state=True), want)


@pytest.mark.parametrize("op", ["chunk_delta_rule", "fused_recurrent_delta_rule"])
def test_delta_rule(op):
    x = _inputs(5)
    extra = {"chunk_size": 16} if op.startswith("chunk") else {}
    want = fla_recurrence(x["q"], x["k"], x["v"], beta=x["beta"], initial_state=x["h0"], delta=True)
    _check(getattr(fla, op)(x["q"], x["k"], x["v"], x["beta"], initial_state=x["h0"], output_final_state=True,
                            **extra), want)


@pytest.mark.parametrize("op", ["chunk_simple_gla", "fused_recurrent_simple_gla"])
def test_simple_gla(op):
    x = _inputs(6)
    run = getattr(fla, op)
    _check(run(x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True),
           fla_recurrence(x["q"], x["k"], x["v"], g=x["g"], initial_state=x["h0"]))
    # a fixed decay per head (g_gamma [H]), with and without g: they add up
    gamma = np.broadcast_to(x["g_gamma"], (B, T, H))
    _check(run(x["q"], x["k"], x["v"], g_gamma=x["g_gamma"], output_final_state=True),
           fla_recurrence(x["q"], x["k"], x["v"], g=gamma))
    _check(run(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], output_final_state=True),
           fla_recurrence(x["q"], x["k"], x["v"], g=x["g"] + gamma))
    # neither: linear attention
    _check(run(x["q"], x["k"], x["v"], output_final_state=True), fla_recurrence(x["q"], x["k"], x["v"]))


@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_gla(op):
    x = _inputs(7)
    _check(getattr(fla, op)(x["q"], x["k"], x["v"], x["gk"], initial_state=x["h0"], output_final_state=True),
           fla_recurrence(x["q"], x["k"], x["v"], gk=x["gk"], initial_state=x["h0"]))


@pytest.mark.parametrize("op", ["fused_recurrent_simple_gla", "fused_recurrent_gla"])
def test_reverse(op):
    x = _inputs(8)
    gate = x["g"] if "simple" in op else x["gk"]
    want = fla_recurrence(x["q"], x["k"], x["v"], initial_state=x["h0"], reverse=True,
                          **({"g": gate} if "simple" in op else {"gk": gate}))
    _check(getattr(fla, op)(x["q"], x["k"], x["v"], gate, initial_state=x["h0"], output_final_state=True,
                            reverse=True), want)


def test_outputs_follow_fla_conventions():
    """``o`` in the dtype of ``q``; no final state unless asked; the float32 final state in [B, H, K, V]."""
    x = {n: jnp.asarray(a, jnp.float32) for n, a in _inputs(9).items()}
    o, final = fla.chunk_gated_delta_rule(x["q"].astype(jnp.bfloat16), x["k"].astype(jnp.bfloat16),
                                          x["v"].astype(jnp.bfloat16), x["g"], x["beta"])
    assert o.dtype == jnp.bfloat16 and o.shape == (B, T, H, V) and final is None
    o, final = fla.chunk_gla(x["q"], x["k"], x["v"], x["gk"], output_final_state=True)
    assert o.dtype == jnp.float32 and final.dtype == jnp.float32 and final.shape == (B, H, K, V)


# fla 0.6's parameters, in order, up to the first keyword-only or **kwargs one of ours (from its source)
FLA_SIGNATURES = {
    "chunk_gated_delta_rule": "q k v g beta scale initial_state output_final_state use_qk_l2norm_in_kernel "
                              "use_beta_sigmoid_in_kernel allow_neg_eigval state_v_first cu_seqlens",
    "fused_recurrent_gated_delta_rule": "q k v g gk gv beta scale initial_state output_final_state "
                                        "use_qk_l2norm_in_kernel use_gate_in_kernel A_log dt_bias "
                                        "use_beta_sigmoid_in_kernel allow_neg_eigval state_v_first cu_seqlens",
    "chunk_delta_rule": "q k v beta scale initial_state output_final_state use_qk_l2norm_in_kernel cu_seqlens",
    "fused_recurrent_delta_rule": "q k v beta scale initial_state output_final_state use_qk_l2norm_in_kernel "
                                  "cu_seqlens",
    "chunk_simple_gla": "q k v g g_gamma scale initial_state output_final_state state_v_first cu_seqlens",
    "fused_recurrent_simple_gla": "q k v g g_gamma scale initial_state output_final_state reverse state_v_first "
                                  "cu_seqlens",
    "chunk_gla": "q k v g scale initial_state output_final_state state_v_first cu_seqlens",
    "fused_recurrent_gla": "q k v gk gv scale initial_state output_final_state reverse state_v_first cu_seqlens",
}


@pytest.mark.parametrize("op", sorted(FLA_SIGNATURES))
def test_signatures_are_flas(op):
    parameters = inspect.signature(getattr(fla, op)).parameters.values()
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == FLA_SIGNATURES[op].split()
    defaults = {p.name: p.default for p in parameters}
    assert defaults["scale"] is None and defaults["initial_state"] is None
    assert defaults["output_final_state"] is False and defaults["cu_seqlens"] is None


# ----------------------------------------------------------------------------------------------------
# what no design model represents
# ----------------------------------------------------------------------------------------------------

def test_unrepresentable_steps_are_refused_saying_so():
    x = _inputs(10)
    # fla's default beta = 1 with unit keys: a full overwrite, beyond a covariance reset
    with pytest.raises(filters.FilterInputError, match="not representable as a design model") as error:
        fla.fused_recurrent_delta_rule(x["q"], x["k"], x["v"])
    assert "beta_t |k_t|^2 = 1" in str(error.value)
    # allow_neg_eigval: beta = 2 sigmoid(logits) in (0, 2)
    with pytest.raises(filters.FilterInputError, match="not representable as a design model"):
        fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], np.full((B, T, H), 3.0),
                                   use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    # unnormalized keys: beta |k|^2 >= 1 although beta < 1
    with pytest.raises(filters.FilterInputError, match=r"beta_t \|k_t\|\^2 = "):
        fla.chunk_delta_rule(x["q"], 3 * x["k"], x["v"], x["beta"])
    with pytest.raises(filters.FilterInputError, match="log_decay: .*accepted: finite log decays <= 0"):
        fla.chunk_simple_gla(x["q"], x["k"], x["v"], np.abs(x["g"]) + 0.1)


@pytest.mark.parametrize("call, message", [
    (lambda x: fla.fused_recurrent_gla(x["q"], x["k"], x["v"], gv=x["gk"][..., :V]),
     r"gv=...\): a decay over the value dimension .* is not a transition of a design model"),
    (lambda x: fla.fused_recurrent_delta_rule(x["q"], x["k"], x["v"], np.full((B, T, H, V), 0.5)),
     r"beta=...\): got shape \(2, 40, 2, 6\), a beta per value channel .* not representable"),
    (lambda x: fla.chunk_gla(x["q"], x["k"], x["v"], x["gk"], max_seqlen=20),
     r"chunk_gla\(max_seqlen=...\): not supported here .* max_seqlen of a packed batch needs cu_seqlens"),
    (lambda x: fla.chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], head_first=False),
     r"unknown keyword argument 'head_first'; pass nothing: inputs are \[B, T, H, ...\]"),
    (lambda x: fla.chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], output_final_stat=True),
     r"unknown keyword argument 'output_final_stat' \(did you mean 'output_final_state'"),
    (lambda x: fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cp_context=object()),
     r"cp_context=...\): not supported here"),
    (lambda x: fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], allow_neg_eigval=True),
     "allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True"),
    (lambda x: fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"][:, :, :1].repeat(3, 2), x["g"], x["beta"]),
     "v has 3 heads, q and k 2; grouped value attention needs a multiple"),
])
def test_arguments_that_are_refused(call, message):
    with pytest.raises(fla.FlaArgumentError, match=message):
        call(_inputs(11))


# ----------------------------------------------------------------------------------------------------
# numbers made by fla itself (benchmarks/fla_reference.py on a GPU)
# ----------------------------------------------------------------------------------------------------

def _reference():
    if not os.path.exists(REFERENCE):
        pytest.skip(f"{os.path.relpath(REFERENCE)} is absent: make it on a CUDA machine with fla-core 0.6.0 "
                    "(python benchmarks/fla_reference.py --out tests/data/fla_reference.npz)")
    return np.load(REFERENCE)


@pytest.mark.parametrize("case", sorted(fla_reference.CASES))
def test_against_numbers_made_by_fla(case):
    data = _reference()
    meta = json.loads(str(data["meta"]))
    if case in meta["failed"]:
        pytest.skip(f"fla {meta['fla']} refused this case when the reference was made: {meta['failed'][case]}")
    assert f"{case}/o" in data.files, (f"{os.path.relpath(REFERENCE)} holds no numbers for {case} (a run stopped "
                                       "early?): make it again with benchmarks/fla_reference.py")
    inputs = {name.split("/", 1)[1]: data[name] for name in data.files if name.startswith("input/")}
    _, op, dtype, *_ = fla_reference.CASES[case]
    # ours in float64 on the same (bf16-representable) inputs: the difference is fla's own round-off
    args, kwargs = fla_reference.case_arguments(case, inputs, lambda name, a: np.asarray(a, np.float64))
    o, final = getattr(fla, op)(*args, **kwargs)
    tol = fla_reference.TOLERANCE[dtype]
    assert relative_error(data[f"{case}/o"], o) < tol, relative_error(data[f"{case}/o"], o)
    assert relative_error(data[f"{case}/final_state"], final) < tol, relative_error(data[f"{case}/final_state"], final)


def test_reference_cases_run_here():
    """Every case of the reference script runs through `filters.fla` (so the GPU run cannot fail on our
    side) and agrees with the float64 recurrence above on the script's own inputs."""
    inputs = {n: np.asarray(a, np.float64) for n, a in fla_reference.make_inputs().items()}
    for case, (_, op, *_rest) in fla_reference.CASES.items():
        args, kwargs = fla_reference.case_arguments(case, inputs)
        o, final = getattr(fla, op)(*args, **kwargs)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(final)) and final.ndim == 4, case
    x = inputs
    want = fla_recurrence(x["q"], x["k"], x["v_grouped"], g=x["g_grouped"], beta=x["beta_grouped"],
                          initial_state=x["h0_grouped"], delta=True)
    args, kwargs = fla_reference.case_arguments("gdn_grouped_values", inputs)
    _check(fla.chunk_gated_delta_rule(*args, **kwargs), want)
