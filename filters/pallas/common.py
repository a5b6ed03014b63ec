"""What every Pallas kernel of the project shares: the launch, the products, the platform switch.

The kernels are written for Pallas's Triton lowering (``jax.experimental.pallas.triton``): block
programs with loads at dynamic offsets, ``lax.fori_loop`` over chunks with the state in registers, and
``dot`` on tensor cores, the same model as flash-linear-attention's Triton kernels. Why Triton rather than
Mosaic GPU is in docs/performance.md.

A kernel runs where it was compiled for: `on_gpu` builds a function that holds the kernel for CUDA and
its plain-JAX reference for every other platform, chosen when the program is lowered
(``lax.platform_dependent``), so a program traced on a CPU and lowered for ``"cuda"`` holds the
kernels. ``interpret=True`` runs the kernel itself on any platform in Pallas's interpreter (slow; for
tests and for reading a kernel on a laptop).
"""
from __future__ import annotations

import functools
import json
import os
import warnings

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton lowering's compiler parameters; deprecated in jax 0.11, present in 0.10 and 0.11
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton lowering
    pltriton = None

SUB = 16   # rows of the sub-blocks inside a chunk: the smallest tensor-core product (m16n16)


class Dots:
    """How a kernel multiplies: the operand dtype and the product precision.

    ``precision="default"``: operands in the input dtype on tensor cores (bf16 or f16 inputs), TF32 for
    float32 inputs, float32 accumulation. ``"highest"``: float32 operands, IEEE float32 products. Either
    way the triangular and Cholesky factors, Gram matrices and states are float32.
    """

    def __init__(self, input_dtype, precision: str = "default"):
        low = jnp.dtype(input_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        self.highest = precision == "highest"
        self.dtype = jnp.dtype(input_dtype) if (low and not self.highest) else jnp.dtype(jnp.float32)
        self.precision = lax.Precision.HIGHEST if self.highest else lax.Precision.DEFAULT

    def __call__(self, a, b, contract=((1,), (0,))):
        """``a @ b`` (contracting ``contract``) with operands cast to the product dtype, float32 out."""
        return lax.dot_general(a.astype(self.dtype), b.astype(self.dtype), (contract, ((), ())),
                               precision=self.precision, preferred_element_type=jnp.float32)

    def nt(self, a, b):
        """``a @ b^T``."""
        return self(a, b, ((1,), (1,)))

    def tn(self, a, b):
        """``a^T @ b``."""
        return self(a, b, ((0,), (0,)))

    def f32(self, a, b, contract=((1,), (0,))):
        """A product of float32 factors (triangular factors, Gram matrices): TF32 by default, IEEE with
        ``precision="highest"``."""
        return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), (contract, ((), ())),
                               precision=self.precision, preferred_element_type=jnp.float32)


