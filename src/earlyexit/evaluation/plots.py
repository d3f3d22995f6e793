"""Sweep plots: quality against layers saved, one PNG per task (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from earlyexit.paths import atomic_file


def plot_sweep(points: list[dict], full_quality: float, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    families = sorted({p["family"] for p in points}, key=[p["family"] for p in points].index)
    for family in families:
        rows = sorted((p for p in points if p["family"] == family), key=lambda p: p["layers_saved"])
        style = "-" if family != "static" else ":"
        ax.plot(
            [p["layers_saved"] for p in rows],
            [p["quality"] for p in rows],
            style,
            marker="o",
            markersize=3,
            label=family,
        )
    ax.axhline(full_quality, color="black", linestyle="--", linewidth=1, label="full model")
    ax.set_xlabel("layers saved (fraction)")
    ax.set_ylabel(points[0].get("metric", "quality") if points else "quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
