"""The published layers as thin wrappers: `DesignLayer` with a named design model."""
from __future__ import annotations

import dataclasses

import designmodels as dm
from layers.design_layer import DesignLayer, LayerError


def named_layer(name: str, d_model: int, **kwargs) -> DesignLayer:
    """``named_layer("gated_deltanet", d_model=256, num_heads=4)``; model options (``gamma`` for RetNet,
    ``prior_variance``, ``process_noise``, ``noise``, ``decay`` for the Bayesian Layer) go to the model."""
    if name not in dm.NAMED_MODELS:
        raise LayerError(f"named_layer: unknown layer {name!r}; accepted: {', '.join(dm.NAMED_MODELS)}"
                         f"{dm.did_you_mean(name, dm.NAMED_MODELS)}.")
    model_keys = {"gamma", "prior_variance", "process_noise", "noise", "decay"}
    layer_keys = {f.name for f in dataclasses.fields(DesignLayer)} - {"model", "d_model", "parent"}
    unknown = sorted(set(kwargs) - model_keys - layer_keys)
    if unknown:
        hints = "".join(dm.did_you_mean(u, sorted(model_keys | layer_keys)) for u in unknown)
        raise TypeError(f"named_layer: unknown keyword {', '.join(unknown)}{hints}; accepted: layer options "
                        f"{', '.join(sorted(layer_keys))}; model options {', '.join(sorted(model_keys))}.")
    model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in model_keys}
    return DesignLayer(dm.NAMED_MODELS[name](**model_kwargs), d_model, **kwargs)


def LinearAttention(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802 (a layer constructor)
    return named_layer("linear_attention", d_model, **kwargs)


def RetNet(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("retnet", d_model, **kwargs)


def GLA(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("gla", d_model, **kwargs)


def Mamba2(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("mamba2", d_model, **kwargs)


def DeltaNet(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("deltanet", d_model, **kwargs)


def GatedDeltaNet(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("gated_deltanet", d_model, **kwargs)


def Longhorn(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("longhorn", d_model, **kwargs)


def BayesianLayer(d_model: int, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("bayesian", d_model, **kwargs)
