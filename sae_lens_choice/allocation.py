"""Allocation rules: which (token, latent) pairs a batch keeps.

Pure torch; nothing here imports SAELens. Every rule takes ``hidden_pre`` with
any number of leading (token) dimensions and a trailing latent dimension F, and
returns ``feature_acts`` of the same shape: ``relu(hidden_pre)`` on the chosen
pairs, zero elsewhere. Only positive values are ever kept, so a rule may keep
fewer pairs than its budget when the batch has too few positive entries.

The selection is greedy by value (the paper's monotonic importance heuristic)
and is not differentiated: gradients reach exactly the kept entries, as they
would through ``relu`` restricted to them.

Notation: N tokens (the product of the leading dimensions), F latents,
T = round(k * N) pairs for a batch at expected L0 ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from typing_extensions import TypedDict, Unpack

from sae_lens_choice.validation import check_number, fail

MutualChoiceMethod = Literal["auto", "candidates", "flat"]

__all__ = [
    "ChoicePairs",
    "FeatureChoiceOptions",
    "FeatureChoicePlan",
    "MutualChoiceOptions",
    "batch_budget",
    "capacity_bounds",
    "check_finite",
    "check_zipf_parameters",
    "feature_choice",
    "feature_choice_pairs",
    "mutual_choice",
    "mutual_choice_pairs",
    "pairs_to_dense",
    "plan_feature_choice",
    "round_capacities",
    "rounding_offset",
    "token_choice",
    "uniform_capacities",
    "zipf_capacities",
]


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _as_matrix(hidden_pre: torch.Tensor) -> torch.Tensor:
    """View ``hidden_pre`` as (N, F); a 1-D input is one token."""
    if not isinstance(hidden_pre, torch.Tensor):
        raise TypeError(f"hidden_pre must be a torch.Tensor, got {type(hidden_pre).__name__}")
    if hidden_pre.ndim == 0:
        raise ValueError("hidden_pre must have a latent dimension; got a 0-d tensor")
    if hidden_pre.numel() == 0:
        raise ValueError(
            f"hidden_pre is empty (shape {tuple(hidden_pre.shape)}): an allocation needs "
            "at least one token and one latent"
        )
    if not hidden_pre.is_floating_point():
        raise ValueError(f"hidden_pre must be a floating tensor, got dtype {hidden_pre.dtype}")
    return hidden_pre.reshape(-1, hidden_pre.shape[-1])


def check_finite(hidden_pre: torch.Tensor, name: str = "hidden_pre") -> None:
    """Raise ``ValueError`` if ``hidden_pre`` holds NaN or inf.

    A NaN compares larger than every number in ``torch.topk``, so one NaN would
    silently win every selection. This check reads a flag back from the device,
    so hot loops call it only occasionally (see the training SAEs).
    """
    if not bool(torch.isfinite(hidden_pre).all()):
        n_bad = int((~torch.isfinite(hidden_pre)).sum())
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or inf); check the input "
            "activations and the learning rate (a diverged SAE produces NaN)"
        )


def _check_k(k: float, d_sae: int, name: str = "k") -> None:
    check_number(k, name, gt=0, hint="k is the expected number of active latents per token")
    if k > d_sae:
        fail(name, f"= {k} is larger than the number of latents d_sae = {d_sae}; use k <= d_sae")


def batch_budget(k: float, n_tokens: int) -> int:
    """T = round(k * N), rounding halves up, so ``k`` is the expected L0 per token."""
    return math.floor(k * n_tokens + 0.5)


# ---------------------------------------------------------------------------
# the pairs a selection keeps
# ---------------------------------------------------------------------------


class ChoicePairs(NamedTuple):
    """The (token, latent) pairs an allocation keeps, with their values.

    A selection is computed without autograd and returned in this form, so
    training can decode from the kept pairs alone (:mod:`sae_lens_choice.sparse`)
    or scatter them into a dense ``feature_acts`` (:func:`pairs_to_dense`).

    Attributes:
        token_idx: (P,) int64 row of each pair in the (N, F) matrix.
        latent_idx: (P,) int64 latent of each pair.
        values: (P,) detached ``relu(hidden_pre)`` of each pair; 0 marks a
            padding slot, which keeps ``P`` independent of the data (no
            read-back) and contributes nothing. Pairs are distinct.
    """

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor

    def kept(self) -> torch.Tensor:
        """(P,) bool: the pairs that fire (positive value)."""
        return self.values > 0

    def latent_counts(self, d_sae: int) -> torch.Tensor:
        """(F,) int64: how many tokens each latent fires on."""
        counts = torch.zeros(d_sae, dtype=torch.long, device=self.values.device)
        return counts.index_add_(0, self.latent_idx, self.kept().to(torch.long))

    def token_counts(self, n_tokens: int) -> torch.Tensor:
        """(N,) int64: how many latents each token fires on (its L0)."""
        counts = torch.zeros(n_tokens, dtype=torch.long, device=self.values.device)
        return counts.index_add_(0, self.token_idx, self.kept().to(torch.long))

    def smallest_value(self, d_sae: int | None = None) -> torch.Tensor:
        """Smallest firing value: 0-d over all pairs, or (F,) per latent with ``d_sae``.

        ``inf`` where nothing fires. Used for threshold tracking.
        """
        inf = self.values.new_tensor(float("inf"))
        positive = torch.where(self.kept(), self.values, inf)  # (P,)
        if d_sae is None:
            return positive.amin() if positive.numel() else inf
        out = self.values.new_full((d_sae,), float("inf"))
        return out.scatter_reduce_(0, self.latent_idx, positive, reduce="amin")


def pairs_to_dense(pairs: ChoicePairs, hidden_pre: torch.Tensor) -> torch.Tensor:
    """``feature_acts`` of ``hidden_pre``'s shape: ``hidden_pre`` on the kept pairs, else 0.

    Differentiable in ``hidden_pre``: gradients reach exactly the kept pairs, as
    through ``relu`` restricted to them. When ``hidden_pre`` is the transposed
    view of an (F, N) contiguous tensor (the Feature Choice training layout),
    the scatter works in that layout and returns an (N, F) view of it.
    """
    x = hidden_pre.reshape(-1, hidden_pre.shape[-1])  # (N, F)
    n_tokens, d_sae = x.shape
    kept = pairs.kept()
    xt = x.t()  # (F, N)
    if xt.is_contiguous():
        position = pairs.latent_idx * n_tokens + pairs.token_idx  # into (F*N,)
        flat = xt.reshape(-1)
    else:
        position = pairs.token_idx * d_sae + pairs.latent_idx  # into (N*F,)
        flat = x.reshape(-1)
    # (latent, token) pairs are distinct, so scattering zeros for padding is harmless
    values = torch.where(kept, flat.gather(0, position), flat.new_zeros(()))
    out = flat.new_zeros(flat.numel()).scatter_(0, position, values)
    if xt.is_contiguous():
        return out.view(d_sae, n_tokens).t().reshape(hidden_pre.shape)
    return out.view(n_tokens, d_sae).reshape(hidden_pre.shape)


# ---------------------------------------------------------------------------
# Token Choice (SAELens `topk`)
# ---------------------------------------------------------------------------


def token_choice(hidden_pre: torch.Tensor, k: int, *, validate: bool = True) -> torch.Tensor:
    """Each token keeps its ``k`` largest pre-activations (SAELens ``TopK``).

    Args:
        hidden_pre: (..., F) pre-activations.
        k: latents per token, an integer in [1, F].
        validate: check for non-finite values (one device read-back).
    """
    x = _as_matrix(hidden_pre)  # (N, F)
    if isinstance(k, float) and not k.is_integer():
        raise ValueError(f"k must be an integer for token choice, got {k}")
    _check_k(k, x.shape[-1])
    if validate:
        check_finite(x)
    values, indices = torch.topk(x, int(k), dim=-1, sorted=False)  # (N, k)
    # in place: an out-of-place scatter copies the (N, F) zeros once more
    out = torch.zeros_like(x).scatter_(-1, indices, values.relu())
    return out.reshape(hidden_pre.shape)


# ---------------------------------------------------------------------------
# Mutual Choice (same set as SAELens `batchtopk`)
# ---------------------------------------------------------------------------


def _flat_top(x: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (N, F) -> the `budget` largest entries of the whole matrix:
    # values (T,) and flat positions (T,) into x.reshape(-1)
    return torch.topk(x.reshape(-1), budget, sorted=False)


def _widen_candidates(
    x: torch.Tensor,
    cand_values: torch.Tensor,
    cand_indices: torch.Tensor,
    saturated: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top ``budget`` of ``x`` when some tokens had all candidates chosen.

    x: (N, F); cand_values, cand_indices: (N, c), each token's top c; saturated:
    (N,) bool. Returns values (T,) and flat positions (T,) into x.reshape(-1).

    Every entry outside the pool below lies in an unsaturated token, below that
    token's smallest candidate, which is at most the T-th largest candidate value
    (one of its candidates was not chosen) and so at most the T-th largest pool
    value: the pool's top T is the matrix's top T (up to ties).
    """
    n_tokens, d_sae = x.shape
    c = cand_values.shape[1]
    sat = saturated.nonzero().squeeze(1)  # (s,)
    if 4 * sat.numel() >= n_tokens:
        # the widened pool would be a large part of the matrix anyway
        return _flat_top(x, budget)
    rest = (~saturated).nonzero().squeeze(1)  # (N - s,)
    head = rest.numel() * c
    # pool = the unsaturated tokens' candidates, then the saturated tokens' whole rows
    pool = torch.cat(
        [cand_values.index_select(0, rest).reshape(-1), x.index_select(0, sat).reshape(-1)]
    )  # ((N - s) * c + s * F,) >= N * c > T entries
    values, p = torch.topk(pool, budget, sorted=False)  # (T,)
    in_head = p < head
    p_head = p.clamp(max=head - 1)
    p_tail = (p - head).clamp(min=0)
    rows = torch.where(
        in_head,
        rest.index_select(0, torch.div(p_head, c, rounding_mode="floor")),
        sat.index_select(0, torch.div(p_tail, d_sae, rounding_mode="floor")),
    )
    cols = torch.where(
        in_head,
        cand_indices.index_select(0, rest).reshape(-1).gather(0, p_head),
        p_tail % d_sae,
    )
    return values, rows * d_sae + cols


