"""The demo's plots (PNG): densities by rank, per-token L0, the NMSE-vs-L0 frontier.

One colour per architecture; the rows recalibrated with
``calibrate_thresholds`` are drawn dotted next to the saved ones. Figures use
matplotlib's object-oriented API, which renders with Agg and touches no
global backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_choice.demo.report import display_fit
from sae_lens_choice.demo.results import RECALIBRATED, ModelResult
from sae_lens_choice.zipf import ZipfFit

__all__ = [
    "RANK_LABEL",
    "label_and_save",
    "new_figure",
    "plot_densities",
    "plot_fit_curves",
    "plot_frontier",
    "plot_l0_histograms",
    "supported_formats",
]


RANK_LABEL = "latent rank (by density)"


def new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    """A matplotlib ``Figure`` (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def label_and_save(
    fig: Any, ax: Any, path: Path, *, title: str, xlabel: str, ylabel: str, log_x: bool = True
) -> None:
    """Log-scale axes (y always), labels, legend; write ``fig`` to ``path``."""
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def supported_formats() -> list[str]:
    """File suffixes (without the dot) matplotlib can save a figure as."""
    return sorted(new_figure().canvas.get_supported_filetypes())


def _styles(models: Sequence[ModelResult]) -> list[dict[str, Any]]:
    colours = {a: f"C{i % 10}" for i, a in enumerate(dict.fromkeys(m.architecture for m in models))}
    return [
        {"color": colours[m.architecture], "ls": ":" if m.thresholds == RECALIBRATED else "-"}
        for m in models
    ]


def _sorted_live(densities: torch.Tensor) -> torch.Tensor:
    d = torch.sort(densities.to(torch.float64).cpu(), descending=True).values
    return d[d > 0]


def plot_fit_curves(
    ax: Any,
    curves: Sequence[tuple[str, torch.Tensor, ZipfFit | None, tuple[int, int], dict[str, Any]]],
) -> None:
    """Densities by rank and their Zipf fits over the fitted ranks (dashed); axes unset.

    ``curves``: (label, densities, fit or None, (lo, hi) ranks fitted, line style).
    """
    for label, densities, fit, (lo, hi), style in curves:
        d = _sorted_live(densities)
        if d.numel() == 0:
            continue
        text = label
        if fit is not None:
            v = fit.to_dict()
            text += f"  (α={v['alpha']:.2f}, β={v['beta']:.1f}, R²={v['r2']:.3f})"
        ax.plot(torch.arange(1, d.numel() + 1), d, lw=1.5, label=text, **style)
        hi = min(hi, d.numel())
        if fit is not None and hi >= lo:
            ranks = torch.arange(lo, hi + 1)
            ax.plot(ranks, fit.predict(ranks), lw=1, **{**style, "ls": "--"})


def plot_densities(models: Sequence[ModelResult], true_probs: torch.Tensor, path: Path) -> None:
    """Evaluation densities by rank with their Zipf fits, against the true features'."""
    fig = new_figure()
    ax = fig.add_subplot()
    truth = torch.sort(true_probs.double().cpu(), descending=True).values
    ranks = torch.arange(1, truth.numel() + 1)
    ax.plot(ranks, truth, color="black", lw=2, alpha=0.4, label="true features (firing prob.)")
    curves = []
    for m, style in zip(models, _styles(models)):
        fit = display_fit(m)
        window = m.zipf_rank_window if m.zipf_window is not None else (1, m.d_sae)
        curves.append((m.name, m.densities, fit, window, style))
    plot_fit_curves(ax, curves)
    label_and_save(
        fig,
        ax,
        path,
        title="Latent density by rank; dashed: Zipf–Mandelbrot fit",
        xlabel=RANK_LABEL,
        ylabel="firing density on eval split",
    )


def plot_l0_histograms(models: Sequence[ModelResult], path: Path) -> None:
    """Per-token L0 histograms on the evaluation split."""
    fig = new_figure()
    ax = fig.add_subplot()
    # up to the 99.9th percentile: a few outlier tokens would squash the rest
    top = 1
    for m in models:
        cumulative = m.l0_histogram.cumsum(0).to(torch.float64) / m.n_tokens
        top = max(top, int(torch.searchsorted(cumulative, 0.999)) + 1)
    edges = torch.arange(-0.5, top + 1.5, 1.0)
    for m, style in zip(models, _styles(models)):
        counts = m.l0_histogram[: top + 1].to(torch.float64)
        counts = torch.nn.functional.pad(counts, (0, top + 1 - counts.numel()))
        ax.stairs(
            counts.numpy(),
            edges.numpy(),
            lw=1.5,
            label=f"{m.name} (mean {m.l0_mean:.2f}, std {m.l0_std:.2f})",
            **style,
        )
    label_and_save(
        fig,
        ax,
        path,
        title="Per-token L0 on the eval split (per-token inference)",
        xlabel="active latents per token (L0)",
        ylabel="tokens (log scale)",
        log_x=False,
    )


def plot_frontier(rows: Sequence[ModelResult], path: Path) -> None:
    """NMSE against mean L0, one line per model name over the k sweep."""
    fig = new_figure()
    ax = fig.add_subplot()
    styles = dict(zip((m.name for m in rows), _styles(rows)))
    for name, style in styles.items():
        pts = sorted((m.l0_mean, m.nmse) for m in rows if m.name == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
    label_and_save(
        fig,
        ax,
        path,
        title="Sparsity–reconstruction frontier",
        xlabel="mean L0 per token (eval, per-token inference)",
        ylabel="NMSE (1 − explained variance)",
    )
