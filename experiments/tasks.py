"""Synthetic recall tasks: Zoology's multi-query associative recall (MQAR) and its variants, and the
key-value recall task of the learned-recall study. Every generator is deterministic given its seed and
vectorised over examples (numpy; no Python loop per token). The exact layouts are in docs/experiments.md.

Shape legend::

    N  examples        L  sequence length        P  key-value pairs        V  vocabulary size

Labels are ``IGNORE`` (-100) wherever nothing is supervised; a supervised position holds a query key
and its label is the value that key is bound to (for "update" and "forget": the latest binding).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

IGNORE = -100
MQAR_VARIANTS = ("base", "shared", "update", "forget", "block")
# Where an example's keys and values come from: Zoology's two halves of the vocabulary (keys [1, V/2), values
# [V/2, V)), or one shared pool [1, V) (a token's role is then given only by its position).
VOCABULARIES = ("split", "shared")
SEPARATOR = 0   # token 0 is reserved: never a key, value or filler; the separator of Block-MQAR


class TaskError(ValueError):
    """A task argument that cannot produce the requested layout; the message says what is accepted."""


# ----------------------------------------------------------------------------------------------------
# vectorised sampling helpers
# ----------------------------------------------------------------------------------------------------

def _subsets(rng: np.random.Generator, num_rows: int, low: int, high: int, size: int,
             chunk: int = 4096) -> np.ndarray:
    """``[num_rows, size]`` distinct integers from ``[low, high)`` per row, a uniformly random subset in
    uniformly random order (the ``size`` smallest of i.i.d. uniform scores, then shuffled)."""
    n = high - low
    if size > n:
        raise TaskError(f"cannot draw {size} distinct tokens from a range of {n}.")
    out = np.empty((num_rows, size), np.int64)
    for start in range(0, num_rows, chunk):      # a loop over chunks of examples, bounding memory
        scores = rng.random((min(chunk, num_rows - start), n), dtype=np.float32)
        part = np.argpartition(scores, size - 1, axis=1)[:, :size] if size < n else np.tile(
            np.arange(n), (scores.shape[0], 1))
        order = np.argsort(rng.random(part.shape), axis=1)
        out[start:start + len(part)] = np.take_along_axis(part, order, 1) + low
    return out


def _power_law_slots(rng: np.random.Generator, num_rows: int, space: int, size: int,
                     power_a: float) -> np.ndarray:
    """Zoology's query placement: ``size`` distinct slots of ``range(space)`` drawn one after another
    without replacement with ``p(i) ~ (i + 1)^(power_a - 1)`` (Gumbel top-k: the same distribution, in
    the same draw order)."""
    logp = (power_a - 1.0) * np.log(np.arange(1, space + 1))
    scores = logp + rng.gumbel(size=(num_rows, space))
    return np.argsort(-scores, axis=1, kind="stable")[:, :size]


def _tokens_excluding(rng: np.random.Generator, shape, low: int, high: int,
                      excluded_sorted: np.ndarray) -> np.ndarray:
    """Uniform tokens of ``[low, high)`` minus each row's ``excluded_sorted`` (``[N, E]``, sorted, distinct,
    inside the range): draw a rank ``r`` among the allowed tokens and map it to the token,
    ``t = low + r + #{i : e_i - low - i <= r}``, with a batched ``searchsorted``."""
    n_rows, n_excl = excluded_sorted.shape
    allowed = high - low - n_excl
    r = rng.integers(0, allowed, size=shape)
    adjusted = excluded_sorted - low - np.arange(n_excl)               # non-decreasing per row
    offset = (np.arange(n_rows) * (high - low + 1))[:, None]
    flat = (adjusted + offset).ravel()
    rr = r.reshape(n_rows, -1) + offset
    count = np.searchsorted(flat, rr.ravel(), side="right").reshape(rr.shape) - np.arange(n_rows)[:, None] * n_excl
    return (low + rr - offset + count).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------------------------------

class MqarLayout(NamedTuple):
    """Where things are, for one variant at one shape (the same for every example)."""

    context: int            # C: tokens before the query region
    bind_offset: int        # a value sits this many positions after its key
    updates: int            # R: rebinding pairs (update variant)


