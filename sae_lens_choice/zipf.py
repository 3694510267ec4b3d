"""Zipf–Mandelbrot laws over latent ranks: pmf, fit, and the under-use test.

Pure torch; nothing here imports SAELens. Densities are firing fractions
(the share of tokens a latent fires on); rank 1 is the densest latent. The fit
is ``log p(r) = log C - alpha * log(r + beta)`` by least squares in log-log
space over a window of ranks, with ``beta`` found by a two-stage grid search
that runs as tensor operations (no read-back), so training can refit it every
step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sae_lens_choice.validation import check_number

__all__ = [
    "DEFAULT_RANK_WINDOW",
    "ZipfFit",
    "density_ranks",
    "fit_rank_window",
    "fit_zipf",
    "underused_mask",
    "zipf_mandelbrot_pmf",
]


class ZipfFit(NamedTuple):
    """A fitted ``p(r) = C * (r + beta) ** -alpha``; fields are 0-d float64 tensors.

    The scale is kept as ``log_C``: on density curves that are closer to
    exponential than to a power law the best fit has a large ``beta`` and a
    large ``alpha``, and ``C = exp(log_C)`` alone overflows float64 even though
    every predicted density is an ordinary number. Predictions are therefore
    made in log space (:meth:`log_predict`).

    ``r2`` is the coefficient of determination of the log-log fit over the
    ranks used (0 when those log-densities are all equal). ``n_points`` is how
    many ranks with positive density the fit used.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    log_C: torch.Tensor
    r2: torch.Tensor
    n_points: torch.Tensor

    @property
    def C(self) -> torch.Tensor:
        """``exp(log_C)``; may be ``inf`` for steep fits, use :meth:`log_predict`."""
        return torch.exp(self.log_C)

    def log_predict(self, ranks: torch.Tensor) -> torch.Tensor:
        """log p(r) at 1-based ``ranks`` (finite whenever the fit is)."""
        r = ranks.to(torch.float64)
        return self.log_C - self.alpha * torch.log(r + self.beta)

    def predict(self, ranks: torch.Tensor) -> torch.Tensor:
        """p(r) at 1-based ``ranks``."""
        return torch.exp(self.log_predict(ranks))

    def to_dict(self) -> dict[str, float]:
        """Plain floats (reads the values back from the device)."""
        return {name: float(value) for name, value in self._asdict().items()}


#: The middle window of ranks a density curve is fitted on, as fractions of
#: d_sae: the densest 1% (a head that saturates) and the rarest 10% (a tail
#: that falls off any power law, the under-used latents) are left out.
DEFAULT_RANK_WINDOW: tuple[float, float] = (0.01, 0.9)


def fit_rank_window(
    d_sae: int, fractions: tuple[float, float] = DEFAULT_RANK_WINDOW
) -> tuple[int, int]:
    """1-based inclusive ranks ``(lo, hi)`` of the fit window for ``d_sae`` latents.

    ``lo`` is the first rank after the densest ``fractions[0] * d_sae``
    latents, ``hi`` the last rank within the first ``fractions[1] * d_sae``
    (at least ``lo``). The one definition used by training (``aux_zipf``),
    evaluation, the demo and the benchmarks.
    """
    check_number(d_sae, "d_sae", integer=True, gt=0)
    lo_frac, hi_frac = fractions
    if not 0.0 <= lo_frac < hi_frac <= 1.0:
        raise ValueError(
            f"rank window fractions must satisfy 0 <= lo < hi <= 1, got {tuple(fractions)!r}"
        )
    lo = int(lo_frac * d_sae) + 1
    return lo, max(lo, int(hi_frac * d_sae))


def zipf_mandelbrot_pmf(n_ranks: int, alpha: float, beta: float = 0.0) -> torch.Tensor:
    """Normalised Zipf–Mandelbrot probabilities over ranks 1..n_ranks (float64)."""
    check_number(n_ranks, "n_ranks", integer=True, gt=0)
    check_number(alpha, "alpha", gt=0)
    check_number(beta, "beta", gt=-1, hint="so that rank + beta > 0")
    weights = (torch.arange(1, n_ranks + 1, dtype=torch.float64) + beta).pow(-alpha)
    return weights / weights.sum()


def density_ranks(densities: torch.Tensor) -> torch.Tensor:
    """1-based rank of each latent by descending density (ties by index)."""
    order = torch.argsort(densities, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, densities.numel() + 1, device=densities.device)
    return ranks


