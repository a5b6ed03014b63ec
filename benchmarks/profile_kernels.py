"""Run each delta-rule kernel once at the headline shape, for a profiler (Nsight Compute) to read.

    ncu --clock-control none -k regex:delta_rule --section SpeedOfLight --section LaunchStats \
        --section Occupancy python3 benchmarks/profile_kernels.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.gpu_kernels import make_inputs  # noqa: E402
from filters.pallas import common, delta_rule as kernels  # noqa: E402


def main(shape=(4, 4096, 16, 128)):
    inputs = make_inputs("gated_deltanet", shape)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    w = inputs["beta"][..., None] * k.astype(jnp.float32)
    batch, time_, heads, dim = shape
    b = common.chunk_log_decay(inputs["log_decay"], batch, time_, heads, 64)
    s0 = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    st = kernels._Stages(True, 64, common.Dots(jnp.bfloat16))
    wp, up, inv = st.prepare(k, w, v, b)
    h, u, _ = st.state(wp, up, w, b, s0)
    y = st.output(q, w, b, h, u)
    dy = jax.random.normal(jax.random.PRNGKey(3), v.shape, jnp.float32)
    _, _, _, dh, du = st.output_backward(q, w, b, h, u, dy)
    g_next, ubar, _ = st.state_backward(wp, w, b, dh, du, s0)
    out = st.chunk_backward(k, w, v, b, inv, h, u, ubar, g_next)
    jax.block_until_ready((y, out))


if __name__ == "__main__":
    main()
