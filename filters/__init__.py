"""Compile: design model -> filter. ``filters.compile(model, backend=...)`` is the one entry point."""
from filters.compiler import LOWERINGS, BackendError, Filter, compile, explain  # noqa: A004
from filters.inputs import FilterInputError, FilterState
from filters.kalman import Diagnostics
from filters.structure import Structure, analyze
