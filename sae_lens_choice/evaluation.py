"""Per-token evaluation of a SAE on held-out activations.

One definition of each quality metric, shared by ``sae-lens-choice demo`` and
the benchmarks: :func:`evaluate_sae` encodes every token on its own (the SAE's
``encode``, as users run it downstream, or any ``encode`` callable) and
decodes with the SAE, streaming over the batches with fixed-size
accumulators on the SAE's device (read back once, at the end):

- **NMSE** ``= sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2``, where
  ``mean(x)`` is the per-dimension mean of the evaluated tokens themselves
  (the error relative to predicting that mean, as in Gao et al. 2024);
  **explained variance** ``= 1 - NMSE``.
- **L0** per token (latents with a nonzero activation): mean, std (with
  Bessel's correction), min, max and the share of tokens with none, all
  exact, from the histogram of per-token L0 (``d_sae + 1`` counts).
- **Densities** (the share of tokens each latent fires on) and **dead
  latents** (latents that fire on no token of the split).
- The **Zipf–Mandelbrot fit** of the densities by rank over
  :func:`sae_lens_choice.zipf.fit_rank_window` and over all ranks (dead
  latents left out), and the **under-used** latents:
  :func:`sae_lens_choice.zipf.underused_mask` against the window fit, dead
  latents included.
- **corr(L0, ||x||)**: Pearson correlation over tokens of L0 and the input's
  norm (whether high-norm tokens take more latents).
- Optionally, against a known dictionary (synthetic data), SAELens's
  ``mean_correlation_coefficient`` and ``feature_uniqueness`` of the decoder
  rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from tqdm.auto import tqdm

from sae_lens_choice.validation import check_number
from sae_lens_choice.zipf import (
    DEFAULT_RANK_WINDOW,
    ZipfFit,
    fit_rank_window,
    fit_zipf,
    underused_mask,
)

__all__ = ["DEFAULT_UNDERUSE_RATIO", "MIN_ZIPF_POINTS", "SAEEvaluation", "evaluate_sae"]

#: gamma of the under-use test: a latent is under-used below half the density
#: the window fit expects at its rank (the training configs' default).
DEFAULT_UNDERUSE_RATIO = 0.5
#: A Zipf fit needs at least this many live latents among the ranks it covers;
#: with fewer it is ``None`` (two points fit any line exactly).
MIN_ZIPF_POINTS = 3


@dataclass(frozen=True)
class SAEEvaluation:
    """What :func:`evaluate_sae` measured; ``to_dict()`` gives plain JSON values.

    Attributes:
        n_tokens: tokens evaluated.
        d_sae: latents.
        nmse: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, the mean taken
            per dimension over the evaluated tokens (NaN if they do not vary).
        explained_variance: ``1 - nmse``.
        l0_mean, l0_std, l0_min, l0_max: per-token L0 (std with Bessel's
            correction; 0 for one token).
        frac_tokens_zero_l0: share of tokens on which no latent fires.
        dead_latents: latents that fire on no token of the split.
        underused_latents: latents below ``underuse_ratio`` times the window
            fit at their rank, dead latents included (only the dead ones when
            there is no window fit).
        underuse_ratio: the gamma of that test.
        l0_norm_corr: Pearson correlation of per-token L0 and ``||x||`` (NaN
            when either is constant, e.g. TopK's L0).
        zipf_rank_window: 1-based inclusive ranks ``(lo, hi)`` of the window fit.
        zipf_window: fit over those ranks, or ``None`` (too few live latents).
        zipf_all_ranks: fit over all live ranks, or ``None``.
        mcc: mean correlation coefficient of the decoder rows with the known
            dictionary (``None`` without one).
        uniqueness: SAELens's ``feature_uniqueness`` of the same (``None``
            without one).
        densities: (d_sae,) float64 share of tokens each latent fires on.
        l0_histogram: (d_sae + 1,) int64: ``l0_histogram[i]`` tokens have L0 ``i``.
    """

    n_tokens: int
    d_sae: int
    nmse: float
    explained_variance: float
    l0_mean: float
    l0_std: float
    l0_min: int
    l0_max: int
    frac_tokens_zero_l0: float
    dead_latents: int
    underused_latents: int
    underuse_ratio: float
    l0_norm_corr: float
    zipf_rank_window: tuple[int, int]
    zipf_window: ZipfFit | None
    zipf_all_ranks: ZipfFit | None
    mcc: float | None
    uniqueness: float | None
    densities: torch.Tensor
    l0_histogram: torch.Tensor

    def metric_fields(self) -> dict[str, Any]:
        """Every field by name, as stored (fits as :class:`ZipfFit`, tensors as tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(SAEEvaluation)}

    def to_dict(self, include_tensors: bool = False) -> dict[str, Any]:
        """Plain Python values: fits as dicts of floats, the window as a list.

        ``include_tensors`` adds ``densities`` and ``l0_histogram`` as lists.
        """
        out: dict[str, Any] = {}
        for name, value in self.metric_fields().items():
            if isinstance(value, torch.Tensor):
                if include_tensors:
                    out[name] = value.tolist()
            elif isinstance(value, ZipfFit):
                out[name] = value.to_dict()
            elif name == "zipf_rank_window":
                out[name] = list(value)
            else:
                out[name] = value
        return out