def floor_count(latent_floor: float, k: float, n_tokens: int, d_sae: int) -> int:
    """Pairs each latent keeps first under a Mutual Choice ``latent_floor``.

    ``floor(latent_floor * k * N / F)``: the fraction ``latent_floor`` of the
    uniform share, rounded down so the floors of all latents fit in the batch
    budget T = round(k * N).
    """
    return math.floor(latent_floor * k * n_tokens / d_sae)


def default_candidates_per_token(k: float, d_sae: int) -> int:
    """Candidates each token contributes to the Mutual Choice pre-selection.

    4x the mean L0 covers tokens up to four times busier than average; busier
    tokens widen the candidate pool (see ``mutual_choice``).
    """
    return min(d_sae, max(4 * math.ceil(k), math.ceil(k) + 8))


class MutualChoiceOptions(TypedDict, total=False):
    """The keyword options of :func:`mutual_choice_pairs`, which :func:`mutual_choice` passes on."""

    method: MutualChoiceMethod
    candidates_per_token: int | None
    floor: int
    validate: bool


def mutual_choice(
    hidden_pre: torch.Tensor, k: float, **options: Unpack[MutualChoiceOptions]
) -> torch.Tensor:
    """Keep the T = round(k * N) largest entries of the whole (N, F) matrix.

    This selects the same set as SAELens's ``BatchTopK`` (Bussmann et al. 2024,
    concurrent with the paper); ties are broken arbitrarily, as ``torch.topk`` does.
    The dense form of :func:`mutual_choice_pairs`, whose keyword options it takes.

    Args:
        hidden_pre: (..., F) pre-activations; the leading dimensions are tokens.
        k: expected L0 per token (may be fractional), in (0, F].
        method: ``"flat"`` is one ``torch.topk`` over all N*F entries (what
            BatchTopK does; no host read-back, so it suits CUDA graphs).
            ``"candidates"`` first takes each token's top ``c`` entries
            (``candidates_per_token``), then the global top T among those N*c.
            That is exact unless some token had all ``c`` candidates chosen;
            then those tokens' whole rows join the pool and the top T is taken
            again (exact; a flat top-k if a quarter of the tokens saturate).
            Deciding that reads one boolean back from the device. ``"auto"``
            (the default) picks ``"candidates"`` on CPU, where it is several
            times faster than a flat top-k, and ``"flat"`` on accelerators,
            where the read-back would stall the stream.
        candidates_per_token: ``c`` for ``"candidates"``;
            default :func:`default_candidates_per_token`.
        floor: each latent first keeps its ``floor`` largest entries of the
            batch (0, the default, is plain Mutual Choice); the rest of the T
            go to the largest remaining entries, wherever they fall. Needs
            ``floor * F <= T``. An entry that is not positive never fires, so a
            latent with fewer positive entries keeps fewer.
        validate: check for non-finite values (one device read-back; default
            ``True``).
    """
    return pairs_to_dense(mutual_choice_pairs(hidden_pre, k, **options), hidden_pre)