def exact_dot(a, b, contract=((1,), (0,))):
    """A float32 product at full precision (IEEE), for the factorizations."""
    return lax.dot_general(a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


# Launch settings per kernel (warps per program, software-pipelining stages of its loops), measured on
# an H200 with benchmarks/gpu_kernels.py (``--tune name.key=value`` tries others).
# Measured at B=4, T=4096, H=16, K=V=128, bf16 (benchmarks/gpu_kernels.py --sweep; docs/results/
# gpu_kernels.md): the state passes pipeline their loads over 3 stages; the prepare kernel, whose 16 x 16
# substitutions reduce across warps, runs best on 2 warps and with T assembled through memory.
TUNING = {
    # Its 16 x 16 diagonal blocks of (I + L)^{-1} are taken by substitution (15 dependent steps, each a
    # reduction across the program): three levels of block products instead were slower (0.56-0.61 ms
    # against 0.45, 2026-12-02) and are gone.
    # L = (K W^T) * D by 16-row tile products (10 at C = 64): one C x C product on the tensor cores
    # through memory instead (as fla's fused kkT) took 0.66 ms against 0.45-0.58 (2026-12-02, evening,
    # each alone; removed).
    "delta_rule_prepare": dict(num_warps=2, reload=True),
    "delta_rule_state": dict(num_warps=4, num_stages=3, block_v=64),
    "additive_state": dict(num_warps=4, num_stages=3, block_v=64),
    "delta_rule_output": dict(num_warps=4, num_stages=2, block_v=128),
    "delta_rule_output_backward": dict(num_warps=8),
    "delta_rule_state_backward": dict(num_warps=8, num_stages=3, block_v=64),
    "additive_state_backward": dict(num_warps=8, num_stages=3, block_v=64),
    "delta_rule_chunk_backward": dict(num_warps=4),
    # The covariance pass (B4 T4096 H16 K128, 2026-11-30, benchmarks/profile_kernels.py --variants, one
    # process): with TF32x3 products 6.6 ms at 8 warps (10.7 at 4, 125 at 2; P through memory and the
    # one-loop factor 7.1 at 8); with IEEE products 85.6 ms at 4 warps (P in registers), 45.3 at 8 warps
    # with P through memory and the one-loop factor; the gains' error against float64 4.3-5.2e-7 in all.
    # "factor": "two_loops" (Cholesky, then substitution) or "one_loop" (one elimination): 6.18 and 5.79 ms
    # on 2026-12-02, 6.6 and 7.1 on 2026-11-30 (with P through memory): within the run-to-run spread.
    # At the MQAR training step's K = 64 (256x128x8x64, 2026-12-02, evening, interleaved rounds) 4 warps
    # beat 8: the pass 1.31 against 2.18 ms, its backward (with its checkpointing forward) 4.52 against
    # 6.50; the training step at d_model 512 20.4 against 25.6 ms. At K = 128, 8 (above).
    "covariance_pass": dict(num_warps={"64": 4, "128": 8}, carry="registers", factor="two_loops"),  # TF32x3
    "covariance_pass_ieee": dict(num_warps=8, carry="memory", factor="one_loop"),           # precision="highest"
    # Its backward kernel (the blocks in reverse from the checkpoints), 2026-12-01: with dP through memory
    # the Bayesian Layer's program compiles in 28 s and runs 6.23 / 36.0 ms forward / forward+backward;
    # with dP in registers Triton's compile did not end within 230 s, twice (K x K tiles spilling).
    # Blocks of 32 steps (``"block": 32`` in covariance_pass; the backward follows its checkpoints) halve
    # the number of blocks but not the steps of the factorizations: 8.18 / 45.7 ms against 6.23 / 34.6 at
    # 16 (2026-12-01, benchmarks/gpu_session.sh bayesian), so 16 stays.
    # It factors each block's Sigma again (Cholesky, then substitution): taking X = L^{-1} and the pivots
    # stored by the checkpointing forward instead was 46.2 against 36.3 ms forward+backward (bisected over
    # six trees in one H200 run, 2026-12-02; removed).
    # "checkpoints": "rerun" (the backward pass reruns the forward kernel to store them) or "forward" (the
    # forward pass stores them and keeps them for the backward: one pass less, T/16 K^2 floats per head
    # held between the passes): at B4 T4096 H16, 40.3 against 35.8 ms for 573 MiB more (1805 -> 2378),
    # 2026-12-02 after the revert above (44.1 against 40.5 before it); the MQAR training step at d_model
    # 512 (4 warps) 18.6 against 20.4 ms. "forward" is the default: only a differentiated pass holds them
    # (inference never does), and training is where the time goes; "rerun" for memory.
    "covariance_pass_backward": dict(num_warps={"64": 4, "128": 8}, carry="memory", checkpoints="forward"),
    "covariance_pass_backward_ieee": dict(num_warps=8, carry="memory", checkpoints="forward"),
    # The channel-wise output (B4 T4096 H16 K128, benchmarks/profile_kernels.py --variants, one process).
    # 2026-12-01: with one program per chunk, A through memory then full-tile readout products took 2.95
    # ms with A's diagonal blocks over channel slices, 2.36 ms column by column; A in registers in one
    # kernel of 16-row products 3.94 ms (removed); 8 warps slower. 2026-12-02: with one program per 16-row
    # block of A (now its only form) the slices win: A's kernel 1.06 ms (slices) against 1.50 (columns)
    # and 2.07 (one program per chunk, columns; removed), the output 1.29 against 1.66 and 2.13; GLA's
    # forward / forward+backward 1.78 / 6.10 ms against 3.23 / 8.09 (docs/results/gpu_kernels.md).
    # The backward reruns the state pass (as flash-linear-attention does) rather than keeping the chunk
    # states from the forward (False keeps them: one kernel less, 2 T K V / C more bytes held per head
    # between the passes).
    "gla_output": dict(diagonal="slices"),
    "gla_attention": dict(),                                 # one program per 16-row block of a chunk
    # Its chunk backward is three kernels as fla splits it (dA per chunk, dv by full tiles, dq dk db by
    # 16-row blocks): 2.91 ms against 4.39 for one kernel of 16-row blocks (2026-12-02, evening, each
    # alone; earlier forms 4.87 and 7.46: all removed, filters/pallas/gla.py).
    "gla_backward": dict(recompute_states=True),
    "gla_dattend": dict(),
    "gla_dvalues": dict(),
    "gla_dkeys": dict(),
}
DEFAULT_TUNING = dict(num_warps=4, num_stages=1)
# Settings a kernel reads without a default in `TUNING` (besides the launch's num_warps and num_stages).
OPTIONAL_SETTINGS = {"covariance_pass": ("block",), "covariance_pass_ieee": ("block",), "gla_output": ("block_v",),
                     "gla_dvalues": ("block_v",)}


def accepted_settings(name: str) -> list:
    """The settings ``TUNING[name]`` may hold: its defaults' names, the launch's, and `OPTIONAL_SETTINGS`."""
    return sorted(set(TUNING[name]) | set(DEFAULT_TUNING) | set(OPTIONAL_SETTINGS.get(name, ())))


def tuning_from_environment(text: str) -> None:
    """Merge ``MBD_PALLAS_TUNING`` (JSON ``{kernel: {setting: value}}``) into `TUNING`, so that a benchmark
    or a training run can try other launch settings without an edit; unknown kernels and settings are
    refused (a setting no kernel reads, such as a removed form's, would otherwise be ignored silently)."""
    try:
        settings = json.loads(text)
        if not (isinstance(settings, dict) and all(isinstance(v, dict) for v in settings.values())):
            raise ValueError("not an object of objects")
    except ValueError as error:
        raise ValueError(f"MBD_PALLAS_TUNING={text!r}: {error}; accepted: JSON {{kernel: {{setting: value}}}}, "
                         f"e.g. '{{\"covariance_pass\": {{\"num_warps\": 2}}}}'") from None
    check_settings(settings, "MBD_PALLAS_TUNING")
    for name, values in settings.items():
        TUNING[name] = {**TUNING[name], **values}


def check_settings(settings: dict, source: str) -> None:
    """Refuse, naming ``source``, a kernel not in `TUNING` or a setting it does not read."""
    unknown = sorted(set(settings) - set(TUNING))
    if unknown:
        raise ValueError(f"{source} names unknown kernels {unknown}; accepted: {sorted(TUNING)}")
    for name, values in settings.items():
        unknown = sorted(set(values) - set(accepted_settings(name)))
        if unknown:
            raise ValueError(f"{source} sets {unknown} of {name!r}, which it does not read; "
                             f"accepted: {accepted_settings(name)}")


if os.environ.get("MBD_PALLAS_TUNING"):
    tuning_from_environment(os.environ["MBD_PALLAS_TUNING"])


def settings_key(names=None) -> str:
    """The `TUNING` of the kernels ``names`` (all when None) as one hashable text: a cache key of the
    kernels' traces (a setting may be a dict, as `num_warps` by key width)."""
    return json.dumps({name: TUNING[name] for name in (TUNING if names is None else names) if name in TUNING},
                      sort_keys=True)


def tuning(name: str, key: str):
    return TUNING.get(name, {}).get(key, DEFAULT_TUNING.get(key))


def value_block(name: str, value_dim: int, key_dim: int) -> int:
    """Columns of the state one program carries (``K x BV`` float32 in registers): a power of two that
    divides ``V``."""
    block = min(value_dim, tuning(name, "block_v") or (64 if key_dim <= 128 else 32))
    while value_dim % block:
        block //= 2
    return block


def num_warps(name: str, key_dim: int | None = None) -> int:
    """The kernel's warps per program: ``TUNING[name]["num_warps"]``, a number or, for kernels whose best
    launch depends on the key width, ``{largest K: warps}`` (JSON keys are strings), the entry of the
    smallest bound at least ``key_dim`` (the largest bound's above all of them)."""
    warps = tuning(name, "num_warps")
    if not isinstance(warps, dict):
        return warps
    try:
        bounds = sorted((int(bound), int(count)) for bound, count in warps.items())
    except (TypeError, ValueError):
        bounds = []
    if not bounds:
        raise ValueError(f"TUNING[{name!r}]['num_warps'] = {warps!r}; accepted: a number of warps or "
                         f"{{largest key dim: warps}}, e.g. {{\"64\": 4, \"128\": 8}}")
    if key_dim is None:
        raise ValueError(f"TUNING[{name!r}]['num_warps'] is by key dim, and this kernel has none")
    return next((count for bound, count in bounds if key_dim <= bound), bounds[-1][1])


def launch(kernel, *, grid, in_specs, out_specs, out_shape, interpret: bool, name: str, key_dim: int | None = None):
    """``pl.pallas_call`` for the Triton lowering, with the kernel's `TUNING` (``key_dim`` picks its warps
    where they are set by key width, `num_warps`); the deprecation warning of the Triton lowering in jax
    0.11 is expected and silenced."""
    params = {} if pltriton is None else {"compiler_params": pltriton.CompilerParams(
        num_warps=num_warps(name, key_dim), num_stages=tuning(name, "num_stages"))}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, interpret=interpret, name=name, **params)


