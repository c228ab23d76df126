"""PNG plots of a comparison, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from scheduler.sim.metrics import Series
from scheduler.sim.timeline import FloatArray

HOUR_S = 3_600.0


def _hours(series: Series) -> FloatArray:
    return series.edges_s[:-1] / HOUR_S


def plot_allocation(path: Path, runs: Mapping[str, Series]) -> None:
    fig, ax = plt.subplots(figsize=(11, 4))
    for name, series in runs.items():
        ax.plot(_hours(series), series.allocation_ratio, label=name, linewidth=0.8)
    ax.set_xlabel("simulated time (h)")
    ax.set_ylabel("GPUs allocated / total")
    ax.set_ylim(0, 1.05)
    ax.set_title("Cluster allocation over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tenants(path: Path, runs: Mapping[str, Series]) -> None:
    """One panel per policy: each tenant's GPUs held, its guarantee dashed in the same colour."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, (name, series) in zip(axes[:, 0], runs.items(), strict=True):
        hours = _hours(series)
        for i, (tenant, alloc) in enumerate(series.tenant_alloc.items()):
            colour = colours(i % 20)
            ax.plot(hours, alloc, color=colour, linewidth=0.7, label=tenant)
            guaranteed = series.guaranteed.get(tenant, 0)
            if guaranteed:
                ax.axhline(guaranteed, color=colour, linestyle="--", linewidth=0.5)
        ax.set_title(f"{name}: GPUs held per tenant (dashed: guarantee)")
        ax.set_ylabel("GPUs")
    axes[-1, 0].set_xlabel("simulated time (h)")
    axes[0, 0].legend(ncol=6, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_wait_cdf(path: Path, runs: Mapping[str, Series]) -> None:
    buckets = list(next(iter(runs.values())).waits_by_size)
    fig, axes = plt.subplots(1, len(buckets), figsize=(4 * len(buckets), 3.6), squeeze=False)
    for ax, bucket in zip(axes[0], buckets, strict=True):
        for name, series in runs.items():
            waits = series.waits_by_size[bucket]
            if waits.size:
                y = np.arange(1, waits.size + 1) / waits.size
                ax.step(np.maximum(waits / HOUR_S, 1e-3), y, where="post", label=name)
        if not any(series.waits_by_size[bucket].size for series in runs.values()):
            ax.text(0.5, 0.5, "no jobs of this size", ha="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.set_title(f"{bucket} GPUs")
        ax.set_xlabel("queueing delay (h)")
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("fraction of jobs")
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:  # on the first panel with jobs (a small history may have no 1-GPU jobs)
        labelled[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out_dir: Path, runs: Mapping[str, Series]) -> list[str]:
    """Draw every plot into `out_dir`; returns the file names, for the report's links."""
    files = {
        "allocation.png": plot_allocation,
        "tenants.png": plot_tenants,
        "wait_cdf.png": plot_wait_cdf,
    }
    for name, draw in files.items():
        draw(out_dir / name, runs)
    return list(files)
