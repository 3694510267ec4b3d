"""Exact threshold calibration from activations.

A Choice SAE encodes one token at a time as a JumpReLU on ``hidden_pre``; its
thresholds must make that per-token encoder fire as the training allocation
did. :func:`compute_thresholds` finds them exactly, as quantiles of a
calibration set, in one streaming pass:

- **global** (Mutual Choice, and SAELens's BatchTopK, which keeps the same
  set): one threshold t with exactly ``T = round(k * N_total)`` of the
  ``N_total x d_sae`` pre-activations strictly above it, so the mean L0 over
  the calibration tokens is k;
- **per latent** (Feature Choice): a threshold t_j with exactly
  ``m_j = round(rho_j * N_total)`` calibration tokens above it, ``rho_j`` the
  latent's target density (its expected capacity over the batch size).

:func:`calibrate_thresholds` writes them into a SAE: a training SAE of this
package, a saved one (SAELens's ``jumprelu``, its targets read from the
metadata this package's training config leaves there, which covers a
``batchtopk``-trained JumpReLU too), or a 0.1.0 inference SAE. The training
SAEs call :func:`compute_thresholds` on their most recent training tokens when
they are saved.

Only positive pre-activations can ever fire (``relu``), so thresholds are
>= 0 and a latent with fewer positive values than its target gets 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from sae_lens.saes.sae import SAE
from tqdm.auto import tqdm

from sae_lens_choice.allocation import batch_budget, check_finite, plan_feature_choice
from sae_lens_choice.choice_base import ChoiceSAE, ChoiceTrainingSAE, choice_hidden_pre
from sae_lens_choice.feature_choice_sae import FeatureChoiceSAEConfig, target_densities
from sae_lens_choice.inference import choice_settings
from sae_lens_choice.validation import check_number

__all__ = [
    "MIN_TARGET_COUNT",
    "CalibrationTarget",
    "calibrate_thresholds",
    "calibration_target",
    "compute_thresholds",
]

T_SAE = TypeVar("T_SAE", bound=SAE[Any])

_NEG_INF = float("-inf")

#: Below this many target tokens a threshold is a noisy extreme quantile of the
#: calibration set: calibration warns and says how many tokens would do.
MIN_TARGET_COUNT = 5


@dataclass(frozen=True)
class CalibrationTarget:
    """What a SAE's thresholds must hit.

    Attributes:
        k: expected L0 per token.
        densities: (d_sae,) float64 per-latent target densities (Feature
            Choice), or ``None`` for one global threshold (Mutual Choice,
            BatchTopK).
    """

    k: float
    densities: torch.Tensor | None = None


def calibration_target(sae: SAE[Any]) -> CalibrationTarget:
    """The target of ``sae``'s thresholds, from its config or saved metadata.

    Raises:
        TypeError: ``sae`` is none of the SAEs this package can calibrate.
    """
    if isinstance(sae, ChoiceTrainingSAE):
        return sae.calibration_target()
    if isinstance(sae, ChoiceSAE):
        cfg = sae.cfg
        if isinstance(cfg, FeatureChoiceSAEConfig):
            densities = target_densities(
                cfg.d_sae, cfg.k, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta
            )
            return CalibrationTarget(k=cfg.k, densities=densities)
        return CalibrationTarget(k=cfg.k)
    settings = choice_settings(sae)
    if settings is not None and isinstance(getattr(sae, "threshold", None), torch.Tensor):
        if settings["architecture"] == "feature_choice":
            densities = target_densities(
                sae.cfg.d_sae,
                settings["k"],
                settings.get("capacity", "zipf"),
                settings.get("zipf_alpha", 1.0),
                settings.get("zipf_beta", 0.0),
            )
            ranking = sae.cfg.metadata.get("capacity_ranking")
            if ranking is not None:  # capacity_order="density_rank": saved with the SAE
                order = torch.as_tensor(ranking, dtype=torch.long)
                densities = torch.empty_like(densities).scatter_(0, order, densities)
            return CalibrationTarget(k=settings["k"], densities=densities)
        saved = sae.cfg.metadata.get("latent_densities")
        if saved is not None:  # Mutual Choice with a latent_floor: saved with the SAE
            return CalibrationTarget(
                k=settings["k"], densities=torch.as_tensor(saved, dtype=torch.float64)
            )
        return CalibrationTarget(k=settings["k"])
    raise TypeError(
        "calibrate_thresholds needs a Mutual Choice, Feature Choice or BatchTopK SAE (a "
        "training SAE of this package, a saved JumpReLU whose metadata names its training "
        f"architecture and k, or a 0.1.0 inference SAE); got {type(sae).__name__} "
        f"(architecture {sae.cfg.architecture()!r})"
    )


# ---------------------------------------------------------------------------
# the input stream
# ---------------------------------------------------------------------------


def _is_activations_store(batches: object) -> bool:
    return hasattr(batches, "next_batch") and hasattr(batches, "train_batch_size_tokens")


def _as_tensor(batch: Any, d_in: int, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}, expected a tensor "
            f"of shape (..., d_in={d_in})"
        )
    return batch


def _n_tokens(batch: torch.Tensor, d_in: int, index: int, hook_z: bool) -> int:
    # hook_z SAEs take (..., n_heads, d_head) and flatten the heads themselves
    width = batch.shape[-1] * (batch.shape[-2] if hook_z and batch.ndim > 1 else 1)
    if width != d_in:
        raise ValueError(
            f"calibration batch {index} has shape {tuple(batch.shape)}; expected (..., d_in={d_in})"
        )
    return batch.numel() // d_in


def _token_budget(
    batches: Any, d_in: int, n_batches: int | None, max_tokens: int | None, hook_z: bool
) -> int | None:
    """An upper bound on the calibration tokens known before reading them, or None.

    None means: the size of the first batch times the number of batches
    (``n_batches`` or ``len(batches)``), which later batches must not exceed.
    """
    if max_tokens is not None:
        return max_tokens
    if isinstance(batches, (list, tuple)):
        items = batches if n_batches is None else batches[:n_batches]
        # shapes only: no copies
        return sum(_n_tokens(_as_tensor(b, d_in, i), d_in, i, hook_z) for i, b in enumerate(items))
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
    """The ``m`` largest positive values seen, over all entries (one global threshold)."""

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
    """Per latent j, the ``m_j`` largest positive values seen (per-latent thresholds).

    Latents are grouped by ``m_j`` (as :func:`plan_feature_choice` groups
    capacities) and each group is a padded (g, m_group) tensor, so the padding
    at most doubles the memory.
    """

    def __init__(self, m: torch.Tensor, device: torch.device, dtype: torch.dtype):
        plan = plan_feature_choice(m, int(m.max()))
        self.order = plan.order.to(device) if plan.order is not None else None
        self.groups = plan.groups
        self.values = [
            torch.full((end - start, 0), _NEG_INF, device=device, dtype=dtype)
            for start, end, _ in self.groups
        ]

    def update(self, hidden_pre: torch.Tensor) -> None:
        cols = hidden_pre.reshape(-1, hidden_pre.shape[-1]).t()  # (F, N)
        if self.order is not None:
            cols = cols.index_select(0, self.order)
        cols = torch.where(cols > 0, cols, cols.new_full((), _NEG_INF))
        for i, (start, end, m) in enumerate(self.groups):
            self.values[i] = _merge_top(self.values[i], cols[start:end], m)

    def thresholds(self, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(F,) float64 per-latent thresholds for target ``counts``, in latent order."""
        out = torch.empty(counts.numel(), dtype=torch.float64)
        for (start, end, _), values in zip(self.groups, self.values):
            latents = torch.arange(start, end) if self.order is None else self.order[start:end]
            latents = latents.cpu()
            out[latents] = _thresholds_from_sorted(values.cpu(), counts[latents], dtype)
        return out


