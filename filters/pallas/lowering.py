"""The ``"pallas"`` lowering: the chunked forms as fused GPU kernels (`filters.pallas`).

Additive family: `delta_rule.additive` (scalar or no decay: linear attention, RetNet, Mamba-2 with its
input scale folded into the keys) or `gla.additive` (channel-wise decay). Reset family: the delta rule
with write key ``eta_t k_t`` (DeltaNet, Gated DeltaNet, Longhorn; with a channel-wise decay, KDA-style,
its state passes and GLA's output and chunk-backward kernels). Exact family (scalar or no decay,
isotropic noise or noise along the key: the Bayesian Layer): `covariance.covariance_pass` for the gains,
then the delta rule with write key ``Kg_t``.

On CUDA the Triton kernels run; on any other platform their plain-JAX references (the same functions,
chosen when the program is lowered, so a program traced on a CPU and lowered for ``"cuda"`` holds the
kernels); with ``interpret=True`` the kernels themselves run in Pallas's interpreter, anywhere.
Products take their operands in the inputs' dtype (bf16 on tensor cores; ``precision="highest"``:
float32 products). What the kernels do not cover runs the chunked lowering (the same mathematics, in
plain XLA): float64 inputs (the kernels compute in float32), key or value widths that are not a power of
two from 16 to 256, and the exact family with K > 128 (its covariance kernel keeps ``P [K, K]`` in
registers).
"""
from __future__ import annotations

import jax.numpy as jnp

from filters import chunked
from filters.inputs import FilterState
from filters.lowering import BackendError, FilterOutput, Lowering
from filters.pallas import covariance, delta_rule, gla
from filters.pallas import common
from filters.pallas.common import SUB

PRECISIONS = ("default", "highest")


def tileable(dim: int) -> bool:
    """Key and value widths the kernels tile: powers of two from 16 to 256."""
    return 16 <= dim <= 256 and dim & (dim - 1) == 0


def check_chunk_size(value) -> None:
    """The kernels tile a chunk in 16-row blocks on power-of-two tiles: 16, 32, 64 or 128."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value in (16, 32, 64, 128)):
        raise BackendError(f"chunk_size={value!r}: the pallas lowering takes 16, 32, 64 or 128 (its kernels "
                           f"work on power-of-two tiles of {SUB}-row blocks); for other sizes use "
                           "backend='chunked'.")


def check_precision(value) -> None:
    if value not in PRECISIONS:
        raise BackendError(f"precision={value!r}: accepted: 'default' (products in the inputs' dtype on tensor "
                           "cores, float32 accumulation) or 'highest' (float32 products).")


def check_interpret(value) -> None:
    if not isinstance(value, bool):
        raise BackendError(f"interpret={value!r}: accepted: True (run the kernels in Pallas's interpreter, on "
                           "any platform) or False.")


class Pallas(Lowering):
    name = "pallas"
    summary = ("fused Pallas GPU kernels (Triton) of the chunked forms: prepare (UT transform, in-kernel "
               "triangular inverse), state pass with the state in registers, output; backward kernels for the "
               "scalar-decay delta rule and additive forms and for the channel-wise decay (GLA; with the delta "
               "rule, KDA-style: state passes and GLA's output kernels, the UT transform's inverse in XLA); exact family: a "
               "covariance-pass kernel (in-kernel 16 x 16 Cholesky, P carried on chip, TF32x3 products) feeding "
               "the delta rule; the plain-JAX references off CUDA")
    options = {"chunk_size": check_chunk_size, "precision": check_precision, "interpret": check_interpret}

    def reason_not_applicable(self, structure):
        if common.pltriton is None:
            return ("this jax has no Pallas Triton lowering (jax.experimental.pallas.triton), which the kernels "
                    "are written for; backend='chunked' runs the same forms in plain XLA")
        reason = chunked.LOWERING.reason_not_applicable(structure)
        if reason:
            return reason
        return None

    # `auto` takes the kernels wherever they apply: on an H200 at B4 T4096 H16 K=V=128, bf16
    # (docs/results/gpu_kernels.md), every family's kernels were faster than the chunked lowering forward
    # and forward+backward (2026-12-02: GLA 1.78 / 6.10 ms, the KDA-style delta rule 5.70 / 20.1 against
    # its chunked 11.5 / 29.7 in one process; the Bayesian Layer 6.35 / 44.1, Gated DeltaNet 0.77 / 2.43;
    # the chunked lowering 7.98 / 12.44, 19.2 / 54.8 and 4.70 / 13.25 in issue #14's earlier run).

    def run(self, structure, x, state, *, diagnostics, chunk_size=chunked.DEFAULT_CHUNK_SIZE,
            precision="default", interpret=False):
        key_dim, value_dim = x.k.shape[-1], x.v.shape[-1]
        if (x.compute_dtype == jnp.float64                   # the kernels compute in float32 and bf16
                or 0 in x.k.shape[:3]                        # no sequence, step or head: a grid of 0 programs
                or not (tileable(key_dim) and tileable(value_dim))
                or (structure.family == "exact" and key_dim > 128)):   # P [K, K] must fit in registers
            return chunked.LOWERING.run(structure, x, state, diagnostics=diagnostics, chunk_size=chunk_size)
        options = dict(chunk_size=chunk_size, precision=precision, interpret=interpret)
        q, k, v = x.q, x.k, x.v
        covariance_out = None
        if structure.family == "additive":
            keys = k if x.input_scale is None else k.astype(jnp.float32) * x.input_scale[..., None]
            recursion = gla.additive if structure.transition == "diagonal" else delta_rule.additive
            y, mean = recursion(q, keys, v, x.transition, state.mean, **options)
        elif structure.family == "reset":
            write = x.write_strength[..., None] * k.astype(jnp.float32)
            y, mean = delta_rule.delta_rule(q, k, write, v, x.transition, state.mean, **options)
        else:
            gains, covariance_out, _ = covariance.covariance_pass(
                q, k, x.transition, chunked.noise_variance(structure, x), x.precision, state.covariance,
                chunk_size=chunk_size, key_noise=structure.noise == "key", dot_precision=precision,
                interpret=interpret)
            y, mean = delta_rule.delta_rule(q, k, gains, v, x.transition, state.mean, **options)
        # y comes in the values' dtype, which the filter returns (no float32 round trip).
        return FilterOutput(y, FilterState(mean, covariance_out))


LOWERING = Pallas()
