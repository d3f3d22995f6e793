"""Markdown tables of evaluation records, as pasted into BENCHMARKS.md."""

from __future__ import annotations


def records_markdown(records: list[dict]) -> str:
    lines = [
        "| task | metric | method | n | quality | full | avg exit | saved | speedup | ideal "
        "| decide |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['method']} | {r['n']} | {r['quality']:.3f} "
            f"| {r['full_quality']:.3f} | {r['avg_exit_layer']:.1f} | {r['layers_saved']:.0%} "
            f"| {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['decision_overhead']:.1%} |"
        )
    return "\n".join(lines) + "\n"
