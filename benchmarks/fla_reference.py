"""Reference numbers made by flash-linear-attention itself, for `filters.fla` (tests/test_fla.py).

Runs each case of `CASES` through fla 0.6's own op (its Triton kernels, on a CUDA GPU) and writes the
inputs and fla's outputs to one small ``.npz`` (about 1 MB); ``tests/test_fla.py`` runs the same cases
through `filters.fla` and compares, and skips while the file is absent::

    python benchmarks/fla_reference.py --out tests/data/fla_reference.npz

Needs torch, triton and ``fla-core==0.6.0`` (a pure-Python wheel; on the lent GPU machine carry it as
``.whl/`` and install it with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl``, then
``PYTHONPATH=/tmp/site``). No JAX: the file holds numbers only. Inputs are drawn with numpy from
``--seed`` and rounded to bfloat16-representable float32 values, so that the bf16 cases (fla's
``chunk_delta_rule`` refuses float32) and the float32 ones see the same numbers. A case that fla refuses
is recorded with fla's message instead of outputs (``meta["failed"]``), and the test skips it with that
message. fla computes float32 products with TF32 on the tensor cores, so the test's tolerances are
relative errors of 5e-3 (float32 cases) and 3e-2 (bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SHAPE = dict(B=2, T=100, H=2, HV=4, K=32, V=32)      # T crosses a 64-step chunk; HV = 2 H: grouped values

# case -> (fla module, op, dtype, positional inputs, keyword inputs (by input name), keyword literals).
# Every case asks for the final state.
CASES = {
    "gdn": ("gated_delta_rule", "chunk_gated_delta_rule", "float32", ("q", "k", "v", "g", "beta"),
            {"initial_state": "h0"}, {}),
    "gdn_l2norm": ("gated_delta_rule", "chunk_gated_delta_rule", "float32", ("q", "k_raw", "v", "g", "beta"),
                   {}, {"use_qk_l2norm_in_kernel": True}),
    "gdn_grouped_values": ("gated_delta_rule", "chunk_gated_delta_rule", "float32",
                           ("q", "k", "v_grouped", "g_grouped", "beta_grouped"), {"initial_state": "h0_grouped"}, {}),
    "gdn_gates_in_kernel": ("gated_delta_rule", "chunk_gated_delta_rule", "float32",
                            ("q", "k", "v", "g_raw", "beta_logits"), {"A_log": "A_log", "dt_bias": "dt_bias"},
                            {"use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}),
    "gdn_state_v_first": ("gated_delta_rule", "chunk_gated_delta_rule", "float32", ("q", "k", "v", "g", "beta"),
                          {"initial_state": "h0_v_first"}, {"state_v_first": True}),
    "gdn_recurrent": ("gated_delta_rule", "fused_recurrent_gated_delta_rule", "float32", ("q", "k", "v"),
                      {"g": "g", "beta": "beta", "initial_state": "h0"}, {}),
    "gdn_recurrent_channelwise": ("gated_delta_rule", "fused_recurrent_gated_delta_rule", "float32",
                                  ("q", "k", "v"), {"g": "g", "gk": "gk", "beta": "beta"}, {}),
    "deltanet": ("delta_rule", "chunk_delta_rule", "bfloat16", ("q", "k", "v", "beta"), {"initial_state": "h0"}, {}),
    "deltanet_recurrent": ("delta_rule", "fused_recurrent_delta_rule", "float32", ("q", "k", "v", "beta"),
                           {"initial_state": "h0"}, {}),
    "simple_gla": ("simple_gla", "chunk_simple_gla", "float32", ("q", "k", "v", "g"), {"initial_state": "h0"}, {}),
    "simple_gla_gamma": ("simple_gla", "chunk_simple_gla", "float32", ("q", "k", "v"), {"g_gamma": "g_gamma"}, {}),
    "simple_gla_recurrent_reverse": ("simple_gla", "fused_recurrent_simple_gla", "float32", ("q", "k", "v", "g"),
                                     {"initial_state": "h0"}, {"reverse": True}),
    "gla": ("gla", "chunk_gla", "float32", ("q", "k", "v", "gk"), {"initial_state": "h0"}, {}),
    "gla_recurrent": ("gla", "fused_recurrent_gla", "float32", ("q", "k", "v"), {"gk": "gk", "initial_state": "h0"}, {}),
}
TOLERANCE = {"float32": 5e-3, "bfloat16": 3e-2}      # relative to the largest entry of fla's output


def make_inputs(seed: int = 0) -> dict:
    """The inputs of every case, float32 numpy arrays (not yet rounded to bfloat16)."""
    rng = np.random.default_rng(seed)
    B, T, H, HV, K, V = (SHAPE[n] for n in ("B", "T", "H", "HV", "K", "V"))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
    x = {
        "q": rng.normal(size=(B, T, H, K)),
        "k": unit(rng.normal(size=(B, T, H, K))),
        "k_raw": 0.5 * rng.normal(size=(B, T, H, K)),
        "v": rng.normal(size=(B, T, H, V)),
        "v_grouped": rng.normal(size=(B, T, HV, V)),
        "g": log_sigmoid(3.0 + rng.normal(size=(B, T, H))),
        "g_grouped": log_sigmoid(3.0 + rng.normal(size=(B, T, HV))),
        "gk": log_sigmoid(3.0 + rng.normal(size=(B, T, H, K))) / 4,
        "g_gamma": np.log(1 - 2.0 ** -np.arange(3, 3 + H)),
        "beta": rng.uniform(0.05, 0.95, size=(B, T, H)),
        "beta_grouped": rng.uniform(0.05, 0.95, size=(B, T, HV)),
        "beta_logits": rng.normal(size=(B, T, H)),
        "g_raw": rng.normal(size=(B, T, H)),
        "A_log": np.log(rng.uniform(1, 16, size=(H,))),
        "dt_bias": rng.normal(size=(H,)) - 2.0,
        "h0": 0.3 * rng.normal(size=(B, H, K, V)),
        "h0_grouped": 0.3 * rng.normal(size=(B, HV, K, V)),
    }
    x["h0_v_first"] = np.swapaxes(x["h0"], -1, -2).copy()
    return {name: value.astype(np.float32) for name, value in x.items()}


def case_arguments(case: str, inputs: dict, convert=lambda name, x: x):
    """``(args, kwargs)`` of a case, each input through ``convert(name, array)``."""
    _, _, _, positional, named, literals = CASES[case]
    args = [convert(name, inputs[name]) for name in positional]
    kwargs = {key: convert(name, inputs[name]) for key, name in named.items()}
    return args, {**kwargs, **literals, "output_final_state": True}


def main(argv=None) -> None:
    import importlib

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/fla_reference.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import fla

    device = "cuda"
    bf16 = lambda a: torch.from_numpy(a).to(torch.bfloat16).to(torch.float32).numpy()
    inputs = {name: bf16(a) for name, a in make_inputs(args.seed).items()}
    out = {f"input/{name}": a for name, a in inputs.items()}
    meta = {"fla": getattr(fla, "__version__", "?"), "torch": torch.__version__, "seed": args.seed,
            "device": torch.cuda.get_device_name(), "shape": SHAPE, "failed": {}}
    gate_names = {"g", "g_grouped", "gk", "g_gamma", "beta", "beta_grouped", "beta_logits", "g_raw", "A_log",
                  "dt_bias"}
    done = []

    def save(out, meta, done):
        # After every case, into a temporary file renamed over the last (fla autotunes for tens of seconds
        # per case on its first call: a run stopped early keeps the cases it finished, and the file is
        # never half written); ``meta["cases"]`` lists the cases the file holds.
        meta = {**meta, "cases": list(done)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        partial = args.out + ".partial.npz"
        np.savez_compressed(partial, **out, meta=np.array(json.dumps(meta)))
        os.replace(partial, args.out)

    for case, (module, op_name, dtype, *_) in CASES.items():
        op = getattr(importlib.import_module(f"fla.ops.{module}"), op_name)

        def convert(name, a, dtype=dtype):
            t = torch.from_numpy(a).to(device)
            # q, k, v in the case's dtype; gates and states float32 (fla keeps its states in float32)
            return t if name in gate_names or name.startswith("h0") else t.to(getattr(torch, dtype))

        call_args, call_kwargs = case_arguments(case, inputs, convert)
        try:
            o, final = op(*call_args, **call_kwargs)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 (recorded: the test skips this case with fla's message)
            meta["failed"][case] = f"{type(error).__name__}: {error}"[:500]
            print(f"{case}: fla refused: {meta['failed'][case]}", file=sys.stderr)
            save(out, meta, done)
            continue
        out[f"{case}/o"] = o.float().cpu().numpy()
        out[f"{case}/final_state"] = final.float().cpu().numpy()
        print(f"{case}: {op_name} ({dtype}) o {tuple(o.shape)} final_state {tuple(final.shape)}")
        done.append(case)
        save(out, meta, done)
    print(f"wrote {args.out}: {len(done)} of {len(CASES)} cases")


if __name__ == "__main__":
    main()