def mutual_choice_pairs(
    hidden_pre: torch.Tensor,
    k: float,
    *,
    method: MutualChoiceMethod = "auto",
    candidates_per_token: int | None = None,
    floor: int = 0,
    validate: bool = True,
) -> ChoicePairs:
    """The (token, latent) pairs :func:`mutual_choice` keeps, with their values.

    Runs without autograd. ``P = T = round(k * N)`` pairs (fewer only when the
    matrix has fewer entries); a pair whose value is not positive is padding
    (value 0), so the shape never depends on the data. Arguments as for
    :func:`mutual_choice`.
    """
    x = _as_matrix(hidden_pre).detach()  # (N, F)
    n_tokens, d_sae = x.shape
    _check_k(k, d_sae)
    if method not in ("auto", "candidates", "flat"):
        raise ValueError(f"method must be 'auto', 'candidates' or 'flat', got {method!r}")
    if validate:
        check_finite(x)
    budget = min(batch_budget(k, n_tokens), n_tokens * d_sae)
    if candidates_per_token is not None and candidates_per_token < 1:
        raise ValueError(f"candidates_per_token must be >= 1, got {candidates_per_token}")
    if floor < 0 or floor * d_sae > budget or floor > n_tokens:
        raise ValueError(
            f"floor must be in [0, min(N, T / F)] = [0, {min(n_tokens, budget // d_sae)}] for "
            f"{n_tokens} tokens, k = {k} and {d_sae} latents; got {floor}"
        )
    if budget == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return ChoicePairs(empty, empty, x.new_zeros(0))
    if floor > 0:
        # Each latent's `floor` largest entries outrank every other entry; the
        # selection below then keeps them and fills the rest of T by value.
        scores = x.clone()
        top_tokens = torch.topk(x, floor, dim=0, sorted=False).indices  # (floor, F)
        scores.scatter_(0, top_tokens, float("inf"))
        pairs = mutual_choice_pairs(
            scores, k, method=method, candidates_per_token=candidates_per_token, validate=False
        )
        values = x[pairs.token_idx, pairs.latent_idx]  # (T,)
        return pairs._replace(values=values.relu())
    if method == "auto":
        method = "candidates" if x.device.type == "cpu" else "flat"
    c = min(candidates_per_token or default_candidates_per_token(k, d_sae), d_sae)
    with torch.no_grad():
        if method == "flat" or c * n_tokens <= budget or c == d_sae:
            values, positions = _flat_top(x, budget)  # (T,), (T,)
        else:
            cand_values, cand_indices = torch.topk(x, c, dim=-1, sorted=False)  # (N, c)
            values, flat_pos = torch.topk(cand_values.reshape(-1), budget, sorted=False)  # (T,)
            rows = torch.div(flat_pos, c, rounding_mode="floor")  # (T,)
            # A token whose every candidate was chosen may have more entries above
            # the global threshold than it was allowed to offer: only then is the
            # shortcut inexact.
            saturated = torch.bincount(rows, minlength=n_tokens) >= c  # (N,)
            if bool(saturated.any()):
                values, positions = _widen_candidates(
                    x, cand_values, cand_indices, saturated, budget
                )
            else:
                cols = cand_indices.reshape(-1).gather(0, flat_pos)  # (T,)
                positions = rows * d_sae + cols
        token_idx = torch.div(positions, d_sae, rounding_mode="floor")
        return ChoicePairs(token_idx, positions - token_idx * d_sae, values.relu())