def on_gpu(kernel_fn, reference_fn, interpret: bool):
    """``kernel_fn`` on CUDA (or everywhere in the interpreter), ``reference_fn`` elsewhere.

    Both take the same arguments and return the same structure; ``kernel_fn`` takes ``interpret`` as a
    keyword."""
    if interpret:
        return functools.partial(kernel_fn, interpret=True)
    if pltriton is None:  # pragma: no cover
        return reference_fn

    def dispatch(*args):
        return lax.platform_dependent(*args, cuda=functools.partial(kernel_fn, interpret=False),
                                      default=reference_fn)
    return dispatch


def spec(block, index_map):
    return pl.BlockSpec(block, index_map)


def rows(ref, start, size):
    """``ref[start:start + size]`` along the first axis (a load at a static or dynamic offset)."""
    return ref[pl.ds(start, size)] if len(ref.shape) == 1 else ref[pl.ds(start, size), :]


def column_blocks(width: int, block: int) -> list:
    """``pl.ds`` slices of ``block`` columns covering ``width`` (a multiple of it): the value blocks over
    which the backward kernels contract V, so that no tile wider than ``block`` is alive."""
    return [pl.ds(j * block, block) for j in range(width // block)]


def masked_exp(diff, mask):
    """``exp(diff)`` where ``mask``, 0 elsewhere, with no overflow where the mask is off."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def iota2(size):
    """Row and column indices of a ``size x size`` tile."""
    r = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    c = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return r, c


# ----------------------------------------------------------------------------------------------------
# Layout: the user's [B, T, H, ...], with T padded to a multiple of the chunk size.


def pad_time(x, multiple, value=0.0):
    """Pad the time axis (1) of ``x`` to a multiple of ``multiple`` with ``value``: padded steps have
    zero keys, values and log decays, so they change no state."""
    if x is None:
        return None
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def chunk_log_decay(log_decay, batch, time, heads, chunk):
    """``b_t = sum of log a_m`` from the chunk start to ``t`` (inclusive), float32: ``[B, T, H]`` for a
    scalar decay, ``[B, T, H, K]`` for a channel-wise one, zeros without decay.

    Every exponent the kernels take is a difference ``b_i - b_j`` with ``j <= i`` (or ``b_C - b_j``), so
    it is <= 0 however strong the decay."""
    if log_decay is None:
        return jnp.zeros((batch, time, heads), jnp.float32)
    trailing = log_decay.shape[3:]          # () for a scalar decay, (K,) for a channel-wise one
    b = log_decay.astype(jnp.float32).reshape(batch, time // chunk, chunk, heads, *trailing)
    return jnp.cumsum(b, axis=2).reshape(batch, time, heads, *trailing)
