"""PNG plots of a ``sparsekern-train`` report: accuracy per epoch, IoU and exploration degree per
mask update, per-layer density."""
from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, out: Path) -> list[str]:
    """Write the plots for ``report`` into ``out``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, run in runs.items():
        ep = run.get("epochs", [])
        ax.plot([r["epoch"] for r in ep], [r["test_acc"] for r in ep], marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax.legend()
    save(fig, "accuracy.png")

    for key, title, name in (("iou", "Mask IoU per update", "iou.png"),
                             ("exploration", "Exploration degree R", "exploration.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for run_name, run in runs.items():
            ups = [u for u in run.get("updates", []) if u.get(key) is not None]
            if ups:
                ax.plot([u["step"] for u in ups], [u[key] for u in ups], marker=".", label=run_name)
        ax.set(xlabel="step", ylabel=key, title=title)
        if ax.lines:
            ax.legend()
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run_name, run in runs.items():
        dens = run.get("layer_density") or {}
        if dens:
            ax.bar(range(len(dens)), list(dens.values()), label=run_name)
            ax.set_xticks(range(len(dens)), list(dens.keys()), rotation=60, ha="right", fontsize=6)
    ax.set(ylabel="density", title="Per-layer density")
    save(fig, "layer_density.png")
    return written
