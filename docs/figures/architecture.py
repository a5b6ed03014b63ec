"""Draws docs/figures/architecture.png, the picture of docs/architecture.md:

    python docs/figures/architecture.py
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STAGES = [
    ("declare", "designmodels/", "DesignModel(prior, transition,\nnoise, observation, covariance)\n"
                                 "components.py, library.py"),
    ("analyse", "designmodels/structure.py", "Structure: family, kinds,\nfixed constants, inputs + Domain\n"
                                             "model.structure"),
    ("lower", "filters/", "compile -> Filter: checks.py,\ninputs.py, then Lowering.run:\n"
                          "sequential | associative |\nchunked | ... (registered)"),
    ("layer", "layers/", "DesignLayer: projections, conv,\nGates (by Domain), filter,\nnorm, output gate"),
    ("run", "configs/ + experiments/", "absl apps, ml_collections configs\ntasks, models, training\n"
                                       "results.json / .csv, figures"),
]
ADD = [
    ("a new component", "components.py: validates itself\nstructure.py: its facts, Domain\n"
                        "kalman.step, checks, gates", 0.5),
    ("a new lowering", "filters/<name>.py:\nclass X(filters.Lowering)\nfilters.register(X())", 2.5),
    ("a new experiment", "configs/<name>.py (smoke)\nexperiments/<name>.py\ncommon.run_app", 4.5),
]


def main(path):
    fig, ax = plt.subplots(figsize=(14, 5.2))
    ax.set_xlim(0, 5)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    for i, (stage, where, what) in enumerate(STAGES):
        x = i + 0.5
        ax.add_patch(FancyBboxPatch((x - 0.44, 2.6), 0.88, 1.9, boxstyle="round,pad=0.02", fc="#eef3fb",
                                    ec="#3b6bb5", lw=1.4))
        ax.text(x, 4.22, stage, ha="center", va="center", fontsize=14, weight="bold", color="#1d3f78")
        ax.text(x, 3.88, where, ha="center", va="center", fontsize=8.5, family="monospace", color="#333333")
        ax.text(x, 3.1, what, ha="center", va="center", fontsize=7.8, color="#222222")
        if i < len(STAGES) - 1:
            ax.add_patch(FancyArrowPatch((x + 0.45, 3.55), (x + 0.55, 3.55), arrowstyle="-|>",
                                         mutation_scale=16, color="#3b6bb5", lw=1.4))
    for title, text, x in ADD:
        ax.add_patch(FancyBboxPatch((x - 0.46, 0.35), 0.92, 1.35, boxstyle="round,pad=0.02", fc="#fbf4e8",
                                    ec="#c07a17", lw=1.2))
        ax.text(x, 1.45, "where " + title + " goes", ha="center", va="center", fontsize=9.5, weight="bold",
                color="#7a4a08")
        ax.text(x, 0.8, text, ha="center", va="center", fontsize=7.8, family="monospace", color="#333333")
        ax.add_patch(FancyArrowPatch((x, 1.72), (x, 2.57), arrowstyle="-|>", mutation_scale=12, color="#c07a17",
                                     lw=1.0, linestyle="--"))
    ax.text(2.5, 5.0, "declare -> analyse -> lower -> layer -> run", ha="center", va="center", fontsize=13,
            color="#1d3f78")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"))
