"""Packed training (issue #16 item 3): the packer lays examples end to end into rows, the model run on packed
rows gives each example the logits (and the loss) it has alone in a padded row, and the MQAR sweep trains on
packed rows through the real training loop (``config.pack``)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import mqar_original as mqar_original_config
from experiments import models, mqar, tasks, training
from tests.support import smoke_config

VOCAB, MAX_LEN = 40, 16
LENGTHS = np.array([5, 12, 7, 16, 3, 9, 16, 4, 8, 8])


def _examples(lengths=LENGTHS, max_len=MAX_LEN, seed=0):
    """Random examples of ``lengths`` tokens, right-padded to ``max_len`` (token 0, label IGNORE), about half
    their positions labelled."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(len(lengths), max_len)).astype(np.int32)
    labels = np.where(rng.random(tokens.shape) < 0.5, rng.integers(0, VOCAB, size=tokens.shape), tasks.IGNORE)
    for i, length in enumerate(lengths):
        tokens[i, length:], labels[i, length:] = 0, tasks.IGNORE
    return {"tokens": tokens, "labels": labels.astype(np.int32)}


def _spans(rows, lengths):
    """``(row, start, example)`` of every example in the packed rows."""
    out = []
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            out.append((r, start, i))
            start += int(lengths[i])
    return out


# ----------------------------------------------------------------------------------------------------
# the packer
# ----------------------------------------------------------------------------------------------------

def test_pack_rows_hold_every_example_once_within_max_len():
    rng = np.random.default_rng(3)
    lengths = rng.choice([64, 128, 256, 100, 7], size=500)
    rows = tasks.pack_rows(lengths, 256, seed=5)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(sum(lengths[row]) for row in rows) <= 256
    # best fit in fewer rows than one example per row, and a pure function of (lengths, max_len, seed)
    assert len(rows) < len(lengths) and sum(lengths) / (256 * len(rows)) > 0.9
    assert tasks.pack_rows(lengths, 256, seed=5) == rows
    assert tasks.pack_rows(lengths, 256, seed=6) != rows


def test_pack_lays_out_tokens_labels_and_cu_seqlens():
    data = _examples()
    rows = tasks.pack_rows(LENGTHS, MAX_LEN, seed=1)
    packed = tasks.pack(data, LENGTHS, rows, MAX_LEN)
    cu = packed["cu_seqlens"]
    assert packed["tokens"].shape == packed["labels"].shape == (len(rows), MAX_LEN)
    assert cu.shape == (len(rows), max(len(r) for r in rows) + 1) and cu.dtype == np.int32
    for r, members in enumerate(rows):
        # valid per row (filters.packed's convention): starts at 0, non-decreasing, ends at the row's length;
        # the last example runs to max_len, the unused entries repeat it
        assert cu[r, 0] == 0 and np.all(np.diff(cu[r]) >= 0) and cu[r, -1] == MAX_LEN
        assert list(cu[r, :len(members)]) == list(np.concatenate([[0], np.cumsum(LENGTHS[members])[:-1]]))
        assert np.all(cu[r, len(members):] == MAX_LEN)
        used = int(sum(LENGTHS[members]))
        assert np.all(packed["tokens"][r, used:] == 0) and np.all(packed["labels"][r, used:] == tasks.IGNORE)
    for r, start, i in _spans(rows, LENGTHS):
        length = LENGTHS[i]
        np.testing.assert_array_equal(packed["tokens"][r, start:start + length], data["tokens"][i, :length])
        np.testing.assert_array_equal(packed["labels"][r, start:start + length], data["labels"][i, :length])
    assert (packed["labels"] != tasks.IGNORE).sum() == (data["labels"] != tasks.IGNORE).sum()


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(tasks.TaskError, match=r"example 1 has length 20.*max_len = 16"):
        tasks.pack_rows([4, 20], MAX_LEN, seed=0)


# ----------------------------------------------------------------------------------------------------
# the model: packed rows give each example its padded logits and loss
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,backend", [("gated_deltanet", "sequential"), ("attention", "sequential"),
                                          ("bayesian", "sequential")])
