"""Markdown tables of evaluation records, as pasted into BENCHMARKS.md."""

from __future__ import annotations


def records_markdown(records: list[dict]) -> str:
    lines = [
        "| task | metric | method | n | quality (95% CI) | full | avg exit | saved "
        "| speedup (95% CI) | ideal | decide |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['task']} | {r['metric']} | {method_label(r)} | {r['n']} "
            f"| {r['quality']:.3f} ({interval(r['quality_ci'])}) | {r['full_quality']:.3f} "
            f"| {r['avg_exit_layer']:.1f} | {r['layers_saved']:.0%} "
            f"| {r['speedup']:.2f}x ({interval(r['speedup_ci'])}) | {r['ideal_speedup']:.2f}x "
            f"| {r['decision_overhead']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def interval(ci: list[float]) -> str:
    """A 95% interval as 'low-high'."""
    return f"{ci[0]:.2f}-{ci[1]:.2f}"


def method_label(record: dict) -> str:
    """The method, and what Learn-then-Test chose for it (or that it certified nothing)."""
    ltt = record.get("ltt")
    if not ltt:
        return record["method"]
    if not ltt["certified"]:
        return f"{record['method']} (LTT: none certified, full depth)"
    return f"{record['method']} (LTT: {ltt['setting']:g})"
