"""Our Pallas GPU kernels beside the chunked XLA lowering, flash-linear-attention and SDPA, in one run.

    python benchmarks/gpu_kernels.py --out docs/results/gpu_kernels.md        # the whole table (H200)
    python benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --models gated_deltanet --peers none
    python benchmarks/gpu_kernels.py --sweep --shapes 4x4096x16x128            # launch settings, per kernel

For every shape ``BxTxHxD`` (K = V = D) and model, on the same inputs (q, k, v bf16; gates float32):
the median time of ``--repeats`` calls after warm-up of the forward and of the forward+backward (the
gradient of ``sum(y * dy)`` w.r.t. q, k, v and every gate) for ours (``--backends``: ``pallas``, the
kernels; ``chunked``, the plain-XLA lowering; both through `filters.compile`, ``validate=False``), for
the matching flash-linear-attention 0.6 op (``--peers fla``; its own Triton kernels, timed with CUDA
events; on Triton < 3.7.1 fla refuses its gated backward on Hopper, so the script sets
``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``: for timing only, its gradients are not used) and
for torch's causal scaled-dot-product attention (``--peers sdpa``); the compile time (ours: lowering +
compiling; fla: its first call, autotuning included); the peak GPU memory of one forward+backward; and
the relative error (Frobenius) of our output and of fla's against a float64 oracle (our sequential
filter on the same inputs, upcast) and against each other. The Bayesian Layer has no peer op; fla's
MesaNet (another filter with a K x K state) is timed beside it. Also measured: the copy bandwidth and
the bf16 matmul rate, for the floor of each row (bytes of q, k, v and y once over bandwidth; FLOPs of
the chunked algorithm over the matmul rate). ``--out`` gets a markdown report, ``--json`` JSON lines.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)   # the float64 oracle only; every timed input is bf16 / f32

import designmodels as dm  # noqa: E402
import filters  # noqa: E402

SHAPES = ("4x4096x16x128", "8x2048x32x64", "1x32768x8x128")
CHUNK = 64


def _simple_gla():
    return dm.DesignModel(transition=dm.ScalarDecay(None), observation=dm.LatentInput(), name="simple_gla")


def _kda():
    """The delta rule with a decay per key channel (KDA-style; fla's ``chunk_kda`` with its decay given)."""
    return dm.DesignModel(transition=dm.DiagonalDecay(None), observation=dm.KeyValueObservation(None),
                          covariance=dm.Reset(write_strength=True), name="kda")


# name -> (our design model, its gates, the fla op, how fla takes the gates)
MODELS = {
    "gated_deltanet": (dm.gated_deltanet, ("log_decay", "beta"), "chunk_gated_delta_rule"),
    "deltanet": (dm.deltanet, ("beta",), "chunk_delta_rule"),
    "simple_gla": (_simple_gla, ("log_decay",), "chunk_simple_gla"),
    "gla": (dm.gla, ("log_decay_k",), "chunk_gla"),
    "bayesian": (functools.partial(dm.bayesian, process_noise=0.01), ("log_decay", "precision"), "chunk_mesa_net"),
    # KDA-style: --models only (not one of issue #14's headline models; timed 2026-12-02)
    "kda": (_kda, ("log_decay_k", "beta"), "chunk_kda"),
    # the Bayesian Layer with noise along the key (experiments.models's bayesian_key): --models only, and its
    # fla peer is MesaNet as above (one fla timing: run it with --peers none beside bayesian)
    "bayesian_key": (functools.partial(dm.bayesian, noise="key", process_noise=5.0), ("log_decay", "precision"),
                     "chunk_mesa_net"),
}
DEFAULT_MODELS = ("gated_deltanet", "deltanet", "simple_gla", "gla", "bayesian")


def fla_peer(name):
    """The fla row a model's ratio is to: the Bayesian Layers' is fla's Gated DeltaNet (their target: at
    most 1.5x), every other model's its own fla op."""
    return "gated_deltanet" if name.startswith("bayesian") else name


def parse_shape(text):
    return tuple(int(x) for x in text.split("x"))


def make_inputs(shape, seed=0):
    """numpy float32 arrays: q, k (unit rows), v, and every gate any model takes."""
    batch, time_, heads, dim = shape
    rng = np.random.default_rng(seed)
    lead = (batch, time_, heads)
    k = rng.standard_normal((*lead, dim), np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    sig = lambda x: 1 / (1 + np.exp(-x))
    return dict(
        q=rng.standard_normal((*lead, dim), np.float32), k=k, v=rng.standard_normal((*lead, dim), np.float32),
        log_decay=np.log(sig(4.0 + rng.standard_normal(lead, np.float32))),
        log_decay_k=np.log(sig(4.0 + rng.standard_normal((*lead, dim), np.float32))),
        beta=(0.95 * sig(rng.standard_normal(lead, np.float32))).astype(np.float32),
        precision=(0.5 + 3.5 * sig(rng.standard_normal(lead, np.float32))).astype(np.float32),
        dy=rng.standard_normal((*lead, dim), np.float32))


def our_gates(name, inputs, cast):
    names = MODELS[name][1]
    rename = {"log_decay_k": "log_decay", "precision": "beta"}
    return {rename.get(n, n): cast(inputs[n]) for n in names}


# ----------------------------------------------------------------------------------------------------
# Timing


def time_jax(fn, args, repeats):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    memory = compiled.memory_analysis()
    peak = None if memory is None else (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                        + memory.output_size_in_bytes)
    return statistics.median(times) * 1e3, compile_s, compiled, peak


def ours(name, backend, inputs, repeats):
    model = MODELS[name][0]()
    f = filters.compile(model, backend=backend)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    qkv = tuple(bf16(inputs[n]) for n in ("q", "k", "v"))
    gates = our_gates(name, inputs, f32)
    dy = f32(inputs["dy"])

    def forward(q, k, v, gates):
        return f(q, k, v, validate=False, **gates)[0]

    def loss(q, k, v, gates):
        return jnp.sum(forward(q, k, v, gates).astype(jnp.float32) * dy)

    fwd_ms, fwd_compile, compiled, _ = time_jax(forward, (*qkv, gates), repeats)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    bwd_ms, bwd_compile, _, peak = time_jax(grad, (*qkv, gates), repeats)
    y = np.asarray(compiled(*qkv, gates), np.float64)
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=bwd_ms, compile_s=fwd_compile + bwd_compile,
                peak_mb=None if peak is None else peak / 2**20), y


def oracle(name, inputs):
    """Our sequential filter in float64 on the inputs as the timed runs see them (bf16 q, k, v)."""
    model = MODELS[name][0]()
    f = filters.compile(model, backend="sequential")
    as64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64))
    gates = our_gates(name, inputs, lambda x: jnp.asarray(x, jnp.float64))
    y, _ = f(*(as64(inputs[n]) for n in ("q", "k", "v")), validate=False, **gates)
    return np.asarray(y, np.float64)


