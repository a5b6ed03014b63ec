"""Small plotting helpers shared by the experiments: headless backend, one colour per model, saving."""
from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One colour per model in every figure of the project (the dynamics figures and the trained experiments'), so
# that a model is recognised across figures and a missing model does not shift the others' colours.
COLORS = {
    "attention": "black",
    "linear_attention": "tab:gray",
    "retnet": "tab:olive",
    "gla": "tab:pink",
    "mamba2": "tab:green",
    "deltanet": "tab:orange",
    "gated_deltanet": "tab:red",
    "longhorn": "tab:brown",
    "bayesian": "tab:blue",
    "bayesian_no_conv": "tab:cyan",
    "bayesian_noise": "tab:purple",
    "bayesian_no_noise": "midnightblue",
    "bayesian_key": "teal",
}
NO_CONV = "_no_conv"   # experiments.models.NO_CONV (not imported: the dynamics figures load no models)

PREDICTED = dict(linestyle="--", linewidth=1.2, alpha=0.9)   # closed forms: dashed lines
MEASURED = dict(marker="o", markersize=3.0, linestyle="none")  # measurements: markers


def color(name: str, default: str = "black") -> str:
    """The model's colour; a convolution-free form without one of its own takes its partner's (the figures
    that show both draw it dashed)."""
    if name not in COLORS and name.endswith(NO_CONV):
        name = name[:-len(NO_CONV)]
    return COLORS.get(name, default)


def figure(ncols: int = 1, width: float = 5.2, height: float = 3.8):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def every(length: int, points: int = 40):
    """Indices of about ``points`` evenly spaced markers in a trace of ``length`` steps."""
    stride = max(1, length // points)
    return slice(0, length, stride)


def log_marks(length: int, points: int = 40):
    """Indices of about ``points`` markers evenly spaced on a log axis over ``1..length``."""
    return np.unique(np.geomspace(1, length, points).astype(int)) - 1


def save(fig, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
