"""Tests run with float64 available: every lowering is proven against the float64 sequential oracle.
Arrays created as float32 stay float32, so the reduced-precision paths are tested too."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see filters/__init__.py: before jax loads LAPACK

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
