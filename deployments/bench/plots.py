"""PNG plots of one or more sweeps, one line per server (its label)."""

from __future__ import annotations

from pathlib import Path

PLOTS = {
    # file name: (title, x label, y label, x of a run, y of a run)
    "throughput_vs_concurrency.png": (
        "Output throughput", "requests in flight", "output tokens/s",
        lambda r: r["load"]["concurrency"] if r["load"]["rate"] is None else None,
        lambda r: r["output_throughput"],
    ),
    "ttft_vs_throughput.png": (
        "Time to first token (p50)", "output tokens/s", "TTFT p50 (ms)",
        lambda r: r["output_throughput"], lambda r: r["ttft_ms"]["p50"],
    ),
    "itl_vs_throughput.png": (
        "Inter-token latency (p50)", "output tokens/s", "ITL p50 (ms)",
        lambda r: r["output_throughput"], lambda r: r["itl_ms"]["p50"],
    ),
}  # fmt: skip


def plot(sweeps: list[dict], out_dir: str | Path, title_suffix: str = "") -> list[Path]:
    """Write the PLOTS for these sweeps into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, xlabel, ylabel, x_of, y_of) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for sweep in sweeps:
            points = sorted((x_of(r), y_of(r)) for r in sweep["runs"] if x_of(r) is not None and y_of(r) is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sweep["label"])
        ax.set_title(title + title_suffix)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