def _regress(
    log_r: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # log_r: (G, F) for G candidate betas; y, w: (F,). Weighted least squares of
    # y on log_r per row; returns slope, intercept, sse, sst, each (G,).
    n = w.sum().clamp(min=1.0)
    mx = (w * log_r).sum(-1) / n  # (G,)
    my = (w * y).sum() / n  # ()
    dx = log_r - mx[:, None]  # (G, F)
    dy = y - my  # (F,)
    sxx = (w * dx * dx).sum(-1).clamp(min=1e-300)
    slope = (w * dx * dy).sum(-1) / sxx
    intercept = my - slope * mx
    residual = y - intercept[:, None] - slope[:, None] * log_r
    sse = (w * residual * residual).sum(-1)
    sst = (w * dy * dy).sum()
    return slope, intercept, sse, sst.expand_as(sse)


def fit_zipf(
    densities: torch.Tensor,
    rank_window: tuple[int | None, int | None] | None = None,
    *,
    max_beta: float | None = None,
    grid_size: int = 64,
) -> ZipfFit:
    """Fit a Zipf–Mandelbrot law to latent densities by rank.

    Args:
        densities: (F,) non-negative firing densities, any order.
        rank_window: 1-based inclusive ranks ``(lo, hi)`` to fit on; ``None``
            ends mean the first / last rank. Zero densities are dead latents:
            they are left out of the fit wherever they fall.
        max_beta: largest ``beta`` searched (default ``10 * hi``). ``beta`` is
            searched on ``[0, max_beta]``.
        grid_size: points in each of the two grid stages.

    Returns:
        :class:`ZipfFit` with 0-d float64 tensors on the densities' device.
    """
    if densities.ndim != 1 or densities.numel() == 0:
        raise ValueError(
            f"densities must be a non-empty 1-D tensor, got shape {tuple(densities.shape)}"
        )
    d = densities.detach().to(torch.float64)
    n = d.numel()
    lo, hi = rank_window if rank_window is not None else (None, None)
    lo = 1 if lo is None else int(lo)
    hi = n if hi is None else min(int(hi), n)
    if lo < 1 or hi < lo:
        raise ValueError(f"rank_window must satisfy 1 <= lo <= hi, got ({lo}, {hi})")
    if grid_size < 4:
        raise ValueError(f"grid_size must be >= 4, got {grid_size}")
    if max_beta is not None:
        # log10 of the grid's end would be -inf or NaN and every beta would fit as NaN.
        check_number(max_beta, "max_beta", gt=0)

    sorted_d = torch.sort(d, descending=True).values  # (F,)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=d.device)  # (F,)
    w = ((sorted_d > 0) & (ranks >= lo) & (ranks <= hi)).to(torch.float64)
    y = torch.log(torch.where(sorted_d > 0, sorted_d, torch.ones_like(sorted_d)))

    top = float(max_beta) if max_beta is not None else 10.0 * hi
    # The grid ends exactly at max_beta (a float32 log10 overshot it) and starts
    # below it even when max_beta < 0.01, so beta stays within [0, max_beta].
    top_exp = math.log10(top)
    coarse = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64, device=d.device),
            torch.logspace(
                min(-2.0, top_exp - 2.0),
                top_exp,
                grid_size - 1,
                dtype=torch.float64,
                device=d.device,
            ),
        ]
    )  # (G,)
    _, _, sse, _ = _regress(torch.log(ranks[None, :] + coarse[:, None]), y, w)
    best = torch.argmin(sse)
    left = coarse[(best - 1).clamp(min=0)]
    right = coarse[(best + 1).clamp(max=grid_size - 1)]
    fine = left + (right - left) * torch.linspace(
        0, 1, grid_size, dtype=torch.float64, device=d.device
    )
    slope, intercept, sse, sst = _regress(torch.log(ranks[None, :] + fine[:, None]), y, w)
    i = torch.argmin(sse)
    r2 = torch.where(sst[i] > 0, 1.0 - sse[i] / sst[i].clamp(min=1e-300), torch.zeros_like(sst[i]))
    return ZipfFit(
        alpha=-slope[i],
        beta=fine[i],
        log_C=intercept[i],
        r2=r2,
        n_points=w.sum(),
    )


def underused_mask(densities: torch.Tensor, fit: ZipfFit, gamma: float) -> torch.Tensor:
    """Latents firing less than ``gamma`` times what the fitted law expects at their rank.

    ``U = {j : rho_j < gamma * p(rank_j)}`` (DESIGN section 4). With ``gamma = 0``
    the set is empty. A latent of density 0 is flagged for any ``gamma > 0``.
    The comparison is made in log space so a fit whose ``C`` overflows still
    flags the right latents; a NaN fit (none made yet) flags only dead latents.

    Args:
        densities: (F,) firing densities.
        fit: a :class:`ZipfFit` of those densities.
        gamma: ratio in [0, 1].
    """
    check_number(gamma, "gamma (zipf_underuse_ratio)", ge=0, le=1)
    rho = densities.to(torch.float64)
    if gamma == 0.0:
        return torch.zeros_like(rho, dtype=torch.bool)
    log_expected = fit.log_predict(density_ranks(densities))
    below = torch.log(rho.clamp(min=1e-300)) < math.log(gamma) + log_expected
    return below | (rho <= 0)
