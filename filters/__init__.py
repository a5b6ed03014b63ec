"""Compile: design model -> filter. ``filters.compile(model, backend=...)`` is the one entry point."""
import os

# jaxlib's CPU LAPACK kernels (triangular solve, Cholesky) call scipy's OpenBLAS from XLA's own thread
# pool; a multi-threaded OpenBLAS inside it oversubscribes the cores and can stall a computation for
# seconds or minutes (seen with jax 0.10 on 2 cores). One BLAS thread per call is what XLA expects.
# This only takes effect if OpenBLAS is not loaded yet: import `filters` before using jax linalg,
# or export OPENBLAS_NUM_THREADS=1 yourself.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from filters.compiler import Filter, compile, explain  # noqa: A004
from filters.checks import FilterInputError, reraise_input_errors
from filters.inputs import FilterState
from filters.kalman import Diagnostics
from filters.lowering import AUTO_PREFERENCE, LOWERINGS, BackendError, FilterOutput, Lowering, register
from filters.structure import Structure, analyze
