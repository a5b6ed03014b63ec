"""Why a layer without its short convolution does or does not learn MQAR: small CPU runs, and the memory
span of each head of the first layer at initialisation and after training.

    python benchmarks/mqar_no_conv.py --out docs/results/mqar_no_conv_cpu.md
    python benchmarks/mqar_no_conv.py --models bayesian_no_noise_no_conv,bayesian_no_conv --steps 100
    python benchmarks/mqar_no_conv.py --task previous --steps 200
    python benchmarks/mqar_no_conv.py --models gated_deltanet_no_conv+bayesian_no_conv --steps 1500
    python benchmarks/mqar_no_conv.py --models bayesian_qt_no_conv --task previous --steps 200 \
        --extra-model 'bayesian_qt_no_conv=["bayesian", {"process_noise": "input", "conv_size": 0}]'

A 2-layer model without convolution must bind a key to the value one step later through its first layer:
at a value's position the first layer must output something of the previous token (the key), which the
second layer then writes as the key of that value. Per model of `experiments.models.MODELS`, this script
trains the model of the MQAR experiments (`experiments.training.train`: AdamW, warm-up + cosine) at a tiny
shape, evaluates it on held-out sequences, and reads the first layer's `layers.DesignLayer.readout_weights`
on held-out sequences at initialisation and after training, summarized per head by `layers.memory_span`
(how far back the readout looks on average, and the shares of the current and the previous step), beside
the head's mean decay ``a_t``, precision (or write strength) ``beta_t`` and process noise ``q_t``; for MQAR,
also the shares of the key's step and of the value's own step at the context's value positions
(`context_binding`: the first layer's job is done there, not in the query region), where each step writes
(`write_angle`: the cosine between the write direction ``Kg_t`` and the key, and the effective gain
``k_t^T Kg_t``, at the context's key and value positions) and how alike the keys are (`key_alignment`). ``--out`` (markdown) is
rewritten after every model, so a run cut short keeps what it measured. ``--task previous`` trains one
layer to output the previous token (uniform tokens; the label at ``t`` is the token at ``t - 1``): the
first layer's job in MQAR without a convolution, alone. Runs are kept under ``--workdir``
(a finished one is not trained again). A name ``first+second`` is a hybrid: the first layer of one model
and the second of another (which layer loses MQAR). ``--extra-model name=JSON`` adds a model to the table for this
run only, JSON being a table entry ``[named layer, {overrides}]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import filters  # noqa: E402,F401  (first: sets the BLAS threading before jax loads LAPACK)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import layers  # noqa: E402
from experiments import common, models, tasks, training  # noqa: E402


def first_layer(name: str, params, tokens, args) -> dict:
    """The first layer's memory span per head (`layers.memory_span` over the second half of the sequence)
    and its mean gates, on ``tokens`` [N, L], for the language model's ``params``."""
    mixer = models.sequence_layer(name.split("+")[0], args.d_model, args.head_dim, "sequential", 4)
    block = params["block_0"]
    h = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32).apply(
        {"params": block["mixer_norm"]}, params["embed"]["embedding"][tokens])
    if not isinstance(mixer, layers.DesignLayer):
        return {}
    variables = {"params": block["mixer"]}
    weights = mixer.apply(variables, h, method=layers.DesignLayer.readout_weights)
    span = layers.memory_span(weights, start=tokens.shape[1] // 2)
    if args.task == "mqar":
        span.update(context_binding(weights, tasks.mqar_layout(args.seq_len, args.pairs, args.variant)))
    cosine, gain = mixer.apply(variables, h, method=lambda m, x: write_angle(m.spec, m._params(), x))
    context = tokens.shape[1]
    if args.task == "mqar":
        layout = tasks.mqar_layout(args.seq_len, args.pairs, args.variant)
        context, values = layout.context, np.arange(layout.bind_offset, layout.context, layout.bind_offset + 1)
        span["gain_at_keys"] = np.median(gain[:, values - layout.bind_offset], axis=(0, 1))
        span["gain_at_values"] = np.median(gain[:, values], axis=(0, 1))
    span["write_cosine"] = np.median(cosine[:, :context], axis=(0, 1))
    span["write_gain"] = np.median(gain[:, :context], axis=(0, 1))
    _, k, _, gates, _ = mixer.apply(variables, h, method=lambda m, x: layers.core.features(m.spec, m._params(), x))
    span["key_alignment"] = key_alignment(k[:, :context])
    if "log_decay" in gates:
        decay = jnp.exp(gates["log_decay"])
        span["decay"] = np.asarray(decay.mean(tuple(range(decay.ndim - 1))) if decay.ndim == 3 else
                                   decay.mean((0, 1, 3)))
    for gate in ("beta", "process_noise"):
        if gate in gates:
            span[gate] = np.asarray(gates[gate].mean((0, 1)))
    return span


def write_angle(spec, params, x) -> tuple[np.ndarray, np.ndarray]:
    """Where each step writes: the gain ``Kg_t`` of ``S_t = G_t S_{t-1} + Kg_t v_t^T`` against the key ``k_t``.

    The exact filter writes along ``Kg_t = P_bar_t k_t / (k_t^T P_bar_t k_t + 1 / beta_t)``, the reset family
    along ``k_t`` (``Kg_t = eta_t k_t``). Returns, ``[B, T, H]`` each, the cosine ``k_t^T Kg_t / (|k_t| |Kg_t|)``
    (1 when the write goes along the key: ``P_bar = sigma^2 I``; it falls as ``P_bar`` turns ``k`` towards the
    directions the memory is less sure of) and the effective gain ``g_t = k_t^T Kg_t``: the fraction of the
    innovation at ``k_t`` that the write removes (the delta rule's ``eta_t |k_t|^2``; a full overwrite is 1).

    ``Kg_t`` is read from the layer's own filter (every family): run on the values ``v_s = e_s`` (the
    identity over time, as `layers.core.readout_weights`) with the query ``e_c`` at every step, the readout's
    diagonal is ``y_t[t] = e_c^T Kg_t`` (``W[t, t] = q_t^T Kg_t``), one run per key channel ``c``."""
    q, k, _, gate_values, _ = layers.core.features(spec, params, x)
    batch, time, heads, key_dim = k.shape
    eye = jnp.broadcast_to(jnp.eye(time, dtype=k.dtype)[None, :, None, :], (batch, time, heads, time))
    tile = lambda z: jnp.concatenate([z] * key_dim)                     # the key channels along the batch
    basis = jnp.broadcast_to(jnp.eye(key_dim, dtype=q.dtype)[:, None, None, None, :],
                             (key_dim, batch, time, heads, key_dim)).reshape(key_dim * batch, time, heads, key_dim)
    y, _ = spec.filter(basis, tile(k), tile(eye), validate=False,
                       **{name: tile(g) for name, g in gate_values.items()})     # [K B, T, H, T]
    diagonal = jnp.diagonal(y, axis1=1, axis2=3)                        # [K B, H, T]: e_c^T Kg_t
    gains = np.asarray(jnp.transpose(diagonal.reshape(key_dim, batch, heads, time), (1, 3, 2, 0)), np.float64)
    k = np.asarray(k, np.float64)
    gain = (k * gains).sum(-1)
    norms = np.linalg.norm(k, axis=-1) * np.linalg.norm(gains, axis=-1)
    return gain / np.maximum(norms, np.finfo(np.float64).tiny), gain


def key_alignment(k) -> np.ndarray:
    """How alike the keys of one sequence are: per head, the median over sequences and pairs of steps
    ``s < t`` of ``|cos(k_t, k_s)|``, for keys ``[B, T, H, K]``. Near 1, every step writes along about one
    direction, where an exact memory is soon certain (its gain there falls like ``1 / (beta n)`` after
    ``n`` writes) and a reset memory overwrites."""
    k = np.asarray(k, np.float64)
    unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    cosines = np.abs(np.einsum("bthk,bshk->bhts", unit, unit))
    later, earlier = np.tril_indices(k.shape[1], -1)
    return np.median(cosines[:, :, later, earlier], axis=(0, 2))


def context_binding(weights, layout) -> dict:
    """Where the binding happens: at the context's value positions ``t`` (the value sits ``layout.bind_offset``
    steps after its key), the shares (``|W[t, s]|`` normalized over ``s <= t``, as in `layers.memory_span`) of the
    key's step ``t - bind_offset`` (``key_at_values``: what the second layer needs as the value's key) and of the
    value's own step (``value_at_values``), per head. A memory that weighs every step alike gives the key
    ``1 / (t + 1)``: ``1/2, 1/4, 1/6, 1/8`` for base MQAR's four pairs."""
    w = np.abs(np.asarray(weights, np.float64))
    w = w / np.maximum(w.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
    t = np.arange(layout.bind_offset, layout.context, layout.bind_offset + 1)
    return {"key_at_values": w[..., t, t - layout.bind_offset].mean((0, 2)),
            "value_at_values": w[..., t, t].mean((0, 2))}


def previous_token(vocab_size: int, seq_len: int, num_examples: int, seed: int):
    """The first layer's job alone: uniform tokens of ``[1, V)``; the label at every position ``t >= 1`` is the
    token at ``t - 1``."""
    tokens = np.random.default_rng(seed).integers(1, vocab_size, size=(num_examples, seq_len))
    labels = np.full_like(tokens, tasks.IGNORE)
    labels[:, 1:] = tokens[:, :-1]
    return tokens.astype(np.int32), labels.astype(np.int32)


def data(args, num_examples: int, seed: int):
    if args.task == "previous":
        return previous_token(args.vocab_size, args.seq_len, num_examples, seed)
    return tasks.mqar(args.vocab_size, args.seq_len, args.pairs, num_examples, seed, args.variant,
                      vocabulary=args.vocabulary)


def measure(name: str, args) -> dict:
    x, y = data(args, args.train_examples, args.seed)
    ex, ey = data(args, args.eval_examples, args.seed + 1)
    layers_ = 1 if args.task == "previous" else 2
    per_layer = tuple(name.split("+")) if "+" in name else name     # "first+second": a hybrid, layer by layer
    model = models.LanguageModel(per_layer, args.vocab_size, args.d_model, num_layers=layers_, head_dim=args.head_dim,
                                 backend=args.backend)
    settings = training.TrainSettings(num_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                      warmup_steps=max(1, args.steps // 10), seed=args.seed, log_every=50,
                                      checkpoint_every=args.steps, throughput_steps=0, progress=False)
    task = "previous" if args.task == "previous" else f"{args.variant}_{args.vocabulary}"
    folder = os.path.join(args.workdir, f"{task}_L{args.seq_len}", name, f"lr{args.lr:.0e}_s{args.seed}_n{args.steps}")
    mesh = training.data_mesh()
    initial = training.init_state(model, settings, {"tokens": x, "labels": y}, mesh).params["params"]
    start = time.time()
    record = training.train(model, settings, {"tokens": x, "labels": y}, {"eval": {"tokens": ex, "labels": ey}},
                            folder, mesh=mesh, description=run_description(name, args))
    trained = training.load_checkpoint(folder)["params"]["params"]
    probe = ex[:args.probe_examples]
    return {"model": name, "accuracy": record["eval"]["eval"]["accuracy"], "seconds": time.time() - start,
            "init": first_layer(name, initial, probe, args), "trained": first_layer(name, trained, probe, args)}


def run_description(name: str, args) -> dict:
    """A run's identity (its folder's ``run.json``): the script's settings, of ``--extra-model`` only the
    entries of the layers this model uses (another model added in the same command does not change the run,
    so its finished folder is reused by a command without that model)."""
    parts = name.split("+")
    own = [extra for extra in args.extra_model if extra.partition("=")[0] in parts]
    return {"script": "mqar_no_conv", "model": name, **{
        k: v for k, v in vars(args).items() if k not in ("models", "out", "workdir", "probe_examples")},
        "extra_model": own}


def _heads(values, form: str = ".2f") -> str:
    return " / ".join(f"{v:{form}}" for v in values)


def markdown(results: list[dict], args) -> str:
    task = (f"The previous token (1 layer; uniform tokens, the label at t is the token at t - 1; chance "
            f"1/{args.vocab_size - 1}), length {args.seq_len}" if args.task == "previous" else
            f"MQAR `{args.variant}` ({args.vocabulary} vocabulary), (L, P) = ({args.seq_len}, {args.pairs})")
    lines = [f"{task}, vocabulary {args.vocab_size}, d_model {args.d_model}, heads of {args.head_dim}, {args.steps} "
             f"steps of batch {args.batch_size}, learning rate {args.lr:g}, seed {args.seed}; accuracy on "
             f"{args.eval_examples} held-out sequences. First "
             f"layer, per head (`/`-separated), over positions t >= {args.seq_len // 2} of {args.probe_examples} "
             "held-out sequences: mean lag of the readout, share of the current and of the previous step; at "
             "the context's value positions (MQAR), the shares of the key's step and of the value's own step; "
             "at the context's positions (MQAR; every position for the previous token), the median cosine "
             "between the write direction Kg_t (P_bar k_t for the exact filter) and the key k_t, and the median "
             "effective gain k_t^T Kg_t (`write_angle`), for MQAR also the median gain at the context's key and "
             "value positions, and the median |cos(k_t, k_s)| of two keys there (`key_alignment`); mean decay a, "
             "beta and process noise q.", ""]
    header = ["model", "accuracy", "when", "mean lag", "current", "previous", "key at values", "value at values",
              "write cosine", "write gain", "gain at keys", "gain at values", "key alignment", "decay a", "beta",
              "q"]
    rows = []
    for r in results:
        for when in ("init", "trained"):
            s = r[when]
            rows.append([r["model"], f"{r['accuracy']:.3f}" if when == "trained" else "", when,
                         *(_heads(s[k], ".2g" if k == "process_noise" else ".2f") if k in s else "-"
                           for k in ("mean_lag", "current", "previous", "key_at_values", "value_at_values",
                                     "write_cosine", "write_gain", "gain_at_keys", "gain_at_values",
                                     "key_alignment", "decay", "beta", "process_noise"))])
    lines.append(common.markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def add_model(text: str) -> None:
    """``NAME=JSON`` -> ``models.MODELS[NAME] = (layer, overrides)`` for this process only."""
    name, _, spec = text.partition("=")
    try:
        layer, overrides = json.loads(spec)
        ok = isinstance(layer, str) and isinstance(overrides, dict)
    except (ValueError, TypeError):
        ok = False
    if not name or not ok:
        raise SystemExit(f"--extra-model: got {text!r}; accepted: NAME=[named layer, {{overrides}}], e.g. "
                         'bayesian_qt_no_conv=["bayesian", {"process_noise": "input", "conv_size": 0}]')
    if name in models.MODELS:
        raise SystemExit(f"--extra-model: {name!r} is already in the model table; choose another name.")
    models.MODELS[name] = (layer, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bayesian_no_noise_no_conv,bayesian_no_conv,gated_deltanet_no_conv")
    parser.add_argument("--task", default="mqar", choices=("mqar", "previous"))
    parser.add_argument("--variant", default="base", choices=tasks.MQAR_VARIANTS)
    parser.add_argument("--vocabulary", default="split", choices=tasks.VOCABULARIES)
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=20_000)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--probe-examples", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--workdir", default="/tmp/mqar_no_conv")
    parser.add_argument("--out", default=None)
    parser.add_argument("--extra-model", action="append", default=[], metavar="NAME=JSON",
                        help='a model added to the table for this run, e.g. bayesian_qt_no_conv=["bayesian", '
                             '{"process_noise": "input", "conv_size": 0}]')
    args = parser.parse_args()
    for extra in args.extra_model:
        add_model(extra)
    names = args.models.split(",")
    models.check_models([part for name in names for part in name.split("+")])
    results = []
    for name in names:
        results.append(measure(name, args))
        text = markdown(results, args)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
