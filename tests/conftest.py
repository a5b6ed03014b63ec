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
# The suite's programs are small and each runs a few times, so XLA's compile, not the run, is most of its
# time: without LLVM's optimizations a CPU program compiles in about 60% of the time (the exact family's
# chunked form at chunk 64: 3.6 s against 6.0) and the suite takes about a quarter less. Numerics are
# IEEE either way; what this leaves untested (code generated at LLVM's -O3) the GPU runs of the suite
# and every benchmark exercise. A flag the caller set is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from experiments.common import deterministic_gpu_reductions  # noqa: E402

deterministic_gpu_reductions()                        # before jax starts a backend

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "float32")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles hundreds of programs, and every compiled CPU program holds memory
    mappings of its own (LLVM's JIT). A worker that keeps every program of the suite reaches the kernel's
    limit of mappings per process (vm.max_map_count, 65,530 by default: 53,821 were counted in one worker
    at two thirds of the suite) and XLA aborts mid-compile ("Fatal Python error: Aborted", the worker
    lost). Dropping the compiled programs after each module keeps a worker's mappings bounded."""
    yield
    jax.clear_caches()
    gc.collect()
