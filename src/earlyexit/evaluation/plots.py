"""Sweep plots: quality against layers saved, one PNG per task (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from earlyexit.paths import atomic_file


def _figure():  # noqa: ANN202 - (Figure, Axes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4), dpi=120)


def _save(fig, ax, title: str, path: Path) -> Path:  # noqa: ANN001
    """Title, grid, legend; written atomically as PNG."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_sweep(points: list[dict], full_quality: float, title: str, path: Path) -> Path:
    fig, ax = _figure()
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
    return _save(fig, ax, title, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plot_generation_sweep(records: list[dict], title: str, path: Path) -> Path:
    """Quality against measured speedup for each thresholded decoding family (calm:T,
    free:T), one point per threshold, with the full model at (1, full quality)."""
    fig, ax = _figure()
    families: dict[str, list[dict]] = {}
    for r in records:  # a family per method and drafter, one point per numeric threshold
        family, _, arg = r["method"].rpartition(":")
        if family.partition(":")[0] in ("calm", "free", "lossless") and _is_number(arg):
            families.setdefault(family, []).append(r)
    for name, rows in families.items():
        rows = sorted(rows, key=lambda r: r["speedup"])
        ax.plot(
            [r["speedup"] for r in rows],
            [r["quality"] for r in rows],
            marker="o",
            markersize=3,
            label=name,
        )
        for r in rows:
            ax.annotate(r["method"].rpartition(":")[2], (r["speedup"], r["quality"]), fontsize=6)
    single = {"free": "free (adaptive)", "lossless": "lossless (n-gram drafts)"}
    single |= {"free:plain": "free, the paper's loop (adaptive)", "hf-pld": "transformers PLD"}
    single |= {"calm": "calm (calibrated)", "static": "static"}
    for r in records:  # the methods without a threshold knob: one marker each
        if r["method"] in single:
            ax.scatter([r["speedup"]], [r["quality"]], marker="*", s=70, label=single[r["method"]])
    if records:
        ax.scatter([1.0], [records[0]["full_quality"]], color="black", label="full model")
    ax.set_xlabel("speedup (decode-phase tokens/s over full, same run)")
    ax.set_ylabel(records[0]["metric"] if records else "quality")
    return _save(fig, ax, title, path)
