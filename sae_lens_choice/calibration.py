"""Exact threshold calibration from held-out activations.

Training tracks the inference thresholds as an EMA of the smallest kept value,
which lags a moving SAE and is biased for fractional capacities.
:func:`calibrate_thresholds` replaces them by exact quantiles of a calibration
set, computed in one streaming pass:

- **Mutual Choice**: one global threshold t such that exactly
  ``T = round(k * N_total)`` of the ``N_total x d_sae`` pre-activations of the
  calibration tokens are strictly above t (mean L0 = k on that set).
- **Feature Choice**: per latent j, a threshold t_j such that exactly
  ``m_j = round(rho_j * N_total)`` calibration tokens are strictly above it,
  with ``rho_j = c_j / n`` the training target density of latent j (``c_j``
  the expected capacities for a batch of ``n`` tokens).

Only positive pre-activations can ever fire (``relu``), so thresholds are
>= 0 and a latent with fewer positive values than its target gets 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from sae_lens.saes.sae import SAE
from tqdm.auto import tqdm

from sae_lens_choice.allocation import batch_budget, check_finite, plan_feature_choice
from sae_lens_choice.inference import FeatureChoice, choice_hidden_pre

__all__ = ["calibrate_thresholds", "target_densities"]

T_SAE = TypeVar("T_SAE", bound=SAE[Any])

_NEG_INF = float("-inf")


def target_densities(sae: SAE[Any], n_tokens: int) -> torch.Tensor:
    """Feature Choice target firing densities ``c_j / n`` (float64, (d_sae,)).

    ``c_j`` are the expected capacities for a batch of ``n_tokens`` tokens.
    Water-filling clips ``c_j`` at ``n``, i.e. densities at 1, so the result
    does not depend on ``n_tokens`` beyond rounding error.
    """
    cfg = sae.cfg
    fc = FeatureChoice(cfg.k, cfg.d_sae, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta)
    return fc.expected_capacities(n_tokens) / n_tokens


def _kind(sae: SAE[Any]) -> str:
    arch = sae.cfg.architecture()
    if arch not in ("mutual_choice", "feature_choice"):
        raise TypeError(
            "calibrate_thresholds needs a mutual_choice or feature_choice SAE "
            f"(inference or training), got architecture {arch!r}"
        )
    if not isinstance(getattr(sae, "threshold", None), torch.Tensor):
        raise TypeError(f"{type(sae).__name__} has no threshold tensor to calibrate")
    return arch


# ---------------------------------------------------------------------------
# the input stream
# ---------------------------------------------------------------------------


def _is_activations_store(batches: object) -> bool:
    return hasattr(batches, "next_batch") and hasattr(batches, "train_batch_size_tokens")


def _as_matrix(batch: Any, d_in: int, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}, expected a tensor "
            f"of shape (..., d_in={d_in})"
        )
    if batch.ndim == 0 or batch.shape[-1] != d_in:
        raise ValueError(
            f"calibration batch {index} has shape {tuple(batch.shape)}; expected (..., d_in={d_in})"
        )
    return batch.reshape(-1, d_in)


def _token_budget(
    batches: Any, d_in: int, n_batches: int | None, max_tokens: int | None
) -> int | None:
    """An upper bound on the calibration tokens known before reading them, or None.

    None means: the size of the first batch times the number of batches
    (``n_batches`` or ``len(batches)``), which later batches must not exceed.
    """
    if max_tokens is not None:
        return max_tokens
    if isinstance(batches, (list, tuple)):
        items = batches if n_batches is None else batches[:n_batches]
        return sum(
            _as_matrix(b, d_in, i).shape[0] for i, b in enumerate(items)
        )  # shapes only: no copies
    return None


# ---------------------------------------------------------------------------
# streaming top-m
# ---------------------------------------------------------------------------


def _merge_top(kept: torch.Tensor, new: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` largest of ``kept`` and ``new`` along the last dim, sorted descending."""
    both = torch.cat([kept, new], dim=-1)
    if both.shape[-1] <= m:
        return torch.sort(both, dim=-1, descending=True).values
    return torch.topk(both, m, dim=-1, sorted=True).values


