"""Sweep plots (matplotlib, Agg): forgetting curves and a metric against a numeric axis, mean ± std over seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from prosg import results


LEGEND_INSIDE = 10  # legend entries that still fit inside the axes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def bucket_midpoints(keys: Iterable[str], under: str | None = None) -> list[tuple[str, float]]:
    """Bucket metric keys (``.../acc@lo-hi``, under prefix ``under`` if given) -> (key, x) sorted by distance;
    the open ``lo-inf`` bucket sits half the previous bucket's width past ``lo`` (it has no midpoint)."""
    buckets = results.bucket_keys(keys, under)
    out = []
    for i, (k, lo, hi) in enumerate(buckets):
        if math.isinf(hi):
            prev_width = lo - buckets[i - 1][1] if i else max(lo, 2)
            out.append((k, lo + prev_width / 2))
        else:
            out.append((k, (lo + hi) / 2))
    return out


def _stat_key(acc_key: str, stat: str) -> str:
    """The key of another statistic of the same bucket (``.../acc@16-32`` -> ``.../chance@16-32``)."""
    k = results.parse_key(acc_key)
    lo, hi = k.bucket
    return results.metric_key(k.split, k.slice, results.bucket_metric(lo, hi, stat))


def _mean_band(stats: list[results.Stats]) -> tuple[np.ndarray, np.ndarray]:
    """Means and error-band stds (``Stats.band``: 0 for one value, NaN for none) as arrays."""
    return np.array([s.mean for s in stats], dtype=float), np.array([s.band() for s in stats], dtype=float)


def forgetting_curves(groups: dict[str, list[dict[str, float]]], prefix: str, path: Path, title: str,
                      ylabel: str = "prompt-fact accuracy") -> bool:
    """Accuracy vs distance-bucket midpoint, one line per group (mean ± std band over its runs).

    ``groups``: label -> one metrics dict per seed. Returns False (and writes nothing) when no
    metrics under ``prefix`` have distance buckets.
    """
    points = bucket_midpoints({k for runs in groups.values() for m in runs for k in m}, under=prefix)
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.array([x for _, x in points])
    colors = _colors(plt, len(groups))
    for (label, runs), color in zip(groups.items(), colors):
        mean, std = _mean_band([results.mean_std(m.get(k, math.nan) for m in runs) for k, _ in points])
        ok = ~np.isnan(mean)  # empty buckets are NaN: draw only where there is data
        (line,) = ax.plot(xs[ok], mean[ok], marker="o", color=color, label=f"{label} (n={len(runs)})")
        ax.fill_between(xs[ok], (mean - std)[ok], (mean + std)[ok], color=line.get_color(), alpha=0.2)
    all_runs = [m for runs in groups.values() for m in runs]
    for stat, style, name in ((results.CEILING, "--", "value-set ceiling"), (results.CHANCE, ":", "chance")):
        ref = np.array([results.mean_std(m.get(_stat_key(k, stat), math.nan) for m in all_runs).mean for k, _ in points])
        ok = ~np.isnan(ref)
        if ok.any():  # a reference line from the data: what no memory of the bindings can beat
            ax.plot(xs[ok], ref[ok], style, color="gray", label=name)
    open_ended = "; the last bucket is open-ended" if results.is_open_bucket(points[-1][0]) else ""
    ax.set_xlabel(f"distance from the prompt (bucket midpoint{open_ended})")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    _finish(plt, fig, ax, path, title)
    return True


def series_stats(points: dict[float, list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x -> values over seeds  ->  sorted xs, mean and sample std at each x."""
    xs = sorted(points)
    return (np.array(xs, dtype=float), *_mean_band([results.mean_std(points[x]) for x in xs]))


def metric_vs_axis(series: dict[str, dict[float, list[float]]], xlabel: str, ylabel: str, path: Path, title: str) -> None:
    """A metric against a numeric axis (log2 x when it spans > 8x), one line per group, mean ± std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_x = [x for pts in series.values() for x in pts]
    for label, pts in sorted(series.items()):
        xs, mean, std = series_stats(pts)
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label)
    if all_x and min(all_x) > 0 and max(all_x) / min(all_x) > 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _finish(plt, fig, ax, path, title)


def _colors(plt, n: int) -> list:
    """``n`` line colours, all different: the default cycle repeats after 10 (a sweep with more cells would
    draw two of them alike)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _finish(plt, fig, ax, path: Path, title: str) -> None:
    """Title, grid, legend (beside the axes when it is long); save as PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > LEGEND_INSIDE:  # beside the axes: the figure widens to hold it
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 2.5, height)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
