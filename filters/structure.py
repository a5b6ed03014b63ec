"""Structure analysis, as the compiler sees it: `analyze` checks that it was given a design model and
returns its `Structure` (defined in `designmodels.structure`, where the one reading of the components
lives). Every lowering is a function of the structure alone: no code in `filters` reads a model's
components.
"""
from __future__ import annotations

import designmodels as dm
from designmodels.structure import Domain, InputSpec, KeyCovariance, NoiseKind, Structure, TransitionKind  # noqa: F401


def analyze(model: dm.DesignModel) -> Structure:
    """The `Structure` of a (validated) design model; a clear error for anything else."""
    if not isinstance(model, dm.DesignModel):
        hint = ""
        if isinstance(model, str):
            hint = (f"; for the named model write dm.NAMED_MODELS[{model!r}]()" if model in dm.NAMED_MODELS
                    else f"{dm.did_you_mean(model, dm.NAMED_MODELS)}; named models: {', '.join(dm.NAMED_MODELS)}")
        elif callable(model) and getattr(model, "__name__", None) in dm.NAMED_MODELS:
            hint = f"; call it: dm.{model.__name__}()"
        raise TypeError(f"filters.compile: expected a designmodels.DesignModel, got {type(model).__name__} "
                        f"{model!r:.80}{hint}.")
    return model.structure
