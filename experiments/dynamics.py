"""The memories compared by the dynamics experiments, and the closed forms of `docs/dynamics.md`.

Two parts, kept apart on purpose:

* `memories`: each model is *declared* with `designmodels` and compiled with `filters.compile`; this
  module only chooses its constant run-time gates. No filter code lives here.
* the closed forms (`riccati_*`, `two_key_*`, `crowding_*`): plain numpy evaluations of the formulas
  derived in `docs/dynamics.md`. They never call a filter; the experiments put them beside what the
  compiled filters measure.

Notation (docs/dynamics.md): ``l^2`` prior variance, ``beta`` observation precision (the Bayesian Layer)
or write strength (DeltaNet), ``q`` random-walk process noise, ``alpha`` a scalar decay, ``dt`` Mamba-2's
input scale, ``rho = k_A . k_B``, ``s = sqrt(1 - rho^2)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

import designmodels as dm
import filters
from designmodels.packaging import require_sibling

require_sibling(filters)   # a shadowing module of that name fails here, by name

MODEL_NAMES = ("linear_attention", "deltanet", "gated_deltanet", "mamba2", "bayesian", "bayesian_noise")
LABELS = {
    "linear_attention": "linear attention",
    "deltanet": "DeltaNet",
    "gated_deltanet": "Gated DeltaNet",
    "mamba2": "Mamba-2",
    "bayesian": "Bayesian (q = 0)",
    "bayesian_noise": "Bayesian (q > 0)",
}


# ----------------------------------------------------------------------------------------------------
# The memories: declared design models with constant gates.


@dataclasses.dataclass(frozen=True)
class Memory:
    """A declared model and the constant values of its run-time gates.

    ``params`` holds the hyperparameters the closed forms need (``alpha``, ``beta``, ``dt``, ``q``,
    ``prior_variance``), named as in docs/dynamics.md.
    """

    name: str
    model: dm.DesignModel
    gates: dict
    params: dict

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def compile(self) -> filters.Filter:
        return filters.compile(self.model, backend="sequential", diagnostics=True)

    def gate_arrays(self, shape, *, idle=None) -> dict:
        """Every declared run-time input as a constant ``[B, T, H]`` array; where ``idle`` (a boolean
        ``[T]`` mask of query-only steps) is set, decays are switched off (``log_decay = 0``)."""
        out = {}
        for name in self.model.runtime_inputs:
            value = np.full(shape, self.gates[name], np.float64)
            if name == "log_decay" and idle is not None:
                value[:, np.asarray(idle)] = 0.0
            out[name] = value
        return out


def memories(config, names=None) -> list[Memory]:
    """The memories named in ``config.models`` (or ``names``), with the hyperparameters of ``config``:
    ``deltanet_beta``, ``gdn_alpha``, ``gdn_beta``, ``mamba2_dt``, ``mamba2_A``, ``bayes_prior_variance``,
    ``bayes_beta``, ``bayes_process_noise``."""
    out = []
    for name in names or config.models:
        if name == "linear_attention":
            out.append(Memory(name, dm.linear_attention(), {}, {}))
        elif name == "deltanet":
            out.append(Memory(name, dm.deltanet(), {"beta": config.deltanet_beta},
                              {"beta": config.deltanet_beta}))
        elif name == "gated_deltanet":
            out.append(Memory(name, dm.gated_deltanet(),
                              {"log_decay": math.log(config.gdn_alpha), "beta": config.gdn_beta},
                              {"alpha": config.gdn_alpha, "beta": config.gdn_beta}))
        elif name == "mamba2":  # log_decay = dt * A, input_scale = dt
            dt, a = config.mamba2_dt, config.mamba2_A
            out.append(Memory(name, dm.mamba2(), {"log_decay": dt * a, "input_scale": dt},
                              {"alpha": math.exp(dt * a), "dt": dt}))
        elif name in ("bayesian", "bayesian_noise"):
            q = config.bayes_process_noise if name == "bayesian_noise" else 0.0
            model = dm.bayesian(prior_variance=config.bayes_prior_variance, process_noise=q or None,
                                noise="random_walk", decay="none")
            out.append(Memory(name, model, {"beta": config.bayes_beta},
                              {"beta": config.bayes_beta, "q": q, "prior_variance": config.bayes_prior_variance}))
        else:
            raise ValueError(f"config.models: {name!r} not known; accepted: {', '.join(MODEL_NAMES)}.")
    return out


# ----------------------------------------------------------------------------------------------------
# Agreement and the readout.


def relative_error(predicted: float, measured: float) -> float:
    """``|measured - predicted| / |predicted|`` (the absolute error when the prediction is exactly 0)."""
    return abs(measured - predicted) / abs(predicted) if predicted != 0 else abs(measured)


def agrees(predicted: Optional[float], measured: float, tolerance: float = 0.01) -> Optional[bool]:
    """Within ``tolerance`` relative (an absolute 1e-12 floor covers predictions that underflow to 0)."""
    if predicted is None:
        return None
    return bool(abs(measured - predicted) <= tolerance * abs(predicted) + 1e-12)


def pairwise_retrieval(target, distractor, temperature):
    """``softmax([target, distractor] / T)[0] = sigmoid((target - distractor) / T)``, computed stably."""
    x = (np.asarray(target, np.float64) - np.asarray(distractor, np.float64)) / temperature
    return np.exp(-np.logaddexp(0.0, -x))


# ----------------------------------------------------------------------------------------------------
# The scalar Riccati recursion (docs/dynamics.md, section 1).


def riccati_roots(beta: float, q: float) -> tuple[float, float]:
    """The two fixed points of ``p -> (p + q) / (1 + beta (p + q))``: the roots of
    ``beta p^2 + beta q p - q = 0``, ``p_+ >= 0 >= p_-``."""
    if q == 0:
        return 0.0, 0.0
    root = math.sqrt((beta * q) ** 2 + 4 * beta * q)
    return (-beta * q + root) / (2 * beta), (-beta * q - root) / (2 * beta)


def riccati_floor(beta: float, q: float) -> float:
    """The steady-state write gain ``g_inf = beta p_+ = (sqrt(x^2 + 4 x) - x) / 2`` with ``x = beta q``."""
    x = beta * q
    return 0.5 * (math.sqrt(x * x + 4 * x) - x)


def scalar_riccati(p0: float, beta: float, q: float, steps: int):
    """The posterior variance ``p_t`` along a unit key after ``t = 0..steps`` writes to it, and the
    product of the error factors ``prod_{i<=t} (1 - g_i) = 1 / den_t``, in closed form.

    ``q = 0``: ``p_t = p0 / (1 + t beta p0)``, ``1/den_t = 1 / (1 + t beta p0)``.
    ``q > 0``: the Moebius map has fixed points ``p_+, p_-`` and multiplier ``kappa = (1 - g_inf)^2``:
    ``(p_t - p_+) / (p_t - p_-) = kappa^t (p0 - p_+) / (p0 - p_-)``, and
    ``1/den_t = (1 - g_inf)^t / (A + C (1 - g_inf)^(2t))`` with ``A = (p0 - p_-) / (p_+ - p_-)``,
    ``C = 1 - A``.
    """
    t = np.arange(steps + 1, dtype=np.float64)
    if q == 0:
        den = 1.0 + t * beta * p0
        return p0 / den, 1.0 / den
    p_plus, p_minus = riccati_roots(beta, q)
    g = beta * p_plus
    xi = (1 - g) ** (2 * t) * (p0 - p_plus) / (p0 - p_minus)
    p = (p_plus - xi * p_minus) / (1 - xi)
    a = (p0 - p_minus) / (p_plus - p_minus)
    inv_den = (1 - g) ** t / (a + (1 - a) * (1 - g) ** (2 * t))
    return p, inv_den


def write_gains(beta: float, q: float, prior_variance: float, steps: int) -> np.ndarray:
    """``g_t = beta p_t``, ``t = 1..steps``: the gain of each of ``steps`` writes to one unit key."""
    return beta * scalar_riccati(prior_variance, beta, q, steps)[0][1:]


def gain_envelope(beta: float, prior_variance: float, steps: int) -> np.ndarray:
    """Without process noise: ``g_n = beta l^2 / (1 + n beta l^2)``, ``n = 1..steps``."""
    n = np.arange(1, steps + 1, dtype=np.float64)
    return beta * prior_variance / (1 + n * beta * prior_variance)


def _telescoped_sum(p0: float, beta: float, q: float, p_t: np.ndarray) -> np.ndarray:
    """``sum_{i=1..t} 1 / (den_{i-1} den_i) = (p_t - p0) / (q - beta p0 (p0 + q))`` (det H = 1); at
    the fixed point (denominator 0) the geometric series ``sum (1 - g)^(2i - 1)``."""
    d = q - beta * p0 * (p0 + q)
    if abs(d) > 1e-13 * max(1.0, beta * p0 * p0):
        return (p_t - p0) / d
    g = beta * p0 / (1 + beta * p0) if q == 0 else riccati_floor(beta, q)
    r = (1 - g) ** 2
    t = np.arange(len(p_t), dtype=np.float64)
    return (1 - g) * (1 - r ** t) / (1 - r) if r < 1 else t


# ----------------------------------------------------------------------------------------------------
# The two-key collision (docs/dynamics.md, section 2): boost B n_B times, then flood A n_A times,
# read at k_B after every write. Returns the readout's target (v_B) and distractor (v_A) components.


def two_key_readouts(name: str, params: dict, rho: float, n_boost: int, n_flood: int):
    """``(b_t, a_t)``, ``t = 1..n_boost + n_flood``: the coefficients of ``v_B`` and ``v_A`` in
    ``M_t k_B`` (one-hot values), in closed form for each model."""
    s = math.sqrt(max(0.0, 1 - rho * rho))
    i = np.arange(1, n_boost + 1, dtype=np.float64)       # boost steps
    j = np.arange(1, n_flood + 1, dtype=np.float64)       # flood steps
    if name == "linear_attention":
        b = np.concatenate([i, np.full(n_flood, float(n_boost))])
        a = np.concatenate([np.zeros(n_boost), rho * j])
    elif name == "mamba2":
        alpha, dt = params["alpha"], params["dt"]
        boost = dt * (1 - alpha ** i) / (1 - alpha)
        c = dt * (1 - alpha ** n_boost) / (1 - alpha)
        b = np.concatenate([boost, c * alpha ** j])
        a = np.concatenate([np.zeros(n_boost), rho * dt * (1 - alpha ** j) / (1 - alpha)])
    elif name in ("deltanet", "gated_deltanet"):
        alpha, beta = params.get("alpha", 1.0), params["beta"]
        r = alpha * (1 - beta)                            # per-step contraction of the written coefficient
        c_star = beta / (1 - r)
        boost = c_star * (1 - r ** i)
        erased = 1 - (1 - beta) ** j                      # (I - beta k k^T)^j = I - erased k k^T
        b = np.concatenate([boost, boost[-1] * alpha ** j * (1 - erased * rho * rho)])
        a = np.concatenate([np.zeros(n_boost), rho * c_star * (1 - r ** j)])
    elif name in ("bayesian", "bayesian_noise"):
        b, a = _bayesian_two_key(params, rho, s, n_boost, n_flood)
    else:
        raise ValueError(name)
    return b, a


def _bayesian_two_key(params, rho, s, n_boost, n_flood):
    beta, q, l2 = params["beta"], params["q"], params["prior_variance"]
    # Boost: along k_B the scalar Riccati from l^2; across it, no evidence: sigma = l^2 + n_B q.
    p_b, inv_den_b = scalar_riccati(l2, beta, q, n_boost)
    mu = 1 - inv_den_b[1:]                                # M k_B = mu_t v_B
    pi, sigma, m = p_b[-1], l2 + n_boost * q, mu[-1]
    # Flood, in the basis (k_A, w), w = s k_B - rho u: k_B = rho k_A + s w.
    p0 = rho * rho * pi + s * s * sigma                   # k_A^T P k_A
    c0 = rho * s * (pi - sigma)                           # k_A^T P w
    p_a, inv_den_a = scalar_riccati(p0, beta, q, n_flood)
    total = _telescoped_sum(p0, beta, q, p_a)[1:] if c0 != 0 else np.zeros(n_flood)
    inv_den = inv_den_a[1:]
    readouts = []
    for y, x0, z0 in ((0.0, m * rho, m * s), (1.0, 0.0, 0.0)):   # row of v_B (target 0), row of v_A
        x = y + (x0 - y) * inv_den
        z = z0 + (y - x0) * beta * c0 * total
        readouts.append(rho * x + s * z)
    b = np.concatenate([mu, readouts[0]])
    a = np.concatenate([np.zeros(n_boost), readouts[1]])
    return b, a


def two_key_gains(params: dict, rho: float, n_boost: int, n_flood: int) -> np.ndarray:
    """The Bayesian Layer's write gain during the collision: ``beta p_t`` along ``k_B`` while boosting,
    then along ``k_A`` from ``p0 = rho^2 pi + s^2 sigma`` while flooding."""
    beta, q, l2 = params["beta"], params["q"], params["prior_variance"]
    p_b, _ = scalar_riccati(l2, beta, q, n_boost)
    p0 = rho * rho * p_b[-1] + (1 - rho * rho) * (l2 + n_boost * q)
    p_a, _ = scalar_riccati(p0, beta, q, n_flood)
    return beta * np.concatenate([p_b[1:], p_a[1:]])


def two_key_limit(name: str, params: dict, rho: float, n_boost: int, temperature: float) -> float:
    """The retrieval plateau as the flood goes on forever (``n_A -> infinity``)."""
    s = math.sqrt(max(0.0, 1 - rho * rho))
    if name == "linear_attention":   # b = n_B, a = rho n_A -> infinity
        return float(pairwise_retrieval(n_boost, 0.0, temperature)) if rho == 0 else 0.0
    if name == "mamba2":
        alpha, dt = params["alpha"], params["dt"]
        b, a = 0.0, rho * dt / (1 - alpha)
    elif name in ("deltanet", "gated_deltanet"):
        alpha, beta = params.get("alpha", 1.0), params["beta"]
        r = alpha * (1 - beta)
        c_star = beta / (1 - r)
        b = c_star * (1 - r ** n_boost) * (1 - rho * rho) if alpha == 1 else 0.0
        a = rho * c_star
    else:
        beta, q, l2 = params["beta"], params["q"], params["prior_variance"]
        p_b, inv_den_b = scalar_riccati(l2, beta, q, n_boost)
        pi, sigma, m = p_b[-1], l2 + n_boost * q, 1 - inv_den_b[-1]
        p0 = rho * rho * pi + s * s * sigma
        c0 = rho * s * (pi - sigma)
        shift = c0 / (p0 - riccati_roots(beta, q)[1]) if c0 != 0 else 0.0
        b = s * (m * s - m * rho * shift)                 # x -> 0, z -> z0 - x0 c0 / (p0 - p_-)
        a = rho + s * shift                               # x -> 1, z -> c0 / (p0 - p_-)
    return float(pairwise_retrieval(b, a, temperature))


# ----------------------------------------------------------------------------------------------------
# Crowding (docs/dynamics.md, section 3): n random unit keys in dimension D, orthonormal random values,
# loss (1/n) sum_i |M k_i - v_i|^2 after all writes.


def crowding_prediction(name: str, params: dict, n: int, key_dim: int) -> Optional[float]:
    """The expected loss over random keys, or None where no closed form is derived.

    Additive memories (exact for every ``n, D``): with write weights ``w_j = dt alpha^(n-j)``,
    ``E L = 1 - (2/n) sum_j w_j + (1/n) sum_j w_j^2 (1 + (n - 1)/D)``; linear attention
    (``dt = alpha = 1``): ``(n - 1) / D``, the cross-direction term ``E rho^2 = 1/D`` from each other key.
    The Bayesian Layer without process noise (ridge regression, ``lambda = 1/(beta l^2)``; Marchenko-Pastur,
    asymptotic in ``D`` at fixed ``y = n/D``): ``E L = lambda^2 f (1 + y f) / (1 - y + lambda + 2 y lambda f)``
    with ``f`` the positive root of ``y lambda f^2 + (1 - y + lambda) f - 1 = 0``.
    """
    if name == "linear_attention":
        return (n - 1) / key_dim
    if name == "mamba2":
        alpha, dt = params["alpha"], params["dt"]
        w1 = dt * (1 - alpha ** n) / (1 - alpha)
        w2 = dt * dt * (1 - alpha ** (2 * n)) / (1 - alpha ** 2)
        return 1 - 2 * w1 / n + w2 / n * (1 + (n - 1) / key_dim)
    if name == "bayesian":
        return marchenko_pastur_ridge_loss(n / key_dim, 1.0 / (params["beta"] * params["prior_variance"]))
    return None


def marchenko_pastur_ridge_loss(y: float, lam: float) -> float:
    """``lambda^2 int dF(x) / (x + lambda)^2`` for the Marchenko-Pastur law of ratio ``y``."""
    b = 1 - y + lam
    f = (-b + math.sqrt(b * b + 4 * y * lam)) / (2 * y * lam)
    return lam * lam * f * (1 + y * f) / (1 - y + lam + 2 * y * lam * f)


def noiseless_ridge_limit(n: int, key_dim: int) -> float:
    """``lambda -> 0``: least squares interpolates ``n <= D`` keys; beyond, the residual projector has
    trace ``n - D``: ``L = max(0, 1 - D / n)``."""
    return max(0.0, 1 - key_dim / n)


# ----------------------------------------------------------------------------------------------------
# Records: {"quantity", "model", "predicted" (float or None), "measured", ...}, and their table.


def record(quantity: str, model: str, predicted: Optional[float], measured: float, tolerance: float = 0.01,
           **context) -> dict:
    predicted = None if predicted is None else float(predicted)
    measured = float(measured)
    return {"quantity": quantity, "model": model, "predicted": predicted, "measured": measured,
            "relative_error": None if predicted is None else relative_error(predicted, measured),
            "agrees": agrees(predicted, measured, tolerance), **context}


def _number(x) -> str:
    return "-" if x is None else f"{x:.6g}"


def records_table(records, context_keys=("rho", "step", "n", "n_over_D", "beta", "q")) -> str:
    """A markdown table of the records: quantity, model, context, predicted, measured, error, verdict."""
    from experiments import common
    keys = [k for k in context_keys if any(k in r for r in records)]
    rows = []
    for r in records:
        verdict = {None: "no closed form", True: "agrees", False: "DISAGREES"}[r["agrees"]]
        error = "-" if r["relative_error"] is None else f"{r['relative_error']:.1e}"
        rows.append([r["quantity"], r["model"]] + [_number(r.get(k)) for k in keys] +
                    [_number(r["predicted"]), _number(r["measured"]), error, verdict])
    return common.markdown_table(["quantity", "model", *keys, "predicted", "measured", "rel. error", ""], rows)


def print_and_check(records, name=lambda r: f"{r['quantity']}/{r['model']}") -> None:
    """Print `records_table`; exit non-zero, naming each, if any measurement disagrees with its closed form
    beyond the tolerance (the end of `experiments.collision` and `experiments.crowding`)."""
    print(records_table(records))
    bad = [name(r) for r in records if r["agrees"] is False]
    if bad:
        raise SystemExit(f"closed form and measurement disagree beyond tolerance: {', '.join(bad)}")