class _GlobalTop:
    """The ``m`` largest positive values seen, over all entries (Mutual Choice)."""

    def __init__(self, m: int, device: torch.device, dtype: torch.dtype):
        self.m = m
        self.values = torch.empty(0, device=device, dtype=dtype)

    def update(self, hidden_pre: torch.Tensor) -> None:
        # Values at or below the current m-th largest (or <= 0) can never enter
        # the top m: filter them out before the merge.
        floor = 0.0
        if self.values.numel() >= self.m:
            floor = max(floor, float(self.values[self.m - 1]))
        flat = hidden_pre.reshape(-1)
        candidates = flat[flat > floor]
        if candidates.numel() > self.m:
            candidates = torch.topk(candidates, self.m, sorted=False).values
        self.values = _merge_top(self.values, candidates, self.m)


class _PerLatentTop:
    """Per latent j, the ``m_j`` largest positive values seen (Feature Choice).

    Latents are grouped by ``m_j`` (as :func:`plan_feature_choice` groups
    capacities) and each group is a padded (g, m_group) tensor, so the padding
    at most doubles the memory.
    """

    def __init__(self, m: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.m = m
        plan = plan_feature_choice(m, int(m.max()))
        self.order = plan.order.to(device) if plan.order is not None else None
        self.groups = plan.groups
        self.values = [
            torch.full((end - start, 0), _NEG_INF, device=device, dtype=dtype)
            for start, end, _ in self.groups
        ]

    def update(self, hidden_pre: torch.Tensor) -> None:
        cols = hidden_pre.t()  # (F, N)
        if self.order is not None:
            cols = cols.index_select(0, self.order)
        cols = torch.where(cols > 0, cols, cols.new_full((), _NEG_INF))
        for i, (start, end, m) in enumerate(self.groups):
            self.values[i] = _merge_top(self.values[i], cols[start:end], m)

    def per_latent(self, d_sae: int) -> list[torch.Tensor]:
        """Sorted kept values of each latent, in latent order.

        Every m_j >= 1, so the groups cover all latents.
        """
        out: list[torch.Tensor | None] = [None] * d_sae
        for (start, end, _), values in zip(self.groups, self.values):
            for row, pos in enumerate(range(start, end)):
                j = int(self.order[pos]) if self.order is not None else pos
                out[j] = values[row]
        assert all(v is not None for v in out)
        return out  # type: ignore[return-value]


def _threshold_from_sorted(values: torch.Tensor, m: int, dtype: torch.dtype) -> float:
    """A threshold with exactly ``m`` of ``values`` (sorted, descending) strictly above it.

    The midpoint between the m-th and (m+1)-th values when it falls strictly
    between them in ``dtype`` (the dtype ``hidden_pre`` is compared in); else
    the (m+1)-th value itself, which is exact. Ties at the boundary keep fewer
    than ``m``. With ``m = 0`` the largest value (nothing fires on this set);
    with fewer than m+1 positive values, 0 (every positive value fires).
    """
    positive = values[values > 0]
    if positive.numel() <= m:
        return 0.0
    lower = float(positive[m])
    if m == 0:
        return lower
    upper = float(positive[m - 1])
    mid = torch.tensor((lower + upper) / 2, dtype=torch.float64).to(dtype)
    if lower <= float(mid) < upper:
        return float(mid)
    return lower


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------


@torch.no_grad()
def calibrate_thresholds(
    sae: T_SAE,
    batches: Iterable[torch.Tensor] | torch.Tensor | Any,
    *,
    n_batches: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> T_SAE:
    """Recompute the SAE's inference thresholds exactly from held-out activations.

    Works on Mutual Choice and Feature Choice SAEs, inference
    (``MutualChoiceSAE``/``FeatureChoiceSAE``: ``threshold`` of shape
    (d_sae,)) or training (``threshold`` 0-d for Mutual Choice, (d_sae,) for
    Feature Choice). Thresholds are in ``hidden_pre`` units: after
    ``process_sae_in`` and, when ``rescale_acts_by_decoder_norm``, after the
    decoder-norm rescaling, exactly what the encoder compares.

    - Mutual Choice: a global threshold with exactly ``T = round(k * N_total)``
      calibration pre-activations strictly above it (midway between the T-th
      and (T+1)-th largest), so the mean L0 over the calibration tokens is k.
    - Feature Choice: per latent, exactly ``m_j = round(rho_j * N_total)``
      tokens above it, where ``rho_j = c_j / n`` is the target density:
      ``c_j`` the expected capacities (``FeatureChoice.expected_capacities(n)``)
      for ``n`` the size of the first calibration batch (the densities do not
      depend on n, see :func:`target_densities`).

    Ties at a boundary make the count fall short, never exceed it.

    Memory: one streaming pass that keeps only the top values that can still
    matter: the ``T + 1`` largest overall (Mutual Choice), or the ``m_j + 1``
    largest of each latent (Feature Choice, in groups padded to at most twice
    that). That is O(k * N_total + d_sae) floats plus one batch's hidden_pre,
    never all activations. The counts come from an upper bound on N_total
    known up front: ``max_tokens``, the sizes of a list/tuple of tensors, or
    the first batch's size times ``n_batches`` (or ``len(batches)``); with the
    last, a later batch larger than the first raises ``ValueError`` (pass
    ``max_tokens`` instead).

    Args:
        sae: the SAE; its thresholds are replaced in place.
        batches: activations at the SAE's hook, in the units the SAE takes as
            input: a SAELens ``ActivationsStore`` (read with ``next_batch()``;
            it never ends, so give ``n_batches`` or ``max_tokens``), any
            iterable of tensors of shape (..., d_in), or one such tensor (one
            batch).
        n_batches: read at most this many batches.
        max_tokens: read at most this many tokens (the last batch is cut).
        show_progress: show a tqdm progress bar.

    Returns:
        ``sae``, with calibrated thresholds. For a training SAE its
        ``threshold_updates`` counters are set to at least 1, so further
        training blends into the calibrated values instead of replacing them.

    Raises:
        ValueError: no tokens, wrong activation width, a non-finite
            ``hidden_pre``, or an endless stream without a bound.
    """
    kind = _kind(sae)
    cfg = sae.cfg
    d_in, d_sae = cfg.d_in, cfg.d_sae
    if n_batches is not None and not (isinstance(n_batches, int) and n_batches >= 1):
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")

    store = _is_activations_store(batches)
    if store and n_batches is None and max_tokens is None:
        raise ValueError(
            "an ActivationsStore never runs out: pass n_batches or max_tokens to "
            "calibrate_thresholds"
        )
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    budget = _token_budget(batches, d_in, n_batches, max_tokens)
    n_expected: int | None = n_batches
    if n_expected is None and not store and hasattr(batches, "__len__"):
        n_expected = len(batches)  # type: ignore[arg-type]
    if budget is None and n_expected is None:
        raise ValueError(
            "calibrate_thresholds cannot bound the number of calibration tokens of this "
            "iterable in advance (needed for an exact streaming quantile): pass "
            "n_batches or max_tokens (an upper bound on the tokens), or a list of tensors"
        )

    iterator: Iterator[Any] = iter(batches)
    device = sae.W_enc.device
    compute_dtype = sae.W_enc.dtype
    keep_dtype = torch.promote_types(compute_dtype, torch.float32)
    tracker: _GlobalTop | _PerLatentTop | None = None
    densities: torch.Tensor | None = None
    first_size: int | None = None
    n_tokens = 0
    n_read = 0
    progress = tqdm(
        total=n_expected,
        desc=f"Calibrating {kind} thresholds",
        unit="batch",
        disable=not show_progress,
    )
    try:
        while n_batches is None or n_read < n_batches:
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            x = _as_matrix(batch, d_in, n_read)  # (N_b, d_in)
            if max_tokens is not None:
                x = x[: max_tokens - n_tokens]
            n_read += 1
            if x.shape[0] == 0:
                progress.update(1)
                continue
            if first_size is None:
                first_size = x.shape[0]
                if budget is None:
                    assert n_expected is not None
                    budget = first_size * n_expected
                if kind == "feature_choice":
                    densities = target_densities(sae, first_size)
                tracker = _make_tracker(kind, sae, budget, densities, device, keep_dtype)
            assert budget is not None
            if n_tokens + x.shape[0] > budget:
                raise ValueError(
                    f"calibration batch {n_read - 1} brings the token count to "
                    f"{n_tokens + x.shape[0]}, above the {budget} planned from the first "
                    "batch's size; batches of varying size need max_tokens=<upper bound>"
                )
            hidden_pre = choice_hidden_pre(sae, sae.process_sae_in(x.to(device)))  # (N_b, F)
            check_finite(hidden_pre, f"hidden_pre of calibration batch {n_read - 1}")
            assert tracker is not None
            tracker.update(hidden_pre.to(keep_dtype))
            n_tokens += x.shape[0]
            progress.update(1)
            progress.set_postfix(tokens=n_tokens)
    finally:
        progress.close()
    if tracker is None or n_tokens == 0:
        raise ValueError("calibrate_thresholds got no calibration tokens")

    if isinstance(tracker, _GlobalTop):
        m = batch_budget(cfg.k, n_tokens)
        value = _threshold_from_sorted(tracker.values, m, compute_dtype)
        new = torch.full((d_sae,), value, dtype=torch.float64)
    else:
        assert densities is not None
        counts = _counts(densities, n_tokens)
        kept = tracker.per_latent(d_sae)
        new = torch.tensor(
            [_threshold_from_sorted(kept[j], int(counts[j]), compute_dtype) for j in range(d_sae)],
            dtype=torch.float64,
        )
    _write_thresholds(sae, new)
    return sae


def _counts(densities: torch.Tensor, n_tokens: int) -> torch.Tensor:
    # round half up, as batch_budget does; densities <= 1 so counts <= n_tokens
    return torch.floor(densities * n_tokens + 0.5).to(torch.long).clamp(0, n_tokens)


def _make_tracker(
    kind: str,
    sae: SAE[Any],
    budget: int,
    densities: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> _GlobalTop | _PerLatentTop:
    # +1: the threshold sits between the m-th and (m+1)-th values. Counts grow
    # with N, so those for the budget cover any N_total <= budget.
    if kind == "mutual_choice":
        return _GlobalTop(batch_budget(sae.cfg.k, budget) + 1, device, dtype)
    assert densities is not None
    m = (_counts(densities, budget) + 1).clamp(max=budget)
    return _PerLatentTop(m, device, dtype)


def _write_thresholds(sae: SAE[Any], new: torch.Tensor) -> None:
    threshold: torch.Tensor = sae.threshold  # type: ignore[assignment]
    if threshold.ndim == 0:
        # Training Mutual Choice SAE: one global value.
        threshold.copy_(new[0].to(threshold))
    else:
        if threshold.shape != new.shape:
            raise ValueError(
                f"{type(sae).__name__}.threshold has shape {tuple(threshold.shape)}, "
                f"expected (d_sae,) = {tuple(new.shape)}"
            )
        threshold.copy_(new.to(threshold))
    updates = getattr(sae, "threshold_updates", None)
    if isinstance(updates, torch.Tensor):
        updates.clamp_(min=1)
