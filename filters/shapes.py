"""The shape legend, once, as jaxtyping aliases for the signatures of the filters, the layers and the
kernels' references; checked at run time in the tests (`typed`).

Legend::

    B  batch               T  time (steps)          H  heads
    K  key dimension       V  value dimension       D  model width (the layers)
    C  chunk size          N  number of chunks

Inputs use flash-linear-attention's layout ``[B, T, H, dim]``; the state is ``S [B, H, K, V]`` (keys by
values) and ``P [B, H, K, K]``. Every alias accepts any floating dtype (bfloat16 to float64) and a jax
array, a numpy array or a tracer.

`typed` is how the shapes are checked: on a function whose array arguments are annotated with these
aliases, it binds each dimension name on first use and checks that every other argument (and the result)
agrees, once per call (at trace time under ``jit``). It checks only when ``MBD_CHECK_SHAPES=1`` is set
(``tests/conftest.py`` sets it), so production code pays nothing. The boundary (`filters.compile`'s
`Filter`) is not decorated: it checks its inputs itself, with messages that say what is accepted; the
decorated functions are those behind it, whose inputs must already be right.
"""
from __future__ import annotations

import functools
import inspect
import os
import typing
from typing import Any, Optional, Union

import jax
import numpy as np
from jaxtyping import Float, jaxtyped

Array = Union[jax.Array, np.ndarray]
_Array = Array

# [B, T, H, ...]: a whole sequence; "*t" (StepInputs, Diagnostics) is (T,) for a sequence, () for one step
Queries = Float[_Array, "B T H K"]
Keys = Float[_Array, "B T H K"]
Values = Float[_Array, "B T H V"]
Readouts = Float[_Array, "B T H V"]
PerHead = Float[_Array, "B T H"]                      # a gate per step and head: beta, q_t, s_t, log a_t
PerChannel = Float[_Array, "B T H K"]                 # a gate per step, head and key channel: log a_t
LogDecay = Optional[Union[PerHead, PerChannel]]       # none, scalar or channel-wise
Transition = Float[_Array, "B T H K K"]

# the state
Mean = Float[_Array, "B H K V"]                       # S
Covariance = Float[_Array, "B H K K"]                 # P
KeySquare = Float[_Array, "K K"]                      # a fixed K x K matrix (P_0, P_s)

# a sequence or one step (StepInputs, Diagnostics): [B, T, H, ...] or [B, H, ...]
SteppedKeys = Float[_Array, "B *t H K"]
SteppedValues = Float[_Array, "B *t H V"]
SteppedPerHead = Float[_Array, "B *t H"]
SteppedTransition = Union[Float[_Array, "B *t H"], Float[_Array, "B *t H K"], Float[_Array, "B *t H K K"]]

# one decoding step: [B, H, ...]
StepQueries = Float[_Array, "B H K"]
StepValues = Float[_Array, "B H V"]

# one chunk of one head (the chunked mathematics)
ChunkKeys = Float[_Array, "C K"]
ChunkValues = Float[_Array, "C V"]
ChunkSquare = Float[_Array, "C C"]
ChunkReaders = Float[_Array, "2*C K"]                 # two C x K blocks stacked
ChunkSteps = Float[_Array, "C"]
ChunkLogDecay = Optional[Union[Float[_Array, "C"], Float[_Array, "C K"]]]
ChunkState = Float[_Array, "K V"]
ChunkCovariance = Float[_Array, "K K"]
EndDecay = Float[_Array, "_"]                         # gamma_C: one for all channels, or one per channel

# the layers
Activations = Float[_Array, "B T D"]
StepActivations = Float[_Array, "B D"]
SteppedActivations = Float[_Array, "B *t D"]

CHECK = os.environ.get("MBD_CHECK_SHAPES") == "1"


def typed(fn):
    """``fn`` with its annotated shapes checked at every call when ``MBD_CHECK_SHAPES=1`` (module
    docstring); otherwise ``fn`` itself."""
    if not CHECK:
        return fn
    return jaxtyped(typechecker=_check_annotations)(fn)


def _matches(value, annotation) -> bool:
    """``isinstance`` for what the filters annotate: jaxtyping arrays, unions and Optional of them,
    NamedTuples of them (their fields, recursively), other classes; anything else passes."""
    if annotation is Any or annotation is None or annotation is inspect.Parameter.empty:
        return True
    if annotation is type(None):
        return value is None
    origin, options = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        return any(_matches(value, option) for option in options)
    if origin is tuple and options and options[-1] is not Ellipsis:           # tuple[X, Y]: each item
        return (isinstance(value, tuple) and len(value) == len(options)
                and all(_matches(v, o) for v, o in zip(value, options)))
    if not isinstance(annotation, type):
        return True
    if issubclass(annotation, tuple) and hasattr(annotation, "_fields"):    # a NamedTuple
        if not isinstance(value, annotation):
            return False
        hints = typing.get_type_hints(annotation)
        return all(_matches(getattr(value, f), hints.get(f, Any)) for f in annotation._fields)
    return isinstance(value, annotation)


def _check_annotations(fn):
    """The typechecker `typed` hands to ``jaxtyping.jaxtyped`` (which keeps the dimension names bound
    across the arguments and the result of one call)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        # jaxtyped calls this on stand-ins of fn: one with fn's parameters, and one that also takes fn's
        # result as a keyword and returns it, under fn's return annotation
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            annotation = signature.parameters[name].annotation
            if not _matches(value, annotation):
                raise TypeError(f"{fn.__qualname__}: {name}: expected {annotation}, got {_describe(value)}.")
        result = fn(*args, **kwargs)
        if not _matches(result, signature.return_annotation):
            raise TypeError(f"{fn.__qualname__}: result: expected {signature.return_annotation}, got "
                            f"{_describe(result)}.")
        return result

    return checked


def _describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype}{list(value.shape)}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__