# ---------------------------------------------------------------------------
# Feature Choice
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureChoicePlan:
    """How :func:`feature_choice` splits latents into groups of similar capacity.

    Each group ``(start, end, k)`` covers latents ``order[start:end]`` and uses a
    top-``k`` over tokens with ``k`` the largest capacity any of them can get.
    Zipf capacities put a few latents at up to N tokens and most at a handful:
    grouping avoids a top-N over every latent. ``order`` is ``None`` when the
    latents are already sorted by non-increasing bound (Zipf and uniform
    capacities are), which lets each group be a slice rather than a gather.
    """

    d_sae: int
    n_tokens: int
    groups: tuple[tuple[int, int, int], ...]
    order: torch.Tensor | None = None


def plan_feature_choice(
    capacity_bounds: torch.Tensor, n_tokens: int, growth: float = 2.0
) -> FeatureChoicePlan:
    """Group latents by the largest integer capacity each can receive.

    Args:
        capacity_bounds: (F,) upper bounds on the per-batch integer capacities
            (for :func:`round_capacities` of ``c``, ``floor(c) + 1`` capped at N).
        n_tokens: N, the number of tokens per batch the plan is for.
        growth: a new group starts when the bound falls below ``1/growth`` of
            the current group's ``k``.
    """
    bounds = capacity_bounds.detach().to("cpu", torch.int64)
    if bounds.ndim != 1:
        raise ValueError(f"capacity_bounds must be 1-D, got shape {tuple(bounds.shape)}")
    if int(bounds.min()) < 0 or int(bounds.max()) > n_tokens:
        raise ValueError(f"capacity_bounds must lie in [0, n_tokens={n_tokens}]")
    order: torch.Tensor | None = None
    if bool((bounds[1:] > bounds[:-1]).any()):
        order = torch.argsort(bounds, descending=True, stable=True)
        bounds = bounds[order]
    groups: list[tuple[int, int, int]] = []
    values = bounds.tolist()
    start = 0
    while start < len(values):
        k = values[start]
        if k == 0:
            break  # the remaining latents get no tokens in any batch
        end = start + 1
        while end < len(values) and values[end] * growth > k:
            end += 1
        groups.append((start, end, k))
        start = end
    return FeatureChoicePlan(
        d_sae=len(values),
        n_tokens=n_tokens,
        groups=tuple(groups),
        order=None if order is None else order.to(capacity_bounds.device),
    )


