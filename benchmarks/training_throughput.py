"""Tokens per second of the MQAR training step, per model, d_model and backend, each timed alone.

    python benchmarks/training_throughput.py                                   # the MQAR models, d 64-512
    python benchmarks/training_throughput.py --d-models 64 --backends sequential,chunked --out t.md
    python benchmarks/training_throughput.py --d-models 64 --backends chunked --heads supervised,full

The step is the one the recall experiments train with (`experiments.training.make_train_step`: the
2-layer `experiments.models.LanguageModel`, AdamW, forward + backward + update, jitted), on a batch of
MQAR tokens (batch 256, length 128 by default: Zoology's (128, 8) shape). Each configuration runs in
this process only, after a warm-up step, median of ``--repeats`` timings of ``--steps`` steps: the
numbers do not depend on what else ran on the device, unlike the tokens/s column of a sweep whose
runs may share it. Attention has no backend; it is timed once per d_model. ``--heads``: ``supervised``
(the training step's own: logits at the labelled positions only, `training.logits_and_labels`) or
``full`` (logits at every position, as a language model computes them; the same loss). ``--out`` is
rewritten after every configuration, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402,F401  (first: sets the BLAS threading before jax loads LAPACK)
import jax  # noqa: E402

from experiments import models, tasks, training  # noqa: E402


def time_step(name: str, d_model: int, backend: str, head: str, batch_size: int, seq_len: int, steps: int,
              repeats: int, head_dim: int, vocab_size: int) -> dict:
    model = models.LanguageModel(name, vocab_size, d_model, head_dim=head_dim, backend=backend)
    # the settings of a run of experiments/concurrent_sweep.sh: the same compiled step (the learning rate
    # is not compiled in), so a JAX_COMPILATION_CACHE_DIR shared with a sweep turns compiling into loading
    settings = training.TrainSettings(num_steps=1000, batch_size=batch_size, learning_rate=1e-2, warmup_steps=100)
    x, y = tasks.mqar(vocab_size, seq_len, max(1, seq_len // 16), batch_size, 0, "base")
    mesh = training.data_mesh()
    batch = training.put_batch({"tokens": x, "labels": y}, mesh)
    state = training.init_state(model, settings, {"tokens": x, "labels": y}, mesh)
    supervised = training.supervised_count(y) if head == "supervised" else None
    step = training.make_train_step(model, settings, mesh, supervised=supervised)
    start = time.perf_counter()
    jax.block_until_ready(step(jax.tree.map(jax.numpy.copy, state), batch))    # the step donates its state
    compile_seconds = time.perf_counter() - start
    # the experiments' own timing (a warm-up step, then `steps` steps on a copy of the state), repeated
    seconds = statistics.median(training.measure_throughput(step, state, batch, steps)["seconds_per_step"]
                                for _ in range(repeats))
    return {"model": name, "d_model": d_model, "backend": backend if name != "attention" else "-", "head": head,
            "ms_per_step": 1e3 * seconds, "tokens_per_second": batch_size * seq_len / seconds,
            "compile_s": compile_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="attention,linear_attention,mamba2,deltanet,gated_deltanet,bayesian")
    parser.add_argument("--d-models", default="64,128,256,512")
    parser.add_argument("--backends", default="sequential,chunked", help="for the design layers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", default="supervised", help="supervised and/or full (see above)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    names, heads = args.models.split(","), args.heads.split(",")
    models.check_models(names)
    if set(heads) - {"supervised", "full"}:
        parser.error(f"--heads={args.heads}: each must be 'supervised' or 'full'")
    rows = []
    for d_model in [int(d) for d in args.d_models.split(",")]:
        for name in names:
            for backend in (["-"] if name == "attention" else args.backends.split(",")):
                for head in heads:
                    row = time_step(name, d_model, "auto" if backend == "-" else backend, head, args.batch_size,
                                    args.seq_len, args.steps, args.repeats, args.head_dim, args.vocab_size)
                    rows.append(row)
                    print(f"{name:>17} d{d_model:<4} {row['backend']:>10} {head:>10}: {row['ms_per_step']:8.2f} "
                          f"ms/step  {row['tokens_per_second'] / 1e6:7.3f} M tokens/s  (first call "
                          f"{row['compile_s']:.1f} s)", flush=True)
                    table = write_table(args, rows)
    print("\n" + table)


def write_table(args, rows) -> str:
    """The markdown table of ``rows``, also written to ``--out`` if given."""
    device = jax.devices()[0]
    header = (f"Training step (2-layer LanguageModel, AdamW, fwd+bwd+update), batch {args.batch_size} x length "
              f"{args.seq_len}, head_dim {args.head_dim}, vocab {args.vocab_size}, float32; median of "
              f"{args.repeats} x {args.steps} steps after warm-up, each configuration alone on the device; "
              "first call s: compiling (or loading from JAX_COMPILATION_CACHE_DIR) and one step.\n"
              f"Platform: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
              f"python {platform.python_version()}.\n\n"
              "| model | d_model | backend | head | ms / step | tokens / s | first call s |\n"
              "| --- | --- | --- | --- | --- | --- | --- |\n")
    table = header + "".join(
        f"| {r['model']} | {r['d_model']} | {r['backend']} | {r['head']} | {r['ms_per_step']:.2f} | "
        f"{r['tokens_per_second'] / 1e6:.3f}M | {r['compile_s']:.1f} |\n" for r in rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/training_throughput.py {' '.join(sys.argv[1:])}`\n\n" + table)
    return table


if __name__ == "__main__":
    main()
