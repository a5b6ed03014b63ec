"""Tests run with float64 available: every lowering is proven against the float64 sequential oracle.
Arrays created as float32 stay float32, so the reduced-precision paths are tested too.

On a GPU, two platform defaults would make the tests measure the platform instead of the code:
matrix products in TF32 (10 mantissa bits; the lowerings already run theirs in full float32, but the
layers' projections and direct calls of helpers would not), and non-deterministic reductions (the
embedding gradient's scatter-add), which break the bit-exact resume checks. Both are switched off
here; neither changes anything on a CPU."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see filters/__init__.py: before numpy loads OpenBLAS
os.environ.setdefault("MBD_CHECK_SHAPES", "1")      # filters.shapes: annotated shapes checked at every call

from experiments.common import deterministic_gpu_reductions  # noqa: E402

deterministic_gpu_reductions()                        # before jax starts a backend

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "float32")
