"""Tests for ``sae_lens_choice.zipf``: the pmf, the log-log fit and the under-use test."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lens_choice.zipf import (
    ZipfFit,
    density_ranks,
    fit_rank_window,
    fit_zipf,
    underused_mask,
    zipf_mandelbrot_pmf,
)

N_LATENTS = 4096
# Fit on a middle window of ranks, as training does: the head and the far tail
# of a real SAE's density curve bend away from the law.
WINDOW = (3, 3000)


def _zipf_densities(
    alpha: float, beta: float, *, noise: float = 0.0, seed: int = 0, n: int = N_LATENTS
) -> torch.Tensor:
    """Densities following p(r) ∝ (r + beta)^-alpha, in shuffled latent order.

    ``noise`` is the std of a multiplicative log-normal factor per latent. The
    scale (40 expected firing latents per token in all) is arbitrary: the fit
    must not depend on it.
    """
    gen = torch.Generator().manual_seed(seed)
    d = zipf_mandelbrot_pmf(n, alpha, beta) * 40
    if noise:
        d = d * torch.exp(noise * torch.randn(n, generator=gen, dtype=torch.float64))
    return d[torch.randperm(n, generator=gen)]


def _rel_err(estimate: torch.Tensor, truth: float) -> float:
    return abs(float(estimate) / truth - 1)


# ---------------------------------------------------------------------------
# pmf and ranks, by hand
# ---------------------------------------------------------------------------


def test_zipf_mandelbrot_pmf_hand_worked() -> None:
    # alpha=1, beta=0: weights 1, 1/2, 1/3 with sum 11/6 -> 6/11, 3/11, 2/11.
    p = zipf_mandelbrot_pmf(3, 1.0)
    torch.testing.assert_close(p, torch.tensor([6, 3, 2], dtype=torch.float64) / 11)
    # alpha=2, beta=1: weights 1/4, 1/9 with sum 13/36 -> 9/13, 4/13.
    p = zipf_mandelbrot_pmf(2, 2.0, 1.0)
    torch.testing.assert_close(p, torch.tensor([9, 4], dtype=torch.float64) / 13)


def test_zipf_mandelbrot_pmf_sums_to_one() -> None:
    p = zipf_mandelbrot_pmf(1000, 1.2, 7.5)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert bool((p[1:] < p[:-1]).all())


def test_density_ranks_hand_worked() -> None:
    # Descending density, ties by index: latent 1 (0.5) is rank 1, then latent 0
    # and latent 2 (both 0.1) as ranks 2 and 3, then latent 3 (0.0).
    ranks = density_ranks(torch.tensor([0.1, 0.5, 0.1, 0.0]))
    assert ranks.tolist() == [2, 1, 3, 4]


def test_fit_hand_worked_pure_power_law() -> None:
    # Densities exactly 1/r on ranks 1..64 (beta = 0): the log-log points lie on a
    # line of slope -1 through log C = 0, so alpha = 1, C = 1 and R^2 = 1.
    d = 1.0 / torch.arange(1, 65, dtype=torch.float64)
    fit = fit_zipf(d)
    assert math.isclose(float(fit.alpha), 1.0, rel_tol=1e-6)
    assert float(fit.beta) == 0.0  # the grid's first point is beta = 0 exactly
    assert math.isclose(float(fit.C), 1.0, rel_tol=1e-6)
    assert math.isclose(float(fit.r2), 1.0, rel_tol=1e-9)
    assert int(fit.n_points) == 64


def test_zipf_fit_predict_and_to_dict() -> None:
    # C=2, alpha=1, beta=1: p(1) = 2/2 = 1, p(3) = 2/4 = 0.5.
    one = torch.tensor(1.0, dtype=torch.float64)
    fit = ZipfFit(alpha=one, beta=one, log_C=math.log(2) * one, r2=one, n_points=3 * one)
    torch.testing.assert_close(
        fit.predict(torch.tensor([1, 3])), torch.tensor([1.0, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(fit.C, 2 * one)
    assert fit.to_dict() == pytest.approx(
        {"alpha": 1.0, "beta": 1.0, "log_C": math.log(2), "r2": 1.0, "n_points": 3.0}
    )


# ---------------------------------------------------------------------------
# recovery of a known law
# ---------------------------------------------------------------------------

LAWS = [(1.0, 10.0), (1.3, 20.0), (0.8, 10.0), (1.1, 3.0)]


@pytest.mark.parametrize(("alpha", "beta"), LAWS)
def test_fit_recovers_noise_free_law(alpha: float, beta: float) -> None:
    fit = fit_zipf(_zipf_densities(alpha, beta), WINDOW)
    assert _rel_err(fit.alpha, alpha) < 0.05
    assert _rel_err(fit.beta, beta) < 0.05
    assert float(fit.r2) > 0.99
    assert int(fit.n_points) == WINDOW[1] - WINDOW[0] + 1


@pytest.mark.parametrize(("alpha", "beta"), LAWS[:3])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_law_with_mild_noise(alpha: float, beta: float, seed: int) -> None:
    # 2% multiplicative noise; beta is the weakly identified parameter (it only
    # bends the low ranks), so the noise must stay mild for a 5% bound on it.
    fit = fit_zipf(_zipf_densities(alpha, beta, noise=0.02, seed=seed), WINDOW)
    assert _rel_err(fit.alpha, alpha) < 0.05
    assert _rel_err(fit.beta, beta) < 0.05
    assert float(fit.r2) > 0.99


def test_fit_is_scale_free_in_densities() -> None:
    d = _zipf_densities(1.2, 8.0)
    a, b = fit_zipf(d, WINDOW), fit_zipf(d * 1e-3, WINDOW)
    torch.testing.assert_close(a.alpha, b.alpha)
    torch.testing.assert_close(a.beta, b.beta)
    torch.testing.assert_close(b.log_C, a.log_C + math.log(1e-3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_reports_low_r2_on_uniform_densities(seed: int) -> None:
    # Sorted uniform densities fall off linearly, then sharply near the last rank:
    # no power law fits that well.
    u = torch.rand(N_LATENTS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    zipf_r2 = float(fit_zipf(_zipf_densities(1.0, 10.0, noise=0.02, seed=seed), WINDOW).r2)
    assert zipf_r2 > 0.999
    assert float(fit_zipf(u).r2) < 0.85
    assert float(fit_zipf(u, WINDOW).r2) < 0.99


def test_fit_ignores_zero_densities() -> None:
    alpha, beta = 1.1, 6.0
    live = _zipf_densities(alpha, beta, n=2000)
    # 500 dead latents interleaved with the live ones; the window covers them.
    with_dead = torch.cat([live, torch.zeros(500, dtype=torch.float64)])
    with_dead = with_dead[torch.randperm(2500, generator=torch.Generator().manual_seed(0))]
    # Same beta grid for both fits (its default range follows the window's end).
    fit = fit_zipf(with_dead, (1, 2500), max_beta=1000.0)
    assert int(fit.n_points) == 2000
    assert bool(torch.isfinite(torch.stack(list(fit))).all())
    reference = fit_zipf(live, max_beta=1000.0)
    torch.testing.assert_close(fit.alpha, reference.alpha)
    torch.testing.assert_close(fit.beta, reference.beta)
    assert _rel_err(fit.alpha, alpha) < 0.05
    assert _rel_err(fit.beta, beta) < 0.05


def test_fit_handles_all_dead_and_constant_densities() -> None:
    dead = fit_zipf(torch.zeros(16))
    assert int(dead.n_points) == 0
    assert bool(torch.isfinite(torch.stack(list(dead))).all())
    flat = fit_zipf(torch.full((16,), 0.25))
    # Equal log-densities have no variance to explain: R^2 is reported as 0.
    assert float(flat.r2) == 0.0
    assert int(flat.n_points) == 16


def test_fit_window_beyond_last_rank_is_clipped() -> None:
    d = _zipf_densities(1.0, 10.0, n=500)
    torch.testing.assert_close(
        torch.stack(list(fit_zipf(d, (3, 10_000)))), torch.stack(list(fit_zipf(d, (3, None))))
    )


def test_fit_runs_on_float32_and_returns_float64_scalars() -> None:
    fit = fit_zipf(_zipf_densities(1.0, 10.0).to(torch.float32), WINDOW)
    for value in fit:
        assert value.dtype == torch.float64
        assert value.ndim == 0
    assert _rel_err(fit.alpha, 1.0) < 0.05


# ---------------------------------------------------------------------------
# under-used latents
# ---------------------------------------------------------------------------


def _densities_with_underused(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Zipf law with 100 latents from the middle pushed to 5% of their density."""
    d = _zipf_densities(1.0, 10.0, seed=seed)
    ranks = density_ranks(d)
    starved = (ranks > 1500) & (ranks <= 1600)
    return torch.where(starved, d * 0.05, d), starved


