"""The named design models: each published layer, declared (not implemented).

Each docstring gives the run-time parameterization the compiled filter takes; `docs/unification.md`
derives why each declaration reduces to the published recurrence and when that reduction is exact.
"""
from __future__ import annotations

import contextlib
from typing import Literal, Optional, Union

from designmodels import components as c
from designmodels.model import DesignModel


@contextlib.contextmanager
def _argument(function: str, **arguments):
    """Prefix a component's error with the argument of the named model that caused it."""
    try:
        yield
    except c.DesignModelError as e:
        given = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        raise c.DesignModelError(f"{function}({given}): {e}") from None


def linear_attention() -> DesignModel:
    """``S_t = S_{t-1} + k_t v_t^T`` (Katharopoulos et al. 2020): identity transition, latent input."""
    return DesignModel(transition=c.Identity(), observation=c.LatentInput(), name="linear_attention")


def retnet(gamma: float = 1 - 2 ** -5) -> DesignModel:
    """``S_t = gamma S_{t-1} + k_t v_t^T`` (Sun et al. 2023): fixed scalar decay ``gamma in (0, 1]``."""
    with _argument("retnet", gamma=gamma):
        transition = c.ScalarDecay(gamma)
    return DesignModel(transition=transition, observation=c.LatentInput(), name="retnet")


def gla() -> DesignModel:
    """``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`` (Yang et al. 2024). Run time: ``log_decay`` ``[B,T,H,K]``."""
    return DesignModel(transition=c.DiagonalDecay(None), observation=c.LatentInput(), name="gla")


def mamba2() -> DesignModel:
    """Mamba-2 / SSD (Dao & Gu 2024): ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t``.

    Run time: ``q = C``, ``k = B``, ``v = x``, ``log_decay = dt * A`` ``[B,T,H]``, ``input_scale = dt``.
    """
    return DesignModel(transition=c.ScalarDecay(None), observation=c.LatentInput(scaled=True), name="mamba2")


def deltanet() -> DesignModel:
    """The delta rule ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T`` (Schlag et al. 2021).

    Run time: ``beta`` ``[B,T,H]``, the write strength, with ``beta_t |k_t|^2 < 1`` (unit keys:
    ``beta in (0, 1)``); a covariance reset with ``sigma_t^2 = beta_t / (1 - beta_t |k_t|^2)``.
    """
    return DesignModel(transition=c.Identity(), observation=c.KeyValueObservation(None),
                       covariance=c.Reset(write_strength=True), name="deltanet")


