"""PNG plots of a serving benchmark: latency CDFs, and throughput / concurrency over time."""
from __future__ import annotations

import numpy as np

from herd.bench.metrics import METRICS, BenchmarkMetrics, token_times
from herd.bench.request import RequestOutput


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    return plt


def plot_latency_cdfs(m: BenchmarkMetrics, path: str, title: str = "") -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, (label, header)) in zip(axes.flat, METRICS.items()):
        xs = np.sort(np.asarray(m.samples.get(name) or [], dtype=float) * 1000.0)
        if len(xs):
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
            for p, style in ((50, ":"), (99, "--")):
                ax.axvline(np.percentile(xs, p), color="gray", linestyle=style, linewidth=1,
                           label=f"p{p} = {np.percentile(xs, p):.1f} ms")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{label}: {header}", fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(outputs: list[RequestOutput], start_time: float, path: str, title: str = "",
                    bin_s: float | None = None) -> str:
    """Output tokens/s in time bins (about 60 over the run unless `bin_s` is given) and the exact
    number of requests in flight."""
    plt = _pyplot()
    t, n = token_times(outputs)
    end = max([o.start_time + o.latency for o in outputs] + [start_time + 1e-3]) - start_time
    bin_s = bin_s or max(0.05, float(f"{end / 60:.1g}"))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    edges = np.arange(0.0, end + bin_s, bin_s)
    tok, _ = np.histogram(t - start_time, bins=edges, weights=n)
    ax1.stairs(tok / bin_s, edges)
    ax1.set_ylabel(f"output tokens/s ({bin_s:g} s bins)")
    ax1.grid(alpha=0.3)
    events = sorted([(o.start_time - start_time, 1) for o in outputs] +
                    [(o.start_time + o.latency - start_time, -1) for o in outputs], key=lambda e: (e[0], e[1]))
    times = [0.0] + [e[0] for e in events]
    counts = np.concatenate([[0], np.cumsum([e[1] for e in events])])
    ax2.step(times, counts, where="post", color="tab:orange")
    ax2.set_ylabel("requests in flight")
    ax2.set_xlabel("seconds since start")
    ax2.grid(alpha=0.3)
    fig.suptitle(title or "Throughput over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
