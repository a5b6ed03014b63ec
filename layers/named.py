"""The published layers as thin wrappers: `DesignLayer` with a named design model (linen; the NNX ones are
in `layers.nnx`, built from the same `split_options`)."""
from __future__ import annotations

import dataclasses

import designmodels as dm
from layers.core import LayerError, LayerSpec
from layers.design_layer import DesignLayer

# options of the named design models (`designmodels.library`); every other option goes to the layer
MODEL_OPTIONS = frozenset({"gamma", "prior_variance", "process_noise", "noise", "decay"})
LAYER_OPTIONS = frozenset(f.name for f in dataclasses.fields(LayerSpec)) - {"model", "d_model"}


def split_options(name: str, kwargs: dict, layer_options=LAYER_OPTIONS) -> tuple[dm.DesignModel, dict]:
    """``(the named model built with its options, the layer options)`` from ``named_layer``'s keywords; an
    unknown name or keyword is an error that lists what is accepted."""
    if name not in dm.NAMED_MODELS:
        raise LayerError(f"named_layer: unknown layer {name!r}; accepted: {', '.join(dm.NAMED_MODELS)}"
                         f"{dm.did_you_mean(name, dm.NAMED_MODELS)}.")
    unknown = sorted(set(kwargs) - MODEL_OPTIONS - set(layer_options))
    if unknown:
        hints = "".join(dm.did_you_mean(u, sorted(MODEL_OPTIONS | set(layer_options))) for u in unknown)
        raise TypeError(f"named_layer: unknown keyword {', '.join(unknown)}{hints}; accepted: layer options "
                        f"{', '.join(sorted(layer_options))}; model options {', '.join(sorted(MODEL_OPTIONS))}.")
    model_kwargs = {k: v for k, v in kwargs.items() if k in MODEL_OPTIONS}
    layer_kwargs = {k: v for k, v in kwargs.items() if k not in MODEL_OPTIONS}
    return dm.NAMED_MODELS[name](**model_kwargs), layer_kwargs


def named_layer(name: str, d_model: int, **kwargs) -> DesignLayer:
    """``named_layer("gated_deltanet", d_model=256, num_heads=4)``; model options (``gamma`` for RetNet,
    ``prior_variance``, ``process_noise``, ``noise``, ``decay`` for the Bayesian Layer) go to the model."""
    # linen's module name is a layer option too
    model, layer_kwargs = split_options(name, kwargs, LAYER_OPTIONS | {"name"})
    return DesignLayer(model, d_model, **layer_kwargs)


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
