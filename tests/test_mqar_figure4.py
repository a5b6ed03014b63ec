"""The paper's MQAR figure: its config (the shared vocabulary in every panel, the figure's models, the sweep
protocol's learning rates and seeds), the choice of the learning rate over seeds, and the three-panel
report, end to end on tiny CPU runs (the smoke setting)."""
import os

import numpy as np
import pytest

from configs import mqar_figure4 as figure_config
from experiments import models, mqar, mqar_figure4 as figure, training
from tests.support import smoke_config


def _smoke(**overrides):
    return smoke_config(figure_config, **overrides)


def test_the_config_is_the_figure_s():
    config = figure_config.get_config()
    figure.check(config)
    assert config.variants == ("base", "update", "block") and config.vocabulary == "shared"
    for name in ("bayesian", "bayesian_no_conv", "gated_deltanet", "gated_deltanet_no_conv", "mamba2", "deltanet",
                 "linear_attention", "attention"):
        assert name in config.models
    np.testing.assert_allclose(config.learning_rates, np.logspace(-4, -2, 4), rtol=0.025)   # 2 digits
    assert len(config.seeds) == 3
    with pytest.raises(ValueError, match=r"config.seeds=\(0, 0\): a seed given twice; accepted: distinct integers >= 0"):
        figure.check(_smoke(seeds=(0, 0)))
    with pytest.raises(ValueError, match=r"config.variants: \['shared'\] are not panels of the figure"):
        figure.check(_smoke(variants=("base", "shared")))


def _record(variant, model, d_model, lr, seed, accuracy, diverged=False):
    description = {"experiment": "mqar", "variant": variant, "model": model, "d_model": d_model,
                   "learning_rate": lr, "seq_len": 32, "num_kv_pairs": 2}
    record = {"description": description, "seed": seed, "settings": {"seed": seed}, "num_params": 1, "steps": 1,
              "final_train": {}, "throughput": {}, "run_dir": f"seed{seed}/x"}
    if diverged:
        return {**record, "status": "diverged", "eval": {}}
    return {**record, "status": "finished",
            "eval": {"L32_P2": {"accuracy": accuracy}, "L64_P4": {"accuracy": accuracy / 2}}}


def test_the_learning_rate_is_chosen_by_the_mean_over_seeds():
    """The best mean over the seeds wins, not the best single seed; a diverged seed counts as 0."""
    records = [_record("base", "attention", 16, 1e-3, s, a) for s, a in enumerate((0.9, 0.9, 0.9))]
    records += [_record("base", "attention", 16, 1e-2, s, a) for s, a in enumerate((1.0, 1.0, 0.5))]   # one lucky
    records += [_record("base", "attention", 16, 3e-2, 0, 1.0), _record("base", "attention", 16, 3e-2, 1, 0,
                                                                         diverged=True)]
    (key, (lr, runs)), = figure.cells(records).items()
    assert key == ("base", 32, 2, "attention", 16) and lr == 1e-3 and [r["seed"] for r in runs] == [0, 1, 2]
    text = figure.table(records)
    assert "| (a) MQAR | (32, 2) | attention | 16 | 1.0e-03 | 0.900 +- 0.000 | 0: 0.900, 1: 0.900, 2: 0.900 | " \
           "L64 P4: 0.450 |" in text
    only_diverging = [_record("block", "bayesian_no_conv", 16, 1e-2, 0, 0, diverged=True),
                      _record("block", "bayesian_no_conv", 16, 1e-2, 1, 0.4)]
    assert "| 0.200 +- 0.283 | 0: diverged, 1: 0.400 |" in figure.table(only_diverging)


def test_the_learning_rate_is_chosen_on_the_validation_split_not_on_the_reported_test():
    """A rate that is best on the test set but not on the validation split is not chosen; the table reports
    the test accuracy at the chosen rate and lists no validation column among the shapes beyond training."""
    def with_valid(record, valid):
        return {**record, "eval": {**record["eval"], mqar.VALID: {"accuracy": valid}}}
    records = [with_valid(_record("update", "mamba2", 32, 1e-3, s, 0.6), 0.8) for s in (0, 1)]
    records += [with_valid(_record("update", "mamba2", 32, 1e-2, s, 0.9), 0.7) for s in (0, 1)]   # best on test
    (key, (lr, runs)), = figure.cells(records).items()
    assert lr == 1e-3 and [r["seed"] for r in runs] == [0, 1]
    text = figure.table(records)
    assert "| (b) Update-MQAR | (32, 2) | mamba2 | 32 | 1.0e-03 | 0.600 +- 0.000 | 0: 0.600, 1: 0.600 | L64 P4: 0.300 |" \
        in text