def _check_capacities(capacities: torch.Tensor, n_tokens: int, d_sae: int) -> None:
    if not isinstance(capacities, torch.Tensor):
        raise ValueError(f"capacities must be an integer tensor, got {type(capacities).__name__}")
    if capacities.shape != (d_sae,):
        raise ValueError(
            f"capacities must have shape (d_sae,) = ({d_sae},), got {tuple(capacities.shape)}"
        )
    if capacities.is_floating_point() or capacities.is_complex():
        raise ValueError(
            f"capacities must be integers (dtype {capacities.dtype}); use round_capacities(c) "
            "to turn expected counts into integers"
        )
    if bool((capacities < 0).any()):
        raise ValueError("capacities must be >= 0; got a negative capacity")
    if bool((capacities > n_tokens).any()):
        raise ValueError(
            f"capacities must be <= the number of tokens N={n_tokens}; "
            f"got a capacity of {int(capacities.max())}"
        )


def _check_plan_covers(plan: FeatureChoicePlan, capacities: torch.Tensor) -> None:
    # A group's top-k is the most any of its latents can keep: a capacity above it
    # would be cut down silently, so a plan built from other capacities is an error.
    bound = torch.zeros(plan.d_sae, dtype=torch.long)  # (F,), in plan order
    for start, end, k in plan.groups:
        bound[start:end] = k
    caps = capacities.detach().to("cpu", torch.long)
    if plan.order is not None:
        caps = caps.index_select(0, plan.order.to("cpu"))
    over = (caps > bound).nonzero()
    if over.numel() > 0:
        pos = int(over[0, 0])
        latent = pos if plan.order is None else int(plan.order[pos])
        raise ValueError(
            f"capacities exceed the plan's bounds: latent {latent} has capacity "
            f"{int(caps[pos])} but the plan allows at most {int(bound[pos])}; build the plan "
            "with plan_feature_choice(capacity_bounds(c, n_tokens), n_tokens) from the same "
            "expected capacities c"
        )