def fla_op(name, inputs, repeats):
    import torch
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True   # timing only (see the module doc)
    from fla import ops
    op_name = MODELS[name][2]
    module = {"chunk_gated_delta_rule": "gated_delta_rule", "chunk_delta_rule": "delta_rule",
              "chunk_simple_gla": "simple_gla", "chunk_gla": "gla", "chunk_mesa_net": "mesa_net",
              "chunk_kda": "kda"}[op_name]
    op = getattr(__import__(f"fla.ops.{module}", fromlist=[op_name]), op_name)
    del ops
    cuda = lambda x, dtype=torch.float32: torch.tensor(x, device="cuda").to(dtype)
    q, k, v = (cuda(inputs[n], torch.bfloat16) for n in ("q", "k", "v"))
    tensors = dict(q=q, k=k, v=v)
    if op_name in ("chunk_gated_delta_rule", "chunk_simple_gla", "chunk_mesa_net"):
        tensors["g"] = cuda(inputs["log_decay"])
    if op_name in ("chunk_gla", "chunk_kda"):
        tensors["g"] = cuda(inputs["log_decay_k"])
    if op_name in ("chunk_gated_delta_rule", "chunk_delta_rule", "chunk_mesa_net", "chunk_kda"):
        tensors["beta"] = cuda(inputs["beta"])
    if op_name == "chunk_mesa_net":
        # MesaNet's ridge strength is one per head and key channel, [H, K] (fla 0.6 asserts the shape)
        tensors["lamb"] = torch.ones(q.shape[2], q.shape[3], device="cuda", dtype=torch.float32)
    kwargs = {} if op_name == "chunk_mesa_net" else {"scale": 1.0}
    dy = cuda(inputs["dy"], torch.bfloat16)

    def call(**t):
        return op(**t, **kwargs)[0]

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()                                  # the first call autotunes
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        fn()
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times), first

    with torch.no_grad():
        fwd_ms, fwd_first = timed(lambda: call(**tensors))
        y = call(**tensors).float().cpu().numpy().astype(np.float64)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}

    def forward_backward():
        for t in leaves.values():
            t.grad = None
        call(**leaves).backward(dy)

    torch.cuda.reset_peak_memory_stats()
    bwd_ms, bwd_first = timed(forward_backward)
    peak = torch.cuda.max_memory_allocated() / 2**20
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=bwd_ms, compile_s=fwd_first + bwd_first, peak_mb=peak), y