def test_underused_mask_flags_latents_far_below_the_curve() -> None:
    d, starved = _densities_with_underused()
    # The window stops before the starved latents' new ranks, so they do not bend the fit.
    fit = fit_zipf(d, (3, 1400))
    assert float(fit.r2) > 0.99
    mask = underused_mask(d, fit, gamma=0.5)
    assert mask.dtype == torch.bool
    assert mask.shape == d.shape
    # Each starved latent sinks a few hundred ranks, where the law expects far more
    # than twice its density; everyone else sits on the curve (ratio ~ 1).
    assert torch.equal(mask, starved)


def test_underused_mask_is_empty_at_gamma_zero() -> None:
    d, _ = _densities_with_underused()
    d[:10] = 0.0  # even dead latents are not "under-used" at gamma = 0
    fit = fit_zipf(d, WINDOW)
    assert not bool(underused_mask(d, fit, gamma=0.0).any())


def test_underused_mask_flags_dead_latents_for_any_positive_gamma() -> None:
    d = _zipf_densities(1.0, 10.0)
    dead = torch.zeros_like(d, dtype=torch.bool)
    dead[[5, 77, 4000]] = True
    d = torch.where(dead, torch.zeros_like(d), d)
    fit = fit_zipf(d, WINDOW)
    mask = underused_mask(d, fit, gamma=1e-6)
    assert torch.equal(mask, dead)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_underused_mask_rejects_gamma_outside_unit_interval(gamma: float) -> None:
    d = _zipf_densities(1.0, 10.0, n=100)
    with pytest.raises(
        ValueError, match=r"gamma \(zipf_underuse_ratio\) must be a finite number >= 0 and <= 1"
    ):
        underused_mask(d, fit_zipf(d), gamma)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(0, 10), (10, 5), (-3, None)])