def _thresholds_from_sorted(
    values: torch.Tensor, m: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Thresholds with exactly ``m[i]`` of ``values[i]`` (sorted, descending) strictly above.

    The midpoint between the m-th and (m+1)-th values when it falls strictly
    between them in ``dtype`` (the dtype ``hidden_pre`` is compared in); else
    the (m+1)-th value itself, which is exact. Ties at the boundary keep fewer
    than ``m``. With ``m = 0`` the largest value (nothing fires on this set);
    with fewer than m+1 positive values, 0 (every positive value fires).

    Args:
        values: (G, L) rows sorted descending (non-positive entries ignored).
        m: (G,) int64 target counts.
    """
    values = values.to(torch.float64)
    n_positive = (values > 0).sum(-1)  # (G,)
    if values.shape[-1] == 0:
        return torch.zeros(values.shape[0], dtype=torch.float64)
    last = values.shape[-1] - 1
    lower = values.gather(-1, m.clamp(max=last)[:, None]).squeeze(-1)
    upper = values.gather(-1, (m - 1).clamp(min=0, max=last)[:, None]).squeeze(-1)
    mid = ((lower + upper) / 2).to(dtype).to(torch.float64)
    between = (lower <= mid) & (mid < upper) & (m > 0)
    threshold = torch.where(between, mid, lower)
    return torch.where(n_positive <= m, torch.zeros_like(threshold), threshold)


# ---------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------


def _counts(densities: torch.Tensor, n_tokens: int) -> torch.Tensor:
    # round half up, as batch_budget does; densities <= 1 so counts <= n_tokens
    return torch.floor(densities * n_tokens + 0.5).to(torch.long).clamp(0, n_tokens)


def _warn_if_few(target: CalibrationTarget, n_tokens: int, stacklevel: int) -> None:
    if target.densities is None:
        if batch_budget(target.k, n_tokens) < MIN_TARGET_COUNT:
            warnings.warn(
                f"calibration on {n_tokens} token(s) puts the global threshold at the "
                f"{batch_budget(target.k, n_tokens)}-th largest value: unreliable; use at "
                f"least {int(MIN_TARGET_COUNT / target.k) + 1} tokens",
                UserWarning,
                stacklevel=stacklevel,
            )
        return
    counts = _counts(target.densities, n_tokens)
    few = int((counts < MIN_TARGET_COUNT).sum())
    if few:
        needed = int(MIN_TARGET_COUNT / float(target.densities.clamp(min=1e-12).min())) + 1
        warnings.warn(
            f"calibration on {n_tokens} token(s): {few} latent threshold(s) rest on fewer "
            f"than {MIN_TARGET_COUNT} target tokens each and are unreliable (a latent whose "
            "target count rounds to 0 fires on none of them); calibrate on at least "
            f"{needed} tokens",
            UserWarning,
            stacklevel=stacklevel,
        )


def compute_thresholds(
    sae: SAE[Any],
    batches: Iterable[torch.Tensor] | torch.Tensor | Any,
    *,
    target: CalibrationTarget | None = None,
    n_batches: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Exact thresholds for ``sae`` on ``batches``, as a (d_sae,) float64 tensor.

    Thresholds are in ``hidden_pre`` units: after ``process_sae_in`` and, when
    ``rescale_acts_by_decoder_norm``, after the decoder-norm rescaling, exactly
    what the encoder compares. See :func:`calibrate_thresholds` for the rule,
    the arguments and the memory bound; ``target`` defaults to
    :func:`calibration_target` of ``sae``. Nothing is written into ``sae``.
    """
    # stacklevel 5: warnings name the caller (warn, _compute_thresholds, its no_grad wrapper, us)
    return _compute_thresholds(sae, batches, target, n_batches, max_tokens, show_progress, 5)


@torch.no_grad()
def _compute_thresholds(
    sae: SAE[Any],
    batches: Any,
    target: CalibrationTarget | None,
    n_batches: int | None,
    max_tokens: int | None,
    show_progress: bool,
    stacklevel: int,
) -> torch.Tensor:
    target = calibration_target(sae) if target is None else target
    cfg = sae.cfg
    d_in = cfg.d_in
    if n_batches is not None:
        check_number(n_batches, "n_batches", integer=True, ge=1)
    if max_tokens is not None:
        check_number(max_tokens, "max_tokens", integer=True, ge=1)
    hook_z = bool(getattr(sae, "hook_z_reshaping_mode", False))

    store = _is_activations_store(batches)
    if store and n_batches is None and max_tokens is None:
        raise ValueError(
            "an ActivationsStore never runs out: pass n_batches or max_tokens to "
            "calibrate_thresholds"
        )
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    budget = _token_budget(batches, d_in, n_batches, max_tokens, hook_z)
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
    n_tokens = 0
    n_read = 0
    progress = tqdm(
        total=n_expected,
        desc=f"Calibrating {cfg.architecture()} thresholds",
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
            x = _as_tensor(batch, d_in, n_read)
            size = _n_tokens(x, d_in, n_read, hook_z)
            if max_tokens is not None and n_tokens + size > max_tokens:
                # keep whole tokens: cut along the flattened leading dimensions
                token_shape = x.shape[-2:] if hook_z else x.shape[-1:]
                x = x.reshape(-1, *token_shape)[: max_tokens - n_tokens]
                size = x.shape[0]
            n_read += 1
            if size == 0:
                progress.update(1)
                continue
            if tracker is None:
                if budget is None:
                    assert n_expected is not None
                    budget = size * n_expected
                tracker = _make_tracker(target, budget, device, keep_dtype)
            assert budget is not None
            if n_tokens + size > budget:
                raise ValueError(
                    f"calibration batch {n_read - 1} brings the token count to "
                    f"{n_tokens + size}, above the {budget} planned from the first "
                    "batch's size; batches of varying size need max_tokens=<upper bound>"
                )
            hidden_pre = choice_hidden_pre(sae, sae.process_sae_in(x.to(device)))  # (..., F)
            check_finite(hidden_pre, f"hidden_pre of calibration batch {n_read - 1}")
            tracker.update(hidden_pre.to(keep_dtype))
            n_tokens += size
            progress.update(1)
            progress.set_postfix(tokens=n_tokens)
    finally:
        progress.close()
    if tracker is None or n_tokens == 0:
        raise ValueError("calibrate_thresholds got no calibration tokens")
    _warn_if_few(target, n_tokens, stacklevel)

    if isinstance(tracker, _GlobalTop):
        m = torch.tensor([batch_budget(target.k, n_tokens)])
        value = _thresholds_from_sorted(tracker.values.cpu()[None, :], m, compute_dtype)
        return value.expand(cfg.d_sae).clone()
    assert target.densities is not None
    return tracker.thresholds(_counts(target.densities, n_tokens), compute_dtype)


def _make_tracker(
    target: CalibrationTarget, budget: int, device: torch.device, dtype: torch.dtype
) -> _GlobalTop | _PerLatentTop:
    # +1: the threshold sits between the m-th and (m+1)-th values. Counts grow
    # with N, so those for the budget cover any N_total <= budget.
    if target.densities is None:
        return _GlobalTop(batch_budget(target.k, budget) + 1, device, dtype)
    m = (_counts(target.densities, budget) + 1).clamp(max=budget)
    return _PerLatentTop(m, device, dtype)


def calibrate_thresholds(
    sae: T_SAE,
    batches: Iterable[torch.Tensor] | torch.Tensor | Any,
    *,
    n_batches: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> T_SAE:
    """Recompute the SAE's inference thresholds exactly from (held-out) activations.

    Works on every SAE of this package: a saved one as SAELens loads it
    (``jumprelu``, its target read from the metadata the training config
    leaves: training architecture, ``k`` and Feature Choice's capacity
    settings; a ``batchtopk``-trained JumpReLU works the same way), a training
    SAE (``threshold`` 0-d for Mutual Choice, (d_sae,) for Feature Choice), or a
    0.1.0 inference SAE.

    - Global threshold (Mutual Choice, BatchTopK): exactly ``T = round(k *
      N_total)`` calibration pre-activations strictly above it (midway between
      the T-th and (T+1)-th largest), so the mean L0 over the calibration
      tokens is k.
    - Per-latent thresholds (Feature Choice): exactly ``m_j = round(rho_j *
      N_total)`` tokens above each, ``rho_j`` the latent's target density.

    Ties at a boundary make the count fall short, never exceed it. Below
    :data:`MIN_TARGET_COUNT` target tokens per threshold a warning says how
    many calibration tokens would be enough.

    Memory: one streaming pass that keeps only the top values that can still
    matter: the ``T + 1`` largest overall, or the ``m_j + 1`` largest of each
    latent (in groups padded to at most twice that): O(k * N_total + d_sae)
    floats plus one batch's ``hidden_pre``, never all activations. The counts
    come from an upper bound on N_total known up front: ``max_tokens``, the
    sizes of a list/tuple of tensors, or the first batch's size times
    ``n_batches`` (or ``len(batches)``); with the last, a later batch larger
    than the first raises ``ValueError`` (pass ``max_tokens`` instead).

    Args:
        sae: the SAE; its thresholds are replaced in place.
        batches: activations at the SAE's hook, in the units the SAE takes as
            input: a SAELens ``ActivationsStore`` (read with ``next_batch()``;
            it never ends, so give ``n_batches`` or ``max_tokens``), any
            iterable of tensors of shape (..., d_in), or one such tensor.
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
        TypeError: a SAE this package cannot calibrate.
    """
    new = _compute_thresholds(sae, batches, None, n_batches, max_tokens, show_progress, 5)
    threshold: torch.Tensor = sae.threshold  # type: ignore[assignment]
    with torch.no_grad():
        # a training Mutual Choice SAE holds one global value (0-d)
        threshold.copy_((new[0] if threshold.ndim == 0 else new).to(threshold))
    if isinstance(sae, ChoiceTrainingSAE):
        # further training blends into the calibrated values instead of
        # replacing them, and a save right now keeps them
        sae.threshold_updates.clamp_(min=1)
        sae._thresholds_calibrated = True
    return sae