class FeatureChoiceOptions(TypedDict, total=False):
    """The keyword options of :func:`feature_choice_pairs`, which :func:`feature_choice` passes on."""

    plan: FeatureChoicePlan | None
    validate: bool


def feature_choice(
    hidden_pre: torch.Tensor, capacities: torch.Tensor, **options: Unpack[FeatureChoiceOptions]
) -> torch.Tensor:
    """Latent j keeps its ``capacities[j]`` largest tokens (positive values only).

    The dense form of :func:`feature_choice_pairs`, whose keyword options it takes.

    Args:
        hidden_pre: (..., F) pre-activations; the leading dimensions are tokens.
        capacities: (F,) integer tensor, each entry in [0, N].
        plan: grouping from :func:`plan_feature_choice`. Without one (the
            default), a single top-k with the largest capacity is used, which
            reads that maximum back from the device.
        validate: check capacities (against the plan's bounds too) and finiteness
            (device read-backs; default ``True``).

    The selection runs over tokens for each latent, so it works on the (F, N)
    transpose. When ``hidden_pre`` is itself a transposed view of an (F, N)
    contiguous tensor (the training SAE computes it that way) no copy is made.
    The result may then be a non-contiguous (N, F) view.
    """
    return pairs_to_dense(feature_choice_pairs(hidden_pre, capacities, **options), hidden_pre)