def sdpa(shape, inputs, repeats):
    import torch
    import torch.nn.functional as F
    cuda = lambda x: torch.tensor(x, device="cuda").to(torch.bfloat16).transpose(1, 2).contiguous()
    q, k, v = (cuda(inputs[n]) for n in ("q", "k", "v"))
    dy = cuda(inputs["dy"])
    res = {}
    for mode in ("fwd", "fwdbwd"):
        leaves = [t.detach().clone().requires_grad_(mode == "fwdbwd") for t in (q, k, v)]

        def run():
            o = F.scaled_dot_product_attention(*leaves, is_causal=True)
            if mode == "fwdbwd":
                o.backward(dy)
        run()
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        res[f"{mode}_ms"] = statistics.median(times)
    return res


def ceilings():
    """The measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    import torch
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn, work in (("bandwidth_GBps", lambda: y.copy_(x), 2 * x.numel()),
                           ("bf16_TFLOPs", lambda: a @ a, 2 * 8192**3)):
        fn()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1e3 / 10
        out[name] = work / seconds / (1e9 if name.startswith("band") else 1e12)
    return out


def floor_ms(name, shape, ceil):
    """Bytes of q, k, v, y once over bandwidth; FLOPs of the chunked forward over the matmul rate."""
    batch, time_, heads, dim = shape
    tokens = batch * time_ * heads
    bytes_ = tokens * dim * 2 * 4
    # per token and head, multiply-adds of the chunked forward (C = 64): additive 2 K V + C (K + V)
    # (state update, inter- and intra-chunk output); delta rule + prepare and the state's erase:
    # 4 K V + C (3 K + 2 V); exact: + the covariance pass, about 3 K^2 + C K per step.
    kk = vv = dim
    macs = {"simple_gla": 2 * kk * vv + CHUNK * (kk + vv), "gla": 2 * kk * vv + CHUNK * (kk + vv)}.get(
        name, 4 * kk * vv + CHUNK * (3 * kk + 2 * vv))
    if name.startswith("bayesian"):
        macs += 3 * kk * kk + CHUNK * kk
    flops = 2 * macs * tokens
    return max(bytes_ / (ceil["bandwidth_GBps"] * 1e9), flops / (ceil["bf16_TFLOPs"] * 1e12)) * 1e3


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------------
# The launch-settings sweep of the delta-rule kernels


KERNEL_CONFIGS = {
    "delta_rule_prepare": [dict(num_warps=w, reload=r) for w in (1, 2, 4) for r in (False, True)],
    "delta_rule_state": [dict(num_warps=w, num_stages=st, block_v=64) for w in (4, 8) for st in (3, 4)],
    "delta_rule_output": [dict(num_warps=w, num_stages=2, block_v=128) for w in (4, 8)],
    "delta_rule_output_backward": [dict(num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2)],
    "delta_rule_state_backward": [dict(num_warps=w, num_stages=st, block_v=64) for w in (4, 8)
                                  for st in (2, 3, 4)],
    "delta_rule_chunk_backward": [dict(num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2)],
}


def sweep(shape, repeats):
    """Time each delta-rule kernel alone under each launch setting of `KERNEL_CONFIGS`."""
    from filters.pallas import common, delta_rule as kernels
    inputs = make_inputs(shape)
    q, k, v = (jnp.asarray(inputs[n], jnp.bfloat16) for n in ("q", "k", "v"))
    w = (jnp.asarray(inputs["beta"])[..., None] * k.astype(jnp.float32)).astype(jnp.bfloat16)
    batch, time_, heads, dim = shape
    b = common.chunk_log_decay(jnp.asarray(inputs["log_decay"]), batch, time_, heads, CHUNK)
    s0 = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    dots = common.Dots(jnp.bfloat16)
    interpret = jax.default_backend() == "cpu"   # a dry run of this script on a CPU
    st = kernels._Stages(CHUNK, dots, interpret)
    wp, up, inv = st.prepare(k, w, v, b)
    h, u, _ = st.state(wp, up, w, b, s0)
    dy = jnp.asarray(inputs["dy"])
    _, _, _, dh, du = st.output_backward(q, w, b, h, u, dy)
    g_next, ubar, _ = st.state_backward(wp, w, b, dh, du, s0)
    calls = {
        "delta_rule_prepare": (kernels.prepare_kernel, (k, w, v, b)),
        "delta_rule_state": (kernels.state_kernel, (wp, up, w, b, s0)),
        "delta_rule_output": (kernels.output_kernel, (q, w, b, h, u)),
        "delta_rule_output_backward": (kernels.output_backward_kernel, (q, w, b, h, u, dy)),
        "delta_rule_state_backward": (kernels.state_backward_kernel, (wp, w, b, dh, du, s0)),
        "delta_rule_chunk_backward": (kernels.chunk_backward_kernel, (k, w, v, b, inv, h, u, ubar, g_next)),
    }
    for name, (fn, args) in calls.items():
        saved = common.TUNING.get(name)
        results = []
        for config in KERNEL_CONFIGS[name]:
            common.TUNING[name] = config
            try:
                ms = time_jax(functools.partial(fn, chunk=CHUNK, dots=dots, interpret=interpret), args, repeats)[0]
            except Exception as error:  # a setting the compiler refuses (e.g. out of registers)
                print(json.dumps(dict(kernel=name, config=config, error=str(error)[:200])), flush=True)
                continue
            results.append((ms, config))
            print(json.dumps(dict(kernel=name, config=config, ms=round(ms, 4))), flush=True)
        common.TUNING[name] = saved
        best = min(results, key=lambda r: r[0])
        print(json.dumps(dict(best=name, ms=round(best[0], 4), **best[1])), flush=True)


# ----------------------------------------------------------------------------------------------------


def report(records, ceil, args):
    # "-dirty" where the tree differs from the commit (on the lent GPU the copy's git is the session's
    # first commit, whatever was committed since: the reader must not take the name alone for the code)
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    lines = [
        "# GPU kernels: ours beside flash-linear-attention", "",
        f"Measured {datetime.date.today()} on {jax.devices()[0].device_kind}, jax {jax.__version__}, commit "
        f"{commit}, by `python benchmarks/gpu_kernels.py {' '.join(sys.argv[1:])}` (one process, same "
        "inputs: q, k, v bf16, gates float32; median of "
        f"{args.repeats} calls after warm-up). Measured ceilings: copy {ceil['bandwidth_GBps']:.0f} GB/s, "
        f"bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s. fla: `fla-core` 0.6.0 with "
        "`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True` (Triton 3.6 on Hopper; timing only).", "",
        "ratio = ours / fla (below 1: ours is faster). error = relative (Frobenius) error of the bf16 "
        "output against the float64 oracle (our sequential filter on the same inputs). compile = lowering + "
        "compiling (ours) or the first call with its autotuning (fla), forward and forward+backward "
        "together. peak = memory of one forward+backward (ours: the compiled program's arguments, "
        "outputs and temporaries; fla: torch's peak allocation).", "",
        "| shape BxTxHxD | model | impl | fwd ms | fwd+bwd ms | ratio fwd | ratio fwd+bwd | floor ms | "
        "error | compile s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_key = {(r["shape"], r["model"], r["impl"]): r for r in records}
    for r in records:
        # the Bayesian Layer's ratio is to fla's Gated DeltaNet (its target: at most 1.5x)
        peer = by_key.get((r["shape"], fla_peer(r["model"]), "fla"))
        ratio = lambda key: (f"{r[key] / peer[key]:.2f}" if peer and r.get(key) and not r["impl"].startswith("fla")
                             else "")
        fmt = lambda key, spec: "" if r.get(key) is None else format(r[key], spec)
        lines.append(f"| {r['shape']} | {r['model']} | {r['impl']} | {fmt('fwd_ms', '.3f')} | "
                     f"{fmt('fwdbwd_ms', '.3f')} | {ratio('fwd_ms')} | {ratio('fwdbwd_ms')} | "
                     f"{fmt('floor_ms', '.3f')} | {fmt('error', '.1e')} | {fmt('compile_s', '.1f')} | "
                     f"{fmt('peak_mb', '.0f')} |")
    lines += ["", "ratio of the Bayesian Layer: to fla's Gated DeltaNet (`chunk_gated_delta_rule`) at the same "
              "shape. Against fla's MesaNet (`chunk_mesa_net`, also a K x K state):", ""]
    for r in records:
        mesa = by_key.get((r["shape"], "bayesian", "fla mesa_net"))
        if r["model"].startswith("bayesian") and not r["impl"].startswith("fla") and mesa:
            lines.append(f"- {r['shape']}, {r['impl']}: MesaNet / ours = {mesa['fwd_ms'] / r['fwd_ms']:.2f}x "
                         f"forward, {mesa['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x forward+backward")
    agreement = [r for r in records if "vs_fla" in r]
    if agreement:
        lines += ["", "Our output against fla's on the same inputs (relative, Frobenius):", "",
                  "| shape | model | impl | ours vs fla |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['shape']} | {r['model']} | {r['impl']} | {r['vs_fla']:.1e} |" for r in agreement]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--backends", default="pallas,chunked")
    parser.add_argument("--peers", default="fla,sdpa", help="fla, sdpa, or none")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--oracle", default="4x4096x16x128,8x2048x32x64",
                        help="shapes at which to compute the float64 oracle (it is a sequential scan)")
    parser.add_argument("--sweep", action="store_true", help="time each kernel alone under several launch "
                        "settings at the first shape, then stop")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.sweep:
        sweep(parse_shape(args.shapes.split(",")[0]), args.repeats)
        return
    peers = [p for p in args.peers.split(",") if p != "none"]
    ceil = ceilings() if peers else {"bandwidth_GBps": float("nan"), "bf16_TFLOPs": float("nan")}
    print(json.dumps(ceil), flush=True)
    records = []

    def add(record):
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
        if args.out:
            with open(args.out, "w") as f:
                f.write(report(records, ceil, args))

    for shape_text in args.shapes.split(","):
        shape = parse_shape(shape_text)
        inputs = make_inputs(shape)
        if "sdpa" in peers:
            add(dict(shape=shape_text, model="attention", impl="sdpa", **sdpa(shape, inputs, args.repeats)))
        for name in args.models.split(","):
            reference = oracle(name, inputs) if shape_text in args.oracle.split(",") else None
            floor = floor_ms(name, shape, ceil)
            outputs = {}
            for backend in args.backends.split(","):
                timing, y = ours(name, backend, inputs, args.repeats)
                outputs[backend] = (y, dict(shape=shape_text, model=name, impl=backend, floor_ms=floor,
                                            error=None if reference is None else relative(y, reference), **timing))
                add(outputs[backend][1])
            if "fla" in peers:
                timing, y = fla_op(name, inputs, args.repeats)
                bayesian = name.startswith("bayesian")          # fla's peer is MesaNet, another filter
                error = None if reference is None or bayesian else relative(y, reference)
                add(dict(shape=shape_text, model=name, impl="fla mesa_net" if bayesian else "fla",
                         floor_ms=floor, error=error, **timing))
                if not bayesian:
                    for ours_y, record in outputs.values():
                        record["vs_fla"] = relative(ours_y, y)
                if args.out:
                    with open(args.out, "w") as f:
                        f.write(report(records, ceil, args))


if __name__ == "__main__":
    main()