def mqar_layout(seq_len: int, num_kv_pairs: int, variant: str = "base", *, num_updates: Optional[int] = None,
                block_gap: int = 6) -> MqarLayout:
    """The layout of `mqar`, validated: raises `TaskError` when the pairs and queries do not fit."""
    if variant not in MQAR_VARIANTS:
        raise TaskError(f"variant={variant!r}: unknown; accepted: {', '.join(MQAR_VARIANTS)}.")
    if num_kv_pairs < 1:
        raise TaskError(f"num_kv_pairs={num_kv_pairs}: must be at least 1.")
    updates = 0
    if variant == "update":
        updates = num_kv_pairs if num_updates is None else num_updates
        if updates < 1:
            raise TaskError(f"num_updates={updates}: the update variant needs at least one rebinding.")
    if variant == "forget":
        if num_updates not in (None, num_kv_pairs):
            raise TaskError(f"num_updates={num_updates}: the forget variant rewrites each of the {num_kv_pairs} "
                            f"keys once (accepted: None or {num_kv_pairs}; for another number of random "
                            "rebindings use variant 'update').")
        updates = num_kv_pairs
    if variant == "block":
        if block_gap < 1:
            raise TaskError(f"block_gap={block_gap}: must be at least 1 separator.")
        context, offset = num_kv_pairs * (block_gap + 2), block_gap + 1
    else:
        context, offset = 2 * (num_kv_pairs + updates), 1
    if context + 2 * num_kv_pairs > seq_len:
        raise TaskError(
            f"seq_len={seq_len} is too short for variant {variant!r} with {num_kv_pairs} pairs: the context "
            f"takes {context} tokens and the {num_kv_pairs} queries need {2 * num_kv_pairs} more "
            f"(seq_len >= {context + 2 * num_kv_pairs}).")
    return MqarLayout(context, offset, updates)


def mqar_vocabulary(variant: str, vocabulary: Optional[str] = None) -> str:
    """The vocabulary of a variant: ``vocabulary`` (one of `VOCABULARIES`), or when None ``"split"``, except
    for the variant ``"shared"``, which is base MQAR with the shared vocabulary (and refuses ``"split"``)."""
    if vocabulary is None:
        return "shared" if variant == "shared" else "split"
    if vocabulary not in VOCABULARIES:
        raise TaskError(f"vocabulary={vocabulary!r}: unknown; accepted: {', '.join(VOCABULARIES)}.")
    if variant == "shared" and vocabulary != "shared":
        raise TaskError(f"variant='shared' is base MQAR with the shared vocabulary; vocabulary={vocabulary!r} "
                        "contradicts it (accepted: 'shared' or None; for Zoology's split halves use variant "
                        "'base').")
    return vocabulary


def mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
         variant: str = "base", *, vocabulary: Optional[str] = None, num_updates: Optional[int] = None,
         block_gap: int = 6, power_a: float = 0.01, random_filler: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Multi-query associative recall (Zoology, Arora et al. 2024) and its variants.

    Returns ``(inputs int32 [N, L], labels int32 [N, L])``. Layout (docs/experiments.md):

    * ``base``: keys from ``[1, V/2)``, values from ``[V/2, V)``, all distinct within an example. The
      context ``k_1 v_1 ... k_P v_P`` opens the sequence; in the query region after it, every key is
      queried once, at an even offset drawn by Zoology's power law (``power_a``; small = near the
      context). The query position is supervised with the key's value. All other positions are filler:
      uniform tokens of ``[1, V)`` that are not a key of the example (``random_filler=False``: token 0).
    * ``vocabulary="shared"`` (any variant): the ``P`` keys and all the values of an example are drawn
      together as distinct tokens of ``[1, V)``, so a token's role is given only by its position; with
      ``"split"`` (the default) keys come from ``[1, V/2)`` and values from ``[V/2, V)``. Each variant's
      split data is the same whether or not ``vocabulary`` is given.
    * ``shared``: base with the shared vocabulary (``2P`` distinct tokens of ``[1, V)``).
    * ``update``: after the ``P`` pairs come ``R = num_updates`` (default ``P``) rebinding pairs
      ``k_j v'`` with ``j`` uniform over the keys (a key may be rebound more than once); every value in
      an example is distinct, so a rebinding never repeats an old value. The label is the latest value.
    * ``forget``: the update layout with every key rewritten once: after the ``P`` pairs, the same ``P``
      keys again in a random order, each with a new value, and every key queried, so that every query
      asks for its key's second value and none may be answered from the first block.
    * ``block``: each key is followed by ``block_gap`` separator tokens (token 0), then its value:
      ``k_i 0^g v_i``. The value sits ``g + 1`` positions after its key; with ``g + 1 > n_layers *
      (conv_size - 1)`` no stack of the models' short convolutions reaches from a value to its key.
    """
    layout = mqar_layout(seq_len, num_kv_pairs, variant, num_updates=num_updates, block_gap=block_gap)
    vocabulary = mqar_vocabulary(variant, vocabulary)
    if vocab_size < 8:
        raise TaskError(f"vocab_size={vocab_size}: too small (at least 8).")
    n, p, r = num_examples, num_kv_pairs, layout.updates
    half = vocab_size // 2
    if vocabulary == "shared" and 2 * p + r > vocab_size - 1:
        raise TaskError(f"vocab_size={vocab_size}: too small for {p} keys and {p + r} values, all distinct, from "
                        f"the shared pool [1, {vocab_size}) (needs vocab_size >= {2 * p + r + 1}).")
    if vocabulary == "split" and (p > half - 1 or p + r > vocab_size - half):
        raise TaskError(f"vocab_size={vocab_size}: too small for {p} distinct keys from [1, {half}) and {p + r} "
                        f"distinct values from [{half}, {vocab_size}) (needs vocab_size >= "
                        f"{max(2 * p + 2, 2 * (p + r) - 1)}).")
    rng = np.random.default_rng(seed)
    if vocabulary == "shared":       # one draw of P + (P + R) distinct tokens: keys first, then every value
        drawn = _subsets(rng, n, 1, vocab_size, 2 * p + r)
        keys, values = drawn[:, :p], drawn[:, p:]
    else:
        keys = _subsets(rng, n, 1, half, p)
        values = _subsets(rng, n, half, vocab_size, p + r)

    if random_filler:
        inputs = _tokens_excluding(rng, (n, seq_len), 1, vocab_size, np.sort(keys, axis=1))
    else:
        inputs = np.full((n, seq_len), SEPARATOR, np.int64)
    labels = np.full((n, seq_len), IGNORE, np.int64)
    rows = np.arange(n)[:, None]

    latest = values[:, :p].copy()
    if variant == "block":
        starts = np.arange(p) * (block_gap + 2)
        inputs[:, :layout.context] = SEPARATOR
        inputs[rows, starts] = keys
        inputs[rows, starts + layout.bind_offset] = values[:, :p]
    else:
        inputs[:, 0:2 * p:2], inputs[:, 1:2 * p:2] = keys, values[:, :p]
    if r:
        if variant == "forget":                                        # every key once, in a random order
            which = rng.permuted(np.tile(np.arange(p), (n, 1)), axis=1)
        else:                                                          # the key rebound by update u
            which = rng.integers(0, p, size=(n, r))
        inputs[:, 2 * p::2][:, :r] = np.take_along_axis(keys, which, 1)
        inputs[:, 2 * p + 1::2][:, :r] = values[:, p:]
        hit = which[:, :, None] == np.arange(p)                        # [N, R, P]
        last = np.where(hit, np.arange(r)[None, :, None], -1).max(axis=1)
        latest = np.where(last >= 0, np.take_along_axis(values[:, p:], np.maximum(last, 0), 1), latest)

    space = (seq_len - layout.context) // 2
    slots = _power_law_slots(rng, n, space, p, power_a)                # slot of the i-th key's query
    positions = layout.context + 2 * slots
    inputs[rows, positions] = keys
    labels[rows, positions] = latest
    return inputs.astype(np.int32), labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# the learned-recall study
# ----------------------------------------------------------------------------------------------------

KEY_TOKEN, BLANK_TOKEN, FIRST_VALUE_TOKEN = 0, 1, 2


def recall_vocab_size(num_values: int) -> int:
    return num_values + FIRST_VALUE_TOKEN


def recall(num_examples: int, seq_len: int, num_kv_pairs: int, key_dim: int, num_values: int, seed: int, *,
           collision_fraction: float = 0.0, collision_overlap: float = 0.0) -> dict[str, np.ndarray]:
    """Key-value recall with random key *vectors* (so that their overlap is a knob) and value *tokens*.

    Returns ``{"tokens": int32 [N, L], "vectors": float32 [N, L, key_dim], "labels": int32 [N, L]}``.
    The model's input is ``embed(tokens) + W vectors``. Layout: ``P`` pairs ``(key, value)`` (a key
    position has token `KEY_TOKEN` and the key vector; a value position the value's token
    ``FIRST_VALUE_TOKEN + j``, ``j < num_values`` uniform, and a zero vector), blanks (`BLANK_TOKEN`,
    zero vector), then the last ``P`` positions query every key once in random order (token `KEY_TOKEN`
    and the key vector; label: its value token). Longer ``seq_len`` means a longer wait before recall.

    Keys are i.i.d. uniform unit vectors. Collisions: ``round(collision_fraction * P / 2)`` disjoint
    pairs of keys (random members of the example) are made to overlap exactly,
    ``k_b = rho k_a + sqrt(1 - rho^2) z`` with ``z`` a unit vector orthogonal to ``k_a`` and
    ``rho = collision_overlap``.
    """
    if seq_len < 3 * num_kv_pairs:
        raise TaskError(f"seq_len={seq_len}: needs at least 3 * num_kv_pairs = {3 * num_kv_pairs}.")
    if not 0.0 <= collision_fraction <= 1.0 or not -1.0 < collision_overlap < 1.0:
        raise TaskError(f"collision_fraction={collision_fraction} must be in [0, 1] and collision_overlap="
                        f"{collision_overlap} in (-1, 1).")
    if key_dim < 2:
        raise TaskError(f"key_dim={key_dim}: must be at least 2.")
    rng = np.random.default_rng(seed)
    n, p = num_examples, num_kv_pairs
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
    keys = unit(rng.normal(size=(n, p, key_dim)))
    collisions = int(round(collision_fraction * p / 2))
    if collisions:
        members = np.argsort(rng.random((n, p)), axis=1)[:, :2 * collisions]
        a_idx, b_idx = members[:, 0::2], members[:, 1::2]
        k_a = np.take_along_axis(keys, a_idx[..., None], 1)
        z = rng.normal(size=k_a.shape)
        z = unit(z - np.sum(z * k_a, -1, keepdims=True) * k_a)
        k_b = collision_overlap * k_a + math.sqrt(1 - collision_overlap ** 2) * z
        np.put_along_axis(keys, b_idx[..., None], k_b, 1)
    values = rng.integers(0, num_values, size=(n, p))
    order = np.argsort(rng.random((n, p)), axis=1)                     # query order

    tokens = np.full((n, seq_len), BLANK_TOKEN, np.int64)
    vectors = np.zeros((n, seq_len, key_dim), np.float32)
    labels = np.full((n, seq_len), IGNORE, np.int64)
    tokens[:, 0:2 * p:2] = KEY_TOKEN
    tokens[:, 1:2 * p:2] = values + FIRST_VALUE_TOKEN
    vectors[:, 0:2 * p:2] = keys
    q0 = seq_len - p
    tokens[:, q0:] = KEY_TOKEN
    vectors[:, q0:] = np.take_along_axis(keys, order[..., None], 1)
    labels[:, q0:] = np.take_along_axis(values, order, 1) + FIRST_VALUE_TOKEN
    return {"tokens": tokens.astype(np.int32), "vectors": vectors, "labels": labels.astype(np.int32)}


# ----------------------------------------------------------------------------------------------------
# batching helpers
# ----------------------------------------------------------------------------------------------------

def pad_to(data: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Right-pad every ``[N, L, ...]`` array to ``seq_len`` (labels with ``IGNORE``, tokens with 0, vectors
    with 0). Padding at the end changes nothing before it in a causal model."""
    out = {}
    for name, x in data.items():
        extra = seq_len - x.shape[1]
        if extra < 0:
            raise TaskError(f"pad_to: {name} has length {x.shape[1]} > {seq_len}.")
        fill = IGNORE if name == "labels" else 0
        out[name] = np.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return out


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack datasets of possibly different lengths, right-padded to the longest."""
    length = max(part["labels"].shape[1] for part in parts)
    padded = [pad_to(part, length) for part in parts]
    return {name: np.concatenate([part[name] for part in padded]) for name in padded[0]}


# ----------------------------------------------------------------------------------------------------
# packing: examples laid end to end into rows
# ----------------------------------------------------------------------------------------------------

def pack_rows(lengths, max_len: int, seed: int) -> list[list[int]]:
    """Which examples share a row: the examples (of ``lengths`` tokens each) in the order of a permutation
    drawn from ``seed``, each put into the open row with the *least* room that still holds it (best fit), a
    new row when none does. Returns the rows, each the list of its examples in the order they are laid
    out. Every example is in exactly one row; no row holds more than ``max_len`` tokens.

    A pure function of ``(lengths, max_len, seed)``: the layout of a training set follows from its shapes
    alone, before its tokens are drawn. The open rows are kept by their room left (at most ``max_len``
    distinct values, a handful for MQAR's lengths), so each example costs a look over those values only."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not len(lengths):
        raise TaskError(f"pack_rows: lengths of shape {lengths.shape}; accepted: a non-empty 1-D array of the "
                        "examples' lengths.")
    bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
    if len(bad):
        raise TaskError(f"pack_rows: example {int(bad[0])} has length {int(lengths[bad[0]])}; accepted: lengths "
                        f"in [1, max_len = {max_len}] (an example longer than a row cannot be packed).")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}       # room left -> the open rows with that room (room > 0)
    for i in np.random.default_rng(seed).permutation(len(lengths)):
        length = int(lengths[i])
        fitting = [room for room, open_rows in by_room.items() if room >= length and open_rows]
        if fitting:
            room = min(fitting)
            row = by_room[room].pop()
        else:
            room, row = max_len, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if room > length:
            by_room.setdefault(room - length, []).append(row)
    return rows