def test_fit_rejects_bad_rank_window(window: tuple[int | None, int | None]) -> None:
    with pytest.raises(ValueError, match=r"rank_window must satisfy 1 <= lo <= hi"):
        fit_zipf(_zipf_densities(1.0, 1.0, n=100), window)


@pytest.mark.parametrize("densities", [torch.zeros(0), torch.ones(4, 4)])
def test_fit_rejects_bad_densities(densities: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"densities must be a non-empty 1-D tensor"):
        fit_zipf(densities)


def test_fit_rejects_small_grid() -> None:
    with pytest.raises(ValueError, match=r"grid_size must be >= 4"):
        fit_zipf(torch.ones(8), grid_size=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_ranks": 0, "alpha": 1.0}, r"n_ranks must be an integer > 0"),
        ({"n_ranks": 4, "alpha": 0.0}, r"alpha must be a finite number > 0"),
        ({"n_ranks": 4, "alpha": -2.0}, r"alpha must be a finite number > 0"),
        ({"n_ranks": 4, "alpha": 1.0, "beta": -1.0}, r"beta must be a finite number > -1"),
    ],
)
def test_pmf_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        zipf_mandelbrot_pmf(**kwargs)


@pytest.mark.parametrize("max_beta", [0.0, -1.0, float("nan"), float("inf")])
def test_fit_rejects_bad_max_beta(max_beta: float) -> None:
    with pytest.raises(ValueError, match=r"max_beta must be a finite number > 0"):
        fit_zipf(torch.ones(8), max_beta=max_beta)


@pytest.mark.parametrize("max_beta", [1e-3, 0.5, 4.0])
def test_fit_keeps_beta_within_max_beta(max_beta: float) -> None:
    # The true beta (10) lies outside the searched range, so the best fit sits at
    # its upper end and no further.
    fit = fit_zipf(_zipf_densities(1.0, 10.0, n=500), max_beta=max_beta)
    assert 0.0 <= float(fit.beta) <= max_beta
    assert math.isclose(float(fit.beta), max_beta, rel_tol=1e-9)


def test_steep_exponential_curve_still_flags_underused_latents() -> None:
    # Densities falling exponentially with rank are no power law: the best
    # Zipf-Mandelbrot fit runs beta to the top of its grid with a huge alpha, so
    # C = exp(log C) overflows float64. The fit and the under-use test must still
    # work in log space: a tail of latents 1000x below the curve is flagged.
    n = 512
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = 0.5 * torch.exp(-ranks / 8.0)
    d[-20:] *= 1e-3
    fit = fit_zipf(d, (6, 460))
    assert math.isfinite(float(fit.log_C)) and math.isfinite(float(fit.alpha))
    assert not math.isfinite(float(fit.C))  # the overflow this guards against
    assert torch.isfinite(fit.log_predict(ranks)).all()
    mask = underused_mask(d, fit, 0.5)
    assert bool(mask[-20:].all())
    assert int(mask[:460].sum()) == 0  # the fitted part of the curve sits on the fit


def test_fit_rank_window_hand_worked() -> None:
    # d_sae = 1000, (0.01, 0.9): skip the densest int(10) = 10 ranks -> lo = 11;
    # hi = int(900) = 900.
    assert fit_rank_window(1000) == (11, 900)
    # d_sae = 50: int(0.5) + 1 = 1; int(45) = 45.
    assert fit_rank_window(50) == (1, 45)
    # a window narrower than one rank still holds lo.
    assert fit_rank_window(3, (0.5, 0.6)) == (2, 2)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_fit_rank_window_rejects_bad_fractions(fractions: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match=r"rank window fractions must satisfy 0 <= lo < hi <= 1"):
        fit_rank_window(100, fractions)