def feature_choice_pairs(
    hidden_pre: torch.Tensor,
    capacities: torch.Tensor,
    *,
    plan: FeatureChoicePlan | None = None,
    validate: bool = True,
) -> ChoicePairs:
    """The (token, latent) pairs :func:`feature_choice` keeps, with their values.

    Runs without autograd. Each plan group of ``g`` latents offers ``g * k``
    slots (``k`` the group's largest capacity); a slot beyond its latent's
    capacity, or whose value is not positive, is padding (value 0), so the
    number of pairs ``P = sum(g * k)`` is fixed by the plan, never by the data.
    Arguments as for :func:`feature_choice`.
    """
    x = _as_matrix(hidden_pre).detach()  # (N, F)
    n_tokens, d_sae = x.shape
    if validate:
        _check_capacities(capacities, n_tokens, d_sae)
        check_finite(x)
    if plan is None:
        k_max = int(capacities.max())
        plan = FeatureChoicePlan(
            d_sae=d_sae, n_tokens=n_tokens, groups=((0, d_sae, k_max),) if k_max > 0 else ()
        )
    elif plan.d_sae != d_sae or plan.n_tokens != n_tokens:
        raise ValueError(
            f"plan was made for (n_tokens={plan.n_tokens}, d_sae={plan.d_sae}) but hidden_pre "
            f"has (n_tokens={n_tokens}, d_sae={d_sae}); build it with plan_feature_choice"
        )
    elif validate:
        _check_plan_covers(plan, capacities)
    if not plan.groups:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return ChoicePairs(empty, empty, x.new_zeros(0))
    xt = x.t()  # (F, N)
    if not xt.is_contiguous():
        xt = xt.contiguous()
    caps = capacities.to(device=x.device, dtype=torch.long)
    tokens, latents_all, kept_values = [], [], []
    with torch.no_grad():
        for start, end, k in plan.groups:
            if plan.order is None:
                latents = torch.arange(start, end, device=x.device)  # (g,)
                block = xt[start:end]  # (g, N)
            else:
                latents = plan.order[start:end]  # (g,)
                block = xt.index_select(0, latents)  # (g, N)
            values, token_idx = torch.topk(block, k, dim=-1, sorted=True)  # (g, k)
            rank = torch.arange(k, device=x.device)
            keep = (rank[None, :] < caps.index_select(0, latents)[:, None]) & (values > 0)
            tokens.append(token_idx.reshape(-1))  # (g*k,)
            latents_all.append(latents[:, None].expand(-1, k).reshape(-1))  # (g*k,)
            kept_values.append(torch.where(keep, values, values.new_zeros(())).reshape(-1))
        return ChoicePairs(torch.cat(tokens), torch.cat(latents_all), torch.cat(kept_values))


# ---------------------------------------------------------------------------
# Capacities
# ---------------------------------------------------------------------------


def _check_capacity_args(n_tokens: int, d_sae: int, k: float) -> None:
    check_number(n_tokens, "n_tokens", integer=True, gt=0)
    check_number(d_sae, "d_sae", integer=True, gt=0)
    _check_k(k, d_sae)


def check_zipf_parameters(alpha: float, beta: float, owner: str | None = None) -> None:
    """Zipf–Mandelbrot capacity parameters: ``zipf_alpha > 0``, ``zipf_beta > -1``."""
    check_number(alpha, "zipf_alpha", owner=owner, gt=0)
    check_number(beta, "zipf_beta", owner=owner, gt=-1, hint="so that j + 1 + zipf_beta > 0")


def uniform_capacities(n_tokens: int, d_sae: int, k: float) -> torch.Tensor:
    """Expected tokens per latent when every latent gets the same share: T / F.

    Returns a float64 (F,) tensor summing to ``k * n_tokens``; since k <= F each
    entry is <= N.
    """
    _check_capacity_args(n_tokens, d_sae, k)
    return torch.full((d_sae,), k * n_tokens / d_sae, dtype=torch.float64)


def zipf_capacities(
    n_tokens: int, d_sae: int, k: float, alpha: float = 1.0, beta: float = 0.0
) -> torch.Tensor:
    """Expected tokens per latent following a Zipf–Mandelbrot law over latent index.

    ``c_j`` is proportional to ``(j + 1 + beta) ** -alpha``, so low-index latents
    are the frequent ones (this breaks the symmetry between latents). Any
    ``c_j`` above N is clipped to N and the excess is re-spread over the other
    latents in proportion to their weights (water-filling), so the total stays
    ``k * n_tokens``.

    Returns:
        float64 (F,) tensor, non-increasing, each entry in (0, N].
    """
    _check_capacity_args(n_tokens, d_sae, k)
    check_zipf_parameters(alpha, beta)
    total = k * n_tokens
    weights = (torch.arange(d_sae, dtype=torch.float64) + 1.0 + beta).pow(-alpha)
    # Weights decrease with j, so the clipped latents are always a prefix: find
    # the shortest prefix p such that spreading the rest leaves latent p under N.
    capacities = torch.empty(d_sae, dtype=torch.float64)
    tail_weight = torch.flip(torch.cumsum(torch.flip(weights, [0]), 0), [0])  # sum_{i>=p} w_i
    for p in range(d_sae + 1):
        if p == d_sae:
            # k <= F guarantees total <= F * N, so every latent is at N.
            capacities.fill_(float(n_tokens))
            break
        remaining = total - p * n_tokens
        share = remaining * weights[p] / tail_weight[p]
        if share <= n_tokens:
            capacities[:p] = float(n_tokens)
            capacities[p:] = remaining * weights[p:] / tail_weight[p]
            break
    return capacities


