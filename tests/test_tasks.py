"""The recall tasks: every supervised label is the value bound to its query key (checked by an independent
scan of each sequence), the layouts of the variants, determinism, and clear errors."""
import numpy as np
import pytest

from experiments import tasks

V, L, P = 64, 64, 4
VARIANTS = tasks.MQAR_VARIANTS


def _binding_offset(variant, gap=6):
    return gap + 1 if variant == "block" else 1


def _check_labels_bound_to_keys(inputs, labels, variant, pairs, gap=6):
    """Independent of the generator: for each supervised position ``p``, the key ``x[p]`` must occur
    before ``p``, and the label must be the token ``offset`` positions after its latest occurrence."""
    offset = _binding_offset(variant, gap)
    for x, y in zip(inputs, labels):
        positions = np.flatnonzero(y != tasks.IGNORE)
        assert len(positions) == pairs
        assert len(set(x[positions])) == pairs            # every key is queried once
        for p in positions:
            earlier = np.flatnonzero(x[:p] == x[p])
            assert len(earlier), "a query key that never occurred before"
            assert y[p] == x[earlier[-1] + offset]


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_are_the_values_bound_to_the_query_keys(variant):
    seq_len = 96 if variant in ("update", "forget", "block") else L
    inputs, labels = tasks.mqar(V, seq_len, P, 200, seed=3, variant=variant)
    assert inputs.shape == labels.shape == (200, seq_len)
    assert inputs.dtype == labels.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < V
    _check_labels_bound_to_keys(inputs, labels, variant, P)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_from_the_seed(variant):
    a = tasks.mqar(V, 96, P, 50, seed=7, variant=variant)
    b = tasks.mqar(V, 96, P, 50, seed=7, variant=variant)
    c = tasks.mqar(V, 96, P, 50, seed=8, variant=variant)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_base_layout_is_zoology_s():
    inputs, labels = tasks.mqar(V, L, P, 300, seed=0)
    keys, values = inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2]
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all(values >= V // 2)
    assert all(len(set(row)) == P for row in keys) and all(len(set(row)) == P for row in values)
    assert np.all(labels[:, :2 * P] == tasks.IGNORE)                 # nothing supervised in the context
    supervised = np.argwhere(labels != tasks.IGNORE)
    assert np.all((supervised[:, 1] - 2 * P) % 2 == 0)               # queries at even offsets
    # fillers: never token 0, never a key of the example
    for x, k, y in zip(inputs, keys, labels):
        filler = x[2 * P:][y[2 * P:] == tasks.IGNORE]
        assert np.all(filler != 0) and not np.isin(filler, k).any()


def test_query_slots_follow_zoology_s_sequential_power_law_draws():
    """The i-th key's query slot is the i-th draw without replacement of p(s) ~ (s + 1)^(a - 1), as
    numpy's sequential ``choice`` (Zoology) draws it: compare the mean slot of each draw."""
    n, power_a = 3000, 0.01
    space = (L - 2 * P) // 2
    inputs, labels = tasks.mqar(V, L, P, n, seed=11, power_a=power_a)
    keys = inputs[:, 0:2 * P:2]
    slots = np.empty((n, P))
    for i, (x, k) in enumerate(zip(inputs, keys)):
        for j in range(P):
            slots[i, j] = (np.flatnonzero(x[2 * P:] == k[j])[0]) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    rng = np.random.default_rng(0)
    reference = np.array([rng.choice(space, size=P, replace=False, p=p / p.sum()) for _ in range(n)])
    np.testing.assert_allclose(slots.mean(0), reference.mean(0), atol=0.8)
    assert slots.mean() < (space - 1) / 2 - 3            # early slots dominate


def test_power_law_one_is_uniform_and_zero_filler():
    inputs, labels = tasks.mqar(V, L, P, 2000, seed=1, power_a=1.0, random_filler=False)
    offsets = (np.argwhere(labels != tasks.IGNORE)[:, 1] - 2 * P) // 2
    space = (L - 2 * P) // 2
    assert abs(np.mean(offsets) - (space - 1) / 2) < 0.5
    assert np.all(inputs[:, 2 * P:][labels[:, 2 * P:] == tasks.IGNORE] == 0)


def test_shared_vocabulary():
    inputs, _ = tasks.mqar(V, L, P, 500, seed=2, variant="shared")
    keys, values = inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2]
    both = np.concatenate([keys, values], 1)
    assert all(len(set(row)) == 2 * P for row in both)               # 2P distinct tokens per example
    for tokens in (keys, values):                                    # both roles use both halves
        assert np.mean(tokens < V // 2) > 0.3 and np.mean(tokens >= V // 2) > 0.3


# sha256 of (inputs, labels) of `tasks.mqar(64, 96, 4, 50, seed=17, variant, **options)`, made by the generator
# of commit f23f4cf (numpy 2.4), before the vocabulary became an option: the committed results were trained on
# data made this way, so the default (split) data of every variant, and the "shared" variant's, must not change.
UNCHANGED_DATA = {
    ("base", ()): "fb1a11b31a6c4337",
    ("shared", ()): "bfb523e55a20bb42",
    ("update", ()): "9e77fb173ba8e098",
    ("block", ()): "f44db4b3cb84b670",
    ("base", (("power_a", 0.5), ("random_filler", False))): "ee8d9390e606b730",
    ("update", (("num_updates", 3),)): "c8cc5e913fabeabd",
    ("block", (("block_gap", 5),)): "2d75484a79bc681e",
}


def _digest(inputs, labels) -> str:
    import hashlib
    return hashlib.sha256(inputs.tobytes() + labels.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("variant, options", list(UNCHANGED_DATA))
def test_the_data_of_the_committed_results_is_unchanged(variant, options):
    options = dict(options)
    default = tasks.mqar(V, 96, P, 50, seed=17, variant=variant, **options)
    assert _digest(*default) == UNCHANGED_DATA[variant, tuple(options.items())]
    explicit = tasks.mqar(V, 96, P, 50, seed=17, variant=variant, vocabulary=tasks.mqar_vocabulary(variant),
                          **options)
    np.testing.assert_array_equal(explicit[0], default[0])
    np.testing.assert_array_equal(explicit[1], default[1])


def test_the_shared_variant_is_base_with_the_shared_vocabulary():
    a = tasks.mqar(V, L, P, 100, seed=9, variant="shared")
    b = tasks.mqar(V, L, P, 100, seed=9, variant="base", vocabulary="shared")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _keys_and_values(inputs, variant, pairs, updates=0, gap=6):
    """The key and value tokens of each example's context, read off by position."""
    if variant == "block":
        starts = np.arange(pairs) * (gap + 2)
        return inputs[:, starts], inputs[:, starts + gap + 1]
    context = 2 * (pairs + updates)
    return inputs[:, 0:2 * pairs:2], inputs[:, 1:context:2]


@pytest.mark.parametrize("variant", ["base", "update", "block"])
def test_shared_vocabulary_keys_and_values_come_from_one_pool(variant):
    """With ``vocabulary="shared"`` the keys and values of an example are distinct tokens of one pool
    ``[1, V)``: across examples every token of the pool is both a key and a value, and keys and values have
    the same (uniform) distribution, so only a token's position gives its role. The labels stay bound."""
    n, seq_len, updates = 4000, 96, (P if variant == "update" else 0)
    inputs, labels = tasks.mqar(V, seq_len, P, n, seed=12, variant=variant, vocabulary="shared")
    _check_labels_bound_to_keys(inputs[:300], labels[:300], variant, P)
    keys, values = _keys_and_values(inputs, variant, P, updates)
    both = np.concatenate([keys, values], 1)
    assert all(len(set(row)) == P + P + updates for row in both)      # distinct within an example
    assert both.min() >= 1 and both.max() < V
    pool = np.arange(1, V)
    key_counts, value_counts = (np.bincount(t.ravel(), minlength=V)[1:] for t in (keys, values))
    assert np.all(key_counts > 0) and np.all(value_counts > 0)        # every token plays both roles
    for counts in (key_counts, value_counts):                          # uniform over the pool: chi-square test
        expected = counts.sum() / len(pool)
        chi2 = np.sum((counts - expected) ** 2 / expected)
        assert chi2 < len(pool) + 5 * np.sqrt(2 * len(pool)), chi2     # mean df = 62, sd ~ 11
    # the split vocabulary of the same variant keeps the halves apart (the option changes something)
    split = tasks.mqar(V, seq_len, P, 200, seed=12, variant=variant, vocabulary="split")[0]
    split_keys, split_values = _keys_and_values(split, variant, P, updates)
    assert split_keys.max() < V // 2 <= split_values.min()


def test_vocabulary_errors_are_clear():
    with pytest.raises(tasks.TaskError, match="vocabulary='halves': unknown; accepted: split, shared"):
        tasks.mqar(V, L, P, 4, 0, vocabulary="halves")
    with pytest.raises(tasks.TaskError, match="variant='shared' is base MQAR with the shared vocabulary"):
        tasks.mqar(V, L, P, 4, 0, variant="shared", vocabulary="split")
    with pytest.raises(tasks.TaskError, match=r"vocab_size=8: too small for 4 keys and 8 values, all distinct, "
                                              r"from the shared pool \[1, 8\) \(needs vocab_size >= 13\)"):
        tasks.mqar(8, 96, P, 4, 0, variant="update", vocabulary="shared")
    with pytest.raises(tasks.TaskError, match=r"vocab_size=8: too small for 4 distinct keys from \[1, 4\) and 8 "
                                              r"distinct values from \[4, 8\) \(needs vocab_size >= 15\)"):
        tasks.mqar(8, 96, P, 4, 0, variant="update")


@pytest.mark.parametrize("vocabulary", tasks.VOCABULARIES)
def test_update_rebinds_to_new_values_and_labels_the_latest(vocabulary):
    pairs, seq_len = 6, 96
    inputs, labels = tasks.mqar(V, seq_len, pairs, 300, seed=4, variant="update", num_updates=5,
                                vocabulary=vocabulary)
    context = 2 * (pairs + 5)
    changed = 0
    for x, y in zip(inputs, labels):
        bound = {}
        for t in range(0, context, 2):
            k, v = x[t], x[t + 1]
            if k in bound:
                assert v not in bound[k], "a rebinding repeats an old value"
            bound.setdefault(k, []).append(v)
        assert len(bound) == pairs
        for p in np.flatnonzero(y != tasks.IGNORE):
            assert y[p] == bound[x[p]][-1]
            changed += len(bound[x[p]]) > 1
    assert changed > 300                           # many queries ask a rebound key


@pytest.mark.parametrize("vocabulary", tasks.VOCABULARIES)
def test_forget_rewrites_every_key_once_and_labels_the_new_value(vocabulary):
    """Zoology's forgetting layout: the second block of pairs is the first block's keys in another order,
    each with a new value; every key is queried, and every label is its key's second value."""
    pairs, seq_len = 6, 96
    inputs, labels = tasks.mqar(V, seq_len, pairs, 300, seed=4, variant="forget", vocabulary=vocabulary)
    orders = set()
    for x, y in zip(inputs, labels):
        first, second = x[0:2 * pairs], x[2 * pairs:4 * pairs]
        assert sorted(second[0::2]) == sorted(first[0::2])                      # the same keys, once each
        assert len(set(first[1::2]) | set(second[1::2])) == 2 * pairs          # all values new
        orders.add(tuple(second[0::2]) == tuple(first[0::2]))
        new = dict(zip(second[0::2], second[1::2]))
        queried = np.flatnonzero(y != tasks.IGNORE)
        assert sorted(x[queried]) == sorted(first[0::2])                        # every key queried
        assert all(y[t] == new[x[t]] for t in queried)
    assert orders == {False} or orders == {False, True}                         # rewritten in random orders
    assert tasks.mqar_layout(96, pairs, "forget") == tasks.mqar_layout(96, pairs, "update")
    with pytest.raises(tasks.TaskError, match="forget variant rewrites each of the 6 keys once .*accepted: None or 6"):
        tasks.mqar(V, seq_len, pairs, 4, 0, variant="forget", num_updates=3)


def test_block_separates_keys_from_values_beyond_the_convolutions():
    gap = 6
    inputs, labels = tasks.mqar(V, 96, P, 100, seed=5, variant="block", block_gap=gap)
    span = gap + 2
    for i in range(P):
        assert np.all((inputs[:, i * span] >= 1) & (inputs[:, i * span] < V // 2))       # key
        assert np.all(inputs[:, i * span + 1:i * span + 1 + gap] == tasks.SEPARATOR)    # separators
        assert np.all(inputs[:, i * span + gap + 1] >= V // 2)                          # its value
    assert gap + 1 > 2 * (4 - 1)     # two stacked size-4 convolutions reach 6 positions back
    _check_labels_bound_to_keys(inputs, labels, "block", P, gap)


def test_layout_errors_are_clear():
    with pytest.raises(tasks.TaskError, match="variant='nope': unknown; accepted: base, shared, update, forget, block"):
        tasks.mqar(V, L, P, 4, 0, variant="nope")
    with pytest.raises(tasks.TaskError, match=r"seq_len=32 is too short .* \(seq_len >= 36\)"):
        tasks.mqar(V, 32, 4, 4, 0, variant="block", block_gap=5)
    with pytest.raises(tasks.TaskError, match="seq_len >= 24"):
        tasks.mqar_layout(16, 4, "update")
    assert tasks.mqar_layout(64, 4, "update") == tasks.MqarLayout(16, 1, 4)


def test_block_gap_of_one_separator_is_the_smallest_accepted():
    inputs, labels = tasks.mqar(V, 32, P, 20, seed=6, variant="block", block_gap=1)
    assert np.all(inputs[:, 1:3 * P:3] == tasks.SEPARATOR)        # k_i 0 v_i
    _check_labels_bound_to_keys(inputs, labels, "block", P, gap=1)
    with pytest.raises(tasks.TaskError, match="block_gap=0: must be at least 1 separator"):
        tasks.mqar(V, 32, P, 20, seed=6, variant="block", block_gap=0)


def test_large_sets_are_fast_enough():
    """Vectorised: Zoology's largest evaluation shape, a thousand examples."""
    import time
    start = time.perf_counter()
    inputs, labels = tasks.mqar(8192, 1024, 256, 1000, seed=0)
    assert time.perf_counter() - start < 10
    assert np.sum(labels != tasks.IGNORE) == 256 * 1000


def test_recall_task():
    n, seq_len, pairs, dim, values = 300, 40, 6, 8, 10
    # the vocabulary: the key token, the blank token and one token per value, all distinct
    assert sorted({tasks.KEY_TOKEN, tasks.BLANK_TOKEN, *range(tasks.FIRST_VALUE_TOKEN, tasks.FIRST_VALUE_TOKEN + values)}) \
        == list(range(tasks.recall_vocab_size(values)))
    data = tasks.recall(n, seq_len, pairs, dim, values, seed=0)
    tokens, vectors, labels = data["tokens"], data["vectors"], data["labels"]
    assert tokens.shape == labels.shape == (n, seq_len) and vectors.shape == (n, seq_len, dim)
    assert vectors.dtype == np.float32 and tokens.max() < tasks.recall_vocab_size(values)
    for x, vec, y in zip(tokens, vectors, labels):
        queries = np.flatnonzero(y != tasks.IGNORE)
        np.testing.assert_array_equal(queries, np.arange(seq_len - pairs, seq_len))
        for q in queries:   # the label is the token after the context position with the same key vector
            match = [t for t in range(0, 2 * pairs, 2) if np.allclose(vec[t], vec[q])]
            assert len(match) == 1 and x[match[0]] == tasks.KEY_TOKEN and y[q] == x[match[0] + 1]
        assert np.all(x[2 * pairs:seq_len - pairs] == tasks.BLANK_TOKEN)
        np.testing.assert_allclose(np.linalg.norm(vec[0:2 * pairs:2], axis=-1), 1, rtol=1e-5)


def test_recall_collisions_have_the_requested_overlap():
    pairs, rho = 8, 0.9
    data = tasks.recall(50, 32, pairs, 16, 10, seed=1, collision_fraction=0.5, collision_overlap=rho)
    keys = data["vectors"][:, 0:2 * pairs:2].astype(np.float64)
    gram = np.einsum("nik,njk->nij", keys, keys)
    close = np.abs(gram - rho) < 1e-5
    assert np.all(close.sum((1, 2)) == 2 * 2)      # round(0.5 * 8 / 2) = 2 colliding pairs, counted twice
    none = tasks.recall(50, 32, pairs, 16, 10, seed=1)["vectors"][:, 0:2 * pairs:2]
    # the default is no collision at all: the keys of collision_fraction=0 (the same draws)
    np.testing.assert_array_equal(none, tasks.recall(50, 32, pairs, 16, 10, seed=1, collision_fraction=0.0,
                                                     collision_overlap=0.5)["vectors"][:, 0:2 * pairs:2])
    assert np.max(np.abs(np.einsum("nik,njk->nij", none, none) - np.eye(pairs))) < 0.95


def test_recall_bounds_are_exact():
    """seq_len >= 3 P, collision_fraction in [0, 1], collision_overlap in (-1, 1), key_dim >= 2: each at
    its bound."""
    ok = lambda **kw: tasks.recall(**{"num_examples": 4, "seq_len": 12, "num_kv_pairs": 4, "key_dim": 2,
                                       "num_values": 5, "seed": 0, **kw})
    ok()
    ok(collision_fraction=1.0, collision_overlap=-0.999)
    ok(collision_fraction=0.0, collision_overlap=0.999)
    for bad, match in (({"seq_len": 11}, "seq_len=11: needs at least 3 \\* num_kv_pairs = 12"),
                       ({"key_dim": 1}, "key_dim=1: must be at least 2"),
                       ({"collision_fraction": 1.0 + 1e-9}, "collision_fraction"),
                       ({"collision_fraction": -1e-9}, "collision_fraction"),
                       ({"collision_overlap": 1.0}, "collision_overlap=1.0 in \\(-1, 1\\)"),
                       ({"collision_overlap": -1.0}, "collision_overlap")):
        with pytest.raises(tasks.TaskError, match=match):
            ok(**bad)


def test_concatenate_pads_on_the_right():
    a = dict(zip(("tokens", "labels"), tasks.mqar(V, 32, 2, 3, 0)))
    b = dict(zip(("tokens", "labels"), tasks.mqar(V, 48, 3, 2, 1)))
    both = tasks.concatenate([a, b])
    assert both["tokens"].shape == (5, 48)
    np.testing.assert_array_equal(both["tokens"][:3, :32], a["tokens"])
    assert np.all(both["labels"][:3, 32:] == tasks.IGNORE) and np.all(both["tokens"][:3, 32:] == 0)