def gated_deltanet() -> DesignModel:
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025): ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1}
    + beta_t k_t v_t^T``. Run time: ``log_decay = log alpha_t`` ``[B,T,H]`` and ``beta`` as in `deltanet`."""
    return DesignModel(transition=c.ScalarDecay(None), observation=c.KeyValueObservation(None),
                       covariance=c.Reset(write_strength=True), name="gated_deltanet")


def longhorn(decay: Literal["none", "input"] = "none") -> DesignModel:
    """Longhorn (Liu et al. 2024), the closed-form online-regression update: ``eps_t = beta_t /
    (1 + beta_t |k_t|^2)``, ``S_t = (I - eps_t k_t k_t^T) S_{t-1} + eps_t k_t v_t^T``: a reset to unit
    prior variance with observation precision ``beta > 0`` (run time, ``[B,T,H]``).

    ``decay="input"`` adds the Bayesian Layer's scalar decay (not in the paper): ``S_bar = a_t S_{t-1}``,
    then the same reset and update, ``S_t = (I - eps_t k_t k_t^T) S_bar + eps_t k_t v_t^T``, with
    ``log_decay`` ``[B,T,H]`` at run time. It is the Bayesian Layer's observation, precision and decay with
    the covariance reset to ``I`` before every write instead of propagated (Gated DeltaNet with a
    precision in place of the write strength).
    """
    if decay == "none":
        transition = c.Identity()
    elif decay == "input":
        transition = c.ScalarDecay(None)
    else:
        hint = c.did_you_mean(decay, ("input", "none")) if isinstance(decay, str) else ""
        raise c.DesignModelError(f"longhorn(decay=...): got {decay!r}{hint}; accepted: 'none' or 'input'.")
    return DesignModel(transition=transition, observation=c.KeyValueObservation(None),
                       covariance=c.Reset(variance=1.0), name="longhorn")


def bayesian(prior_variance: float = 1.0, process_noise: Union[None, float, Literal["input", "key"]] = None,
             noise: Literal["random_walk", "stationary", "key"] = "random_walk",
             decay: Union[Literal["input", "none"], float] = "input") -> DesignModel:
    """The Bayesian Layer: the exact Kalman filter of an isotropic-prior memory.

    Args:
      prior_variance: ``l^2`` in ``P_0 = l^2 I``.
      process_noise: with ``noise="random_walk"``, ``q`` in ``Q = q I`` (None or 0: no noise), or
        ``"input"``: an input-dependent ``Q_t = q_t I``, given at run time as ``process_noise`` ``[B,T,H]``
        (forgets certainty without shrinking the mean: with ``a = 1`` the gain settles at a constant);
        or ``"key"``: noise along the key about to be written, ``Q_t = q_t k_t k_t^T`` (`KeyNoise`), ``q_t``
        given at run time as ``process_noise`` ``[B,T,H]`` (a write replaces what the memory held at
        ``k_t``: the gain along ``k_t`` tends to 1 as ``q_t`` grows; sequential, associative, chunked and
        pallas lowerings);
        with ``noise="stationary"``, the stationary variance ``l_s^2`` in ``Q_t = l_s^2 (1 - a_t^2) I``
        (None: the prior variance, so the prior stays stationary).
      noise: ``"random_walk"``, ``"stationary"`` or ``"key"``: `KeyNoise`, ``Q_t = q k_t k_t^T`` with
        ``process_noise`` a fixed ``q`` (None or 0: no noise) or ``"input"`` (``q_t`` at run time, as
        ``process_noise="key"``).
      decay: ``"input"``: an optional run-time ``log_decay`` ``[B,T,H]`` (omitted: no decay);
        ``"none"``: no decay; a number in (0, 1]: a fixed scalar decay.

    Run time: ``beta`` ``[B,T,H]``, the observation precision ``> 0``.
    """
    if process_noise == "input" and noise == "key":
        process_noise, noise = "key", "random_walk"               # one spelling of KeyNoise(None)
    if process_noise in ("input", "key") and noise != "random_walk":
        raise c.DesignModelError(f"bayesian(process_noise={process_noise!r}, noise={noise!r}): an input-dependent "
                                 "noise is not stationary; accepted: noise='random_walk' with process_noise='input' "
                                 "or 'key'.")
    if noise == "random_walk":
        with _argument("bayesian", process_noise=process_noise):
            if process_noise == "input":
                noise_component = c.RandomWalk(None)
            elif process_noise == "key":
                noise_component = c.KeyNoise(None)
            elif isinstance(process_noise, str):
                raise c.DesignModelError(f"got {process_noise!r}{c.did_you_mean(process_noise, ('input', 'key'))}; "
                                         "accepted: a number >= 0, None (no noise), 'input' (q_t I given at run "
                                         "time) or 'key' (q_t k_t k_t^T given at run time).")
            else:
                noise_component = c.NoProcessNoise() if not process_noise else c.RandomWalk(process_noise)
    elif noise == "stationary":
        with _argument("bayesian", process_noise=process_noise):
            noise_component = c.Stationary(process_noise)
    elif noise == "key":
        with _argument("bayesian", process_noise=process_noise):
            if isinstance(process_noise, str):
                raise c.DesignModelError(f"got {process_noise!r}{c.did_you_mean(process_noise, ('input',))}; "
                                         "accepted with noise='key': a number >= 0, None (no noise) or 'input'.")
            noise_component = c.NoProcessNoise() if not process_noise else c.KeyNoise(process_noise)
    else:
        hint = c.did_you_mean(noise, ("random_walk", "stationary", "key"))
        raise c.DesignModelError(f"bayesian(noise=...): got {noise!r}{hint}; accepted: 'random_walk', 'stationary' "
                                 "or 'key'.")
    if decay == "input":
        transition = c.ScalarDecay(None, required=False)
    elif decay == "none":
        transition = c.Identity()
    elif c._is_number(decay):
        with _argument("bayesian", decay=decay):
            transition = c.ScalarDecay(float(decay))
    else:
        hint = c.did_you_mean(decay, ("input", "none")) if isinstance(decay, str) else ""
        raise c.DesignModelError(
            f"bayesian(decay=...): got {decay!r}{hint}; accepted: 'input', 'none' or a number in (0, 1].")
    with _argument("bayesian", prior_variance=prior_variance):
        prior = c.Prior(c.IsotropicCovariance(prior_variance))
    return DesignModel(prior=prior, transition=transition,
                       noise=noise_component, observation=c.KeyValueObservation(None),
                       covariance=c.Exact(), name="bayesian")


class _Named(dict):
    """name -> model constructor; an unknown name raises a `DesignModelError` (also a ``KeyError``) that lists
    the names and the closest one."""

    def __missing__(self, name):
        raise UnknownModelError(f"{name!r}: not a named design model{c.did_you_mean(name, self)}; accepted: "
                                f"{', '.join(self)}. Declare any other model with DesignModel(...).")


class UnknownModelError(c.DesignModelError, KeyError):
    """A name that is not in `NAMED_MODELS`."""

    __str__ = c.DesignModelError.__str__


NAMED_MODELS = _Named({f.__name__: f for f in (
    linear_attention, retnet, gla, mamba2, deltanet, gated_deltanet, longhorn, bayesian)})