class _Moments:
    """Count, mean and centred second moments of row vectors, merged batch by batch.

    Chan et al.'s pairwise update: each batch is centred on its own mean, so
    no large, nearly equal sums are subtracted (a mean far from zero costs no
    precision). ``full`` keeps the (D, D) co-moment matrix, otherwise only its
    trace (the total sum of squared deviations). Float64, on the rows' device.
    """

    def __init__(self, full: bool):
        self.full = full
        self.n = 0
        self.mean: torch.Tensor | None = None  # (D,)
        self.comoment: torch.Tensor | None = None  # (D, D) if full, else ()

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)  # (N, D)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(0)
        centred = rows - mean_b
        m_b = centred.T @ centred if self.full else centred.pow(2).sum()
        if self.mean is None or self.comoment is None:
            self.n, self.mean, self.comoment = n_b, mean_b, m_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        spread = torch.outer(delta, delta) if self.full else delta.pow(2).sum()
        self.comoment = self.comoment + m_b + spread * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n


def _as_batches(batches: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Any:
    if isinstance(batches, torch.Tensor):
        return batches.split(batch_size)
    return batches


def _fit(densities: torch.Tensor, window: tuple[int, int] | None, n_live: int) -> ZipfFit | None:
    lo, hi = window if window is not None else (1, densities.numel())
    # Sorted by density, the live latents take ranks 1..n_live.
    if min(hi, n_live) - lo + 1 < MIN_ZIPF_POINTS:
        return None
    return fit_zipf(densities, window)


def _pearson(comoment: torch.Tensor) -> float:
    # comoment: (2, 2) centred co-moments of (L0, ||x||)
    denominator = float((comoment[0, 0] * comoment[1, 1]).sqrt())
    return float(comoment[0, 1]) / denominator if denominator > 0 else float("nan")


@torch.no_grad()
def evaluate_sae(
    sae: SAE[Any],
    batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_vectors: torch.Tensor | None = None,
    rank_window: tuple[float, float] = DEFAULT_RANK_WINDOW,
    underuse_ratio: float = DEFAULT_UNDERUSE_RATIO,
    batch_size: int = 4096,
    show_progress: bool = False,
    description: str = "Evaluating",
) -> SAEEvaluation:
    """Evaluate ``sae`` per token on held-out activations (see the module docstring).

    Args:
        sae: any SAELens SAE (inference or training); it decodes, and encodes
            unless ``encode`` is given. Put in eval mode for the pass and
            restored afterwards; nothing else in it changes.
        batches: activations at the SAE's hook in its input units, an
            iterable of tensors of shape (..., d_in) (``(..., n_heads,
            d_head)`` for ``hook_z`` SAEs), or one tensor cut into
            ``batch_size`` rows. Every leading position is a token.
        encode: ``x -> feature_acts`` (..., d_sae) in place of ``sae.encode``
            (for example a batch-mode encoder, or one with other thresholds).
        feature_vectors: (n_features, d_in) known dictionary: adds ``mcc`` and
            ``uniqueness`` of ``sae.W_dec`` against it.
        rank_window: fractions of d_sae giving the window fit's ranks
            (:func:`sae_lens_choice.zipf.fit_rank_window`).
        underuse_ratio: gamma in [0, 1] of the under-use test.
        batch_size: rows per batch when ``batches`` is one tensor.
        show_progress: a tqdm bar over the batches.
        description: the bar's label.

    Returns:
        :class:`SAEEvaluation`.

    Raises:
        ValueError: no tokens, a batch whose codes are not (..., d_sae), or a
            bad ``rank_window`` / ``underuse_ratio`` / ``batch_size``.
    """
    d_sae = sae.cfg.d_sae
    window = fit_rank_window(d_sae, rank_window)
    check_number(underuse_ratio, "underuse_ratio", ge=0, le=1)
    check_number(batch_size, "batch_size", integer=True, gt=0)
    encode_fn = sae.encode if encode is None else encode
    device = sae.W_dec.device

    inputs = _Moments(full=False)  # x: for the NMSE denominator
    l0_and_norm = _Moments(full=True)  # (L0, ||x||) per token: for their correlation
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
    l0_histogram = torch.zeros(d_sae + 1, dtype=torch.int64, device=device)

    was_training = sae.training
    sae.eval()
    try:
        for index, x in enumerate(
            tqdm(_as_batches(batches, batch_size), desc=description, disable=not show_progress)
        ):
            x = x.to(device)
            feature_acts = encode_fn(x)
            if feature_acts.shape[-1] != d_sae:
                raise ValueError(
                    f"batch {index}: the codes have shape {tuple(feature_acts.shape)}, "
                    f"expected (..., d_sae={d_sae})"
                )
            sae_out = sae.decode(feature_acts)
            active = (feature_acts != 0).reshape(-1, d_sae)  # (N, d_sae)
            n_tokens = active.shape[0]
            if n_tokens == 0:
                continue
            x_rows = x.reshape(n_tokens, -1).to(torch.float64)  # (N, d_in); hook_z heads joined
            error = sae_out.reshape(n_tokens, -1).to(torch.float64) - x_rows
            squared_error += error.pow(2).sum()
            inputs.add(x_rows)
            l0 = active.sum(-1)  # (N,)
            l0_and_norm.add(torch.stack([l0.to(torch.float64), x_rows.norm(dim=-1)], dim=-1))
            fired += active.sum(0)
            l0_histogram += torch.bincount(l0, minlength=d_sae + 1)
    finally:
        sae.train(was_training)

    n_tokens = inputs.n
    if n_tokens == 0 or inputs.comoment is None or l0_and_norm.comoment is None:
        raise ValueError("evaluate_sae got no tokens")
    # the one read-back
    histogram = l0_histogram.cpu()
    fired_cpu = fired.cpu()
    total_variance = float(inputs.comoment)
    nmse = float(squared_error) / total_variance if total_variance > 0 else float("nan")

    values = torch.arange(d_sae + 1, dtype=torch.float64)
    counts = histogram.to(torch.float64)
    l0_mean = float((values * counts).sum()) / n_tokens
    l0_var = float(((values - l0_mean).pow(2) * counts).sum()) / max(n_tokens - 1, 1)
    seen = histogram.nonzero().flatten()
    densities = fired_cpu.to(torch.float64) / n_tokens
    n_live = int((fired_cpu > 0).sum())
    fit_window = _fit(densities, window, n_live)
    fit_all = _fit(densities, None, n_live)
    dead = int((fired_cpu == 0).sum())
    underused = (
        int(underused_mask(densities, fit_window, underuse_ratio).sum())
        if fit_window is not None
        else dead
    )

    mcc = uniqueness = None
    if feature_vectors is not None:
        from sae_lens.synthetic import feature_uniqueness, mean_correlation_coefficient

        decoder = sae.W_dec.detach().float().cpu()
        truth = feature_vectors.detach().float().cpu()
        mcc = float(mean_correlation_coefficient(decoder, truth))
        uniqueness = float(feature_uniqueness(decoder, truth))

    return SAEEvaluation(
        n_tokens=n_tokens,
        d_sae=d_sae,
        nmse=nmse,
        explained_variance=1.0 - nmse,
        l0_mean=l0_mean,
        l0_std=l0_var**0.5,
        l0_min=int(seen[0]),
        l0_max=int(seen[-1]),
        frac_tokens_zero_l0=int(histogram[0]) / n_tokens,
        dead_latents=dead,
        underused_latents=underused,
        underuse_ratio=float(underuse_ratio),
        l0_norm_corr=_pearson(l0_and_norm.comoment.cpu()),
        zipf_rank_window=window,
        zipf_window=fit_window,
        zipf_all_ranks=fit_all,
        mcc=mcc,
        uniqueness=uniqueness,
        densities=densities,
        l0_histogram=histogram,
    )