def test_packed_logits_and_loss_equal_each_example_padded(name, backend):
    """gated_deltanet and bayesian: design layers with their convolution (additive and exact family);
    attention: the block-diagonal causal mask and restarted positions. Without the boundaries a later
    example of a row would read the one before it. The sequential lowering keeps the test fast; that
    every lowering resets at the boundaries is tests/test_packed.py's."""
    data = _examples()
    rows = tasks.pack_rows(LENGTHS, MAX_LEN, seed=1)
    assert any(len(r) > 1 for r in rows)           # some row holds several examples
    packed = tasks.pack(data, LENGTHS, rows, MAX_LEN)
    model = models.LanguageModel(name, VOCAB, 16, head_dim=8, backend=backend)
    params = model.init(jax.random.PRNGKey(0), data["tokens"][:1])
    apply = jax.jit(lambda p, t, c=None: model.apply(p, t, cu_seqlens=c))
    padded_logits = np.asarray(apply(params, data["tokens"]))
    packed_logits = np.asarray(apply(params, packed["tokens"], packed["cu_seqlens"]))
    for r, start, i in _spans(rows, LENGTHS):
        np.testing.assert_allclose(packed_logits[r, start:start + LENGTHS[i]], padded_logits[i, :LENGTHS[i]],
                                   rtol=1e-5, atol=1e-5, err_msg=f"example {i} (row {r}, from step {start})")
    # the training step's loss path (supervised positions only, the batch's cu_seqlens passed on)
    sums = {}
    for form, batch in (("padded", data), ("packed", packed)):
        supervised = training.supervised_count(batch["labels"])
        _, metrics = jax.jit(lambda p, b: training.loss_and_metrics(
            *training.logits_and_labels(model, p, b, supervised)))(params, batch)
        sums[form] = {k: float(metrics[k]) for k in ("nll_sum", "correct", "count")}
    assert sums["packed"]["count"] == sums["padded"]["count"] > 0
    assert sums["packed"]["correct"] == sums["padded"]["correct"]
    np.testing.assert_allclose(sums["packed"]["nll_sum"], sums["padded"]["nll_sum"], rtol=1e-5)


def test_packing_refuses_cu_seqlens_that_are_not_one_per_row():
    with pytest.raises(ValueError, match=r"cu_seqlens: got shape \(5,\); accepted: \[B, S \+ 1\]"):
        models.packing(np.array([0, 4, 8, 12, 16]), MAX_LEN)


def test_rows_per_step_is_a_multiple_of_eight_near_batch_size_examples():
    config = smoke_config(mqar_original_config, batch_size=256)
    train_set = mqar.TrainingSet(mqar.MIXED, ((64, 4, 100_000), (256, 16, 80_000)))   # 105,000 rows
    assert mqar.rows_per_step(config, train_set, 105_000) == 152              # 149.3 examples' rows
    assert mqar.rows_per_step(config, train_set, 1_000) == 8                  # at least one multiple


# ----------------------------------------------------------------------------------------------------
# the sweep: config.pack through the real training loop
# ----------------------------------------------------------------------------------------------------

def test_mqar_pack_trains_through_the_loop_and_records_its_rows(tmp_path):
    # 64 examples of 16 and 32 tokens fill 48 rows of 32: a step of 32 examples on average is 24 rows
    config = smoke_config(mqar_original_config, models=("gated_deltanet",), pack=True, batch_size=32)
    train_set, = mqar.training_sets(config)
    train, evals = mqar.datasets(config, "base", train_set)
    rows = mqar.packed_rows(config, train_set)
    assert train["cu_seqlens"].shape[0] == len(rows) < sum(n for _, _, n in train_set.parts)
    assert all("cu_seqlens" not in data for data in evals.values())        # evaluation stays padded
    step_rows = mqar.rows_per_step(config, train_set, len(rows))
    assert len(rows) == 48 and step_rows == 24

    record, = mqar.run(config, str(tmp_path))
    assert record["status"] == "finished" and set(record["eval"]) == {"valid", "L16_P2", "L32_P8"}
    folder = record["run_dir"]
    for name in ("run.json", "results.json", "metrics.csv", "eval.csv"):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    with open(os.path.join(folder, "run.json")) as f:
        identity = json.load(f)
    assert identity["settings"]["batch_size"] == step_rows
    assert identity["train_shape"] == [len(rows), train_set.seq_len]
    assert identity["description"]["pack"] == {"rows": len(rows), "rows_per_step": step_rows,
                                               "examples_per_step": config.batch_size,
                                               "max_examples_per_row": max(len(r) for r in rows)}
    assert len(training.read_csv(os.path.join(folder, "metrics.csv"))) == config.num_steps // config.log_every
    # the padded run of the same grid point has another identity: its folder is refused, not reused
    padded = smoke_config(mqar_original_config, models=("gated_deltanet",), pack=False, batch_size=32)
    with pytest.raises(Exception, match="pack"):
        mqar.run(padded, str(tmp_path))