def pack(data: dict[str, np.ndarray], lengths, rows: list[list[int]], max_len: int) -> dict[str, np.ndarray]:
    """The examples of ``data`` (``[N, L, ...]``, example ``i`` in its first ``lengths[i]`` positions, as
    `concatenate` pads them) laid end to end into ``rows`` (`pack_rows`) of ``max_len`` positions.

    Returns every array of ``data`` as ``[R, max_len, ...]`` (a row's tail after its last example: token 0,
    label ``IGNORE``, vector 0) and ``cu_seqlens`` int32 ``[R, S + 1]`` (``S``: the most examples in a
    row): row ``r``'s ``j``-th example occupies ``cu[r, j] <= t < cu[r, j + 1]``; the last example of a row
    runs to ``max_len`` (its tail is padding after it, which a causal model does not read back), and the
    unused entries repeat ``max_len`` (empty sequences). The convention of `filters.packed`, per row."""
    lengths = np.asarray(lengths)
    width = max(len(r) for r in rows)
    example_row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    cu = np.full((len(rows), width + 1), max_len, np.int32)
    for r, members in enumerate(rows):
        starts = np.concatenate([[0], np.cumsum(lengths[members])[:-1]])
        if starts[-1] + lengths[members[-1]] > max_len:
            raise TaskError(f"pack: row {r} holds {int(starts[-1] + lengths[members[-1]])} tokens > max_len = "
                            f"{max_len}.")
        example_row[members], offset[members] = r, starts
        cu[r, :len(members)] = starts
    if sorted(i for members in rows for i in members) != list(range(len(lengths))):
        raise TaskError(f"pack: the rows do not hold each of the {len(lengths)} examples exactly once.")
    out = {}
    for name, x in data.items():
        fill = IGNORE if name == "labels" else 0
        packed = np.full((len(rows), max_len) + x.shape[2:], fill, x.dtype)
        for length in np.unique(lengths):            # one scatter per distinct length
            which = np.flatnonzero(lengths == length)
            steps = np.arange(length)
            packed[example_row[which, None], offset[which, None] + steps] = x[which, :length]
        out[name] = packed
    out["cu_seqlens"] = cu
    return out