def test_the_figure_colours_a_convolution_free_form_as_its_partner():
    assert figure.color("gated_deltanet_no_conv") == figure.color("gated_deltanet")
    assert figure.color("bayesian_no_conv") == figure.color("bayesian") != figure.color("gated_deltanet")
    assert len({figure.color(m) for m in figure_config.get_config().models if not m.endswith(models.NO_CONV)}) == 6


def test_smoke_end_to_end(tmp_path):
    """Every panel, two seeds, on tiny CPU runs: the runs of each seed in their own folders, with the shared
    vocabulary recorded; the report with the three panels, one row per cell with both seeds."""
    config = _smoke(models=("bayesian_no_conv",))
    figure.check(config)
    figure.main(config, str(tmp_path))
    for seed in (0, 1):
        finished = sorted(tmp_path.glob(f"runs/*/bayesian_no_conv/L32_P2/*_seed{seed}/results.json"))
        assert [p.parts[-5] for p in finished] == ["base", "block", "update"]
    records = figure.collect(str(tmp_path))
    assert len(records) == 6 and sorted({r["seed"] for r in records}) == [0, 1]
    assert {r["description"]["task"]["vocabulary"] for r in records} == {"shared"}
    assert {r["description"]["layer_options"]["conv_size"] for r in records} == {0}
    assert sorted({r["settings"]["seed"] for r in records}) == [0, 1]
    rows = training.read_csv(str(tmp_path / figure.CSV))
    assert len(rows) == 6 and sorted({row["seed"] for row in rows}) == ["0", "1"]
    text = (tmp_path / figure.TABLE).read_text()
    for panel in ("(a) MQAR", "(b) Update-MQAR", "(c) Block-MQAR"):
        assert f"| {panel} | (32, 2) | bayesian_no_conv | 16 | 3.0e-03 |" in text
    assert text.count(" 0: ") == 3 and text.count(", 1: ") == 3              # both seeds in every cell
    assert os.path.getsize(tmp_path / figure.FIGURE) > 0
    # finished runs are skipped; another seed's runs would be trained in a folder of their own
    assert [r["eval"] for r in figure.collect(str(tmp_path))] == [r["eval"] for r in records]
    assert mqar.run_dir(str(tmp_path), "base", "bayesian_no_conv", "L32_P2", 16, 3e-3, 1) in [
        run.folder for run in figure.runs(config, str(tmp_path))]


def test_the_figure_is_laid_out_as_the_paper_s_with_error_bars_over_seeds():
    """Panels (a), (b), (c) side by side in that order; in each a line per model against d_model at the chosen
    learning rate, through the mean over the seeds, with an error bar from the lowest to the highest seed; a
    convolution-free form dashed in its partner's colour."""
    import matplotlib.pyplot as plt

    accuracies = {("attention", 16): (0.5, 0.7, 0.9), ("attention", 32): (1.0, 1.0, 1.0),
                  ("bayesian_no_conv", 16): (0.1, 0.2, 0.6), ("bayesian", 16): (0.4, 0.4, 0.4)}
    records = [_record(variant, model, d, 1e-3, seed, acc) for variant in ("block", "base", "update")
               for (model, d), accs in accuracies.items() for seed, acc in enumerate(accs)]
    records += [_record("base", "attention", 16, 1e-2, seed, 0.0) for seed in range(3)]      # not chosen
    fig = figure.draw(records)
    try:
        axes = fig.get_axes()
        assert [ax.get_title() for ax in axes] == ["(a) MQAR, L=32, P=2", "(b) Update-MQAR, L=32, P=2",
                                                    "(c) Block-MQAR, L=32, P=2"]
        for ax in axes:
            bars = {c.get_label(): c for c in ax.containers}
            assert sorted(bars) == ["attention", "bayesian", "bayesian_no_conv"]
            line, _, (vertical,) = bars["attention"].lines
            np.testing.assert_allclose(line.get_xdata(), [16, 32])
            np.testing.assert_allclose(line.get_ydata(), [0.7, 1.0])
            np.testing.assert_allclose([seg[:, 1] for seg in vertical.get_segments()], [[0.5, 0.9], [1.0, 1.0]])
            no_conv, with_conv = bars["bayesian_no_conv"].lines[0], bars["bayesian"].lines[0]
            np.testing.assert_allclose(no_conv.get_ydata(), [0.3])
            assert no_conv.get_linestyle() == "--" and with_conv.get_linestyle() == "-"
            assert no_conv.get_color() == with_conv.get_color()
    finally:
        plt.close(fig)
    assert figure.draw([]) is None