#: Fractional part of the golden ratio: the Weyl sequence ``frac(t * GOLDEN)`` is
#: equidistributed in [0, 1) with the lowest discrepancy of any such sequence.
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def rounding_offset(step: int | torch.Tensor, seed: int = 0) -> float | torch.Tensor:
    """The systematic-rounding offset of batch ``step``: ``frac(0.5 + (seed + step) * GOLDEN)``.

    Deterministic, so a resumed run and every data-parallel rank draw the same
    capacities as the uninterrupted single-process run; equidistributed in
    [0, 1), so over many batches each latent's mean capacity is exactly its
    expected capacity (the error after t batches is O(log t / t)), which a
    random offset only reaches in expectation. The sequence starts at 0.5, away
    from the ends of [0, 1) where float error in the cumulative capacities
    could move a floor.

    ``step`` may be a tensor (an int64 step counter on the device): the
    offset is then computed there, as a 0-d float64 tensor, with no read-back.
    """
    if isinstance(step, torch.Tensor):
        return torch.frac(0.5 + (step.to(torch.float64) + seed) * GOLDEN)
    check_number(step, "step", integer=True, ge=0)
    check_number(seed, "seed", integer=True, ge=0)
    return math.fmod(0.5 + (seed + step) * GOLDEN, 1.0)


def round_capacities(
    capacities: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    offset: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer capacities for one batch, unbiased and with a fixed total.

    Systematic rounding: with one offset ``u`` in [0, 1) and cumulative sums
    ``C_j``, ``m_j = floor(C_j + u) - floor(C_{j-1} + u)``. Each ``m_j`` is
    ``floor(c_j)`` or ``ceil(c_j)``, ``E[m_j] = c_j`` for a uniform ``u``, and
    ``sum m_j`` equals the total exactly when the total is an integer (else
    its floor or ceil, with the right expectation). A latent with ``c_j < 1``
    gets one token on a fraction ``c_j`` of batches, so it cannot die.

    Args:
        capacities: (F,) expected capacities.
        generator: draws ``u`` uniformly (torch's global RNG when ``None``).
        offset: use this ``u`` instead of drawing one: a float, or a 0-d
            tensor (not checked, so it can stay on the device). Training uses
            :func:`rounding_offset`, so runs are reproducible and resumable.

    Runs on the capacities' device without reading anything back.
    """
    if capacities.ndim != 1:
        raise ValueError(f"capacities must be 1-D, got shape {tuple(capacities.shape)}")
    c = capacities.to(torch.float64)
    if isinstance(offset, torch.Tensor):
        u = offset.to(device=c.device, dtype=torch.float64).reshape(())
    elif offset is not None:
        check_number(offset, "offset", ge=0, lt=1)
        u = torch.tensor(offset, dtype=torch.float64).to(c.device)
    elif generator is not None and generator.device != c.device:
        u = torch.rand((), generator=generator, dtype=torch.float64).to(c.device)
    else:
        u = torch.rand((), generator=generator, dtype=torch.float64, device=c.device)
    cumulative = torch.floor(torch.cumsum(c, 0) + u)  # (F,)
    previous = torch.cat([torch.floor(u).reshape(1), cumulative[:-1]])
    # Floating error can only nudge a floor across an integer; clamp to the
    # bounds the exact arithmetic guarantees.
    return (cumulative - previous).clamp_(torch.floor(c), torch.ceil(c)).to(torch.long)


def capacity_bounds(capacities: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The largest integer :func:`round_capacities` can give each latent."""
    return torch.ceil(capacities.to(torch.float64)).clamp(max=n_tokens).to(torch.long)
