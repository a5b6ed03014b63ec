"""Declare: a design model is a dataclass of components; the library names the published layers."""
from designmodels.components import (
    DesignModelError, did_you_mean, IsotropicCovariance, DiagonalCovariance, FullCovariance, Prior,
    Identity, ScalarDecay, DiagonalDecay, DenseTransition,
    NoProcessNoise, RandomWalk, Stationary, KeyNoise,
    KeyValueObservation, LatentInput, Exact, Reset,
)
from designmodels.model import DesignModel
from designmodels.structure import Domain, InputSpec, KeyCovariance, Structure
from designmodels.library import (
    UnknownModelError,
    NAMED_MODELS, linear_attention, retnet, gla, mamba2, deltanet, gated_deltanet, longhorn, bayesian,
)
